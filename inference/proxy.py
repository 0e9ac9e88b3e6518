"""Forwarding to an engine replica with one shared httpx.AsyncClient per process (pooled connections),
relaying streams chunk by chunk and metering what each request consumed.

Streams: the engine is always asked for `include_usage`; the final usage chunk is passed to the
client only if it asked for it. When the client disconnects, Django cancels the response iterator;
closing the upstream response then aborts generation in the engine at once, and the request is
charged the tokens generated so far (see `count_cut_stream`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx
from django.conf import settings

from maas import telemetry

from . import metrics
from .catalog import Upstream
from .errors import GatewayError, error_body, service_unavailable
from .models import UsageStatus

logger = logging.getLogger(__name__)

_clients: dict[tuple[asyncio.AbstractEventLoop, bool], httpx.AsyncClient] = {}

# What a request written into a pooled connection that the server was closing fails with, before any byte
# of a response: retried once on a fresh connection (see `send`).
STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def http_client(fresh: bool = False) -> httpx.AsyncClient:
    """The process's pooled client (one per event loop; uvicorn runs one loop per worker). `fresh`: the
    client that keeps no idle connection, so each of its requests opens a new one (the retry's)."""
    loop = asyncio.get_running_loop()
    client = _clients.get((loop, fresh))
    if client is None:
        if not any(key[0] is loop for key in _clients):
            _clients.clear()  # a new event loop (tests): the old loop's clients cannot be used from it
        client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=settings.GATEWAY_UPSTREAM_CONNECT_TIMEOUT,
                read=settings.GATEWAY_UPSTREAM_READ_TIMEOUT,
                write=settings.GATEWAY_UPSTREAM_WRITE_TIMEOUT,
                pool=settings.GATEWAY_UPSTREAM_POOL_TIMEOUT,
            ),
            limits=httpx.Limits(
                max_connections=settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
                max_keepalive_connections=0 if fresh else settings.GATEWAY_UPSTREAM_MAX_CONNECTIONS,
                keepalive_expiry=settings.GATEWAY_UPSTREAM_KEEPALIVE_EXPIRY,
            ),
        )
        _clients[(loop, fresh)] = client
    return client


class _ConnectionUse:
    """httpcore's trace hook: did this request open a connection, or reuse a pooled one?"""

    __slots__ = ("opened",)

    def __init__(self):
        self.opened = False

    async def __call__(self, event: str, info: dict) -> None:
        if event.startswith("connection.connect_tcp"):
            self.opened = True


@dataclass
class Meter:
    """What one forwarded request consumed, filled in as the response arrives."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int = 0
    completion_tokens: int = 0  # from the engine's usage, or counted chunk by chunk
    usage_reported: bool = False
    done: bool = False  # the engine sent [DONE]
    streamed_text: dict[int, list[str]] = field(default_factory=dict)  # per choice, for cut streams
    status: str = UsageStatus.OK
    http_status: int = 200

    def take_usage(self, usage: dict | None) -> None:
        if not usage:
            return
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = int(usage.get("completion_tokens") or 0)
        details = usage.get("prompt_tokens_details") or {}
        self.cached_tokens = int(details.get("cached_tokens") or 0)
        self.usage_reported = True

    def take_progress(self, usage: dict) -> None:
        """The usage so far, from a chunk with choices (continuous_usage_stats): what a stream cut after it
        is billed at least, its cached tokens included."""
        self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        self.completion_tokens = max(self.completion_tokens, int(usage.get("completion_tokens") or 0))
        self.cached_tokens = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else (self.first_token_at - self.started) * 1000

    @property
    def latency_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000


def upstream_headers(upstream: Upstream, request_id: str) -> dict[str, str]:
    headers = {"content-type": "application/json", "x-request-id": request_id}
    if upstream.internal_token:
        headers["authorization"] = f"Bearer {upstream.internal_token}"
    return headers


def upstream_failure(exc: Exception) -> tuple[str, GatewayError]:
    """Usage status and the client's error for a transport failure talking to the engine."""
    if isinstance(exc, httpx.TimeoutException) and not isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return UsageStatus.UPSTREAM_TIMEOUT, GatewayError(
            504, "The model server timed out while generating the response. Please retry.", "server_error", "upstream_timeout"
        )
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return UsageStatus.UPSTREAM_UNAVAILABLE, service_unavailable("The model is temporarily unavailable. Please retry.")
    return UsageStatus.UPSTREAM_ERROR, GatewayError(
        502, "The model server failed while generating the response. Please retry.", "server_error", "upstream_error"
    )


