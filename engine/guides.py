"""Grammars for constrained decoding, as llguidance Lark text (no torch, no llguidance: the gateway imports
this through `engine.schema`).

A `Guide` says what the whole output must match: one JSON value for `response_format`, the tool-call
blocks of the default tool format (`engine.tools`) for `tool_choice` "required" or a named function, or
what vLLM's `guided_*` / `structured_outputs` fields ask for (a JSON schema, a regular expression, one of
a list of strings, a Lark grammar).
The engine compiles it (`engine.structured`) once per distinct grammar and masks each constrained row of
the batch with it. JSON is generated with `", "` and `": "` separators and no other whitespace, so a weak
model cannot wander off into endless newlines inside a value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.tools import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

# llguidance's JSON options (its "x-guidance" key): compact JSON with the usual separators.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT: dict = {"type": "object"}


@dataclass(frozen=True)
class Guide:
    """A grammar the output must match. `param` is the request field a compile error is blamed on;
    `parts` are (param, grammar) pairs checked one by one to name the culprit more precisely."""

    grammar: str
    param: str = "response_format"
    parts: tuple[tuple[str, str], ...] = ()


def _json(schema: dict) -> str:
    """A `%json` item: one JSON document of its own (its `$ref`s resolve against `schema`)."""
    return "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}, ensure_ascii=False)


def _literal(text: str) -> str:
    return json.dumps(text)  # a Lark string literal has JSON's escapes


def json_guide(schema: dict | None, param: str = "response_format") -> Guide:
    """The output is one JSON value matching `schema` (None: any JSON object, i.e. json_object)."""
    return Guide(f"start: {_json(schema if schema is not None else ANY_OBJECT)}\n", param)


def regex_guide(pattern: str, param: str = "guided_regex") -> Guide:
    """The output matches the regular expression (llguidance's syntax: Rust regex, no look-around or
    back-references), as a Lark regex token: unescaped slashes and raw line breaks are escaped."""
    escaped, i = [], 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\" and i + 1 < len(pattern):
            escaped.append(pattern[i:i + 2])
            i += 2
            continue
        escaped.append({"/": "\\/", "\n": "\\n", "\r": "\\r"}.get(char, char))
        i += 1
    return Guide(f"start: /{''.join(escaped)}/\n", param)


def choice_guide(choices: list[str], param: str = "guided_choice") -> Guide:
    """The output is exactly one of `choices`."""
    return Guide("start: " + " | ".join(_literal(c) for c in choices) + "\n", param)


def grammar_guide(grammar: str, param: str = "guided_grammar") -> Guide:
    """The output matches a grammar in llguidance's Lark syntax (which also embeds `%json {...}` schemas)."""
    return Guide(grammar if grammar.endswith("\n") else grammar + "\n", param)


def _tool_rules(functions: list[tuple[str, dict | None]]) -> list[str]:
    """`call: <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>` for each function, with the
    name a literal (so it comes first, and only declared names can appear) and the arguments their schema."""
    rules = ["call: " + _literal(TOOL_CALL_OPEN + "\n") + " body " + _literal("\n" + TOOL_CALL_CLOSE)]
    alternatives = []
    for i, (name, parameters) in enumerate(functions):
        head = _literal(json.dumps({"name": name})[:-1] + ', "arguments": ')
        rules.append(f"fn_{i}: {head} {_json(parameters if parameters is not None else ANY_OBJECT)} \"}}\"")
        alternatives.append(f"fn_{i}")
    rules.append("body: " + " | ".join(alternatives))
    return rules


def tool_calls_guide(functions: list[tuple[str, dict | None]], *, parallel: bool,
                     answer: dict | None = None, param: str = "tools") -> Guide:
    """The output is tool calls only: one (`parallel` False) or one or more separated by newlines.
    With `answer` (a JSON schema) the output may instead be one JSON answer (tool_choice auto with
    response_format)."""
    calls = 'call ("\\n" call)*' if parallel else "call"
    start = f"start: {calls} | answer" if answer is not None else f"start: {calls}"
    rules = [start, *_tool_rules(functions)]
    if answer is not None:
        rules.append(f"answer: {_json(answer)}")
    parts = tuple((f"tools[{i}].function.parameters", json_guide(p).grammar)
                  for i, (_, p) in enumerate(functions) if p is not None)
    return Guide("\n".join(rules) + "\n", param, parts)
