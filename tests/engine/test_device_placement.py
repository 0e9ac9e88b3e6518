"""Every tensor a step builds lives on the model's device: checked on CPU through tests/engine/fake_device.py.

The model, its KV pool and the logits wear a second device (`meta`, with real data behind it); an op that
mixes one of them with a host tensor raises MixedDeviceError, as CUDA would. The sampler before 3b95efd
(temperatures, top-k/p/min-p and penalty counts built on the host) fails these tests; so does a runner that
leaves its block tables, positions or slot mapping on the host.
"""

from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.loader import load_model
from engine.model_runner import ModelRunner
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence
from tests.engine.checkpoints import tiny_checkpoint
from tests.engine.fake_device import DEVICE, FakeDevice, MixedDeviceError, OnDevice, OnDeviceGenerator, host

torch.set_num_threads(2)
VOCAB = 50

# One row per sampling feature that builds tensors: each must build them on the logits' device.
SAMPLING_ROWS = {
    "greedy": dict(temperature=0),
    "temperature": dict(temperature=0.7),
    "top_k": dict(temperature=1.0, top_k=5),
    "top_p": dict(temperature=1.0, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.1),
    "seed": dict(temperature=1.0, seed=11),
    "presence/frequency": dict(temperature=0, presence_penalty=0.5, frequency_penalty=0.4),
    "repetition": dict(temperature=0, repetition_penalty=1.3),
    "logit_bias": dict(temperature=0, logit_bias={7: 3.0}),
    "logprobs": dict(temperature=0, logprobs=True, top_logprobs=3),
    "min_tokens": dict(temperature=0, min_tokens=5),  # its stop ids masked (seq below gives it some)
}


def seq(prompt=(1, 2, 3), output=(4, 4, 9), **params):
    s = Sequence("r", list(prompt), SamplingParams(**params), max_tokens=100)
    s.token_ids += list(output)
    if s.params.min_tokens:
        s.min_tokens_stop_ids = (0, 7)  # what LLMEngine.add_request sets: EOS and the stop_token_ids
    return s


def test_the_fake_device_refuses_host_tensors_and_host_generators():
    """The harness itself: what CUDA refuses, it refuses; what CUDA allows (0-dim host scalars), it allows."""
    with FakeDevice() as dev:
        x = dev.put(torch.ones(3))
        assert x.device == DEVICE and isinstance(x * 2, OnDevice)
        assert host(x * torch.tensor(2.0)).tolist() == [2.0, 2.0, 2.0]  # a 0-dim host tensor is a scalar
        with pytest.raises(MixedDeviceError):
            x + torch.ones(3)
        with pytest.raises(MixedDeviceError):
            x[torch.tensor([0, 1])]
        with pytest.raises(MixedDeviceError):
            torch.empty(3, device=x.device).exponential_(generator=torch.Generator().manual_seed(0))
        g = torch.Generator(device=x.device)
        assert isinstance(g, OnDeviceGenerator) and g.device == DEVICE
        with pytest.raises(MixedDeviceError):
            torch.rand((), generator=g)  # a host op driven by the device's generator
        assert isinstance(torch.arange(4, device=x.device), OnDevice)
        assert not isinstance(x.cpu(), OnDevice) and not isinstance(x.to("cpu"), OnDevice)


@pytest.mark.parametrize("feature", sorted(SAMPLING_ROWS))
def test_each_sampling_feature_builds_its_tensors_on_the_logits_device(feature):
    torch.manual_seed(0)
    logits = torch.randn(2, VOCAB)
    with FakeDevice() as dev:
        out = Sampler()(dev.put(logits), [seq(**SAMPLING_ROWS[feature]), seq(temperature=0)])
    assert 0 <= out.token_ids[0] < VOCAB
    assert out.token_ids[1] == int(logits[1].argmax())  # the plain neighbour is untouched


def test_a_batch_mixing_every_sampling_feature_samples_as_on_the_host():
    torch.manual_seed(1)
    logits = torch.randn(len(SAMPLING_ROWS), VOCAB)
    rows = [dict(p) for p in SAMPLING_ROWS.values()]
    on_host = Sampler()(logits.clone(), [seq(**p) for p in rows])
    with FakeDevice() as dev:
        on_device = Sampler()(dev.put(logits), [seq(**p) for p in rows])
    greedy = [i for i, p in enumerate(rows) if p["temperature"] == 0]
    assert [on_device.token_ids[i] for i in greedy] == [on_host.token_ids[i] for i in greedy]
    seeded = list(SAMPLING_ROWS).index("seed")
    assert on_device.token_ids[seeded] == on_host.token_ids[seeded]  # same seed, same draw
    lp = list(SAMPLING_ROWS).index("logprobs")
    assert on_device.logprobs[lp] == on_host.logprobs[lp]


def test_a_seeded_requests_generator_is_made_on_the_logits_device():
    s = seq(temperature=1.0, seed=5)
    with FakeDevice() as dev:
        Sampler()(dev.put(torch.randn(1, VOCAB)), [s])
    assert isinstance(s.generator, OnDeviceGenerator) and s.generator.device == DEVICE


@pytest.fixture(scope="module")
def tiny():
    return tiny_checkpoint("llama")


