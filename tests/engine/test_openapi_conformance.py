"""Every body `python -m engine serve` sends on /v1 (200s, stream chunks, errors) validates against OpenAI's
published OpenAPI document; the schema for each response is the one the document's `paths` name."""

import json

import httpx
import jsonschema
import pytest
import torch
from starlette.testclient import TestClient

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.failures import install_test_fault
from engine.llm_engine import LLMEngine
from engine.loader import demo_model_path
from engine.server import build_app
from tests import openapi_spec
from tests.engine.checkpoints import tiny_checkpoint
from tests.openapi_spec import SpecViolation, validate, validate_error, validate_response, validate_stream
from tests.processes import start_engine, stop

MODEL = "smollm2-openapi"
API_KEY = "sk-conformance"
MESSAGES = [{"role": "user", "content": "Name two colors."}]
PROMPT = "The capital of France is"
CHAT, COMPLETIONS, MODELS = "/v1/chat/completions", "/v1/completions", "/v1/models"
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def api():
    process, url = start_engine(demo_model_path(), "--served-model-name", MODEL, "--api-key", API_KEY,
                                "--kv-cache-memory", "128MiB", "--max-model-len", "512", "--threads", "2",
                                "--log-level", "warning")
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120) as client:
        yield client
    stop(process, timeout=20)


def ok(response: httpx.Response) -> httpx.Response:
    assert response.status_code == 200, response.text
    return response


def chat(api, **fields) -> dict:
    limit = {} if "max_completion_tokens" in fields else {"max_tokens": 4}
    body = ok(api.post(CHAT, json={"model": MODEL, "messages": MESSAGES, **limit, **fields})).json()
    validate_response(CHAT, "post", 200, body)
    return body


def completion(api, **fields) -> dict:
    body = ok(api.post(COMPLETIONS, json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4, **fields})).json()
    validate_response(COMPLETIONS, "post", 200, body)
    return body


def stream(api, path: str, **fields) -> list[dict]:
    base = {"messages": MESSAGES} if path == CHAT else {"prompt": PROMPT}
    response = ok(api.post(path, json={"model": MODEL, "max_tokens": 4, "stream": True, **base, **fields}))
    assert response.headers["content-type"].startswith("text/event-stream")
    return validate_stream(path, "post", response.text)


# -- the validator itself (no server) -------------------------------------------------------------
def test_schemas_these_tests_use_are_valid_json_schema_2020_12():
    """After the OpenAPI 3.0 leftovers are rewritten (nullable, boolean exclusiveMinimum, ...), every schema
    reachable from the operations below is a valid 2020-12 schema, so no keyword is silently misread."""
    document = openapi_spec.spec()
    pending = [openapi_spec.ERROR_SCHEMA] + [
        openapi_spec.response_schema(path, method, 200, content)
        for path, method in ((CHAT, "post"), (COMPLETIONS, "post"), (MODELS, "get"), (f"{MODELS}/m", "get"))
        for content in ("application/json", "text/event-stream")]
    seen = set()
    while pending:
        pointer = openapi_spec.schema_pointer(pending.pop())
        if pointer in seen:
            continue
        seen.add(pointer)
        node = document
        for part in pointer.strip("/").split("/"):
            node = node[part]
        jsonschema.Draft202012Validator.check_schema(node)
        assert not list(_keyword(node, "nullable")), pointer  # 2020-12 would ignore it
        pending += _keyword(node, "$ref")
    assert len(seen) > 10


def _keyword(node, keyword: str):
    """The values of `keyword` used as a keyword (not a property name) anywhere in the schema `node`."""
    if isinstance(node, dict):
        if keyword in node and not isinstance(node[keyword], dict):
            yield node[keyword]
        for value in node.values():
            yield from _keyword(value, keyword)
    elif isinstance(node, list):
        for value in node:
            yield from _keyword(value, keyword)


def test_nullable_fields_accept_null_and_still_check_the_type():
    usage = "#/components/schemas/CreateChatCompletionStreamResponse/properties/usage"
    validate(None, usage)  # `nullable: true` beside a $ref
    with pytest.raises(SpecViolation, match=r"\$: .* is not valid under any of the given schemas"):
        validate("none", usage)


# -- 200 responses ---------------------------------------------------------------------------------
@slow
@pytest.mark.parametrize("fields", [
    {},
    {"logprobs": True},
    {"logprobs": True, "top_logprobs": 3},
    {"n": 2, "temperature": 0.9, "seed": 7},
    {"stop": ["\n", ","], "max_tokens": 8},
    {"max_completion_tokens": 2, "temperature": 0},
], ids=["plain", "logprobs", "top_logprobs", "n2", "stop", "max_completion_tokens"])
def test_chat_completion_validates(api, fields):
    body = chat(api, **fields)
    assert len(body["choices"]) == fields.get("n", 1)


