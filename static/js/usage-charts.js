/* The usage page's charts, drawn with the vendored Chart.js (static/vendor/) from the JSON the page
   embeds (#usage-charts, built by inference/charts.py). The tables on the page hold the same numbers. */
(function () {
  "use strict";

  var source = document.getElementById("usage-charts");
  if (!source || !window.Chart) return;
  var data = JSON.parse(source.textContent);
  // Okabe-Ito: distinguishable with the common colour-vision deficiencies.
  var PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"];
  var integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  var money = new Intl.NumberFormat("en-US", { maximumSignificantDigits: 6 });
  var days = data.by_day.days.map(function (day) { return day.slice(5); });  // MM-DD on the axis

  Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
  Chart.defaults.color = "#5b6475";
  Chart.defaults.maintainAspectRatio = false;
  Chart.defaults.plugins.legend.position = "bottom";
  Chart.defaults.datasets.bar.maxBarThickness = 40;

  function axis(title, format) {
    return { beginAtZero: true, title: { display: true, text: title }, ticks: { callback: function (v) { return format(v); } } };
  }

  function tooltip(format, unit) {
    return {
      mode: "index", intersect: false,
      callbacks: {
        title: function (items) { return items.length ? data.by_day.days[items[0].dataIndex] + " (UTC)" : ""; },
        label: function (item) {
          var value = item.parsed.y === undefined || item.parsed.y === null ? null : item.parsed.y;
          return item.dataset.label + ": " + (value === null ? "no data" : format(value) + unit);
        },
      },
    };
  }

  function perModel(field) {
    return Object.keys(data.by_day.models).map(function (model, i) {
      return { label: model, data: data.by_day.models[model][field], backgroundColor: PALETTE[i % PALETTE.length], stack: "models" };
    });
  }

  function stackedBars(id, field, title, format, unit) {
    new Chart(document.getElementById(id), {
      type: "bar",
      data: { labels: days, datasets: perModel(field) },
      options: {
        scales: { x: { stacked: true, title: { display: true, text: "Day (UTC)" } }, y: Object.assign(axis(title, format), { stacked: true }) },
        plugins: { tooltip: tooltip(format, unit) },
      },
    });
  }

  function sum(field) {
    return days.map(function (_, i) {
      return Object.keys(data.by_day.models).reduce(function (total, model) { return total + data.by_day.models[model][field][i]; }, 0);
    });
  }

  stackedBars("chart-tokens", "total_tokens", "Tokens", function (v) { return integer.format(v); }, " tokens");
  stackedBars("chart-cost", "cost", "Cost", function (v) { return money.format(v); }, "");

  var failed = sum("failed_requests");
  var completed = sum("requests").map(function (n, i) { return n - failed[i]; });
  new Chart(document.getElementById("chart-requests"), {
    type: "bar",
    data: {
      labels: days,
      datasets: [
        { label: "Completed", data: completed, backgroundColor: "#009E73", stack: "requests" },
        { label: "Failed or cut", data: failed, backgroundColor: "#D55E00", stack: "requests" },
      ],
    },
    options: {
      scales: { x: { stacked: true, title: { display: true, text: "Day (UTC)" } }, y: Object.assign(axis("Requests", function (v) { return Number.isInteger(v) ? integer.format(v) : ""; }), { stacked: true }) },
      plugins: { tooltip: tooltip(function (v) { return integer.format(v); }, " requests") },
    },
  });

  var t = data.timings;
  function line(label, values, color, dashed) {
    return { label: label, data: values, borderColor: color, backgroundColor: color, borderDash: dashed ? [6, 4] : [], spanGaps: true, tension: 0.2, pointRadius: 3 };
  }
  new Chart(document.getElementById("chart-latency"), {
    type: "line",
    data: {
      labels: days,
      datasets: [
        line("Time to first token, median", t.ttft_p50, "#0072B2", false),
        line("Time to first token, p95", t.ttft_p95, "#0072B2", true),
        line("Latency, median", t.latency_p50, "#E69F00", false),
        line("Latency, p95", t.latency_p95, "#E69F00", true),
      ],
    },
    options: {
      scales: { x: { title: { display: true, text: "Day (UTC)" } }, y: axis("Milliseconds", function (v) { return integer.format(v) + " ms"; }) },
      plugins: { tooltip: tooltip(function (v) { return integer.format(v); }, " ms") },
    },
  });

  new Chart(document.getElementById("chart-keys"), {
    type: "bar",
    data: {
      labels: data.by_key.map(function (row) { return row.label; }),
      datasets: [{ label: "Tokens", data: data.by_key.map(function (row) { return row.total_tokens; }), backgroundColor: "#0072B2", maxBarThickness: 40 }],
    },
    options: {
      indexAxis: "y",
      scales: { x: axis("Tokens", function (v) { return integer.format(v); }) },
      plugins: {
        legend: { display: false },
        tooltip: { callbacks: { label: function (item) {
          var row = data.by_key[item.dataIndex];
          return integer.format(row.total_tokens) + " tokens, " + integer.format(row.requests) + " requests, cost " + money.format(row.cost);
        } } },
      },
    },
  });
  document.documentElement.setAttribute("data-charts", "drawn");
})();
