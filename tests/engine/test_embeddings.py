"""The embedding engine in process: all-MiniLM-L6-v2 against sentence-transformers, batching, limits, failures."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from torch.nn import functional as F

import engine.embedding_engine as embedding_engine_module
from engine.async_engine import AsyncEngine, EngineDeadError
from engine.config import EngineConfig
from engine.embedding_engine import Embedder, EmbeddingEngine
from engine.embedding_scheduler import EmbeddingParams
from engine.failures import RequestFailedError, install_test_fault
from engine.llm_engine import ContextLengthError
from engine.loader import ModelLoadError
from engine.loader.encoder import demo_embedding_model_path, is_encoder_directory, load_encoder
from engine.pooling import PoolingConfigError, pool, read_pooling
from engine.sampling_params import SamplingParamError
from engine.tokenizer import Tokenizer
from tests.engine.checkpoints import tiny_checkpoint

torch.set_num_threads(2)
SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on the street corner while people walk past.",
    "Quantum chromodynamics describes the strong interaction between quarks and gluons.",
    "hi",
    "Héllo wörld, ça va? 東京は大きい都市です。",
    "Embeddings map text to vectors so that similar meanings land close together. " * 8,
]


@pytest.fixture(scope="module")
def model_dir():
    return demo_embedding_model_path()


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_encoder(model_dir, dtype=torch.float32)


def make_engine(loaded, **config) -> EmbeddingEngine:
    return EmbeddingEngine(EngineConfig(model="unused", served_model_name="minilm", **config), loaded=loaded)


def ids(loaded, texts) -> list[list[int]]:
    return [loaded.tokenizer.encode(t) for t in texts]


def run_all(engine) -> dict:
    finals = {}
    while engine.has_unfinished():
        for out in engine.step():
            finals[out.request_id] = out
    return finals


def test_embeddings_match_sentence_transformers_in_fp32(model_dir):
    from sentence_transformers import SentenceTransformer

    ours = Embedder(str(model_dir), dtype=torch.float32).embed(SENTENCES)
    reference = torch.from_numpy(SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES))
    cosine = F.cosine_similarity(ours, reference)
    assert ours.shape == (len(SENTENCES), 384)
    assert cosine.min().item() >= 0.999, cosine.tolist()
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-5)  # modules.json: Normalize


def test_an_input_embeds_the_same_alone_and_padded_in_a_batch(loaded):
    engine = make_engine(loaded)
    engine.add_request("batch", ids(loaded, SENTENCES), EmbeddingParams())
    together = torch.stack(run_all(engine)["batch"].embeddings)
    for i, text in enumerate(SENTENCES):
        engine.add_request(f"alone-{i}", ids(loaded, [text]), EmbeddingParams())
        alone = run_all(engine)[f"alone-{i}"].embeddings[0]
        assert torch.allclose(alone, together[i], atol=1e-5)


def test_several_requests_are_embedded_in_one_step(loaded):
    engine = make_engine(loaded)
    for i, text in enumerate(SENTENCES[:4]):
        engine.add_request(f"r{i}", ids(loaded, [text, text.upper()]), EmbeddingParams())
    outputs = engine.step()
    assert sorted(o.request_id for o in outputs) == ["r0", "r1", "r2", "r3"]
    assert all(len(o.embeddings) == 2 and o.finished for o in outputs)
    assert not engine.has_unfinished() and engine.requests == {}


def test_a_large_request_shares_each_step_with_the_requests_behind_it(loaded):
    engine = make_engine(loaded, max_num_seqs=4)
    engine.add_request("big", ids(loaded, [f"sentence number {i}" for i in range(12)]), EmbeddingParams())
    engine.add_request("small", ids(loaded, ["a small request"]), EmbeddingParams())
    first = engine.step()
    assert [o.request_id for o in first] == ["small"]  # not behind all twelve of "big"
    finals = run_all(engine)
    assert len(finals["big"].embeddings) == 12
    alone = make_engine(loaded)
    alone.add_request("again", ids(loaded, [f"sentence number {i}" for i in range(12)]), EmbeddingParams())
    again = torch.stack(run_all(alone)["again"].embeddings)
    assert torch.allclose(torch.stack(finals["big"].embeddings), again, atol=1e-5)  # in input order


def test_a_step_stays_within_the_padded_token_budget_and_one_input_always_fits(loaded):
    engine = make_engine(loaded, max_num_batched_tokens=20)
    inputs = [[101] + [2000] * 6 + [102]] * 5  # 8 tokens each: two per step
    engine.add_request("r", inputs, EmbeddingParams())
    batch = engine.scheduler.schedule()
    assert len(batch.rows) == 2
    engine.scheduler.waiting.clear()
    engine.requests.clear()
    engine.add_request("long", [[101] + [2000] * 60 + [102]], EmbeddingParams())  # 62 > 20 tokens: alone
    assert run_all(engine)["long"].embeddings[0].shape == (384,)


def test_inputs_the_model_cannot_take_are_refused_naming_the_input(loaded):
    engine = make_engine(loaded)
    params = EmbeddingParams()
    with pytest.raises(ContextLengthError, match="maximum input length is 256 tokens") as exc:
        engine.check_prompt([[101, 102], [101] * 257], params)
    assert exc.value.param == "input[1]"
    engine.check_prompt([[101] * 256], params)  # exactly the limit is fine: nothing is generated
    with pytest.raises(SamplingParamError, match=r"\[0, 30522\)") as exc:
        engine.check_prompt([[30522]], params)
    assert exc.value.param == "input"
    with pytest.raises(SamplingParamError, match="at most 384") as exc:
        engine.check_prompt([[101]], EmbeddingParams(dimensions=385))
    assert exc.value.param == "dimensions"
    with pytest.raises(SamplingParamError):
        engine.add_request("empty", [[]], params)
    assert not engine.has_unfinished()


def test_dimensions_truncate_then_renormalize(loaded):
    engine = make_engine(loaded)
    engine.add_request("full", ids(loaded, SENTENCES[:2]), EmbeddingParams())
    engine.add_request("short", ids(loaded, SENTENCES[:2]), EmbeddingParams(dimensions=16))
    finals = run_all(engine)
    for full, short in zip(finals["full"].embeddings, finals["short"].embeddings, strict=True):
        assert short.shape == (16,)
        assert torch.allclose(short, F.normalize(full[:16], dim=0), atol=1e-5)


def test_one_requests_postprocessing_failure_fails_it_alone(loaded, monkeypatch):
    """The fault is injected (pooling a good vector cannot fail on demand): `finish` raises for one request."""
    original = embedding_engine_module.finish

    def flaky(vector, *, normalize, dimensions):
        if dimensions == 7:
            raise ValueError("injected postprocessing failure")
        return original(vector, normalize=normalize, dimensions=dimensions)

    monkeypatch.setattr(embedding_engine_module, "finish", flaky)
    engine = make_engine(loaded)
    engine.add_request("bad", ids(loaded, SENTENCES[:3]), EmbeddingParams(dimensions=7))
    engine.add_request("good", ids(loaded, SENTENCES[:3]), EmbeddingParams())
    finals = run_all(engine)
    assert "injected" in finals["bad"].error and finals["bad"].embeddings == []
    assert finals["good"].error is None and len(finals["good"].embeddings) == 3
    assert engine.requests == {}

    def oom(vector, *, normalize, dimensions):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(embedding_engine_module, "finish", oom)
    engine.add_request("r", ids(loaded, ["x"]), EmbeddingParams())
    with pytest.raises(torch.OutOfMemoryError):
        engine.step()  # a fatal error is the engine's, never swallowed as one request's


async def test_the_async_engine_serves_embeddings_and_reports_a_broken_engine(loaded, monkeypatch):
    engine = make_engine(loaded)
    async_engine = AsyncEngine(engine)
    async_engine.start()
    try:
        stream = async_engine.embed("a", ids(loaded, ["one", "two"]), EmbeddingParams())
        outs = [out async for out in stream]
        assert len(outs) == 1 and len(outs[0].embeddings) == 2

        original = embedding_engine_module.finish

        def failing(vector, *, normalize, dimensions):
            if dimensions == 5:
                raise ValueError("injected")
            return original(vector, normalize=normalize, dimensions=dimensions)

        monkeypatch.setattr(embedding_engine_module, "finish", failing)
        with pytest.raises(RequestFailedError, match="injected"):
            async for _ in async_engine.embed("b", ids(loaded, ["x"]), EmbeddingParams(dimensions=5)):
                pass
        assert async_engine.healthy
        install_test_fault(engine, "fatal-after:1")
        with pytest.raises(EngineDeadError):
            async for _ in async_engine.embed("c", ids(loaded, ["x"]), EmbeddingParams()):
                pass
        await asyncio.sleep(0.1)
        assert not async_engine.healthy
    finally:
        async_engine.shutdown()


def test_the_tokenizer_never_truncates_or_pads_silently(loaded, model_dir):
    raw = json.loads((model_dir / "tokenizer.json").read_text())
    assert raw["truncation"]["max_length"] == 128 and raw["padding"]  # the file would cut at 128 and pad
    long = " ".join(["word"] * 200)
    assert len(loaded.tokenizer.encode(long)) == 202 and len(loaded.tokenizer.encode("hi")) == 3


def test_pooling_follows_the_sentence_transformers_modules(tmp_path):
    (tmp_path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    config = tmp_path / "1_Pooling" / "config.json"
    config.write_text(json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    assert read_pooling(tmp_path).mode == "cls" and not read_pooling(tmp_path).normalize
    config.write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(PoolingConfigError, match="pooling_mode_max_tokens"):
        read_pooling(tmp_path)
    bare = tmp_path / "bare"
    bare.mkdir()
    assert read_pooling(bare).mode == "mean" and read_pooling(bare).max_seq_length is None

    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    assert pool(hidden, mask, "cls").tolist() == [[0, 1], [6, 7]]
    assert pool(hidden, mask, "lasttoken").tolist() == [[2, 3], [10, 11]]
    assert pool(hidden, mask, "mean").tolist() == [[1, 2], [8, 9]]  # the padded position is not counted


def test_a_decoder_directory_is_not_an_encoder_and_a_broken_encoder_names_its_problem(model_dir, tmp_path):
    assert is_encoder_directory(model_dir)
    assert not is_encoder_directory(tiny_checkpoint("llama"))
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "modules.json"):
        (broken / name).write_bytes((model_dir / name).read_bytes())
    with pytest.raises(ModelLoadError, match=r"1_Pooling/config.json: missing file"):
        load_encoder(broken)
    (broken / "1_Pooling").mkdir()
    (broken / "1_Pooling" / "config.json").write_bytes((model_dir / "1_Pooling" / "config.json").read_bytes())
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_encoder(broken)
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    del tensors["encoder.layer.3.output.dense.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(ModelLoadError, match=r"encoder\.layer\.3\.output\.dense\.weight"):
        load_encoder(broken)
    assert isinstance(load_encoder(model_dir).tokenizer, Tokenizer)
