"""Incremental detokenization with stop strings.

Text is emitted only once the tokens decode to whole characters (a multi-byte character split across
tokens shows up as U+FFFD until its last byte arrives). The tail of the text that could still be the start
of a stop string is held back, so a stop string is never emitted, even when it spans several tokens
(unless `include_stop_str_in_output`: then the text ends with the matched stop string). The caller says
whether stop strings count yet (`check_stop`: not during the first `min_tokens` tokens); a stop string is
found when it ends in the newly decoded text, so one that ended earlier never stops the sequence later.
"""

from __future__ import annotations

from engine.sampling_params import SamplingParams

# Decoding restarts from a few tokens back so word-boundary spaces come out right.
_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], params: SamplingParams):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # all output text decoded so far (truncated at a stop string)
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string was found

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, check_stop: bool = True) -> None:
        """Append one generated token; sets `stopped` if a stop string completed (and `check_stop`)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete character: wait for more bytes
        start = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if self.stop and check_stop:
            self._find_stop(start)

    def _find_stop(self, start: int) -> None:
        """The earliest stop string that ends after `start` (in the text decoded since): cut the text there."""
        hits = [(pos, len(s)) for s in self.stop if (pos := self.text.find(s, max(0, start - len(s) + 1))) >= 0]
        if hits:
            pos, length = min(hits)
            self.text = self.text[:pos + length if self.include_stop else pos]
            self.stopped = True

    def flush(self, check_stop: bool = True) -> None:
        """The sequence ended: decode the bytes that never completed a character, checking stop strings
        in them too (a stop string there still stops the sequence)."""
        if self.stopped or self.read_offset >= len(self.ids):
            return
        start = len(self.text)
        self.text += self._decode(self.ids[self.prefix_offset:])[
            len(self._decode(self.ids[self.prefix_offset:self.read_offset])):]
        self.read_offset = len(self.ids)
        if self.stop and check_stop:
            self._find_stop(start)

    def take(self, final: bool = False) -> str:
        """The text not yet handed out; unless final, keep back what may begin a stop string."""
        if final:
            self.flush()
        end = len(self.text)
        if not final and not self.stopped and self.stop:
            end -= self._held_back()
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def _held_back(self) -> int:
        text = self.text
        for k in range(min(self.max_stop_len - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