def upstream_error_response(status: int, content: bytes) -> GatewayError:
    """Relay the engine's own 4xx (e.g. prompt longer than the context) in OpenAI form; 5xx becomes 502."""
    try:
        error = json.loads(content)["error"]
        message = error.get("message") or "The model server rejected the request."
    except (ValueError, KeyError, TypeError, AttributeError):
        error, message = {}, f"The model server answered {status}."
    if 400 <= status < 500:
        return GatewayError(status, message, error.get("type") or "invalid_request_error", error.get("code"), error.get("param"))
    return GatewayError(502, "The model server failed to process the request. Please retry.", "server_error", "upstream_error")


async def send(upstream: Upstream, endpoint: str, payload: bytes, request_id: str) -> httpx.Response:
    """POST to the engine and read the response's headers (its body: `read_body` or `relay_stream`).

    A pooled connection can be closed by the server just as a request is written into it (its idle
    timeout and our pool's expiry race). Such a request fails before any response byte arrived, so the
    engine never answered it: it is retried once, on a fresh connection, with a span and a metric.
    Never after a response byte: then the failure is the engine's.
    """
    use = _ConnectionUse()
    url, headers = f"{upstream.base_url}/v1/{endpoint}", upstream_headers(upstream, request_id)
    client = http_client()
    request = client.build_request("POST", url, content=payload, headers=headers, extensions={"trace": use})
    try:
        return await client.send(request, stream=True)
    except STALE_CONNECTION_ERRORS as exc:
        if use.opened:
            raise  # a new connection failed: not the idle-connection race
        reason = type(exc).__name__
        logger.info("retrying %s on a fresh connection to %s after %s on a reused one", request_id,
                    upstream.base_url, reason)
        metrics.UPSTREAM_RETRIES.labels(reason=reason).inc()
        fresh = http_client(fresh=True)
        with telemetry.span("gateway.upstream_retry", {"maas.deployment.id": upstream.id, "error.type": reason}):
            return await fresh.send(fresh.build_request("POST", url, content=payload, headers=headers), stream=True)


async def count_tokens(upstream: Upstream, payload: dict, request_id: str) -> int | None:
    """Token count of a prompt (`messages` through the chat template, or `prompt`) by the engine's /tokenize."""
    try:
        response = await http_client().post(
            f"{upstream.base_url}/tokenize", json=payload, headers=upstream_headers(upstream, request_id), timeout=5.0
        )
        if response.status_code == 200:
            return int(response.json()["count"])
        logger.warning("/tokenize answered %s for %s", response.status_code, request_id)
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        logger.warning("could not count tokens for %s: %s", request_id, exc)
    return None


async def count_cut_stream(upstream: Upstream, body: dict, meter: Meter, request_id: str) -> None:
    """A stream that ended before its usage chunk (client gone, engine failed): count what it consumed.

    Prompt: the engine's own count (/tokenize applies the same chat template). Completion: the streamed
    text of each choice re-tokenized by the engine (minus the special tokens /tokenize adds to any text),
    never less than one token per content chunk received.
    """
    if "messages" in body:
        # the chat template renders the tool definitions too (engine/tools.py)
        prompt_job = count_tokens(upstream, {k: body[k] for k in ("messages", "tools", "tool_choice") if k in body},
                                  request_id)
    else:
        prompt_job = _count_prompts(upstream, body.get("prompt"), request_id)
    texts = list(meter.streamed_text.values())
    results = await asyncio.gather(
        prompt_job,
        count_tokens(upstream, {"prompt": ""}, request_id),
        *(count_tokens(upstream, {"prompt": "".join(parts)}, request_id) for parts in texts),
    )
    meter.prompt_tokens = results[0]
    specials, counts = results[1], results[2:]
    if specials is not None and all(c is not None for c in counts):
        meter.completion_tokens = max(meter.completion_tokens, sum(c - specials for c in counts))


