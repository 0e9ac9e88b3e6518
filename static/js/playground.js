/* The playground: builds a chat completion request from the form, streams it from the gateway with the
   login session (the CSRF token in X-CSRFToken, never an API key), shows the answer token by token, the
   usage, time to first token and latency, and the same request as curl / Python / JavaScript. */
(function () {
  "use strict";

  var root = document.getElementById("playground");
  if (!root) return;
  var $ = function (id) { return document.getElementById(id); };
  var endpoint = root.getAttribute("data-endpoint");
  var baseUrl = root.getAttribute("data-base-url");
  var csrf = root.querySelector("input[name=csrfmiddlewaretoken]").value;
  var history = [];  // the conversation so far: {role, content}
  var controller = null;
  var lastBody = null;  // the last request sent: "view code" shows it while the message box is empty

  function showError(message) {
    var box = $("pg-error");
    box.textContent = message;
    box.hidden = !message;
  }

  function parseJSONField(id, what) {
    var text = $(id).value.trim();
    if (!text) return undefined;
    try { return JSON.parse(text); } catch (e) { throw new Error(what + " is not valid JSON: " + e.message); }
  }

  function numberField(id) {
    var value = $(id).value.trim();
    return value === "" ? undefined : Number(value);
  }

  /* The request body without the conversation's last turn appended (that is `pending`). */
  function buildBody(pending) {
    var messages = [];
    var system = $("pg-system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages = messages.concat(history);
    if (pending) messages.push({ role: "user", content: pending });
    var body = { model: $("pg-model").value, messages: messages };
    var temperature = numberField("pg-temperature"), topP = numberField("pg-top-p"), maxTokens = numberField("pg-max-tokens");
    if (temperature !== undefined) body.temperature = temperature;
    if (topP !== undefined) body.top_p = topP;
    if (maxTokens !== undefined) body.max_tokens = maxTokens;
    var format = $("pg-format").value;
    if (format === "json_object") body.response_format = { type: "json_object" };
    if (format === "json_schema") {
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: parseJSONField("pg-schema", "The JSON schema") } };
    }
    var tools = parseJSONField("pg-tools", "Tools");
    if (tools !== undefined) body.tools = tools;
    body.stream = true;
    body.stream_options = { include_usage: true };
    return body;
  }

  function addMessage(role, text) {
    var item = document.createElement("li");
    item.className = "turn turn-" + role;
    var who = document.createElement("span");
    who.className = "turn-role";
    who.textContent = role === "user" ? "You" : role === "assistant" ? "Assistant" : role;
    var content = document.createElement("div");
    content.className = "turn-content";
    content.textContent = text;
    item.appendChild(who);
    item.appendChild(content);
    $("pg-transcript").appendChild(item);
    return content;
  }

  function setBusy(busy) {
    $("pg-send").disabled = busy;
    $("pg-stop").disabled = !busy;
  }

  function ms(value) { return value === null ? "–" : Math.round(value) + " ms"; }

  /* Server-sent events from a fetch body: calls onData with each parsed `data:` payload. */
  async function readEvents(response, onData) {
    var reader = response.body.getReader();
    var decoder = new TextDecoder();
    var buffer = "";
    for (;;) {
      var part = await reader.read();
      if (part.done) break;
      buffer += decoder.decode(part.value, { stream: true });
      var events = buffer.split("\n\n");
      buffer = events.pop();
      events.forEach(function (event) {
        event.split("\n").forEach(function (line) {
          if (line.indexOf("data:") !== 0) return;
          var data = line.slice(5).trim();
          if (data && data !== "[DONE]") onData(JSON.parse(data));
        });
      });
    }
  }

  async function send(text) {
    showError("");
    var body;
    try { body = buildBody(text); } catch (e) { showError(e.message); return; }
    lastBody = body;
    addMessage("user", text);
    var output = addMessage("assistant", "");
    output.parentNode.classList.add("streaming");
    var answer = "", toolCalls = [], usage = null, finish = null, firstToken = null;
    var started = performance.now();
    controller = new AbortController();
    setBusy(true);
    $("pg-status").textContent = "Streaming…";
    $("pg-ttft").textContent = "–"; $("pg-latency").textContent = "–"; $("pg-usage").textContent = "–";
    try {
      var response = await fetch(endpoint, {
        method: "POST",
        credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrf },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      $("pg-request-id").textContent = response.headers.get("x-request-id") || "–";
      if (!response.ok) {
        var detail = await response.json().catch(function () { return {}; });
        throw new Error((detail.error && detail.error.message) || ("The gateway answered " + response.status + "."));
      }
      await readEvents(response, function (chunk) {
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        (chunk.choices || []).forEach(function (choice) {
          var delta = choice.delta || {};
          if (delta.content) {
            if (firstToken === null) { firstToken = performance.now() - started; $("pg-ttft").textContent = ms(firstToken); }
            answer += delta.content;
            output.textContent = answer;
          }
          (delta.tool_calls || []).forEach(function (call) {
            if (firstToken === null) { firstToken = performance.now() - started; $("pg-ttft").textContent = ms(firstToken); }
            var into = toolCalls[call.index] || (toolCalls[call.index] = { id: call.id, type: "function", function: { name: "", arguments: "" } });
            if (call.function && call.function.name) into.function.name += call.function.name;
            if (call.function && call.function.arguments) into.function.arguments += call.function.arguments;
            output.textContent = answer + toolCalls.map(function (c) { return "\n→ " + c.function.name + "(" + c.function.arguments + ")"; }).join("");
          });
          if (choice.finish_reason) finish = choice.finish_reason;
        });
      });
      $("pg-status").textContent = "Done" + (finish ? " (" + finish + ")" : "");
      var turn = { role: "assistant", content: answer };
      if (toolCalls.length) turn.tool_calls = toolCalls;
      history.push({ role: "user", content: text }, turn);
    } catch (e) {
      if (e.name === "AbortError") {
        $("pg-status").textContent = "Stopped";
        history.push({ role: "user", content: text }, { role: "assistant", content: answer });
      } else {
        $("pg-status").textContent = "Failed";
        showError(e.message);
        output.parentNode.remove();
      }
    } finally {
      output.parentNode.classList.remove("streaming");
      $("pg-latency").textContent = ms(performance.now() - started);
      if (usage) {
        $("pg-usage").textContent = usage.prompt_tokens + " prompt + " + usage.completion_tokens + " completion = " + usage.total_tokens;
      }
      controller = null;
      setBusy(false);
      renderCode();
    }
  }

  /* ---- view code ---- */

  function pyLiteral(value, indent) {
    var pad = "    ".repeat(indent + 1), end = "    ".repeat(indent);
    if (value === null) return "None";
    if (value === true) return "True";
    if (value === false) return "False";
    if (Array.isArray(value)) {
      if (!value.length) return "[]";
      return "[\n" + value.map(function (v) { return pad + pyLiteral(v, indent + 1); }).join(",\n") + ",\n" + end + "]";
    }
    if (typeof value === "object") {
      var keys = Object.keys(value);
      if (!keys.length) return "{}";
      return "{\n" + keys.map(function (k) { return pad + JSON.stringify(k) + ": " + pyLiteral(value[k], indent + 1); }).join(",\n") + ",\n" + end + "}";
    }
    return JSON.stringify(value);
  }

  function snippets(body) {
    var args = Object.assign({}, body);
    delete args.stream_options;
    var json = JSON.stringify(args, null, 2);
    var curl = "curl " + baseUrl + "/chat/completions \\\n" +
      "  -H \"Authorization: Bearer $MAAS_API_KEY\" \\\n" +
      "  -H \"Content-Type: application/json\" \\\n" +
      "  -d '" + json.replace(/'/g, "'\\''") + "'";
    var kwargs = Object.keys(args).map(function (k) { return "    " + k + "=" + pyLiteral(args[k], 1) + ","; }).join("\n");
    var python = "import os\n\nfrom openai import OpenAI\n\n" +
      "client = OpenAI(base_url=\"" + baseUrl + "\", api_key=os.environ[\"MAAS_API_KEY\"])\n" +
      "stream = client.chat.completions.create(\n" + kwargs + "\n)\n" +
      "for chunk in stream:\n    if chunk.choices and chunk.choices[0].delta.content:\n" +
      "        print(chunk.choices[0].delta.content, end=\"\", flush=True)\nprint()\n";
    var javascript = "import OpenAI from \"openai\";\n\n" +
      "const client = new OpenAI({ baseURL: \"" + baseUrl + "\", apiKey: process.env.MAAS_API_KEY });\n" +
      "const stream = await client.chat.completions.create(" + json + ");\n" +
      "for await (const chunk of stream) {\n  process.stdout.write(chunk.choices[0]?.delta?.content ?? \"\");\n}\n";
    return { curl: curl, python: python, javascript: javascript };
  }

  function renderCode() {
    var pending = $("pg-message").value.trim();
    var body = !pending && lastBody;
    if (!body) {
      try { body = buildBody(pending || "Hello!"); } catch (e) { return; }
    }
    var code = snippets(body);
    $("code-curl").textContent = code.curl;
    $("code-python").textContent = code.python;
    $("code-javascript").textContent = code.javascript;
  }

  $("pg-format").addEventListener("change", function () {
    $("pg-schema-field").hidden = this.value !== "json_schema";
    lastBody = null;
    renderCode();
  });
  $("playground-settings").addEventListener("input", function () { lastBody = null; renderCode(); });
  $("playground-settings").addEventListener("submit", function (event) { event.preventDefault(); });
  $("pg-message").addEventListener("input", renderCode);
  $("pg-compose").addEventListener("submit", function (event) {
    event.preventDefault();
    var text = $("pg-message").value.trim();
    if (!text || controller) return;
    $("pg-message").value = "";
    send(text);
  });
  $("pg-message").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("pg-compose").requestSubmit();
  });
  $("pg-stop").addEventListener("click", function () { if (controller) controller.abort(); });
  $("pg-clear").addEventListener("click", function () {
    history = [];
    lastBody = null;
    $("pg-transcript").textContent = "";
    showError("");
    renderCode();
  });
  renderCode();
})();