def _runner_on_device(dev, path, **config) -> ModelRunner:
    loaded = load_model(path)
    dev.put_module(loaded.model)
    return ModelRunner(loaded, EngineConfig(model=str(path), block_size=4, num_kv_blocks=32, **config))


def test_prepare_puts_ids_positions_slots_and_block_tables_on_the_model_device(tiny):
    a = Sequence("a", list(range(10, 19)), SamplingParams(), 4)  # a prefill chunk across blocks
    a.block_table = [5, 2, 7]
    b = Sequence("b", [3, 4, 5, 6, 7], SamplingParams(), 4)  # a decode
    b.block_table, b.num_computed_tokens = [1, 3], 4
    with FakeDevice() as dev:
        runner = _runner_on_device(dev, tiny)
        assert all(isinstance(c, OnDevice) for c in runner.kv_caches)
        input_ids, positions, attn = runner.prepare(ScheduledBatch([a, b], [6, 1]))
        tensors = dict(input_ids=input_ids, positions=positions, slot_mapping=attn.slot_mapping,
                       query_start_loc=attn.query_start_loc, seq_lens=attn.seq_lens, block_tables=attn.block_tables)
        for name, t in tensors.items():
            assert isinstance(t, OnDevice) and t.device == DEVICE, name
    values = {name: host(t).tolist() for name, t in tensors.items()}
    assert values == dict(
        input_ids=[10, 11, 12, 13, 14, 15, 7], positions=[0, 1, 2, 3, 4, 5, 4],
        slot_mapping=[20, 21, 22, 23, 8, 9, 12], query_start_loc=[0, 6, 7], seq_lens=[6, 5],
        block_tables=[[5, 2, 7], [1, 3, 0]],
    )
    assert (input_ids.dtype, attn.slot_mapping.dtype, attn.block_tables.dtype) == (torch.long, torch.long,
                                                                                  torch.int32)


def test_a_host_tensor_in_the_runner_step_is_caught(tiny, monkeypatch):
    """The check has teeth: a runner whose block tables stay on the host fails its first step here, as it
    would on CUDA (the mutation this test guards against)."""
    a = Sequence("a", [1, 2, 3, 4, 5], SamplingParams(temperature=0), 4)
    a.block_table = [0, 1]
    with FakeDevice() as dev:
        runner = _runner_on_device(dev, tiny)
        real = runner.to_tensors

        def leaky(inputs):
            input_ids, positions, attn = real(inputs)
            attn.block_tables = host(attn.block_tables).clone()  # left on the host
            return input_ids, positions, attn

        monkeypatch.setattr(runner, "to_tensors", leaky)
        a.num_computed_tokens = 4  # a decode step reads through the block table
        with pytest.raises(MixedDeviceError):
            runner.run(ScheduledBatch([a], [1]))


def _generate(engine: LLMEngine) -> dict:
    prompt = "The quick brown fox jumps over the lazy dog again and again"
    engine.add_request("greedy", prompt, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    engine.add_request("same-prompt", prompt, SamplingParams(  # a prefix hit on the blocks of "greedy"
        temperature=0.9, seed=5, top_k=10, top_p=0.9, min_p=0.01, presence_penalty=0.3, repetition_penalty=1.1,
        logit_bias={5: 2.0}, logprobs=True, top_logprobs=2, max_tokens=5, ignore_eos=True))
    engine.add_request("n2", "Hello", SamplingParams(temperature=1.0, n=2, seed=1, max_tokens=5, ignore_eos=True))
    tokens: dict = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            for delta in out.outputs:
                tokens.setdefault((out.request_id, delta.index), []).extend(delta.token_ids)
    return tokens


def test_engine_steps_on_the_device_match_the_host(tiny):
    """Chunked prefill (16-token budget), a prefix hit, decodes, seeded n > 1 and every sampling feature:
    the whole loop on the fake device, the same tokens as on the host."""
    config = dict(model=str(tiny), block_size=4, num_kv_blocks=64, max_num_batched_tokens=16)
    on_host = _generate(LLMEngine(EngineConfig(**config), loaded=load_model(tiny), metrics=False))
    with FakeDevice() as dev:
        loaded = load_model(tiny)
        dev.put_module(loaded.model)
        engine = LLMEngine(EngineConfig(**config), loaded=loaded, metrics=False)
        on_device = _generate(engine)
        assert engine.runner.device == DEVICE
    assert on_device == on_host


def test_a_grammar_constrained_request_masks_on_the_device(tiny):
    """Structured outputs: the token bitmask is filled on the host (llguidance) and must cross to the
    logits' device before it is applied."""
    from engine.guides import json_guide

    params = SamplingParams(temperature=0, max_tokens=8, guide=json_guide({"enum": ["yes", "no"]}))
    with FakeDevice() as dev:
        loaded = load_model(tiny)
        dev.put_module(loaded.model)
        engine = LLMEngine(EngineConfig(model=str(tiny), block_size=4, num_kv_blocks=32), loaded=loaded,
                           metrics=False)
        engine.add_request("json", "Answer:", params)
        text = ""
        while engine.has_unfinished():
            for out in engine.step():
                assert out.error is None, out.error
                text += "".join(d.text for d in out.outputs)
    assert text in ('"yes"', '"no"')
