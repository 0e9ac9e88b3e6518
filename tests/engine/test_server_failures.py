"""`python -m engine serve` when the engine itself breaks: /health says so, the request in flight gets an
OpenAI error, and the process exits non-zero within seconds for its supervisor to restart it.

The failure is injected with the ENGINE_TEST_FAULT hook (a real engine cannot be broken on demand)."""

import time

import httpx
import pytest

from engine.loader import demo_model_path
from engine.loader.encoder import demo_embedding_model_path
from tests.processes import start_engine, stop

pytestmark = pytest.mark.slow


def test_an_engine_failure_is_reported_then_the_process_exits_non_zero():
    process, url = start_engine(demo_model_path(), "--served-model-name", "m", "--kv-cache-memory", "64MiB",
                                "--max-model-len", "512", "--threads", "2", "--log-level", "warning",
                                "--fatal-exit-delay", "3", env={"ENGINE_TEST_FAULT": "fatal-after:3"})
    try:
        response = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 10, "ignore_eos": True})
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["type"] == "server_error" and error["code"] == "engine_unavailable"
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and "ENGINE_TEST_FAULT" in health.json()["error"]
        refused = httpx.post(f"{url}/v1/chat/completions", timeout=10, json={
            "model": "m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_unavailable"
        started = time.monotonic()
        assert process.wait(timeout=20) == 1
        assert time.monotonic() - started < 10
    finally:
        if process.poll() is None:
            stop(process)


def test_an_embedding_engine_failure_is_reported_then_the_process_exits_non_zero():
    process, url = start_engine(demo_embedding_model_path(), "--served-model-name", "e", "--threads", "2",
                                "--log-level", "warning", "--fatal-exit-delay", "3",
                                env={"ENGINE_TEST_FAULT": "fatal-after:2"})
    try:
        body = {"model": "e", "input": "a sentence"}
        assert httpx.post(f"{url}/v1/embeddings", timeout=60, json=body).status_code == 200
        response = httpx.post(f"{url}/v1/embeddings", timeout=60, json=body)
        assert response.status_code == 503 and response.json()["error"]["code"] == "engine_unavailable"
        health = httpx.get(f"{url}/health", timeout=5)
        assert health.status_code == 503 and "ENGINE_TEST_FAULT" in health.json()["error"]
        assert process.wait(timeout=20) == 1
    finally:
        if process.poll() is None:
            stop(process)
