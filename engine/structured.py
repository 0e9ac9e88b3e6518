"""Constrained decoding with llguidance: compiled grammars, per-row token masks, advancing a sequence.

Why llguidance (over xgrammar): it needs no other package (xgrammar pulls transformers and a TVM runtime
into the engine's dependencies), builds its token trie straight from our `tokenizers` JSON, covers
JSON Schema broadly (`$ref`/`$defs`, `anyOf`/`oneOf`, patterns, formats, bounds) and embeds JSON
schemas in a Lark grammar (`%json {...}`), which is what the tool-call format needs. Its masks are
computed lazily by an Earley parser over the token trie, so "compiling" a schema is cheap (a fraction of
a millisecond for usual schemas; up to about a second for huge ones, with the GIL released).

- `Grammars.compile(guide)` gives the pristine matcher of a guide, cached (LRU) by grammar text; the
  server calls it in a worker thread before queueing the request, so the step loop only copies it.
  A grammar llguidance refuses is a `GrammarError` naming the request field (a 400).
- `apply_grammar_masks` (called by the sampler) computes each constrained row's mask with llguidance's
  thread pool and sets the logits of every other token to -inf; free rows of the batch are untouched.
- `advance` feeds a sampled token to its sequence's matcher (in postprocessing); a refused token fails
  that request alone.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict

import torch

from engine.guides import Guide
from engine.sampling_params import SamplingParamError
from engine.sequence import Sequence

CACHE_SIZE = 256  # distinct grammars kept compiled


class GrammarError(SamplingParamError):
    """A grammar (schema, tools) llguidance cannot compile (a 400 naming `param`), or a sequence whose
    grammar cannot go on (that request fails alone)."""

    def __init__(self, message: str, param: str = "response_format"):
        super().__init__(message, param)


def _ll():
    import llguidance

    return llguidance


def _short_error(message: str) -> str:
    """llguidance's error without its excerpt of the grammar (which quotes the whole schema)."""
    message = message.split("\n   1 |", 1)[0].strip()
    return re.sub(r"^at \d+\(\d+\): ", "", message)


class Grammars:
    """The compiled grammars of one model (its tokenizer and vocabulary); thread-safe."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: list[int], cache_size: int = CACHE_SIZE):
        self._tokenizer_source = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._ll_tokenizer = None
        self._cache: OrderedDict[str, object] = OrderedDict()
        self.compiled = 0  # cache misses (tests and metrics)

    def tokenizer(self):
        with self._lock:
            if self._ll_tokenizer is None:
                backend = self._tokenizer_source.backend
                self._ll_tokenizer = _ll().LLTokenizer(backend.to_str(), n_vocab=self.vocab_size,
                                                       eos_token=self.eos_token_ids or None)
            return self._ll_tokenizer

    def compile(self, guide: Guide):
        """The pristine matcher of `guide` (never advanced: copy it), compiled once per grammar text."""
        with self._lock:
            matcher = self._cache.get(guide.grammar)
            if matcher is not None:
                self._cache.move_to_end(guide.grammar)
                return matcher
        matcher = self._build(guide.grammar)
        if matcher.is_error():
            raise GrammarError(*self._blame(guide, matcher.get_error()))
        with self._lock:
            self.compiled += 1
            self._cache[guide.grammar] = matcher
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return matcher

    def matcher(self, guide: Guide):
        """A fresh matcher for one sequence."""
        return self.compile(guide).deep_copy()

    def _build(self, grammar: str):
        ll = _ll()
        return ll.LLMatcher(self.tokenizer(), ll.LLMatcher.grammar_from_lark(grammar), log_level=0)

    def _blame(self, guide: Guide, error: str) -> tuple[str, str]:
        for param, grammar in guide.parts:  # which tool's schema, when there are several
            part = self._build(grammar)
            if part.is_error():
                return f"Invalid schema for {param!r}: {_short_error(part.get_error())}", param
        return f"Invalid schema for {guide.param!r}: {_short_error(error)}", guide.param


_executor = None
_executor_lock = threading.Lock()


def _pool():
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = _ll().LLExecutor()
        return _executor


def apply_grammar_masks(logits: torch.Tensor, rows: list[int], seqs: list[Sequence]) -> None:
    """Set to -inf, in place, the logits of the tokens each constrained row's grammar forbids now.
    `rows` index `logits`; `seqs` are their sequences (each with a matcher in `seq.grammar`). A matcher in
    an error state, or one that allows nothing, raises: the sampler retries row by row, so only that
    row's request fails."""
    vocab = logits.shape[1]
    words = (vocab + 31) // 32
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)
    matchers = [seq.grammar for seq in seqs]
    for m in matchers:
        if m.is_error():
            raise GrammarError(f"the grammar cannot continue: {_short_error(m.get_error())}")
    from llguidance.torch import fill_next_token_bitmask_par

    fill_next_token_bitmask_par(_pool(), [(m, i) for i, m in enumerate(matchers)], bitmask)
    for m in matchers:
        if m.is_error():
            raise GrammarError(f"the grammar cannot continue: {_short_error(m.get_error())}")
    if not bool((bitmask != 0).any(-1).all()):
        raise GrammarError("the grammar allows no token here")
    # Each mask byte becomes its 8 additive biases (0 allowed, -inf forbidden) by a table lookup: one
    # gather and one add, much cheaper than unpacking bits and masked_fill over the vocabulary.
    device = logits.device
    codes = bitmask.to(device, non_blocking=True).view(torch.uint8).reshape(-1).int()
    bias = _bias_table(device, logits.dtype).index_select(0, codes).view(len(rows), words * 32)[:, :vocab]
    if len(rows) == logits.shape[0]:
        logits.add_(bias)
    else:
        logits.index_add_(0, torch.tensor(rows, dtype=torch.long, device=device), bias)


_TABLES: dict[tuple, torch.Tensor] = {}


def _bias_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: for each byte value, 0 where its bit is set (little-endian bit order) and -inf elsewhere."""
    table = _TABLES.get((device, dtype))
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = _TABLES[(device, dtype)] = torch.zeros(256, 8, dtype=dtype).masked_fill_(
            bits == 0, float("-inf")).to(device)
    return table


def advance(seq: Sequence, token: int) -> None:
    """Feed the sampled `token` to the sequence's grammar; a token it refuses fails the request."""
    matcher = seq.grammar
    if not matcher.consume_token(token):
        raise GrammarError(f"token {token} does not match the grammar: {_short_error(matcher.get_error())}")
