"""OpenAI-compatible HTTP server over an AsyncEngine (Starlette, run by uvicorn)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import importlib.metadata
import json
import time
import uuid
from collections.abc import AsyncIterator
from functools import lru_cache

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine import schema, telemetry, tools
from engine.async_engine import AsyncEngine, EngineDeadError, EngineOverloadedError
from engine.embedding_engine import EmbeddingEngine, EmbeddingOutput
from engine.llm_engine import CompletionDelta, ContextLengthError, RequestOutput, TokenLogprob
from engine.prompts import PromptBuilder
from engine.protocol import (
    APIError,
    ParsedEmbedding,
    ParsedRequest,
    invalid,
    parse_chat_request,
    parse_completion_request,
    parse_embedding_request,
)
from engine.sampling_params import SamplingParamError
from engine.structured import GrammarError


class OpenAIServer:
    def __init__(self, engine: AsyncEngine, *, api_key: str | None = None, keepalive_interval: float = 15.0,
                 tool_format: str = "auto"):
        assert tool_format in schema.TOOL_FORMATS, tool_format
        self.engine = engine
        self.keepalive_interval = keepalive_interval  # non-streamed answers: seconds of silence at most
        self.llm = engine.engine
        self.embeds = isinstance(self.llm, EmbeddingEngine)  # an embeddings model: /v1/embeddings only
        self.tokenizer = self.llm.tokenizer
        # its tool_format is the default; a request's `tool_format` (the gateway's catalog) wins
        self.prompts = PromptBuilder(self.tokenizer, tool_format)
        self._published: bytes | None = None  # GET /v1/tokenizer's body, built on first use
        self.model_name = self.llm.model_name
        self.api_key = api_key
        self.created = int(time.time())
        self.system_fingerprint = _fingerprint(self.llm.loaded.name or self.model_name, self.llm.loaded.spec.dtype)
        self.token_text = lru_cache(maxsize=65536)(
            lambda token_id: self.tokenizer.decode([token_id], skip_special_tokens=False))

    # -- plumbing -------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise APIError("Invalid or missing API key", status=401, type="invalid_request_error",
                           code="invalid_api_key")

    async def _json(self, request: Request) -> dict:
        try:
            body = schema.parse_json(await request.body())
        except schema.RequestError as exc:
            raise invalid(exc.message, code=exc.code) from None
        if not isinstance(body, dict):
            raise invalid("the request body must be a JSON object")
        return body

    def _check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(f"The model `{model}` does not exist.", status=404, param="model", code="model_not_found")

    def _prompt_ids(self, parsed: ParsedRequest, prompt: str | list[int] | None = None) -> list[int]:
        """The token ids of the chat's rendered messages, or of `prompt` (default: the first prompt)."""
        if parsed.messages is not None:
            try:
                return self.prompts.chat_ids(parsed.messages, parsed.tools, parsed.tool_format)
            except ValueError as exc:
                raise invalid(str(exc), "messages") from None
        return self.prompts.completion_ids(parsed.prompt if prompt is None else prompt)

    def _check_prompt(self, ids: list[int], parsed: ParsedRequest) -> None:
        try:
            self.llm.check_prompt(ids, parsed.params)
        except ContextLengthError as exc:
            param = exc.param if exc.param == "max_tokens" else ("messages" if parsed.messages else "prompt")
            raise APIError(str(exc), param=param, code="context_length_exceeded") from None
        except SamplingParamError as exc:
            raise invalid(str(exc), exc.param) from None

    def _usage(self, outs: list[RequestOutput]) -> dict:
        """Usage over the request's engine requests (one per prompt), each its last output."""
        prompt = sum(out.num_prompt_tokens for out in outs)
        completion = sum(out.num_output_tokens for out in outs)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(out.num_cached_tokens for out in outs)},
        }

    # -- logprobs in the two OpenAI shapes ------------------------------------------------------
    def _chat_logprobs(self, delta: CompletionDelta) -> dict | None:
        if delta.logprobs is None:
            return None

        def entry(token_id: int, logprob: float) -> dict:
            text = self.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                            for lp in delta.logprobs], "refusal": None}

    def _completion_logprobs(self, delta: CompletionDelta, offset: int) -> dict | None:
        if delta.logprobs is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        for lp in delta.logprobs:
            text = self.token_text(lp.token_id)
            tokens.append(text)
            token_logprobs.append(lp.logprob)
            top.append(self._top_by_text(lp.top))  # logprobs=0: {}; the spec allows no null
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _top_by_text(self, top: list[tuple[int, float]]) -> dict[str, float]:
        """Alternatives keyed by their text, as the completions API has them; where two tokens read the same
        (byte tokens of one character), the more likely one's value stays."""
        out: dict[str, float] = {}
        for token_id, logprob in top:
            out.setdefault(self.token_text(token_id), logprob)
        return out

    def _echo_logprobs(self, entries: list[TokenLogprob | None], ids: list[int], k: int) -> dict:
        """The echoed prompt's part of a completion's logprobs. The spec allows no null, so the arrays start
        at the prompt's second token (the first has no logprob: nothing precedes it); `text_offset` says
        where each token starts in the echoed text."""
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = len(self.token_text(ids[0]))
        for entry in entries[1:]:
            text = self.token_text(entry.token_id)
            tokens.append(text)
            token_logprobs.append(entry.logprob)
            top.append(self._top_by_text(entry.top[:k]))
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _prompt_logprobs(self, entries: list[TokenLogprob | None] | None, k: int) -> list | None:
        """vLLM's `prompt_logprobs`: per prompt token (None for the first) its logprob, rank and decoded text,
        and the same for its k most likely alternatives, keyed by token id."""
        if entries is None:
            return None

        def entry(token_id: int, logprob: float, rank: int) -> dict:
            return {"logprob": logprob, "rank": rank, "decoded_token": self.token_text(token_id)}

        return [None] + [{str(e.token_id): entry(e.token_id, e.logprob, e.rank),
                          **{str(t): entry(t, v, r) for r, (t, v) in enumerate(e.top[:k], 1) if t != e.token_id}}
                         for e in entries[1:]]

    # -- endpoints ------------------------------------------------------------------------------
    def _model_object(self) -> dict:
        """OpenAI's model object plus documented extras: the context length (`max_model_len`, vLLM's name),
        what the model can do (`capabilities`) and how tools reach its prompt by default (`tool_format`)."""
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "maas",
                "max_model_len": self.llm.scheduler.max_model_len,
                "capabilities": dict(schema.EMBEDDING_CAPABILITIES if self.embeds else schema.CAPABILITIES),
                "tool_format": self.prompts.tool_format}

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_object()]})

    async def model(self, request: Request) -> Response:
        self._authorize(request)
        self._check_model(request.path_params["model"])
        return JSONResponse(self._model_object())

    async def health(self, request: Request) -> Response:
        if self.engine.healthy:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "error": repr(self.engine.error)}, status_code=503)

    async def metrics(self, request: Request) -> Response:
        self.llm.metrics.observe_gauges(self.llm)
        return Response(self.llm.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def load(self, request: Request) -> Response:
        """What a router needs, cheaper than /metrics: queue depth, KV-cache use and the prefix cache's
        token counts since start (the gateways poll it each second: inference/routing.py)."""
        sched = self.llm.scheduler
        body = {"waiting": len(sched.waiting), "running": len(getattr(sched, "running", ()))}
        bm = getattr(sched, "block_manager", None)
        if bm is not None:
            queries, hits = bm.prefix_queries, bm.prefix_hits
            body.update(kv_cache_usage=round(bm.usage, 4), prefix_cache_queries=queries, prefix_cache_hits=hits,
                        prefix_cache_hit_rate=round(hits / queries, 4) if queries else 0.0)
        return JSONResponse(body)

    async def published_tokenizer(self, request: Request) -> Response:
        """The tokenizer, chat template and default tool format (our extension): the gateway counts prompts
        with them exactly as this server builds them. Cached by the caller per replica."""
        self._authorize(request)
        if self._published is None:
            self._published = json.dumps({**self.prompts.published(), "model": self.model_name}).encode()
        return Response(self._published, media_type="application/json")

    async def tokenize(self, request: Request) -> Response:
        self._authorize(request)
        body = await self._json(request)
        if body.get("model") is not None:
            self._check_model(body["model"])
        if "messages" in body:
            parsed = parse_chat_request({**body, "model": self.model_name})
        elif isinstance(body.get("prompt"), str):
            parsed = ParsedRequest(self.model_name, None, False, False, None, None, prompt=body["prompt"])
        else:
            raise invalid("give 'prompt' (a string) or 'messages'", "prompt")
        ids = self._prompt_ids(parsed)
        return JSONResponse({"count": len(ids), "tokens": ids, "max_model_len": self.llm.scheduler.max_model_len})

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, *, chat: bool) -> Response:
        self._authorize(request)
        body = await self._json(request)
        parse = parse_chat_request if chat else parse_completion_request
        self._check_generative(body, chat)
        parsed = parse(body, self.llm.loaded.generation_defaults)
        self._check_model(parsed.model)
        prompts = [None] if chat else parsed.prompts
        ids = [self._prompt_ids(parsed, prompt) for prompt in prompts]
        for prompt_ids in ids:
            self._check_prompt(prompt_ids, parsed)
        self._check_batch(ids, parsed)
        if parsed.params.guide is not None:
            await self._compile(parsed.params.guide)
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        # several prompts: one engine request each, submitted together
        engine_ids = [request_id] if len(ids) == 1 else [f"{request_id}-{i}" for i in range(len(ids))]
        try:
            streams = self.engine.generate_many(list(zip(engine_ids, ids, strict=True)), parsed.params,
                                                cache_salt=parsed.cache_salt)
        except RuntimeError as exc:  # overloaded, or not running
            raise engine_error(exc) from None
        created = int(time.time())
        if parsed.stream:
            return StreamingResponse(self._stream(streams, parsed, request_id, created, chat, ids,
                                                  caller_request_id=request.headers.get("x-request-id")),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return await self._whole(request, self._answer(streams, parsed, request_id, created, chat, ids,
                                                        request.headers.get("x-request-id")))

    async def _whole(self, request: Request, answer_body) -> Response:
        """A non-streamed answer (the coroutine `answer_body` builds its body). The client leaving aborts it
        in the engine (499); a long answer gets its 200 now and whitespace (valid before JSON) while it is
        generated, so that no proxy's read timeout fires on silence; a failure after that is an error body."""
        answer = asyncio.ensure_future(answer_body)
        gone = asyncio.ensure_future(_disconnected(request))
        done, _ = await asyncio.wait({answer, gone}, timeout=self.keepalive_interval,
                                     return_when=asyncio.FIRST_COMPLETED)
        if answer not in done:
            if gone in done:
                answer.cancel()  # aborts the request in the engine
                return Response(status_code=499)
            gone.cancel()
            return StreamingResponse(self._keepalive(answer), media_type="application/json")
        gone.cancel()
        return JSONResponse(answer.result())

    def _check_generative(self, body: dict, chat: bool) -> None:
        """Chat and completions on an embeddings model: a 400 pointing to /v1/embeddings."""
        if self.embeds:
            endpoint = "chat/completions" if chat else "completions"
            raise invalid(f"The model `{self.model_name}` is an embeddings model: it serves POST /v1/embeddings, "
                          f"not /v1/{endpoint}.", "model", "model_not_supported")

    # -- embeddings ---------------------------------------------------------------------------------
    async def embeddings(self, request: Request) -> Response:
        self._authorize(request)
        parsed = parse_embedding_request(await self._json(request))
        self._check_model(parsed.model)
        if not self.embeds:
            raise invalid(f"The model `{self.model_name}` does not serve embeddings: it is a generative model "
                          "(POST /v1/chat/completions, /v1/completions).", "model", "model_not_supported")
        ids = [self.tokenizer.encode(x) if isinstance(x, str) else list(x) for x in parsed.inputs]
        try:
            self.llm.check_prompt(ids, parsed.params)
        except ContextLengthError as exc:
            raise APIError(str(exc), param=exc.param, code="context_length_exceeded") from None
        except SamplingParamError as exc:
            raise invalid(str(exc), exc.param) from None
        try:
            stream = self.engine.embed(f"embd-{uuid.uuid4().hex}", ids, parsed.params)
        except RuntimeError as exc:  # overloaded, or not running
            raise engine_error(exc) from None
        return await self._whole(request, self._embedding_answer(stream, parsed))

    async def _embedding_answer(self, stream: AsyncIterator[EmbeddingOutput], parsed: ParsedEmbedding) -> dict:
        """OpenAI's embeddings list: one vector per input, in input order, floats or base64 float32."""
        out = [out async for out in _engine_errors(stream)][-1]  # the one output: every input's vector
        encode = _base64_vector if parsed.encoding_format == "base64" else (lambda v: v.tolist())
        return {"object": "list", "model": self.model_name,
                "data": [{"object": "embedding", "index": i, "embedding": encode(v)}
                         for i, v in enumerate(out.embeddings)],
                "usage": {"prompt_tokens": out.num_prompt_tokens, "total_tokens": out.num_prompt_tokens}}

    def _check_batch(self, ids: list[list[int]], parsed: ParsedRequest) -> None:
        """Several prompts: what the request generates over all of them within the per-request limit."""
        cap, params = self.llm.config.max_tokens_per_request, parsed.params
        total = len(ids) * params.n * (params.max_tokens or 0)
        if len(ids) > 1 and total > cap:
            raise invalid(f"prompts x n x max_tokens is {total}, over this server's limit of {cap} generated tokens "
                          "per request: send fewer prompts or lower n or max_tokens.", "max_tokens")

    async def _compile(self, guide) -> None:
        """Compile the request's grammar in a worker thread (cached per grammar), before it is queued, so
        the step loop never waits on a compilation; one llguidance refuses is a 400 naming its field."""
        try:
            await asyncio.to_thread(self.llm.grammars.compile, guide)
        except GrammarError as exc:
            raise invalid(str(exc), exc.param) from None

    def _chat_message(self, parsed: ParsedRequest, c: CompletionDelta) -> tuple[dict, str | None]:
        """A whole answer's message and finish_reason (tool calls read from the text when tools apply)."""
        if not parsed.tool_names:
            return {"role": "assistant", "content": c.text, "refusal": None}, c.finish_reason
        content, calls = tools.parse(c.text, parsed.tool_names)
        message = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = [call.api() for call in calls]
        return message, _finish_reason(c.finish_reason, calls)

    async def _keepalive(self, answer: asyncio.Future) -> AsyncIterator[bytes]:
        try:
            while not (await asyncio.wait({answer}, timeout=self.keepalive_interval))[0]:
                yield b" "
            try:
                body = answer.result()
            except APIError as exc:
                body = exc.body()
            yield json.dumps(body).encode()
        finally:
            answer.cancel()  # the client left (Starlette cancels the stream): abort the request

    async def _answer(self, streams: list[AsyncIterator[RequestOutput]], parsed: ParsedRequest, request_id: str,
                      created: int, chat: bool, ids: list[list[int]], caller_request_id: str | None) -> dict:
        """The whole (non-streamed) response body; several prompts' choices indexed prompt-major (OpenAI's
        `index = prompt_i * n + choice_j`)."""
        outs, choices, prompt_logprobs = await self._collect(streams, parsed, ids)
        n = parsed.params.n
        for i, out in enumerate(outs):
            mine = choices[i * n:(i + 1) * n]
            telemetry.record_request(out, model=self.model_name, finish_reasons=[c.finish_reason for c in mine],
                                     request_id=caller_request_id,
                                     prompt=parsed.messages or (parsed.prompts or [parsed.prompt])[i],
                                     completion=[c.text for c in mine])
        if chat:
            messages = [self._chat_message(parsed, c) for c in choices]
            return {"id": request_id, "object": "chat.completion", "created": created, "model": self.model_name,
                    "choices": [{"index": c.index, "message": message, "logprobs": self._chat_logprobs(c),
                                 "finish_reason": finish_reason}
                                for c, (message, finish_reason) in zip(choices, messages, strict=True)],
                    "usage": self._usage(outs), "system_fingerprint": self.system_fingerprint,
                    **({"prompt_logprobs": self._prompt_logprobs(prompt_logprobs[0], parsed.prompt_logprobs)}
                       if parsed.prompt_logprobs is not None else {})}
        echoed = [len(self._echo_text(parsed, i, ids)) for i in range(len(ids))]  # text_offset starts at `text`
        return {"id": request_id, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"index": c.index, "text": c.text,
                             "logprobs": self._choice_logprobs(parsed, c, echoed[c.index // n],
                                                               prompt_logprobs[c.index // n], ids[c.index // n]),
                             "finish_reason": c.finish_reason,
                             **({"prompt_logprobs": self._prompt_logprobs(prompt_logprobs[c.index // n],
                                                                          parsed.prompt_logprobs)}
                                if parsed.prompt_logprobs is not None else {})} for c in choices],
                "usage": self._usage(outs), "system_fingerprint": self.system_fingerprint}

    def _choice_logprobs(self, parsed: ParsedRequest, c: CompletionDelta, offset: int,
                         prompt_logprobs: list | None, ids: list[int]) -> dict | None:
        """A completion choice's logprobs: with echo, the echoed prompt's tokens first."""
        generated = self._completion_logprobs(c, offset)
        if not (parsed.echo and generated is not None and prompt_logprobs is not None):
            return generated
        echoed = self._echo_logprobs(prompt_logprobs, ids, parsed.params.top_logprobs)
        return {key: echoed[key] + generated[key] for key in generated}

    def _echo_text(self, parsed: ParsedRequest, i: int, ids: list[list[int]]) -> str:
        """With echo, prompt i's text (token id prompts decoded)."""
        if not parsed.echo:
            return ""
        prompt = (parsed.prompts or [parsed.prompt])[i]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(ids[i])

    async def _collect(self, streams: list[AsyncIterator[RequestOutput]], parsed: ParsedRequest,
                       ids: list[list[int]]) -> tuple[list[RequestOutput], list[CompletionDelta], list]:
        """Each prompt's last output, every choice in full (indexed prompt-major) and each prompt's prompt
        logprobs (None unless asked for)."""
        n = parsed.params.n
        choices = [CompletionDelta(k, logprobs=[] if parsed.params.logprobs else None) for k in range(len(ids) * n)]
        for c in choices:
            c.text = self._echo_text(parsed, c.index // n, ids)
        outs: list = [None] * len(ids)
        prompt_logprobs: list = [None] * len(ids)
        async for i, out in _merged(streams):
            outs[i] = out
            prompt_logprobs[i] = out.prompt_logprobs or prompt_logprobs[i]
            for d in out.outputs:
                c = choices[i * n + d.index]
                c.text += d.text
                c.token_ids += d.token_ids
                if d.logprobs is not None:
                    c.logprobs += d.logprobs
                c.finish_reason = d.finish_reason or c.finish_reason
        return outs, choices, prompt_logprobs

    async def _stream(self, streams, parsed: ParsedRequest, request_id: str, created: int, chat: bool,
                      ids: list[list[int]], caller_request_id: str | None = None) -> AsyncIterator[str]:
        """SSE chunks of every prompt's choices as the engine produces them (indexed prompt-major), then
        the usage over all prompts."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        # chat chunks carry `usage: null` until the usage chunk; a completion's `usage` may not be null, so
        # its chunks leave it out
        usage_field = {"usage": None} if parsed.include_usage and chat else {}
        n = parsed.params.n
        choices_total = len(ids) * n
        echoes = [self._echo_text(parsed, k // n, ids) for k in range(choices_total)]
        offsets = {k: len(echo) for k, echo in enumerate(echoes)}
        outs: list = [None] * len(ids)

        def chunk(choices: list[dict]) -> str:
            payload = {"id": request_id, "object": obj, "created": created, "model": self.model_name,
                       "choices": choices, "system_fingerprint": self.system_fingerprint, **usage_field}
            if parsed.continuous_usage and None not in outs:
                payload["usage"] = self._usage(outs)
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        if chat:
            yield chunk([{"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for k in range(choices_total)])
        # echo with logprobs: each prompt's echo chunk waits for its logprobs (its first token's output)
        echo_pending = set(range(len(ids))) if parsed.echo and parsed.params.logprobs else set()
        if parsed.echo and not echo_pending:
            yield chunk([{"index": k, "text": echoes[k], "logprobs": None, "finish_reason": None}
                         for k in range(choices_total)])
        texts = dict.fromkeys(range(choices_total), "") if telemetry.capture_content() else None
        finish_reasons: dict[int, str | None] = dict.fromkeys(range(choices_total))
        parsers = ({k: tools.ToolCallParser(parsed.tool_names) for k in range(choices_total)}
                   if chat and parsed.tool_names else None)
        try:
            async for i, out in _merged(streams):
                outs[i] = out
                if i in echo_pending and out.prompt_logprobs is not None:
                    echo_pending.discard(i)
                    logprobs = self._echo_logprobs(out.prompt_logprobs, ids[i], parsed.params.top_logprobs)
                    yield chunk([{"index": k, "text": echoes[k], "logprobs": logprobs, "finish_reason": None}
                                 for k in range(i * n, (i + 1) * n)])
                choices = []
                for d in out.outputs:
                    k = i * n + d.index
                    finish_reasons[k] = d.finish_reason or finish_reasons[k]
                    if texts is not None:
                        texts[k] += d.text
                    if parsers is not None:
                        for piece in self._tool_chunks(parsers[k], d):
                            yield chunk([piece])
                        continue
                    if not d.text and d.finish_reason is None and d.logprobs is None:
                        continue  # nothing to show yet (held back or an incomplete character)
                    if chat:
                        delta = {"content": d.text} if d.text or d.finish_reason is None else {}
                        choices.append({"index": k, "delta": delta, "logprobs": self._chat_logprobs(d),
                                        "finish_reason": d.finish_reason})
                    else:
                        choices.append({"index": k, "text": d.text,
                                        "logprobs": self._completion_logprobs(d, offsets[k]),
                                        "finish_reason": d.finish_reason})
                        offsets[k] += len(d.text)
                if choices:
                    yield chunk(choices)
        except APIError as exc:
            yield f"data: {json.dumps(exc.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        for i, out in enumerate(outs):
            mine = range(i * n, (i + 1) * n)
            telemetry.record_request(out, model=self.model_name, finish_reasons=[finish_reasons[k] for k in mine],
                                     request_id=caller_request_id,
                                     prompt=parsed.messages or (parsed.prompts or [parsed.prompt])[i],
                                     completion=[texts[k] for k in mine] if texts is not None else None)
        if parsed.include_usage and None not in outs:
            payload = {"id": request_id, "object": obj, "created": created, "model": self.model_name,
                       "choices": [], "system_fingerprint": self.system_fingerprint, "usage": self._usage(outs)}
            yield f"data: {json.dumps(payload)}\n\n"
        yield "data: [DONE]\n\n"


    def _tool_chunks(self, parser: tools.ToolCallParser, d: CompletionDelta) -> list[dict]:
        """A choice's stream entries for one engine delta when tool calls are read from the answer: content
        that cannot be part of a call, then for each completed call its id and name (arguments "") and
        its arguments, as OpenAI streams them; the finish_reason (and the delta's logprobs) on the last."""
        content, calls = parser.feed(d.text)
        if d.finish_reason is not None:
            content += parser.finish()
        deltas = [{"content": content}] if content else []
        for call in calls:
            deltas.append({"tool_calls": [{"index": call.index, "id": call.id, "type": "function",
                                           "function": {"name": call.name, "arguments": ""}}]})
            deltas.append({"tool_calls": [{"index": call.index, "function": {"arguments": call.arguments}}]})
        logprobs = self._chat_logprobs(d)
        if not deltas and (d.finish_reason is not None or logprobs is not None):
            deltas.append({})
        entries = [{"index": d.index, "delta": delta, "logprobs": None, "finish_reason": None} for delta in deltas]
        if entries:
            entries[-1]["logprobs"] = logprobs
            if d.finish_reason is not None:
                entries[-1]["finish_reason"] = _finish_reason(d.finish_reason, parser.calls)
        return entries


def _finish_reason(engine_reason: str | None, calls: list) -> str | None:
    """The API's finish_reason for an answer read for tool calls: the engine's, except that an answer that
    stopped by itself with tool calls in it ends with "tool_calls"."""
    return "tool_calls" if calls and engine_reason == "stop" else engine_reason


def _base64_vector(vector) -> str:
    """`encoding_format: base64`: the vector's little-endian float32 bytes, as OpenAI sends them."""
    return base64.b64encode(vector.float().numpy().astype("<f4").tobytes()).decode()


def _fingerprint(model: str, dtype) -> str:
    """`system_fingerprint`: which engine build serves which weights at which precision."""
    try:
        version = importlib.metadata.version("maas")
    except importlib.metadata.PackageNotFoundError:
        version = "dev"
    return "fp_" + hashlib.sha256(f"{version}:{model}:{dtype}".encode()).hexdigest()[:10]


def engine_error(exc: Exception) -> APIError:
    """The OpenAI error for a failure inside the engine."""
    if isinstance(exc, EngineOverloadedError):
        return APIError(str(exc), status=503, type="server_error", code="engine_overloaded")
    if isinstance(exc, ContextLengthError):
        return APIError(str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, SamplingParamError):
        return invalid(str(exc), exc.param)
    if isinstance(exc, EngineDeadError):
        return APIError(str(exc), status=503, type="server_error", code="engine_unavailable")
    # RequestFailedError: this request alone
    return APIError(str(exc), status=500, type="server_error", code="engine_error")


async def _engine_errors(stream: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Engine-side failures become OpenAI errors."""
    try:
        async for out in stream:
            yield out
    except (RuntimeError, ValueError) as exc:
        raise engine_error(exc) from None


async def _merged(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from each prompt's engine stream as they come, engine failures as OpenAI
    errors; the first error ends it, and leaving it early (a disconnect, an error) aborts every request."""
    if len(streams) == 1:
        async for out in _engine_errors(streams[0]):
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i: int, stream) -> None:
        try:
            async for out in _engine_errors(stream):
                queue.put_nowait((i, out))
            queue.put_nowait((i, done))
        except APIError as exc:
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, stream)) for i, stream in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is done:
                left -= 1
            elif isinstance(item, APIError):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()  # a stream cancelled mid-way aborts its engine request
        await asyncio.gather(*tasks, return_exceptions=True)


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read, so only that message can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def build_app(engine: AsyncEngine, *, api_key: str | None = None, keepalive_interval: float = 15.0,
              tool_format: str = "auto") -> Starlette:
    server = OpenAIServer(engine, api_key=api_key, keepalive_interval=keepalive_interval, tool_format=tool_format)

    async def on_api_error(request: Request, exc: APIError) -> Response:
        return JSONResponse(exc.body(), status_code=exc.status)

    async def on_http_error(request: Request, exc: HTTPException) -> Response:
        """The router's 404 and 405 in the OpenAI error shape (with the gateway's wording), not plain text."""
        if exc.status_code == 404:
            message, code = f"Invalid URL ({request.method} {request.url.path})", "unknown_url"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message, code = f"Method {request.method} is not allowed on {request.url.path}. Allowed: {allowed}.", None
        else:
            message, code = exc.detail, None
        error = APIError(message, status=exc.status_code, code=code,
                         type="server_error" if exc.status_code >= 500 else "invalid_request_error")
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    async def on_server_error(request: Request, exc: Exception) -> Response:
        return JSONResponse(APIError(f"internal error: {exc}", status=500, type="server_error").body(),
                            status_code=500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if not engine.healthy:
            engine.start()
        yield
        engine.shutdown()

    app = Starlette(
        routes=[
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/v1/models/{model:path}", server.model, methods=["GET"]),
            Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
            Route("/v1/completions", server.completions, methods=["POST"]),
            Route("/v1/embeddings", server.embeddings, methods=["POST"]),
            Route("/tokenize", server.tokenize, methods=["POST"]),
            Route("/v1/tokenizer", server.published_tokenizer, methods=["GET"]),
            Route("/health", server.health, methods=["GET"]),
            Route("/metrics", server.metrics, methods=["GET"]),
            Route("/load", server.load, methods=["GET"]),
        ],
        exception_handlers={APIError: on_api_error, HTTPException: on_http_error, Exception: on_server_error},
        lifespan=lifespan,
    )
    app.state.server = server
    telemetry.instrument_app(app)
    return app
