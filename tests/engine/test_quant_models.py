"""Quantized checkpoints load through engine.loader, stay quantized, and match transformers running the
same model with the dequantized weights (logits within tolerance, greedy tokens equal)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.loader import load_model
from engine.quant import QuantConfig, QuantLinear
from tests.engine.checkpoints import (
    load_reference,
    smollm2_gguf_path,
    tiny_checkpoint,
    write_tiny_gguf,
)
from tests.engine.paged_driver import PagedDriver
from tests.engine.quant_helpers import awq_quantize, fp8_quantize, gptq_quantize

torch.set_num_threads(2)

STEPS = 8
GROUP_SIZE = 32  # the tiny checkpoints have hidden 64 and intermediate 128
QUANTIZATION_CONFIGS = {
    "awq": {
        "quant_method": "awq",
        "bits": 4,
        "group_size": GROUP_SIZE,
        "zero_point": True,
        "version": "gemm",
    },
    "gptq": {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": GROUP_SIZE,
        "desc_act": False,
        "sym": False,
        "checkpoint_format": "gptq",
    },
    "fp8-channel": {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            }
        },
        "ignore": ["lm_head"],
    },
    "fp8-tensor": {"quant_method": "fp8", "activation_scheme": "dynamic"},
}


def quantize_checkpoint(kind: str, fmt: str, root: Path) -> tuple[Path, Path]:
    """(quantized checkpoint in fmt's on-disk layout, float checkpoint of the dequantized weights)."""
    source = tiny_checkpoint(kind)
    quantized, reference = root / f"{kind}-{fmt}", root / f"{kind}-{fmt}-reference"
    shutil.copytree(source, quantized)
    shutil.copytree(source, reference)
    state = load_file(str(source / "model.safetensors"))
    packed, dense = {}, {}
    for name, tensor in state.items():
        if not (name.startswith("model.layers.") and name.endswith("_proj.weight")):
            packed[name] = dense[name] = tensor
            continue
        if fmt == "awq":
            tensors, deq = awq_quantize(tensor, GROUP_SIZE)
        elif fmt == "gptq":
            tensors, deq = gptq_quantize(tensor, GROUP_SIZE)
        else:
            tensors, deq = fp8_quantize(tensor, per_channel=fmt == "fp8-channel")
            if fmt == "fp8-tensor":
                tensors["input_scale"] = torch.tensor(1.0)  # static activation scale: unused by W8A16
        base = name.removesuffix(".weight")
        packed.update({f"{base}.{suffix}": t.contiguous() for suffix, t in tensors.items()})
        dense[name] = deq.contiguous()
    save_file(packed, str(quantized / "model.safetensors"))
    save_file(dense, str(reference / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = QUANTIZATION_CONFIGS[fmt]
    (quantized / "config.json").write_text(json.dumps(config))
    return quantized, reference


def reference_logits(reference, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0].float()


def assert_matches_reference(loaded, reference, prompt: list[int], atol: float, steps: int = STEPS) -> None:
    prompt_logits, step_logits, tokens = PagedDriver(loaded.model, loaded.spec, block_size=4).greedy(
        prompt, steps
    )
    expected = reference_logits(reference, prompt + tokens)
    torch.testing.assert_close(prompt_logits, expected[: len(prompt)], atol=atol, rtol=0)
    expected_steps = expected[len(prompt) - 1 : len(prompt) - 1 + steps]
    torch.testing.assert_close(torch.cat(step_logits), expected_steps, atol=atol, rtol=0)
    assert tokens == expected_steps.argmax(-1).tolist()


def quant_linears(model) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


@pytest.mark.parametrize(
    ("kind", "fmt"),
    [
        ("llama", "awq"),
        ("qwen2", "awq"),
        ("llama", "gptq"),
        ("qwen3", "fp8-channel"),
        ("llama", "fp8-tensor"),
    ],
)
def test_quantized_hf_checkpoint_matches_dequantized_transformers(tmp_path, kind, fmt):
    quantized, reference_dir = quantize_checkpoint(kind, fmt, tmp_path)
    loaded = load_model(quantized)
    linears = quant_linears(loaded.model)
    assert len(linears) == 4 * loaded.spec.num_layers  # qkv, o, gate_up, down: all quantized
    expected_kernel = "cpu_tiled_w8" if fmt.startswith("fp8") else "cpu_tiled_w4"
    assert {name for linear in linears for name in linear.kernel_names} == {expected_kernel}
    reference = load_reference(reference_dir)
    prompt = loaded.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paged attention!")
    assert_matches_reference(loaded, reference, prompt, atol=1e-3)
    # the quantized model is smaller than its float reference
    assert loaded.weight_bytes < load_model(reference_dir).weight_bytes


def test_incomplete_quantized_checkpoint_is_a_load_error(tmp_path):
    quantized, _ = quantize_checkpoint("llama", "awq", tmp_path)
    state = load_file(str(quantized / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.qzeros"]
    save_file(state, str(quantized / "model.safetensors"))
    from engine.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match=r"layers\.1\.mlp\.gate_up_proj.*qzeros"):
        load_model(quantized)


def test_unsupported_quantization_config_is_a_load_error(tmp_path):
    quantized, _ = quantize_checkpoint("llama", "gptq", tmp_path)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["desc_act"] = True
    (quantized / "config.json").write_text(json.dumps(config))
    from engine.loader import ModelLoadError

    with pytest.raises(ModelLoadError, match="config.json.*desc_act"):
        load_model(quantized)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_tiny_gguf_served_quantized_matches_transformers(tmp_path, qtype):
    path = write_tiny_gguf("llama", tmp_path / f"tiny-llama.{qtype}.gguf", qtype=qtype)
    loaded = load_model(path, dtype=torch.float32, quant=QuantConfig("gguf"))  # the exact tiled kernels
    linears = quant_linears(loaded.model)
    expected_kernel = "cpu_tiled_w8" if qtype == "Q8_0" else "cpu_tiled_w4"
    assert {name for linear in linears for name in linear.kernel_names} == {expected_kernel}
    reader = gguf.GGUFReader(str(path))
    packed = sum(int(t.n_bytes) for t in reader.tensors if t.name.startswith("blk.") and t.data.ndim == 2)
    held = sum(linear.weight_bytes for linear in linears)
    # Q4_1 (d, min, 16 bytes) and Q8_0 (d, 32 bytes) blocks are held in exactly their file size; a Q4_0
    # block (d, 16 bytes) also gets its fp16 bias -8d in the one int4 representation: 20 bytes, not 18.
    assert held == packed * {"Q4_0": 20 / 18, "Q4_1": 1, "Q8_0": 1}[qtype]
    prompt = loaded.tokenizer.encode("What is the capital of France? Paris is the capital of France.")
    assert_matches_reference(loaded, load_reference(path), prompt, atol=1e-4)


# ---- the SmolLM2 demo model (GGUF Q4_1) ------------------------------------------------------------

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]


@pytest.fixture(scope="module")
def smollm2_reference():
    return load_reference(smollm2_gguf_path())


def chat_ids(tokenizer, content: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}])
    return tokenizer.encode(text, add_special_tokens=False)


def test_smollm2_q4_1_served_4bit_matches_dequantized_greedy(smollm2_reference):
    path = smollm2_gguf_path()
    loaded = load_model(path, dtype=torch.float32, quant=QuantConfig("gguf"))
    linears = quant_linears(loaded.model)
    assert len(linears) == 4 * loaded.spec.num_layers
    assert {name for linear in linears for name in linear.kernel_names} == {"cpu_tiled_w4"}
    for content in CHAT_PROMPTS:
        prompt = chat_ids(loaded.tokenizer, content)
        assert_matches_reference(loaded, smollm2_reference, prompt, atol=2e-3, steps=5)


def test_smollm2_bfloat16_is_served_4bit_by_default(smollm2_reference):
    """CPU bfloat16: the GGUF's projections stay 4-bit (ATen's int4 GEMM) without being asked."""
    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 GEMM")
    loaded = load_model(smollm2_gguf_path(), dtype=torch.bfloat16)
    linears = quant_linears(loaded.model)
    assert {name for linear in linears for name in linear.kernel_names} == {"aten_int4_cpu"}
    for content in CHAT_PROMPTS:
        prompt = chat_ids(loaded.tokenizer, content)
        _, step_logits, tokens = PagedDriver(loaded.model, loaded.spec, block_size=16).greedy(prompt, 4)
        expected = reference_logits(smollm2_reference, prompt + tokens)[len(prompt) - 1 : len(prompt) + 3]
        # A bfloat16 model (activations, norms, attention and the int4 GEMM's scales all in bfloat16) drifts
        # from the float32 reference by up to ~2 logits over 30 layers (the dense bfloat16 path does too);
        # every greedy choice is the reference's, or within bfloat16 noise of it (a near-tie).
        # Logits are compared up to a per-row shift (softmax ignores it; bfloat16 rows drift by one).
        ours = torch.cat(step_logits)
        diff = ((ours - ours.mean(-1, keepdim=True)) - (expected - expected.mean(-1, keepdim=True))).abs()
        assert diff.max() < 3.0 and diff.mean() < 0.2, (diff.max(), diff.mean())
        top = expected.max(-1).values
        chosen = expected[torch.arange(len(tokens)), torch.tensor(tokens)]
        assert (top - chosen).max() < 0.25, (tokens, expected.argmax(-1).tolist())


def test_smollm2_4bit_resident_weight_bytes_are_the_packed_size():
    path = smollm2_gguf_path()
    reader = gguf.GGUFReader(str(path))
    projections = [t for t in reader.tensors if t.name.startswith("blk.") and t.tensor_type.name == "Q4_1"]
    packed = sum(int(t.n_bytes) for t in projections)
    for dtype in (torch.float32, torch.bfloat16):
        loaded = load_model(path, dtype=dtype, quant=QuantConfig("gguf"))
        held = sum(linear.weight_bytes for linear in quant_linears(loaded.model))
        assert abs(held - packed) <= 0.02 * packed, (dtype, held, packed)
        # LoadedModel.weight_bytes reports it: projections packed + embedding and norms dense
        dense = sum(
            p.numel() * p.element_size()
            for name, p in loaded.model.named_parameters()
            if not any(
                name.startswith(f"layers.{i}.") and "proj" in name for i in range(loaded.spec.num_layers)
            )
        )
        assert loaded.weight_bytes == dense + held


def test_the_cpu_default_is_the_packed_bfloat16_mode_for_a_quantized_gguf_only(tmp_path):
    """Without a dtype: a quantized GGUF loads in bfloat16 with its projections packed, resident weights no
    more than the file's bytes plus the dense embedding (issue 11's memory target), whether or not the CPU
    has native bfloat16; an unquantized GGUF, a Hugging Face directory, a GGUF asked to load dense, and any
    model with a torch without the CPU int4 GEMM load in float32, the exact mode."""
    from unittest import mock

    from engine.quant import DEQUANTIZED

    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 GEMM")
    path = smollm2_gguf_path()
    loaded = load_model(path)
    assert loaded.spec.dtype == torch.bfloat16
    assert {name for linear in quant_linears(loaded.model) for name in linear.kernel_names} == {"aten_int4_cpu"}
    embedding = loaded.model.embed_tokens.weight
    assert loaded.weight_bytes <= path.stat().st_size + embedding.numel() * embedding.element_size()
    assert load_model(path, quant=DEQUANTIZED).spec.dtype == torch.float32
    plain = write_tiny_gguf("llama", tmp_path / "tiny.F32.gguf", quantize=False)
    assert load_model(plain).spec.dtype == torch.float32
    assert load_model(tiny_checkpoint("llama")).spec.dtype == torch.float32
    with mock.patch("engine.loader.packed_int4_cpu", return_value=False):
        assert load_model(write_tiny_gguf("llama", tmp_path / "tiny.Q4_0.gguf", qtype="Q4_0")).spec.dtype \
            == torch.float32


def test_quantization_dense_dequantizes_a_gguf_that_would_stay_packed(tmp_path):
    """The engine option (--quantization, EngineConfig.quantization): bfloat16 keeps a Q4_0 GGUF 4-bit by
    default; "dense" loads the same file as plain dense projections with the same answers (bfloat16 noise),
    in more memory. A quantized HF checkpoint cannot be loaded dense: a load error naming the option."""
    from engine.config import EngineConfig
    from engine.loader import ModelLoadError

    if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        pytest.skip("this torch has no CPU int4 GEMM")
    path = write_tiny_gguf("llama", tmp_path / "tiny.Q4_0.gguf", qtype="Q4_0")
    auto, dense = (EngineConfig(model=str(path), quantization=q) for q in ("auto", "dense"))
    packed = load_model(path, dtype=torch.bfloat16, quant=auto.weights_quant())
    plain = load_model(path, dtype=torch.bfloat16, quant=dense.weights_quant())
    assert len(quant_linears(packed.model)) == 4 * packed.spec.num_layers and not quant_linears(plain.model)
    assert plain.weight_bytes > packed.weight_bytes
    prompt = plain.tokenizer.encode("The quick brown fox")
    ours = [PagedDriver(m.model, m.spec, block_size=16).greedy(prompt, 4)[1] for m in (packed, plain)]
    torch.testing.assert_close(torch.cat(ours[0]), torch.cat(ours[1]), atol=0.25, rtol=0)
    quantized, _ = quantize_checkpoint("llama", "awq", tmp_path)
    with pytest.raises(ModelLoadError, match="--quantization dense"):
        load_model(quantized, quant=dense.weights_quant())
    with pytest.raises(ValueError, match="quantization"):
        EngineConfig(model=str(path), quantization="int3")