@slow
@pytest.mark.parametrize("fields", [
    {},
    {"stream_options": {"include_usage": True}},
    {"logprobs": True, "top_logprobs": 2, "n": 2, "stream_options": {"include_usage": True}},
    {"stop": [" "], "max_tokens": 8},
], ids=["plain", "include_usage", "logprobs_n2_usage", "stop"])
def test_chat_stream_chunks_validate(api, fields):
    chunks = stream(api, CHAT, **fields)
    usage = [c for c in chunks if c.get("usage")]
    if fields.get("stream_options"):
        assert len(usage) == 1 and usage[0] is chunks[-1] and chunks[-1]["choices"] == []
    else:
        assert not usage


@slow
@pytest.mark.parametrize("fields", [
    {},
    {"echo": True},
    {"logprobs": 2},
    {"logprobs": 0},
    {"echo": True, "logprobs": 1, "n": 2, "temperature": 0.9},
    {"prompt": [1, 2, 3], "stop": "."},
], ids=["plain", "echo", "logprobs", "logprobs0", "echo_logprobs_n2", "token_prompt_stop"])
def test_completion_validates(api, fields):
    completion(api, **fields)


@slow
@pytest.mark.parametrize("fields", [
    {},
    {"echo": True, "logprobs": 2, "stream_options": {"include_usage": True}},
    {"n": 2, "temperature": 0.9, "logprobs": 0},
], ids=["plain", "echo_logprobs_usage", "n2_logprobs0"])
def test_completion_stream_chunks_validate(api, fields):
    chunks = stream(api, COMPLETIONS, **fields)
    with_usage = [c for c in chunks if "usage" in c]
    assert with_usage == ([chunks[-1]] if fields.get("stream_options") else [])


@slow
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
def test_completion_text_offsets_index_into_the_echoed_text(api, streamed):
    """With echo, `text` starts with the prompt and `logprobs` covers the prompt's tokens (from its second)
    then the generated ones: every offset indexes its token in `text`, the first generated one past the
    prompt."""
    fields = {"echo": True, "logprobs": 1, "temperature": 0, "max_tokens": 5}
    if streamed:
        chunks = [c for c in stream(api, COMPLETIONS, **fields) if c["choices"]]
        text = "".join(c["choices"][0]["text"] for c in chunks)
        tokens = [t for c in chunks if c["choices"][0]["logprobs"] for t in c["choices"][0]["logprobs"]["tokens"]]
        offsets = [o for c in chunks if c["choices"][0]["logprobs"]
                   for o in c["choices"][0]["logprobs"]["text_offset"]]
    else:
        choice = completion(api, **fields)["choices"][0]
        text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert text.startswith(PROMPT) and len(tokens) > 5 and offsets[-5] == len(PROMPT)
    assert offsets[0] > 0 and "".join(tokens[:-5]) == PROMPT[offsets[0]:]
    assert all(text[offset:].startswith(token) for token, offset in zip(tokens, offsets, strict=True))


@slow
def test_models_list_validates(api):
    body = ok(api.get(MODELS)).json()
    validate_response(MODELS, "get", 200, body)
    assert [m["id"] for m in body["data"]] == [MODEL]
    one = ok(api.get(f"{MODELS}/{MODEL}")).json()
    validate_response(f"{MODELS}/{MODEL}", "get", 200, one)
    assert one == body["data"][0]
    missing = api.get(f"{MODELS}/no-such-model")
    assert missing.status_code == 404
    validate_error(missing.json())


@slow
def test_the_validator_rejects_real_bodies_with_a_field_broken(api):
    """The checks above can fail: a real response with `choices` removed, a message without `refusal`, a
    null fingerprint, a chunk whose delta role is not a role, each is rejected at its JSON path."""
    body = chat(api)
    for mutate, where in [
        (lambda b: b.pop("choices"), r"\$: 'choices' is a required property"),
        (lambda b: b["choices"][0]["message"].pop("refusal"), r"\$\.choices\[0\]\.message: 'refusal'"),
        (lambda b: b.update(system_fingerprint=None), r"\$\.system_fingerprint: None is not of type 'string'"),
        (lambda b: b["usage"].update(total_tokens="7"), r"\$\.usage\.total_tokens: '7' is not of type"),
    ]:
        broken = json.loads(json.dumps(body))
        mutate(broken)
        with pytest.raises(SpecViolation, match=where):
            validate_response(CHAT, "post", 200, broken)
    [first, *_] = stream(api, CHAT)
    first["choices"][0]["delta"]["role"] = "robot"
    with pytest.raises(SpecViolation, match=r"event 0: .*\n\$\.choices\[0\]\.delta\.role: 'robot' is not one of"):
        validate_stream(CHAT, "post", f"data: {json.dumps(first)}\n\ndata: [DONE]\n\n")


