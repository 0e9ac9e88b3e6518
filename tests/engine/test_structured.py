"""Structured outputs and tool calls in the engine: the request schema's new fields, grammar compilation and
its cache, the per-row mask in the batched sampler, finishing and failing per sequence, and the tool-call
parser (fast: a tiny random-weight checkpoint, whose output only the grammar makes valid)."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

from engine import LLM, SamplingParams
from engine import schema as request_schema
from engine.guides import json_guide, tool_calls_guide
from engine.sampler import Sampler
from engine.sequence import Sequence
from engine.structured import GrammarError, apply_grammar_masks
from engine.tools import ToolCallParser, parse, render
from tests.engine.checkpoints import tiny_checkpoint
from tests.engine.structured_schemas import SCHEMAS

torch.set_num_threads(2)
MESSAGES = [{"role": "user", "content": "hi"}]
POINT = {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                          "ok": {"type": "boolean"}},
         "required": ["x", "ok"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def llm():
    return LLM(str(tiny_checkpoint("llama")), block_size=4, num_kv_blocks=256)


def chat(**fields):
    return request_schema.parse_chat({"model": "m", "messages": MESSAGES, **fields})


def refused(parse, body) -> request_schema.RequestError:
    with pytest.raises(request_schema.RequestError) as err:
        parse(body)
    return err.value


# -- the request schema ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "param", "code"), [
    ({"response_format": {"type": "grammar"}}, "response_format.type", "invalid_value"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "missing_required_parameter"),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}}, "response_format.json_schema",
     "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!"}}},
     "response_format.json_schema.name", "invalid_value"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": True}}},
     "response_format.json_schema.schema", "invalid_value"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type", "invalid_value"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "invalid_value"),
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", "invalid_type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "invalid_value"),
    ({"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
    ({"function_call": "auto"}, "function_call", "unsupported_parameter"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages[0].tool_calls", "invalid_value"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id", "missing_required_parameter"),
])
def test_unsupported_or_invalid_structured_fields_are_400s_naming_the_field(fields, param, code):
    error = refused(request_schema.parse_chat, {"model": "m", "messages": MESSAGES, **fields})
    assert (error.param, error.code) == (param, code), error.message


def test_tools_are_refused_on_legacy_completions_but_response_format_is_not():
    error = refused(request_schema.parse_completion, {"model": "m", "prompt": "x", "tools": [WEATHER]})
    assert (error.param, error.code) == ("tools", "unsupported_parameter")
    request = request_schema.parse_completion({"model": "m", "prompt": "x", "response_format": {"type": "json_object"}})
    assert request.sampling_params().guide == json_guide(None)


def test_the_guide_follows_response_format_and_tool_choice():
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": POINT, "strict": True}}
    assert chat(response_format=fmt).sampling_params().guide == json_guide(POINT)
    assert chat(response_format={"type": "text"}).sampling_params().guide is None
    assert chat(tools=[WEATHER]).sampling_params().guide is None  # auto, free text: calls are parsed
    assert chat(tools=[WEATHER], tool_choice="none", response_format=fmt).sampling_params().guide == json_guide(POINT)
    functions = [("get_weather", WEATHER["function"]["parameters"])]
    assert chat(tools=[WEATHER], tool_choice="required").sampling_params().guide == tool_calls_guide(
        functions, parallel=True)
    named = chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}},
                 parallel_tool_calls=True).sampling_params().guide
    assert named == tool_calls_guide(functions, parallel=False, param="tool_choice")
    assert chat(tools=[WEATHER], response_format=fmt).sampling_params().guide == tool_calls_guide(
        functions, parallel=True, answer=POINT)


def test_the_prompt_bound_counts_tool_definitions_and_tool_calls():
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "7 degrees"}]
    plain = chat().prompt_bytes()
    with_tools = request_schema.parse_chat({"model": "m", "messages": history, "tools": [WEATHER]})
    messages, _ = render(with_tools.template_messages(), with_tools.template_tools(), native=False)
    rendered = sum(len(m["content"].encode()) + len(m["role"]) for m in messages)
    assert with_tools.prompt_bytes() >= rendered > plain + len(json.dumps(WEATHER))


# -- compilation, masks, finishing ----------------------------------------------------------------------
def test_a_schema_is_compiled_once_and_one_llguidance_refuses_names_its_field(llm):
    grammars = llm.engine.grammars
    before = grammars.compiled
    guide = json_guide({"type": "object", "properties": {"cache": {"type": "integer"}}})
    assert grammars.compile(guide) is grammars.compile(guide)
    assert grammars.compiled == before + 1
    with pytest.raises(GrammarError) as err:
        grammars.compile(json_guide({"type": "string", "pattern": "(?<=a)b"}))
    assert err.value.param == "response_format" and "look-around" in str(err.value)
    bad_tool = ("g", {"$ref": "#/$defs/missing"})
    with pytest.raises(GrammarError) as err:
        grammars.compile(tool_calls_guide([("f", None), bad_tool], parallel=False))
    assert err.value.param == "tools[1].function.parameters"


def test_constrained_and_free_rows_share_a_batch_and_only_the_constrained_row_is_masked(llm):
    grammars = llm.engine.grammars
    vocab = llm.engine.loaded.spec.vocab_size
    free = Sequence("free", [1, 2], SamplingParams(temperature=0), 8)
    constrained = Sequence("json", [1, 2], SamplingParams(temperature=0), 8)
    constrained.grammar = grammars.matcher(json_guide(POINT))
    logits = torch.randn(2, vocab, generator=torch.Generator().manual_seed(0))
    result = Sampler()(logits, [free, constrained])
    assert result.token_ids[0] == int(logits[0].argmax())  # the free row: untouched
    opening = llm.tokenizer.decode([result.token_ids[1]])
    assert opening and '{"'.startswith(opening)  # the JSON row: only the start of {"x"... or {"ok"...
    masked = logits.clone()
    apply_grammar_masks(masked, [1], [constrained])
    assert torch.equal(masked[0], logits[0]) and 0 < int(torch.isfinite(masked[1]).sum()) < vocab


def test_sampled_answers_that_stop_validate_against_their_schema(llm):
    """All the suite's schemas, three sampled choices each, in one batch on a random-weight model: every
    token it emits is one the grammar allowed, so every answer that stops validates; most do stop."""
    cases = [(what, schema) for what, schema in SCHEMAS for _ in range(3)]
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=48, guide=json_guide(schema))
              for i, (_, schema) in enumerate(cases)]
    outs = llm.generate([f"Give {what} as JSON." for what, _ in cases], params)
    stopped = 0
    for out, (_, schema) in zip(outs, cases, strict=True):
        choice = out.outputs[0]
        assert choice.finish_reason in ("stop", "length")
        if choice.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(choice.text), schema)
    assert len(SCHEMAS) >= 20 and stopped >= len(cases) // 2


def test_a_grammar_that_completes_stops_the_sequence_and_a_cut_one_is_length(llm):
    done = llm.generate("x", SamplingParams(temperature=0, max_tokens=40, guide=json_guide({"enum": [True, False]})))
    assert done[0].outputs[0].finish_reason == "stop" and done[0].outputs[0].text in ("true", "false")
    cut = llm.generate("x", SamplingParams(temperature=0, max_tokens=3, guide=json_guide(
        {"type": "array", "items": {"enum": ["aaaaaaaa", "bbbbbbbb"]}, "minItems": 3})))
    assert cut[0].outputs[0].finish_reason == "length" and len(cut[0].outputs[0].token_ids) == 3


def test_a_grammar_failure_fails_its_request_alone(llm):
    engine = llm.engine
    guide = json_guide(POINT)
    engine.add_request("broken", "a", SamplingParams(temperature=0, max_tokens=6, guide=guide))
    engine.add_request("fine", "a", SamplingParams(temperature=0, max_tokens=6, guide=guide))
    engine.add_request("free", "a", SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    matcher = engine.requests["broken"].seqs[0].grammar
    matcher.consume_token(llm.tokenizer.encode("]", add_special_tokens=False)[0])  # now in an error state
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
    assert finals["broken"].error and "grammar" in finals["broken"].error
    assert finals["fine"].error is None and finals["free"].error is None
    assert finals["free"].num_output_tokens == 6


# -- the tool-call format -------------------------------------------------------------------------------
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'


def test_tool_calls_are_parsed_and_anything_else_stays_content():
    content, calls = parse(f"Let me check.\n{CALL}\n{CALL}", {"get_weather"})
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather"] * 2
    assert json.loads(calls[0].arguments) == {"city": "Oslo"} and calls[0].id != calls[1].id
    assert parse("no calls here", {"get_weather"}) == ("no calls here", [])
    unknown = CALL.replace("get_weather", "rm_rf")
    assert parse(unknown, {"get_weather"}) == (unknown, [])
    assert parse("<tool_call>\n{not json\n</tool_call>", {"get_weather"})[1] == []


def test_streamed_parsing_holds_back_a_possible_tag_and_agrees_with_the_whole_answer():
    text = f"Sure <b> {CALL}"
    parser = ToolCallParser({"get_weather"})
    streamed, calls = "", []
    for i in range(len(text)):  # one character at a time: tags split anywhere
        content, new = parser.feed(text[i])
        assert "<tool" not in content
        streamed += content
        calls += new
    streamed += parser.finish()
    whole_content, whole_calls = parse(text, {"get_weather"})
    assert streamed.strip() == whole_content == "Sure <b>"
    assert [(c.name, c.arguments) for c in calls] == [(c.name, c.arguments) for c in whole_calls]


def test_the_default_tool_format_renders_history_for_a_template_without_tools():
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [{"role": "system", "content": "Be brief."}, *MESSAGES,
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "7 degrees"}]
    out, kwargs = render(messages, [WEATHER], native=False)
    assert kwargs == {} and out[0]["content"].startswith("Be brief.\n\n# Tools") and '"get_weather"' in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": CALL}
    assert out[3] == {"role": "user", "content": "<tool_response>\n7 degrees\n</tool_response>"}
    native, kwargs = render(messages, [WEATHER], native=True)
    assert kwargs == {"tools": [WEATHER]} and native[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
