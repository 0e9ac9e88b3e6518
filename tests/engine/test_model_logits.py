"""Logits of prompt positions and greedy steps match transformers on the same weights in the exact mode
(float32: what a quantized GGUF is loaded in when asked, the fast bfloat16 default is not exact)."""

from __future__ import annotations

import pytest
import torch

from engine.loader import load_model
from tests.engine.checkpoints import (
    KINDS,
    load_reference,
    smollm2_gguf_path,
    tiny_checkpoint,
    tiny_gguf,
    write_tiny_gguf,
)
from tests.engine.paged_driver import PagedDriver

torch.set_num_threads(2)

GREEDY_STEPS = 8


def reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float()


def reference_greedy(reference, prompt: list[int], steps: int) -> list[int]:
    """transformers' own greedy generate (it stops early at EOS)."""
    with torch.no_grad():
        out = reference.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False)
    return out[0, len(prompt) :].tolist()


def check_against_reference(path, prompt: list[int], atol: float, chunk_size: int | None = None):
    loaded = load_model(path, dtype=torch.float32)
    reference = load_reference(path)
    driver = PagedDriver(loaded.model, loaded.spec, block_size=4)
    prompt_logits, step_logits, tokens = driver.greedy(prompt, GREEDY_STEPS, chunk_size=chunk_size)

    expected = reference_logits(reference, prompt + tokens)
    torch.testing.assert_close(prompt_logits, expected[: len(prompt)], atol=atol, rtol=0)
    expected_steps = expected[len(prompt) - 1 : len(prompt) - 1 + GREEDY_STEPS]
    torch.testing.assert_close(torch.cat(step_logits), expected_steps, atol=atol, rtol=0)
    # Greedy continuations agree: every step's argmax under the reference is our token...
    assert tokens == expected_steps.argmax(-1).tolist()
    # ...and transformers' generate produces the same tokens (up to its stop at EOS).
    generated = reference_greedy(reference, prompt, GREEDY_STEPS)
    assert generated == tokens[: len(generated)]
    return loaded


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_checkpoint_logits_and_greedy_match_transformers(kind):
    path = tiny_checkpoint(kind)
    loaded = load_model(path)
    prompt = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paged attention!")
    assert len(prompt) > 8
    check_against_reference(path, prompt, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_checkpoint_chunked_prefill_matches_transformers(kind):
    path = tiny_checkpoint(kind)
    loaded = load_model(path)
    prompt = loaded.tokenizer.encode(
        "Continuous batching lets requests join and leave the batch at every step."
    )
    check_against_reference(path, prompt, atol=1e-4, chunk_size=5)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_gguf_logits_and_greedy_match_transformers(kind):
    """Q8_0 GGUFs laid out as llama.cpp does (llama q/k permuted), read by transformers' GGUF loader."""
    path = tiny_gguf(kind)
    loaded = load_model(path)
    prompt = loaded.tokenizer.encode("What is the capital of France? Paris is the capital of France.")
    check_against_reference(path, prompt, atol=1e-4)


def test_gguf_rope_freqs_equal_llama3_scaling(tmp_path):
    """Llama 3.1+ GGUFs carry llama3 rope scaling as rope_freqs.weight: same logits as the HF checkpoint."""
    path = write_tiny_gguf("llama", tmp_path / "llama3.gguf", quantize=False, llama3_rope_freqs=True)
    from_gguf = load_model(path)
    assert "freq_factors" in from_gguf.model.config.rope_parameters
    prompt = from_gguf.tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 3)
    reference = load_reference(tiny_checkpoint("llama"))
    logits = PagedDriver(from_gguf.model, from_gguf.spec).greedy(prompt, 1)[0]
    torch.testing.assert_close(logits, reference_logits(reference, prompt), atol=1e-4, rtol=0)


def test_smollm2_gguf_logits_and_greedy_match_transformers():
    path = smollm2_gguf_path()
    loaded = load_model(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = loaded.tokenizer.encode(loaded.tokenizer.apply_chat_template(messages), add_special_tokens=False)
    check_against_reference(path, prompt, atol=2e-3)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_steps_match_each_sequence_alone(kind):
    """Decodes, chunked prefills and a prefix-sharing prefill in the same steps (all layers share the
    step's metadata) give each sequence the logits it gets alone."""
    loaded = load_model(tiny_checkpoint(kind))
    tok = loaded.tokenizer
    prompt_a = tok.encode("The quick brown fox jumps over the lazy dog.")
    prompt_b = tok.encode("Continuous batching lets requests join and leave the batch at every step.")
    steps = 4

    def alone(prompt):
        return PagedDriver(loaded.model, loaded.spec).greedy(prompt, steps + 1)

    _, a_logits, a_tokens = alone(prompt_a)
    _, b_logits, b_tokens = alone(prompt_b)
    _, c_logits, c_tokens = alone(prompt_a[:8] + prompt_b[:5])

    driver = PagedDriver(loaded.model, loaded.spec, block_order=list(range(127, -1, -1)))
    a, b = driver.add_sequence(), driver.add_sequence()
    got_a = [driver.step([(a, prompt_a)])]
    half = len(prompt_b) // 2
    got_a.append(driver.step([(a, [a_tokens[0]]), (b, prompt_b[:half])])[:1])
    # c shares a's first 2 blocks (8 tokens, block size 4) as a prefix-cache hit would.
    c = driver.add_sequence(shared_prefix_of=a, prefix_blocks=2)
    out = driver.step([(b, prompt_b[half:]), (a, [a_tokens[1]]), (c, prompt_b[:5])])
    got_b, got_c = [out[0:1]], [out[2:3]]
    got_a.append(out[1:2])
    for i in range(2, steps):
        out = driver.step([(a, [a_tokens[i]]), (b, [b_tokens[i - 2]]), (c, [c_tokens[i - 2]])])
        got_a.append(out[0:1])
        got_b.append(out[1:2])
        got_c.append(out[2:3])
    assert len(got_a) == steps + 1 and len(got_b) == len(got_c) == steps - 1
    torch.testing.assert_close(torch.cat(got_a), torch.cat(a_logits), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(got_b), torch.cat(b_logits[: steps - 1]), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat(got_c), torch.cat(c_logits[: steps - 1]), atol=1e-4, rtol=0)
