"""LLMEngine: requests in, one scheduler step at a time, text deltas out. LLM: the offline batch API."""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.failures import is_fatal
from engine.metrics import EngineMetrics
from engine.model_runner import ModelRunner
from engine.sampling_params import SamplingParamError, SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.structured import Grammars, advance

log = logging.getLogger(__name__)

class ContextLengthError(SamplingParamError):
    """The prompt (plus the requested max_tokens) does not fit the model's context or the KV pool."""


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    rank: int | None = None  # of token_id in its distribution, 1 = most likely (prompt logprobs)


@dataclass
class CompletionDelta:
    """What one choice produced in one step (or, from LLM.generate, in total)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    request_id: str
    outputs: list[CompletionDelta]
    finished: bool
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int  # over all choices, so far
    prompt_token_ids: list[int] = field(default_factory=list)
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    first_scheduled_time: float | None = None
    error: str | None = None  # the request failed inside the engine (finished, answers 500)
    # With SamplingParams.prompt_logprobs, on the output of the first generated token: one entry per
    # prompt token, None for the first (nothing precedes it)
    prompt_logprobs: list[TokenLogprob | None] | None = None


class Request:
    __slots__ = ("request_id", "prompt_token_ids", "params", "seqs", "detoks", "arrival_time", "first_token_time",
                 "num_unfinished")

    def __init__(self, request_id, prompt_token_ids, params, seqs, detoks, arrival_time):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.seqs = seqs
        self.detoks = detoks
        self.arrival_time = arrival_time
        self.first_token_time = None
        self.num_unfinished = len(seqs)

    @property
    def num_cached_tokens(self) -> int:
        return max(self.seqs[0].num_cached_tokens, 0)

    @property
    def num_output_tokens(self) -> int:
        return sum(s.num_output_tokens for s in self.seqs)


class LLMEngine:
    def __init__(self, config: EngineConfig, *, loaded=None, metrics: bool = True):
        from engine.loader import load_model

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.workers = None  # tensor parallelism: ranks 1..N-1 (engine/tp_workers.py)
        tp = None
        if config.tensor_parallel_size > 1:
            if loaded is not None:
                raise ValueError("a model loaded whole cannot be split: with tensor_parallel_size > 1 every rank "
                                 "loads its own shard")
            from engine.distributed import rank_device
            from engine.tp_workers import Workers

            self.workers = Workers.start(config)
            tp = self.workers.tp
        try:
            device = config.device if tp is None else rank_device(config.device, 0)
            self.loaded = loaded or load_model(config.model, dtype=config.dtype, device=device,
                                                 quant=config.weights_quant(), tp=tp)
            self.runner = ModelRunner(self.loaded, config, tp=tp, workers=self.workers)
        except BaseException:
            self.close()
            raise
        self.tokenizer = self.loaded.tokenizer
        self.model_name = config.served_model_name or self.loaded.name
        self.max_model_len = min(config.max_model_len or self.loaded.spec.max_position_embeddings,
                                 self.loaded.spec.max_position_embeddings)
        block_manager = BlockManager(
            self.runner.num_blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching,
            extra_key=f"{self.loaded.name}:{self.loaded.spec.dtype}",
        )
        self.scheduler = Scheduler(
            block_manager, max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len,
        )
        self.eos_token_ids = frozenset(self.loaded.eos_token_ids)  # read by `finish_reason` and min_tokens
        self.requests: dict[str, Request] = {}
        self.metrics = EngineMetrics(self.model_name) if metrics else None
        self.grammars = Grammars(self.tokenizer, self.loaded.spec.vocab_size, self.loaded.eos_token_ids)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (nothing else holds a resource beyond the process)."""
        if self.workers is not None:
            self.workers.stop()
            self.workers = None

    # -- requests -------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    cache_salt: str | None = None, arrival_time: float | None = None) -> Request:
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.check_prompt(token_ids, params)
        max_tokens = self.max_tokens_per_choice(len(token_ids), params)
        arrival = arrival_time if arrival_time is not None else time.perf_counter()
        seqs = [Sequence(request_id, token_ids, params, max_tokens, index=i, cache_salt=cache_salt,
                         arrival_time=arrival) for i in range(params.n)]
        if params.guide is not None:  # compiled already when the server admitted it: a cache hit
            for seq in seqs:
                seq.grammar = self.grammars.matcher(params.guide)
        if params.min_tokens:  # the sampler masks these until min_tokens tokens are out
            early = tuple(sorted(set(params.stop_token_ids) | (set() if params.ignore_eos
                                                               else set(self.eos_token_ids))))
            for seq in seqs:
                seq.min_tokens_stop_ids = early
        detoks = [IncrementalDetokenizer(self.tokenizer, token_ids, params) for _ in seqs]
        request = Request(request_id, token_ids, params, seqs, detoks, arrival)
        self.requests[request_id] = request
        for seq in seqs:
            self.scheduler.add(seq)
        if self.metrics:
            self.metrics.prompt_tokens.inc(len(token_ids))
        return request

    def max_tokens_per_choice(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """max_tokens, or without it what the context and the server's per-request limit leave."""
        room = self.scheduler.max_model_len - num_prompt_tokens
        if params.max_tokens is not None:
            return min(params.max_tokens, room)
        return min(room, self.config.max_tokens_per_request // params.n)

    def check_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        """Reject up front what can never run or depends on the model: empty prompts, ids outside the
        vocabulary, prompts over the context, more tokens than the server's per-request limit."""
        if not token_ids:
            raise SamplingParamError("the prompt is empty", "prompt")
        vocab = self.loaded.spec.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise SamplingParamError(f"prompt token ids must be in [0, {vocab})", "prompt")
        if any(t >= vocab for t in params.stop_token_ids):
            raise SamplingParamError(f"'stop_token_ids' must be token ids in [0, {vocab})", "stop_token_ids")
        if any(t >= vocab for t in params.logit_bias):
            raise SamplingParamError(f"'logit_bias' keys must be token ids in [0, {vocab})", "logit_bias")
        limit = self.scheduler.max_model_len
        if len(token_ids) >= limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, your prompt has "
                f"{len(token_ids)} tokens; it must leave room for at least one generated token.", "messages")
        if params.max_tokens and len(token_ids) + params.max_tokens > limit:
            raise ContextLengthError(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(token_ids) + params.max_tokens} tokens ({len(token_ids)} in the prompt, "
                f"{params.max_tokens} in the completion). Please reduce the prompt or max_tokens.", "max_tokens")
        cap = self.config.max_tokens_per_request
        if params.max_tokens is not None and params.n * params.max_tokens > cap:
            raise SamplingParamError(
                f"n x max_tokens is {params.n * params.max_tokens}, over this server's limit of {cap} generated "
                f"tokens per request: lower n or max_tokens.", "max_tokens")
        if params.n > cap:
            raise SamplingParamError(f"n is over this server's limit of {cap} generated tokens per request", "n")
        most = self.max_tokens_per_choice(len(token_ids), params)
        if params.min_tokens > most:
            raise SamplingParamError(f"min_tokens ({params.min_tokens}) is over the {most} tokens this prompt leaves "
                                     "each choice (context and this server's per-request limit)", "min_tokens")

    def abort(self, request_id: str) -> None:
        """Drop a request (client gone); its blocks return to the pool now."""
        request = self.requests.pop(request_id, None)
        if request is not None:
            for seq in request.seqs:
                self.scheduler.finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, sample, detokenize; returns what each touched request produced.

        A failure in one sequence's sampling or postprocessing fails its request alone (an output with
        `error`); a failure of the step itself (scheduling, the forward pass) propagates: the engine is broken.
        """
        scheduler = self.scheduler
        batch = scheduler.schedule()
        if not batch:
            return []
        sampling, result, prompt_failures = self.runner.run(batch)
        sampled: dict[int, int] = {}
        failures: dict[str, BaseException] = {}
        for seq in batch.seqs:
            if seq.seq_id in prompt_failures:
                failures.setdefault(seq.request_id, prompt_failures[seq.seq_id])
        if result is not None:
            for seq, token, error in zip(sampling, result.token_ids, result.errors, strict=True):
                if error is None:
                    sampled[seq.seq_id] = token
                else:
                    failures.setdefault(seq.request_id, error)
        scheduler.update(batch, sampled)
        now = time.perf_counter()
        outputs: dict[str, RequestOutput] = {}
        for row, seq in enumerate(sampling):
            request = self.requests.get(seq.request_id)
            if request is None or seq.seq_id not in sampled or seq.request_id in failures:
                continue
            try:
                delta = self._postprocess(request, seq, sampled[seq.seq_id], result.logprobs[row], now)
            except Exception as exc:  # noqa: BLE001 - one request's failure is that request's alone
                if is_fatal(exc):
                    raise
                failures[seq.request_id] = exc
                continue
            out = outputs.get(seq.request_id)
            if out is None:
                out = outputs[seq.request_id] = RequestOutput(
                    request.request_id, [], False, len(request.prompt_token_ids), request.num_cached_tokens, 0,
                    arrival_time=request.arrival_time, first_token_time=request.first_token_time,
                    first_scheduled_time=request.seqs[0].first_scheduled_time)
            out.outputs.append(delta)
            if seq.prompt_logprobs is not None and seq.num_output_tokens == 1:
                out.prompt_logprobs = [None] + [TokenLogprob(token, logprob, top, rank) for token, (logprob, rank, top)
                                                in zip(request.prompt_token_ids[1:], seq.prompt_logprobs, strict=True)]
        for request_id, exc in failures.items():
            outputs[request_id] = self._fail(request_id, exc, now)
        for out in outputs.values():
            request = self.requests.get(out.request_id)
            if request is None:
                continue  # failed above
            out.num_output_tokens = request.num_output_tokens
            if request.num_unfinished == 0:
                out.finished = True
                out.finish_time = now
                del self.requests[out.request_id]
                if self.metrics:
                    for seq in request.seqs:
                        self.metrics.observe_finished(request.arrival_time, request.first_token_time, now,
                                                      seq.num_output_tokens, seq.finish_reason)
        if self.metrics:
            self.metrics.generation_tokens.inc(len(sampled))
            self.metrics.observe_step(self)
        return list(outputs.values())

    def _postprocess(self, request: Request, seq: Sequence, token: int, logprobs, now: float) -> CompletionDelta:
        """One sampled token of one sequence: its text, its logprobs, and whether it finished the sequence."""
        if request.first_token_time is None:
            request.first_token_time = now
            if self.metrics:
                self.metrics.ttft.observe(now - request.arrival_time)
        detok = request.detoks[seq.index]
        delta = CompletionDelta(seq.index, token_ids=[token])
        if seq.params.logprobs:
            chosen, top = logprobs
            delta.logprobs = [TokenLogprob(token, chosen, top)]
        if seq.grammar is not None:
            advance(seq, token)
        reason = self.finish_reason(seq, token, detok)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            request.num_unfinished -= 1
            delta.finish_reason = reason
        delta.text = detok.take(final=reason is not None)
        return delta

    def finish_reason(self, seq: Sequence, token: int, detok: IncrementalDetokenizer) -> str | None:
        """The one place that decides whether, and why, a sequence stops after `token` (its last token).

        A stop token (EOS unless ignore_eos, or a stop_token_id) stops without its text; a stop string
        found in the text so far stops, also on the very token that reached max_tokens; neither counts
        during the first `min_tokens` tokens (the sampler also masks the stop tokens then). A grammar that
        admits nothing more stops (the constrained answer is complete, whatever min_tokens says);
        otherwise max_tokens or the context length make it "length".
        """
        params = seq.params
        stops = seq.num_output_tokens > params.min_tokens
        if stops and (token in params.stop_token_ids
                      or (not params.ignore_eos and token in self.eos_token_ids)):
            return "stop"
        detok.add_token(token, check_stop=stops)
        if detok.stopped:
            return "stop"
        if seq.grammar is not None and seq.grammar.is_stopped():
            detok.flush(check_stop=stops)
            return "stop"
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.scheduler.max_model_len:
            detok.flush(check_stop=stops)
            return "stop" if detok.stopped else "length"
        return None

    def _fail(self, request_id: str, exc: BaseException, now: float) -> RequestOutput:
        """Fail one request (all its choices) and free its blocks; the rest of the batch goes on."""
        log.error("request %s failed in the engine: %r", request_id, exc, exc_info=exc)
        request = self.requests.pop(request_id)
        for seq in request.seqs:
            self.scheduler.finish(seq, "error")
        if self.metrics:
            self.metrics.observe_finished(request.arrival_time, request.first_token_time, now,
                                          request.num_output_tokens, "error")
        return RequestOutput(request_id, [], True, len(request.prompt_token_ids), request.num_cached_tokens,
                             request.num_output_tokens, arrival_time=request.arrival_time,
                             first_token_time=request.first_token_time, finish_time=now,
                             error=f"{type(exc).__name__}: {exc}")


_request_ids = itertools.count()


class LLM:
    """Offline API: `LLM(path).generate(prompts, SamplingParams(...))`."""

    def __init__(self, model: str, **config):
        self.engine = LLMEngine(EngineConfig(model=model, **config), metrics=False)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[int] | list[str | list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run all prompts to completion (continuous batching); one RequestOutput per prompt, in order,
        with each choice's full text and token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for prompt, p in zip(prompts, params, strict=True):
            request_id = f"offline-{next(_request_ids)}"
            self.engine.add_request(request_id, prompt, p)
            ids.append(request_id)
        results: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                merged = results.get(out.request_id)
                if merged is None:
                    merged = results[out.request_id] = out
                    out.outputs = _merge([], out.outputs)
                else:
                    merged.outputs = _merge(merged.outputs, out.outputs)
                    merged.finished, merged.finish_time = out.finished, out.finish_time
                    merged.num_output_tokens = out.num_output_tokens
                    merged.prompt_logprobs = merged.prompt_logprobs or out.prompt_logprobs
        for request_id in ids:
            results[request_id].outputs.sort(key=lambda d: d.index)
        return [results[i] for i in ids]


def _merge(total: list[CompletionDelta], deltas: list[CompletionDelta]) -> list[CompletionDelta]:
    by_index = {d.index: d for d in total}
    for d in deltas:
        acc = by_index.get(d.index)
        if acc is None:
            acc = by_index[d.index] = CompletionDelta(d.index, logprobs=[] if d.logprobs is not None else None)
        acc.text += d.text
        acc.token_ids += d.token_ids
        if d.logprobs is not None:
            acc.logprobs = (acc.logprobs or []) + d.logprobs
        acc.finish_reason = d.finish_reason or acc.finish_reason
    return list(by_index.values())
