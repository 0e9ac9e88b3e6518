"""`python -m engine serve` end to end: a real subprocess on SmolLM2, driven by the official openai client."""

import json
import re
import time

import httpx
import openai
import pytest

from engine.loader import demo_model_path
from tests.processes import start_engine, stop

MODEL = "smollm2-test"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def server():
    process, url = start_engine(demo_model_path(), "--served-model-name", MODEL, "--kv-cache-memory", "128MiB",
                                "--max-model-len", "1024", "--threads", "2", "--log-level", "warning",
                                "--keepalive-interval", "1")
    yield url
    stop(process, timeout=20)


@pytest.fixture(scope="session")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=120)


def metric(base: str, name: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    match = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def test_health_and_models(server, client):
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"


def test_chat_completion(client):
    resp = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=16, temperature=0
    )
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == MODEL
    assert isinstance(resp.created, int)
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage.prompt_tokens > 20 and 0 < resp.usage.completion_tokens <= 16
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    # cache hits are whole KV blocks (16 tokens), and the last prompt token is always computed
    cached = resp.usage.prompt_tokens_details.cached_tokens
    assert cached % 16 == 0 and 0 <= cached < resp.usage.prompt_tokens


def test_streaming_chat_with_usage_matches_non_streaming(client):
    messages = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_and_streaming_completions(client):
    resp = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2
    )
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    choice = resp.choices[0]
    assert choice.text and len(choice.logprobs.tokens) == resp.usage.completion_tokens
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    stream = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream) == choice.text


def test_chat_logprobs_shape(client):
    resp = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert content[0].logprob <= 0 and len(content[0].top_logprobs) == 2 and content[0].bytes


def test_repeated_prompt_reports_cached_tokens_and_salt_separates(client):
    messages = [{"role": "user", "content": "Write one sentence about the sea and the sky at dawn."}]
    first = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, temperature=0, extra_body={"cache_salt": "org-a"}
    )
    second = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, temperature=0, extra_body={"cache_salt": "org-a"}
    )
    other = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=2, temperature=0, extra_body={"cache_salt": "org-b"}
    )
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached % 16 == 0 and cached < second.usage.prompt_tokens
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == first.choices[0].message.content


def test_errors(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert info.value.param == "temperature" and info.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], top_p=1.5)
    assert info.value.param == "top_p"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[])
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 1100}])
    assert info.value.code == "context_length_exceeded" and info.value.param == "messages"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="hello", max_tokens=5000)
    assert info.value.code == "context_length_exceeded" and info.value.param == "max_tokens"


def test_error_body_is_openai_shaped(server):
    resp = httpx.post(f"{server}/v1/chat/completions", content=b"{not json")
    assert resp.status_code == 400
    assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    resp = httpx.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "x", "n": "two"})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "n"


def test_traceparent_header_is_tolerated(server):
    resp = httpx.post(
        f"{server}/v1/completions",
        json={"model": MODEL, "prompt": "Hi", "max_tokens": 2},
        headers={"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"},
    )
    assert resp.status_code == 200


def test_tokenize(server, client):
    prompt = httpx.post(f"{server}/tokenize", json={"model": MODEL, "prompt": "Hello world"}).json()
    assert prompt["count"] == len(prompt["tokens"]) > 0 and prompt["max_model_len"] == 1024
    messages = [{"role": "user", "content": "What is 2+2?"}]
    chat = httpx.post(f"{server}/tokenize", json={"model": MODEL, "messages": messages}).json()
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1)
    assert chat["count"] == resp.usage.prompt_tokens
    assert httpx.post(f"{server}/tokenize", json={"model": "nope", "prompt": "x"}).status_code == 404


def test_metrics(server, client):
    client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=4)
    text = httpx.get(f"{server}/metrics").text
    for name in (
        "engine_num_requests_running",
        "engine_num_requests_waiting",
        "engine_kv_cache_usage_ratio",
        "engine_prefix_cache_hit_rate",
        "engine_time_to_first_token_seconds_bucket",
        "engine_time_per_output_token_seconds_bucket",
        "engine_prompt_tokens_total",
        "engine_generation_tokens_total",
    ):
        assert name in text
    assert metric(server, "engine_generation_tokens_total") >= 4
    assert metric(server, "engine_time_to_first_token_seconds_count") >= 1


def test_client_disconnect_frees_blocks(server):
    body = {
        "model": MODEL,
        "prompt": "Tell me a very long story.",
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        received = []
        for line in lines:
            if line.startswith("data: {"):
                received.append(json.loads(line[6:]))
            if len(received) >= 3:
                break
        assert metric(server, "engine_num_requests_running") == 1
        assert metric(server, "engine_kv_cache_usage_ratio") > 0
    deadline = time.monotonic() + 30
    while (
        metric(server, "engine_num_requests_running") != 0
        or metric(server, "engine_kv_cache_usage_ratio") != 0
    ):
        assert time.monotonic() < deadline, "the aborted request still holds blocks"
        time.sleep(0.2)


def test_long_non_streamed_answer_keeps_the_connection_alive_and_a_disconnect_then_aborts(server):
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 900, "ignore_eos": True}
    generated_before = metric(server, "engine_generation_tokens_total")
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=httpx.Timeout(10, read=2)) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("application/json")
        received = b""
        for part in resp.iter_raw():
            received += part
            if len(received) >= 2:
                break
        assert received.strip() == b""  # spaces while generating (JSON allows them before the value)
    deadline = time.monotonic() + 30
    while metric(server, "engine_num_requests_running") != 0 or metric(server, "engine_kv_cache_usage_ratio") != 0:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.2)
    assert metric(server, "engine_generation_tokens_total") - generated_before < 900  # stopped early


def test_non_streaming_client_disconnect_aborts(server):
    body = {"model": MODEL, "prompt": "Tell me a very long story.", "max_tokens": 900, "ignore_eos": True}
    generated_before = metric(server, "engine_generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))  # before the 200
    deadline = time.monotonic() + 30
    while metric(server, "engine_num_requests_running") != 0 or metric(server, "engine_kv_cache_usage_ratio") != 0:
        assert time.monotonic() < deadline, "the abandoned request is still running"
        time.sleep(0.2)
    assert metric(server, "engine_generation_tokens_total") - generated_before < 900  # stopped early


def test_embeddings_on_a_generative_model_are_a_400(server):
    response = httpx.post(f"{server}/v1/embeddings", json={"model": MODEL, "input": "hi"}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "model" and error["code"] == "model_not_supported"
    assert "does not serve embeddings" in error["message"]
