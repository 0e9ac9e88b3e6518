"""Incremental detokenization: no broken UTF-8 mid-stream, stop strings never emitted (across tokens too)."""

import gguf
import pytest

from engine.detokenizer import IncrementalDetokenizer
from engine.loader import demo_model_path
from engine.loader.gguf import GGUFMetadata, build_tokenizer
from engine.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def tokenizer():
    path = demo_model_path()
    return build_tokenizer(GGUFMetadata(gguf.GGUFReader(str(path)), path))


def stream(tokenizer, text, stop=(), prompt="Say:"):
    """Feed text's tokens one by one; returns (deltas, detokenizer)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt), SamplingParams(stop=list(stop)))
    deltas = []
    for i, token in enumerate(ids):
        detok.add_token(token)
        final = detok.stopped or i == len(ids) - 1
        deltas.append(detok.take(final=final))
        if detok.stopped:
            break
    return deltas, detok


def test_multibyte_characters_split_across_tokens(tokenizer):
    text = " héllo wörld: 你好, 🙂🚀 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    # The premise: some token is a partial character on its own.
    assert any("\ufffd" in tokenizer.decode([t]) for t in ids)
    deltas, _ = stream(tokenizer, text)
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1]  # waited for the rest of a character at least once
    assert "".join(deltas) == text


def test_plain_text_streams_every_token(tokenizer):
    text = " The quick brown fox jumps over the lazy dog."
    deltas, _ = stream(tokenizer, text)
    assert "".join(deltas) == text and all(deltas)


def test_stop_string_across_token_boundaries_is_never_emitted(tokenizer):
    text = " The quick brown fox jumps over the lazy dog."
    stop = "n fox ju"  # spans several tokens and starts mid-token
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert not any(stop in tokenizer.decode([t]) for t in ids)
    deltas, detok = stream(tokenizer, text, stop=[stop])
    assert detok.stopped
    assert "".join(deltas) == " The quick brow"
    assert not any("n f" in d or "fox" in d for d in deltas)


def test_earliest_of_several_stop_strings_wins(tokenizer):
    deltas, detok = stream(tokenizer, " one two three four", stop=["four", "two"])
    assert detok.stopped and "".join(deltas) == " one "


def test_held_back_text_is_released_when_no_stop_follows(tokenizer):
    text = " the end is not the ending"
    deltas, detok = stream(tokenizer, text, stop=["the endgame"])
    assert not detok.stopped and "".join(deltas) == text


def test_stop_string_with_multibyte_text(tokenizer):
    deltas, detok = stream(tokenizer, " 你好世界再见", stop=["世界"])
    assert detok.stopped and "".join(deltas) == " 你好"


def test_stop_string_in_the_final_flush_of_incomplete_bytes(tokenizer):
    """A sequence that ends (max_tokens) mid-character flushes its undecoded bytes; a stop string
    completed by that flushed text still stops it and is not emitted."""
    ids = tokenizer.encode(" The end 日本", add_special_tokens=False)
    cut = next(k for k in range(1, len(ids) + 1) if tokenizer.decode(ids[:k]).endswith("\ufffd"))
    assert tokenizer.decode(ids[:cut]) == " The end \ufffd"  # the premise: " 日"'s first bytes come with the space
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:"), SamplingParams(stop=["end "]))
    deltas = []
    for token in ids[:cut]:
        detok.add_token(token)
        assert not detok.stopped
        deltas.append(detok.take())
    deltas.append(detok.take(final=True))
    assert detok.stopped
    assert "".join(deltas) == " The "


def test_stop_string_counts_only_once_stops_are_checked(tokenizer):
    """min_tokens: a stop string that ends while stops are not checked never stops the text later."""
    params = SamplingParams(stop=["ab"])
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:"), params)
    ids = tokenizer.encode(" ab cd ab ef", add_special_tokens=False)
    for token in ids:
        detok.add_token(token, check_stop=len(detok.text) >= 3)
        if detok.stopped:
            break
    assert detok.stopped and detok.text == " ab cd "


def test_include_stop_str_keeps_it_and_what_was_held_back(tokenizer):
    params = SamplingParams(stop=["wor", "ld"], include_stop_str_in_output=True)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode("Say:"), params)
    out = ""
    for token in tokenizer.encode(" hello world", add_special_tokens=False):
        detok.add_token(token)
        out += detok.take(final=detok.stopped)
        if detok.stopped:
            break
    assert out == " hello wor"
