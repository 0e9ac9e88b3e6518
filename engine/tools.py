"""Tool calling: how tools reach the prompt, and how the model's tool calls are read back.

A chat template that knows tools (it mentions `tools`, as Qwen's, Hermes', Llama 3.1's do) gets them as
transformers passes them: `tools=[...]` and assistant messages with `tool_calls` (arguments as objects).
A template that does not (SmolLM2's) gets the default format, Hermes-style:

- the tool definitions go into the system message (a system message is added if there is none), with the
  instruction to answer a call as `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
- an assistant message's `tool_calls` are written back in that form after its content;
- a `tool` message becomes a `user` message `<tool_response>\\n...\\n</tool_response>`.

The model's output is read with `ToolCallParser`: text before the first `<tool_call>` is content, each
complete block whose JSON names a declared function with object arguments is a tool call, anything else
stays content. Streaming and whole answers use the same parser, so they always agree.
No torch here: the gateway imports this to bound the prompt.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"

_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}}\n</tool_call>"
)


def template_supports_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def tools_system_text(tools: list[dict]) -> str:
    """The default format's tool block (`tools` as OpenAI sends them: {"type": "function", "function": ...})."""
    return _SYSTEM.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))


def _arguments(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def format_call(name: str, arguments: str) -> str:
    """One tool call in the default format (arguments: the JSON text the API carries)."""
    args = _arguments(arguments)
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


def render(messages: list[dict], tools: list[dict] | None, *, native: bool) -> tuple[list[dict], dict]:
    """Messages (OpenAI shape, `tool_calls` with string arguments) and template kwargs for a template that
    supports tools (`native`) or for the default format."""
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, ({"tools": tools} if tools else {})
    out = []
    for m in messages:
        role, content = m["role"], m.get("content")
        if role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content or ''}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(format_call(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            out.append({"role": role, "content": f"{content}\n{calls}" if content else calls})
        else:
            out.append({k: v for k, v in m.items() if k != "tool_calls"})
    if tools:
        block = tools_system_text(tools)
        if out and out[0]["role"] in ("system", "developer") and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out, {}


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON text

    def api(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(block: str, names: set[str], index: int) -> ToolCall | None:
    try:
        value = json.loads(block)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in names:
        return None
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(index, f"call_{uuid.uuid4().hex[:24]}", value["name"],
                    json.dumps(arguments, ensure_ascii=False))


class ToolCallParser:
    """Incremental: `feed(text)` returns the content that is certainly not part of a tool call and the
    calls completed so far; `finish()` returns what was held back (an unfinished block is content)."""

    def __init__(self, names: set[str]):
        self.names = names
        self.buffer = ""
        self.calls: list[ToolCall] = []
        self.content = ""  # all content returned so far

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buffer += text
        content, calls = "", []
        while True:
            start = self.buffer.find(TOOL_CALL_OPEN)
            if start < 0:
                keep = _partial_suffix(self.buffer, TOOL_CALL_OPEN)
                content += self.buffer[:len(self.buffer) - keep]
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            end = self.buffer.find(TOOL_CALL_CLOSE, start)
            if end < 0:
                content += self.buffer[:start]
                self.buffer = self.buffer[start:]
                break
            block = self.buffer[start + len(TOOL_CALL_OPEN):end]
            call = _call(block.strip(), self.names, len(self.calls))
            if call is None:
                content += self.buffer[:end + len(TOOL_CALL_CLOSE)]
            else:
                content += self.buffer[:start]
                self.calls.append(call)
                calls.append(call)
            self.buffer = self.buffer[end + len(TOOL_CALL_CLOSE):]
        if self.calls:  # between and after calls only whitespace is expected; keep it out of the content
            content = content if content.strip() else ""
        self.content += content
        return content, calls

    def finish(self) -> str:
        rest, self.buffer = self.buffer, ""
        if self.calls and not rest.strip():
            rest = ""
        self.content += rest
        return rest


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


def parse(text: str, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """A whole answer: (content or None, tool calls)."""
    parser = ToolCallParser(names)
    parser.feed(text)
    parser.finish()
    content = parser.content.strip() if parser.calls else parser.content
    return (content or None) if parser.calls else content, parser.calls
