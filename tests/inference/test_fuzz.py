"""Property-based fuzzing of the generation API: generated bodies (valid, invalid and extreme) go to a real
`python -m engine serve` and to the gateway in front of it.

For every body: no 5xx (no fault is forced here), the engine and the gateway give the same status (they
share one request schema), every error is an OpenAI error body, and every 200 (streamed chunks too) is on
OpenAI's published spec. Afterwards the engine still answers a plain request.

CI runs FUZZ_EXAMPLES (default 60) bodies per endpoint; run longer with, e.g.,
`FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/inference/test_fuzz.py`.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.openapi_spec import validate_error, validate_response, validate_stream

from .conftest import add_model, make_tenant

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
MODEL = "smollm2"

EXTREME_INTS = [-(2**63) - 1, -(2**63), -1, 0, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 10**30]
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(-3, 3), max_size=2),
                 st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.just(1.5),
                 st.sampled_from(EXTREME_INTS), st.sampled_from([1e308, -1e308, 2.0000001, -0.0]))
texts = st.text(st.characters(codec="utf-8"), max_size=12)


def mostly(valid, invalid=junk, valid_in_ten: int = 8):
    """`valid` eight times in ten (the rest `invalid`), so most bodies reach the engine."""
    return st.integers(0, 9).flatmap(lambda i: valid if i < valid_in_ten else invalid)


def number(low: float, high: float):
    return st.one_of(st.floats(low, high, allow_nan=False), st.sampled_from([low, high]))


# Bounded generation: a valid max_tokens is 1-3; the others are refused (or over the context).
max_tokens = mostly(st.integers(1, 3), st.sampled_from([0, -1, 2**31, 2**63, 10**30, 1.0, "2", True, None]), 9)

SAMPLING = {
    "temperature": mostly(number(0, 2)),
    "top_p": mostly(number(0, 1)),
    "top_k": mostly(st.one_of(st.integers(-1, 60), st.sampled_from([2**31, 2**63 - 1, 49152, 49153]))),
    "min_p": mostly(number(0, 1)),
    "seed": mostly(st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), 2**63 - 1]))),
    "n": mostly(st.integers(1, 3), st.sampled_from([0, -1, 128, 129, 2**63, 1.0])),
    "presence_penalty": mostly(number(-2, 2)),
    "frequency_penalty": mostly(number(-2, 2)),
    "repetition_penalty": mostly(number(0.01, 2)),
    "stop": mostly(st.one_of(texts, st.lists(texts, max_size=5))),
    "stop_token_ids": mostly(st.lists(st.one_of(st.integers(0, 49151), st.sampled_from([49152, 2**63])),
                                      max_size=3)),
    "logit_bias": mostly(st.dictionaries(st.one_of(st.integers(0, 49200).map(str), texts),
                                         mostly(number(-100, 100)), max_size=3)),
    "ignore_eos": mostly(st.booleans()),
    "skip_special_tokens": mostly(st.booleans()),
    "user": mostly(texts),
    "metadata": mostly(st.dictionaries(texts, texts, max_size=2)),
    "store": mostly(st.booleans()),
    "service_tier": st.sampled_from(["auto", "default", "bogus", None]),
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "bogus"}, None, 3]),
    "tools": st.sampled_from([[], None, [{"type": "function", "function": {"name": "f"}}]]),
    "tool_choice": st.sampled_from(["none", "auto", None]),
    "logprobs_x": junk,  # an unknown field
}
ROLES = mostly(st.sampled_from(["system", "user", "assistant", "developer"]),
               st.sampled_from(["tool", "bot", "", None, 3]))
PARTS = st.lists(st.fixed_dictionaries({"type": mostly(st.just("text"), st.just("image_url"), 9), "text": texts}),
                 min_size=1, max_size=2)
CONTENT = mostly(st.one_of(texts, PARTS))
MESSAGE = mostly(st.fixed_dictionaries({"role": ROLES, "content": CONTENT}))
MESSAGES = mostly(st.lists(MESSAGE, min_size=1, max_size=3).map(lambda m: [*m, {"role": "user", "content": "Hi"}]),
                  st.one_of(st.just([]), junk), 9)


def body(endpoint: str):
    """A body for `endpoint`: a few sampling fields, a model (almost always ours), a prompt, a stream flag."""
    fields = st.dictionaries(st.sampled_from(sorted(SAMPLING)), st.none(), max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: SAMPLING[k] for k in keys}))
    if endpoint == "chat/completions":
        prompt = st.fixed_dictionaries({"messages": MESSAGES, "max_tokens": max_tokens},
                                       optional={"logprobs": mostly(st.booleans()),
                                                 "top_logprobs": mostly(st.integers(0, 20), st.integers(-2, 22))})
    else:
        token_ids = st.lists(mostly(st.integers(0, 49151), st.sampled_from([49152, -1, 2**63])), min_size=1,
                             max_size=4)
        prompts = st.one_of(texts.filter(str.strip), token_ids, st.lists(texts, min_size=1, max_size=2),
                            st.lists(token_ids, min_size=1, max_size=2))
        prompt = st.fixed_dictionaries({"prompt": mostly(prompts, junk, 9), "max_tokens": max_tokens},
                                       optional={"echo": mostly(st.booleans()),
                                                 "logprobs": mostly(st.integers(0, 5), st.integers(-2, 7)),
                                                 "suffix": st.sampled_from(["", "x", None]),
                                                 "best_of": st.sampled_from([1, 2, None])})
    stream = st.sampled_from([{}, {"stream": False}, {"stream": True},
                              {"stream": True, "stream_options": {"include_usage": True}},
                              {"stream_options": {"include_usage": True}}, {"stream": "yes"}])
    model = st.sampled_from([MODEL] * 12 + ["other-model", "", 3])
    return st.tuples(model, prompt, fields, stream).map(lambda t: {"model": t[0], **t[1], **t[2], **t[3]})


def check(response: httpx.Response, endpoint: str, sent: dict, where: str) -> None:
    path = f"/v1/{endpoint}"
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]} for {sent}"
    if response.status_code != 200:
        validate_error(response.json())
    elif response.headers["content-type"].startswith("text/event-stream"):
        validate_stream(path, "post", response.text)
    else:
        validate_response(path, "post", 200, response.json())


@pytest.fixture
def targets(gateway, engine_server):
    add_model(MODEL, engine_server, context_length=2048)
    tenant = make_tenant("fuzz", token_quota=10**12)
    return engine_server, gateway, tenant.raw_key


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_generated_bodies_never_5xx_agree_and_stay_on_the_spec(targets, endpoint):
    engine, gateway, key = targets
    seen: dict[int, int] = {}
    with httpx.Client(timeout=120) as client:

        @settings(max_examples=EXAMPLES, deadline=None, derandomize="CI" in os.environ,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(body(endpoint))
        def send(sent):
            payload = json.dumps(sent)
            direct = client.post(f"{engine}/v1/{endpoint}", content=payload,
                                 headers={"content-type": "application/json"})
            check(direct, endpoint, sent, "engine")
            through = client.post(f"{gateway}/v1/{endpoint}", content=payload,
                                  headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
            check(through, endpoint, sent, "gateway")
            assert through.status_code == direct.status_code, (
                f"gateway {through.status_code} {through.text[:300]} vs engine {direct.status_code} "
                f"{direct.text[:300]} for {sent}")
            seen[direct.status_code] = seen.get(direct.status_code, 0) + 1

        send()
        print(f"fuzz {endpoint}: {sum(seen.values())} bodies, statuses {seen}")
        assert seen.get(200) and seen.get(400), seen  # the generator reaches both sides
        plain = client.post(f"{engine}/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert plain.status_code == 200 and httpx.get(f"{engine}/health").status_code == 200


RAW_BODIES = [
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 2}',  # lone surrogate
    b'{"model": "smollm2", "prompt": "\\udfff", "max_tokens": 2}',
    b"[" * 100_000,  # nesting deeper than any parser's stack
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
    b"\xff\xfe{}",  # not UTF-8
    b"",
    b'{"model": "smollm2", "messages": [{"role": "user", "content": "hi"}]',  # cut short
]
raw_bodies = st.one_of(
    st.sampled_from(RAW_BODIES),
    st.binary(max_size=40),
    st.tuples(st.integers(0, 60), st.sampled_from(["\\ud800", "\\u0000", "\\", '"', "[", "{", "\x00", "\ufeff"])).map(
        lambda t: (RAW_BODIES[0][: t[0]].decode(errors="ignore") + t[1] + RAW_BODIES[0][t[0]:].decode()).encode()),
)


@pytest.mark.parametrize("endpoint", ["chat/completions", "completions"])
def test_raw_bodies_are_400s_never_5xx_and_the_same_from_both(targets, endpoint):
    """Bytes that are not (acceptable) JSON: lone surrogate escapes, deep nesting, NaN, bad UTF-8."""
    engine, gateway, key = targets
    with httpx.Client(timeout=60) as client:

        @settings(max_examples=max(20, EXAMPLES // 3), deadline=None, derandomize="CI" in os.environ,
                  suppress_health_check=[HealthCheck.too_slow])
        @given(raw_bodies)
        def send(raw):
            direct = client.post(f"{engine}/v1/{endpoint}", content=raw, headers={"content-type": "application/json"})
            through = client.post(f"{gateway}/v1/{endpoint}", content=raw,
                                  headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
            for response, where in ((direct, "engine"), (through, "gateway")):
                assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:300]} for {raw!r}"
                if response.status_code != 200:
                    validate_error(response.json())
            assert direct.status_code == through.status_code, (direct.text[:300], through.text[:300], raw)

        for raw in RAW_BODIES:
            send.hypothesis.inner_test(raw)  # each known-bad body, then generated ones
        send()


# -- /v1/embeddings ------------------------------------------------------------------------------------
EMBEDDING_VOCAB = 30522  # all-MiniLM-L6-v2's
embedding_token_ids = st.lists(mostly(st.integers(0, EMBEDDING_VOCAB - 1),
                                      st.sampled_from([EMBEDDING_VOCAB, -1, 2**63, 1.5, "1"])), min_size=0, max_size=4)
embedding_texts = mostly(texts.filter(bool), st.just(""), 9)
embedding_inputs = st.one_of(
    embedding_texts, st.sampled_from(["word " * 300, "x"]), embedding_token_ids,
    st.lists(embedding_texts, min_size=0, max_size=3), st.lists(embedding_token_ids, min_size=0, max_size=2),
    st.lists(st.one_of(texts, embedding_token_ids), min_size=2, max_size=2),  # mixed forms: refused
)
EMBEDDING_FIELDS = {
    "encoding_format": mostly(st.sampled_from(["float", "base64"]), st.sampled_from(["int8", "", None, 1])),
    "dimensions": mostly(st.one_of(st.integers(1, 384), st.sampled_from([384, 385, 0, -1, 2**63])),
                         st.sampled_from([1.0, "8", True, None])),
    "user": mostly(texts),
}


def embedding_body():
    fields = st.dictionaries(st.sampled_from(sorted(EMBEDDING_FIELDS)), st.none(), max_size=3).flatmap(
        lambda keys: st.fixed_dictionaries({k: EMBEDDING_FIELDS[k] for k in keys}))
    model = st.sampled_from(["all-minilm-l6-v2"] * 12 + ["other-model", "", 3])
    unknown = mostly(st.just({}), st.fixed_dictionaries({"truncate": junk}), 9)  # an unknown field, now and then
    return st.tuples(model, mostly(embedding_inputs, junk, 9), fields, unknown).map(
        lambda t: {"model": t[0], "input": t[1], **t[2], **t[3]})


def check_embedding(response: httpx.Response, sent: dict, where: str) -> None:
    assert response.status_code < 500, f"{where}: {response.status_code} {response.text[:500]} for {sent}"
    if response.status_code != 200:
        validate_error(response.json())
        return
    body = response.json()
    if sent.get("encoding_format") == "base64":  # the spec describes the float form: check it decoded
        import base64
        import struct

        for item in body["data"]:
            raw = base64.b64decode(item["embedding"])
            item["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    validate_response("/v1/embeddings", "post", 200, body)


def test_generated_embedding_bodies_never_5xx_agree_and_stay_on_the_spec(gateway, embedding_server):
    from inference.models import ModelKind

    add_model("all-minilm-l6-v2", embedding_server, context_length=256, kind=ModelKind.EMBEDDINGS)
    key = make_tenant("fuzz-embed", token_quota=10**12).raw_key
    seen: dict[int, int] = {}
    with httpx.Client(timeout=120) as client:

        @settings(max_examples=EXAMPLES, deadline=None, derandomize="CI" in os.environ,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(embedding_body())
        def send(sent):
            payload = json.dumps(sent)
            direct = client.post(f"{embedding_server}/v1/embeddings", content=payload,
                                 headers={"content-type": "application/json"})
            check_embedding(direct, sent, "engine")
            through = client.post(f"{gateway}/v1/embeddings", content=payload,
                                  headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
            check_embedding(through, sent, "gateway")
            assert through.status_code == direct.status_code, (
                f"gateway {through.status_code} {through.text[:300]} vs engine {direct.status_code} "
                f"{direct.text[:300]} for {sent}")
            seen[direct.status_code] = seen.get(direct.status_code, 0) + 1

        send()
        print(f"fuzz embeddings: {sum(seen.values())} bodies, statuses {seen}")
        assert seen.get(200) and seen.get(400), seen
        plain = client.post(f"{embedding_server}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hi"})
        assert plain.status_code == 200 and httpx.get(f"{embedding_server}/health").status_code == 200
