"""The keep-alive race between the gateway's pooled connections and an upstream's idle timeout.

`RacingUpstream` is a raw HTTP/1.1 server that answers the first request of every connection and closes
the connection, without a byte of response, when a second request arrives on it: exactly what a server
does when its idle timeout fires as a pooled connection is reused, but on every reuse, so the race is
deterministic. A real engine cannot be made to lose this race on demand.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time

import httpx
import pytest

from .conftest import add_model, make_tenant, start_gateway, stop

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

TOKEN = "metrics-token-for-the-race"
MESSAGES = [{"role": "user", "content": "Hi"}]


def chat_body(model: str) -> dict:
    return {"id": "chatcmpl-race", "object": "chat.completion", "created": int(time.time()), "model": model,
            "system_fingerprint": "fp_race", "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
            "message": {"role": "assistant", "content": "pong", "refusal": None}}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4,
                      "prompt_tokens_details": {"cached_tokens": 0}}}


def sse_body(model: str) -> bytes:
    base = {"id": "chatcmpl-race", "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "system_fingerprint": "fp_race"}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "pong"}, "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}},
    ]
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


class RacingUpstream:
    """Answers one request per connection, then closes the connection when the next request arrives.
    mode "cut": sends the headers and half of the body of every answer, then closes (a failure after the
    response began, which must never be retried)."""

    def __init__(self, mode: str = "race"):
        self.mode = mode
        self.requests = 0  # requests read, answered or not
        self.dropped = 0  # requests that arrived on a reused connection and were dropped
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        self.ready.set()
        self.loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) if b"ength:" in head else 0
                body = json.loads(await reader.readexactly(length)) if length else {}
                self.requests += 1
                if served:
                    self.dropped += 1
                    return  # the idle timeout fired as the request arrived: close, answer nothing
                served += 1
                model = body.get("model", "race")
                payload = sse_body(model) if body.get("stream") else json.dumps(chat_body(model)).encode()
                kind = b"text/event-stream" if body.get("stream") else b"application/json"
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: " + kind +
                             f"\r\ncontent-length: {len(payload)}\r\n\r\n".encode())
                if self.mode == "cut":
                    writer.write(payload[: len(payload) // 2])
                    await writer.drain()
                    return
                writer.write(payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def metered_gateway(django_db_setup, redis_clean):
    # the racing upstream answers every request alike (no /v1/tokenizer): it counts completions only
    url, process = start_gateway(METRICS_TOKEN=TOKEN, GATEWAY_EXACT_PROMPT_COUNT="0")
    yield url
    stop(process)


def retries(gateway: str) -> float:
    text = httpx.get(f"{gateway}/metrics", headers={"authorization": f"Bearer {TOKEN}"}).text
    return sum(float(v) for v in re.findall(r"^maas_gateway_upstream_retries_total\{[^}]*\} ([0-9.e+]+)$", text, re.M))


def test_a_request_written_into_a_connection_the_upstream_closes_is_retried_on_a_fresh_one(metered_gateway):
    upstream = RacingUpstream()
    try:
        add_model("racy", upstream.url)
        tenant = make_tenant()
        headers = {"authorization": f"Bearer {tenant.raw_key}"}
        before = retries(metered_gateway)
        # A request right after a whole non-streamed answer reuses its pooled connection and loses the race.
        for stream in (False, False, True, False, True):
            body = {"model": "racy", "messages": MESSAGES, "max_tokens": 4, "stream": stream}
            response = httpx.post(f"{metered_gateway}/v1/chat/completions", json=body, headers=headers, timeout=30)
            assert response.status_code == 200, response.text
            assert "pong" in response.text and "error" not in response.text
        assert upstream.dropped == 2  # the 2nd (plain) and the 5th (a stream) request
        assert retries(metered_gateway) - before == upstream.dropped
    finally:
        upstream.close()


def test_a_failure_after_the_response_began_is_not_retried(metered_gateway):
    upstream = RacingUpstream(mode="cut")
    try:
        add_model("racy", upstream.url)
        tenant = make_tenant()
        response = httpx.post(f"{metered_gateway}/v1/chat/completions", timeout=30,
                              headers={"authorization": f"Bearer {tenant.raw_key}"},
                              json={"model": "racy", "messages": MESSAGES, "max_tokens": 4})
        assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"
        assert upstream.requests == 1  # sent once: the engine may have generated, so never twice
    finally:
        upstream.close()