async def _count_prompts(upstream: Upstream, prompt, request_id: str) -> int | None:
    """A completion's prompt tokens: every prompt of a batch (token ids are counted as they are)."""
    batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list))
    counts = await asyncio.gather(*(asyncio.sleep(0, len(p)) if isinstance(p, list) else count_tokens(upstream, {"prompt": p}, request_id)
                                    for p in (prompt if batch else [prompt])))
    return None if None in counts else sum(counts)


def tokens_in_chunk(chunk: dict, streamed_text: dict[int, list[str]]) -> int:
    """Choices with new text in a stream chunk (each carries at least one generated token); the text
    is kept per choice in `streamed_text`."""
    count = 0
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        text = (delta or {}).get("content") if delta is not None else choice.get("text")
        generated = bool(text)
        # A tool call streams as its name (arguments "") then its arguments, both from one engine step:
        # both are generated text, the arguments chunk is the one that counts.
        for call in (delta or {}).get("tool_calls") or ():
            function = call.get("function") or {}
            text = (text or "") + (function.get("name") or "") + (function.get("arguments") or "")
            generated = generated or bool(function.get("arguments"))
        if text:
            streamed_text.setdefault(choice.get("index", 0), []).append(text)
        if generated:
            count += 1
    return count


def take_answer_text(body: dict, meter: Meter) -> None:
    """A whole answer without usage: each choice's text kept for counting, at least one token per choice
    with text (as a stream chunk counts)."""
    for choice in body.get("choices") or ():
        message = choice.get("message") or {}
        text = choice.get("text") if "text" in choice else message.get("content")
        for call in message.get("tool_calls") or ():
            function = call.get("function") or {}
            text = (text or "") + (function.get("name") or "") + (function.get("arguments") or "")
        if text:
            meter.streamed_text.setdefault(choice.get("index", 0), []).append(text)
            meter.completion_tokens += 1


def sse_error(error: GatewayError) -> bytes:
    return f"data: {json.dumps(error_body(error.message, error.type, error.code, error.param))}\n\n".encode()


async def relay_stream(
    response: httpx.Response, meter: Meter, client_wants_usage: bool, upstream: Upstream,
    client_wants_progress: bool = False,
) -> AsyncIterator[bytes]:
    """Yield the engine's SSE events as they arrive, metering them; closes the upstream on exit.

    The usage so far that the gateway asked of the engine on every chunk is metered and taken out again
    unless the client asked for it too (a chat chunk then says `usage: null`, as OpenAI's do)."""
    done = False
    try:
        async for line in response.aiter_lines():
            if not line:
                continue
            if not line.startswith("data:"):
                yield f"{line}\n\n".encode()
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = meter.done = True  # the caller sends [DONE] once the usage is recorded
                break
            try:
                chunk = json.loads(data)
            except ValueError:
                chunk = {}
            if "error" in chunk:
                meter.status, meter.http_status = UsageStatus.UPSTREAM_ERROR, 502
                yield f"data: {data}\n\n".encode()
                done = True
                break
            generated = tokens_in_chunk(chunk, meter.streamed_text)
            if generated:
                meter.mark_first_token()
                if not meter.usage_reported:
                    meter.completion_tokens += generated
            if chunk.get("usage") and chunk.get("choices"):
                meter.take_progress(chunk["usage"])
                if not client_wants_progress:
                    del chunk["usage"]
                    if client_wants_usage and chunk.get("object") == "chat.completion.chunk":
                        chunk["usage"] = None
                    data = json.dumps(chunk, ensure_ascii=False)
            elif chunk.get("usage"):
                meter.take_usage(chunk["usage"])
                if not client_wants_usage:
                    continue  # the usage chunk the gateway asked for on its own behalf
            yield f"data: {data}\n\n".encode()
        if not done:
            raise httpx.RemoteProtocolError("the model server closed the stream before [DONE]")
    except (httpx.HTTPError, httpx.StreamError) as exc:
        meter.status, error = upstream_failure(exc)
        meter.http_status = error.status
        logger.warning("stream from %s failed: %s", upstream.base_url, exc)
        yield sse_error(error)
    except asyncio.CancelledError:
        meter.status, meter.http_status = UsageStatus.CLIENT_DISCONNECTED, 499
        raise
    finally:
        await asyncio.shield(response.aclose())