# -- errors ----------------------------------------------------------------------------------------
@slow
@pytest.mark.parametrize("path, body, status", [
    (CHAT, {"model": MODEL, "messages": MESSAGES, "temperature": "hot"}, 400),
    (CHAT, {"model": MODEL, "messages": MESSAGES, "max_tokens": 100_000}, 400),
    (CHAT, {"model": MODEL, "messages": []}, 400),
    (CHAT, {"model": "no-such-model", "messages": MESSAGES}, 404),
    (CHAT, b"{not json", 400),
    (CHAT, b"[1, 2]", 400),
    (COMPLETIONS, {"model": MODEL, "prompt": PROMPT, "logprobs": 9}, 400),
    (COMPLETIONS, {"model": "no-such-model", "prompt": PROMPT}, 404),
    (COMPLETIONS, b"\xff\xfe", 400),
], ids=["bad_field", "context_length", "no_messages", "unknown_model", "bad_json", "not_an_object",
        "completion_bad_field", "completion_unknown_model", "not_utf8"])
def test_request_errors_validate(api, path, body, status):
    response = api.post(path, content=body) if isinstance(body, bytes) else api.post(path, json=body)
    assert response.status_code == status, response.text
    validate_response(path, "post", status, response.json())


@slow
@pytest.mark.parametrize("method, path, status", [
    ("GET", "/v1/no-such-endpoint", 404),
    ("POST", "/v1/audio/speech", 404),
    ("GET", "/no-such-page", 404),
    ("GET", CHAT, 405),
    ("DELETE", COMPLETIONS, 405),
    ("POST", MODELS, 405),
], ids=["unknown_v1_path", "unsupported_endpoint", "unknown_root_path", "get_chat", "delete_completions",
        "post_models"])
def test_routing_errors_are_openai_json(api, method, path, status):
    response = api.request(method, path)
    assert response.status_code == status and response.headers["content-type"].startswith("application/json")
    validate_error(response.json())
    if status == 405:
        assert method not in response.headers["allow"]


@slow
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no_key", "bad_key"])
def test_auth_errors_validate(api, headers):
    client = httpx.Client(base_url=api.base_url, headers=headers, timeout=30)
    with client:
        for response in (client.get(MODELS),
                         client.post(CHAT, json={"model": MODEL, "messages": MESSAGES, "max_tokens": 1})):
            assert response.status_code == 401
            validate_error(response.json())


def tiny_engine(**config) -> LLMEngine:
    torch.set_num_threads(2)
    return LLMEngine(EngineConfig(model=str(tiny_checkpoint("llama")), served_model_name="tiny", block_size=4,
                                  num_kv_blocks=64, **config))


def test_overloaded_engine_error_validates():
    """503 from a full waiting queue (max_waiting_requests=0): the in-process app on a tiny checkpoint,
    since a real server cannot be made to overflow on demand."""
    with TestClient(build_app(AsyncEngine(tiny_engine(max_waiting_requests=0)))) as client:
        response = client.post(COMPLETIONS, json={"model": "tiny", "prompt": "Hello", "max_tokens": 2})
    assert response.status_code == 503
    validate_response(COMPLETIONS, "post", 503, response.json())


def test_engine_failing_midstream_sends_a_valid_error_event_then_done():
    """The engine's third step fails (the ENGINE_TEST_FAULT hook, in-process: a real server would exit):
    the stream already under way ends with an `{"error": ...}` event and [DONE], both as the spec has them."""
    engine = tiny_engine()
    install_test_fault(engine, "fatal-after:3")
    with TestClient(build_app(AsyncEngine(engine)), raise_server_exceptions=False) as client:
        response = client.post(COMPLETIONS, json={"model": "tiny", "prompt": "Hello", "max_tokens": 8,
                                                  "ignore_eos": True, "stream": True})
        assert response.status_code == 200
        events = validate_stream(COMPLETIONS, "post", response.text)
        # The 200 and its headers went out before the failure; random tokens of the tiny model may not have
        # completed a character by then, so the error event can be the first one that carries anything.
        assert events and "error" in events[-1] and all("error" not in e for e in events[:-1])
        after = client.post(CHAT, json={"model": "tiny", "messages": MESSAGES, "max_tokens": 2})
    assert after.status_code >= 500
    validate_response(CHAT, "post", after.status_code, after.json())
