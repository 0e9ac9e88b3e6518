/* Console behaviour, no dependencies: copy-to-clipboard for the one-time key reveal, tabs,
   confirmation before destructive forms. Everything works without it (forms still post). */
(function () {
  "use strict";

  function copyText(input, status) {
    var text = input.value;
    var done = function (ok) {
      if (status) status.textContent = ok ? "Copied to the clipboard." : "Press Ctrl+C (⌘C) to copy the selected key.";
    };
    input.focus();
    input.select();
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { done(true); }, function () { done(document.execCommand("copy")); });
    } else {
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
      done(ok);
    }
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy-target]");
    if (!button) return;
    var input = document.getElementById(button.getAttribute("data-copy-target"));
    var statusId = button.getAttribute("aria-describedby");
    if (input) copyText(input, statusId ? document.getElementById(statusId) : null);
  });

  document.addEventListener("focusin", function (event) {
    if (event.target.matches && event.target.matches("[data-select-on-focus]")) event.target.select();
  });

  // Tabs: a [role=tab] shows the panel it controls and hides its siblings' panels.
  document.addEventListener("click", function (event) {
    var tab = event.target.closest("[role=tab]");
    if (!tab) return;
    tab.parentNode.querySelectorAll("[role=tab]").forEach(function (other) {
      var selected = other === tab;
      other.setAttribute("aria-selected", selected ? "true" : "false");
      var panel = document.getElementById(other.getAttribute("aria-controls"));
      if (panel) panel.hidden = !selected;
    });
  });

  document.addEventListener("submit", function (event) {
    var message = event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) event.preventDefault();
  });
})();
