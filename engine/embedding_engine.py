"""EmbeddingEngine: embedding requests in, one batched encoder pass per step, finished vectors out.

An embedding model runs in its own engine process (`python -m engine serve --model DIR` detects an
encoder directory): the same AsyncEngine thread and HTTP server as a generative model, with this engine
in place of LLMEngine. Its step is `schedule → run → postprocess` like LLMEngine's: the scheduler picks
inputs (engine/embedding_scheduler.py), one padded forward pass computes them, pooling turns each into a
vector, and every request whose inputs are all done is returned.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from engine.config import EngineConfig
from engine.embedding_scheduler import EmbeddingBatch, EmbeddingParams, EmbeddingRequest, EmbeddingScheduler
from engine.failures import is_fatal
from engine.llm_engine import ContextLengthError
from engine.metrics import EmbeddingMetrics
from engine.pooling import finish, pool
from engine.sampling_params import SamplingParamError

log = logging.getLogger(__name__)


@dataclass
class EmbeddingOutput:
    request_id: str
    embeddings: list[torch.Tensor]  # one float32 CPU vector per input, in input order
    num_prompt_tokens: int
    finished: bool = True
    error: str | None = None  # the request failed inside the engine (answers 500)


class EmbeddingEngine:
    def __init__(self, config: EngineConfig, *, loaded=None, metrics: bool = True):
        from engine.loader.encoder import load_encoder

        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.config = config
        self.loaded = loaded or load_encoder(config.model, dtype=config.dtype, device=config.device)
        self.tokenizer = self.loaded.tokenizer
        self.model_name = config.served_model_name or self.loaded.name
        self.device = next(self.loaded.model.parameters()).device
        self.dimensions = self.loaded.spec.hidden_size
        self.max_model_len = min(config.max_model_len or self.loaded.spec.max_position_embeddings,
                                 self.loaded.spec.max_position_embeddings)
        self.scheduler = EmbeddingScheduler(max_num_seqs=config.max_num_seqs,
                                            max_num_batched_tokens=config.max_num_batched_tokens,
                                            max_model_len=self.max_model_len)
        self.requests: dict[str, EmbeddingRequest] = {}
        self.metrics = EmbeddingMetrics(self.model_name) if metrics else None

    # -- requests -------------------------------------------------------------------------------
    def check_prompt(self, inputs: list[list[int]], params: EmbeddingParams) -> None:
        """Refuse up front what can never run: empty inputs, ids outside the vocabulary, inputs over the
        model's limit (`context_length_exceeded`), more dimensions than the model has."""
        vocab, limit = self.loaded.spec.vocab_size, self.max_model_len
        for i, ids in enumerate(inputs):
            param = "input" if len(inputs) == 1 else f"input[{i}]"
            if not ids:
                raise SamplingParamError("an input is empty", param)
            if min(ids) < 0 or max(ids) >= vocab:
                raise SamplingParamError(f"token ids must be in [0, {vocab})", param)
            if len(ids) > limit:
                raise ContextLengthError(
                    f"This model's maximum input length is {limit} tokens. However, "
                    f"{'your input' if len(inputs) == 1 else f'input {i}'} has {len(ids)} tokens. Please reduce "
                    "the length of the input.", param)
        if params.dimensions is not None and params.dimensions > self.dimensions:
            raise SamplingParamError(f"'dimensions' must be at most {self.dimensions}, the width of this model's "
                                     f"embeddings; got {params.dimensions}", "dimensions")

    def add_request(self, request_id: str, inputs: list[list[int]], params: EmbeddingParams, *,
                    cache_salt: str | None = None, arrival_time: float | None = None) -> EmbeddingRequest:
        """`cache_salt` is accepted for AsyncEngine's sake and unused: nothing is cached across requests."""
        if request_id in self.requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        self.check_prompt(inputs, params)
        request = EmbeddingRequest(request_id, [list(ids) for ids in inputs], params,
                                   arrival_time if arrival_time is not None else time.perf_counter())
        self.requests[request_id] = request
        self.scheduler.add(request)
        if self.metrics:
            self.metrics.prompt_tokens.inc(request.num_prompt_tokens)
        return request

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.scheduler.abort(request)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop -------------------------------------------------------------------------------
    def step(self) -> list[EmbeddingOutput]:
        """Schedule, run one encoder pass, pool; returns the requests finished in this step. A failure in
        one request's postprocessing fails it alone; a failure of the pass itself propagates (the engine
        is broken, engine/failures.py)."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        pooled = self.run(batch)
        now = time.perf_counter()
        outputs: list[EmbeddingOutput] = []
        failed: set[str] = set()
        for (request, i), vector in zip(batch.rows, pooled, strict=True):
            if self.requests.get(request.request_id) is not request or request.request_id in failed:
                continue  # aborted meanwhile, or failed on an earlier input
            try:
                request.vectors[i] = finish(vector, normalize=self.loaded.pooling.normalize,
                                            dimensions=request.params.dimensions).cpu()
            except Exception as exc:  # noqa: BLE001 - one request's failure is that request's alone
                if is_fatal(exc):
                    raise
                failed.add(request.request_id)
                outputs.append(self._fail(request, exc))
                continue
            request.num_done += 1
            if request.finished:
                del self.requests[request.request_id]
                outputs.append(EmbeddingOutput(request.request_id, request.vectors, request.num_prompt_tokens))
                if self.metrics:
                    self.metrics.observe_finished(request.arrival_time, now)
        if self.metrics:
            self.metrics.observe_step(self, len(batch.rows))
        return outputs

    @torch.inference_mode()
    def run(self, batch: EmbeddingBatch) -> torch.Tensor:
        """One padded encoder pass over the batch's inputs: [B, H] pooled float32 vectors."""
        rows = batch.token_ids()
        width = max(len(ids) for ids in rows)
        pad = self.loaded.model.config.pad_token_id
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long).to(self.device)
        lengths = torch.tensor([len(r) for r in rows]).to(self.device)
        mask = torch.arange(width, device=self.device)[None, :] < lengths[:, None]
        hidden = self.loaded.model(ids, mask)
        return pool(hidden, mask, self.loaded.pooling.mode)

    def _fail(self, request: EmbeddingRequest, exc: BaseException) -> EmbeddingOutput:
        log.error("request %s failed in the engine: %r", request.request_id, exc, exc_info=exc)
        self.abort(request.request_id)
        return EmbeddingOutput(request.request_id, [], request.num_prompt_tokens,
                               error=f"{type(exc).__name__}: {exc}")


class Embedder:
    """Offline API: `Embedder(path).embed(["a sentence", ...])` -> [N, H] float32, batched like the server."""

    def __init__(self, model: str, **config):
        self.engine = EmbeddingEngine(EngineConfig(model=model, **config), metrics=False)
        self.tokenizer = self.engine.tokenizer

    def embed(self, texts: list[str | list[int]], params: EmbeddingParams | None = None) -> torch.Tensor:
        inputs = [self.tokenizer.encode(t) if isinstance(t, str) else list(t) for t in texts]
        self.engine.add_request("offline", inputs, params or EmbeddingParams())
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.error:
                    raise RuntimeError(out.error)
                return torch.stack(out.embeddings)
        raise AssertionError("the request finished without output")
