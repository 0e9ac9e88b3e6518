"""Exact prompt token counts at admission, with the tokenizer and chat template each engine replica
publishes (`GET /v1/tokenizer`): the gateway builds the prompt with the engine's own `PromptBuilder`,
so a quota hold counts the tokens the engine will see, not a byte bound.

One fetch per replica per gateway process (a few MB, a fraction of a second to load); a replica that
does not publish one (another server, an old engine) or cannot be reached is asked again after
GATEWAY_TOKENIZER_RETRY_SECONDS, and meanwhile the byte bound applies. Counting a prompt is the
`tokenizers` library's Rust encoder plus one template render: a fraction of a millisecond.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
from django.conf import settings
from opentelemetry import context as otel_context

from engine.prompts import PromptBuilder

from .catalog import Upstream
from .proxy import upstream_headers
from .validation import InferenceRequest

logger = logging.getLogger(__name__)

_builders: dict[tuple[int, str], PromptBuilder | float] = {}  # (deployment, url) -> builder, or retry time
_lock = threading.Lock()


def cached(upstream: Upstream) -> PromptBuilder | None | bool:
    """The replica's builder; None while it has none (retry later); False when never fetched or due again."""
    if not settings.GATEWAY_EXACT_PROMPT_COUNT or not upstream.supports_tokenizer:
        return None  # a server that publishes no tokenizer is never asked for one
    found = _builders.get((upstream.id, upstream.base_url))
    if isinstance(found, PromptBuilder):
        return found
    if found is not None and time.monotonic() < found:
        return None
    return False


def fetch(upstream: Upstream) -> PromptBuilder | None:
    """GET /v1/tokenizer from the replica (blocking; the async path calls it in a thread, once)."""
    key = (upstream.id, upstream.base_url)
    detached = otel_context.attach(otel_context.Context())  # a cache fill, not part of the request's trace
    try:
        response = httpx.get(f"{upstream.base_url}/v1/tokenizer", headers=upstream_headers(upstream, "tokenizer"),
                             timeout=settings.GATEWAY_TOKENIZER_TIMEOUT)
        response.raise_for_status()
        builder = PromptBuilder.from_published(response.json())
    except Exception as exc:  # noqa: BLE001 - any failure: the byte bound, and ask again later
        logger.warning("no tokenizer from %s (%s): prompts are bounded by their bytes for %ss", upstream.base_url,
                       exc, settings.GATEWAY_TOKENIZER_RETRY_SECONDS)
        with _lock:
            _builders[key] = time.monotonic() + settings.GATEWAY_TOKENIZER_RETRY_SECONDS
        return None
    finally:
        otel_context.detach(detached)
    with _lock:
        _builders[key] = builder
    return builder


def builder_for(upstream: Upstream) -> PromptBuilder | None:
    found = cached(upstream)
    return fetch(upstream) if found is False else found


def model_builder(upstreams: tuple[Upstream, ...], answering: Upstream) -> PromptBuilder | None | bool:
    """The answering replica's builder, else one a sibling replica of the same model published (an
    external server that publishes none is metered with our engine's tokenizer of that model); False
    when one could be fetched (`fetch` the first of `tokenizer_sources`)."""
    due = False
    for upstream in tokenizer_sources(upstreams, answering):
        found = cached(upstream)
        if found:
            return found
        due = due or found is False
    return False if due else None


def tokenizer_sources(upstreams: tuple[Upstream, ...], answering: Upstream) -> list[Upstream]:
    return [u for u in (answering, *upstreams) if u.supports_tokenizer and (u is answering or u.id != answering.id)]


def count(builder: PromptBuilder | None, inference: InferenceRequest, tool_format: str | None) -> int | None:
    """The request's prompt tokens (all prompts of a completions batch), or None when unknown: no
    builder, or a conversation the template refuses (the engine then answers the 400)."""
    if builder is None:
        return None
    request = inference.request
    try:
        if inference.endpoint == "chat/completions":
            return len(builder.chat_ids(request.template_messages(), request.template_tools(), tool_format))
        if inference.endpoint == "completions":
            return sum(len(builder.completion_ids(p)) for p in request.prompt_list())
        if inference.endpoint == "embeddings":
            return sum(len(builder.completion_ids(x)) for x in request.inputs())
        return None
    except ValueError:
        return None


def count_cut(builder: PromptBuilder, inference: InferenceRequest, tool_format: str | None, meter) -> None:
    """A request that ended without the engine's usage (client gone, engine failed): its prompt counted
    here, and each choice's relayed text re-tokenized (never less than the chunks already counted), with
    no request to the replica, which may be the one that died."""
    prompt = count(builder, inference, tool_format)
    if prompt is not None:
        meter.prompt_tokens = prompt
    encode = builder.tokenizer.encode
    echoes = _echoes(builder, inference)
    relayed = 0
    for index, parts in meter.streamed_text.items():
        text = "".join(parts)
        echo = echoes.get(index, "")
        relayed += len(encode(text[len(echo):] if echo and text.startswith(echo) else text, add_special_tokens=False))
    if echoes:  # the echo chunks were counted as one token each while relayed: the text decides
        meter.completion_tokens = relayed
    else:
        meter.completion_tokens = max(meter.completion_tokens, relayed)


def _echoes(builder: PromptBuilder, inference: InferenceRequest) -> dict[int, str]:
    """With `echo` (completions), each choice's echoed prompt text, which is not generated work."""
    request = inference.request
    if inference.endpoint != "completions" or not request.echo:
        return {}
    n = request.n or 1
    texts = [p if isinstance(p, str) else builder.tokenizer.decode(p) for p in request.prompt_list()]
    return {k: texts[k // n] for k in range(len(texts) * n)}


def forget() -> None:
    """Drop every fetched tokenizer (tests; a replica's model changed)."""
    with _lock:
        _builders.clear()
