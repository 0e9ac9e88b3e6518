"""W4A16 / W8A16 GEMM timings against dense matmul, and end-to-end decode tokens/s by weight format.

    python bench/quant_kernels.py                        # CUDA: Llama-3-8B layer shapes, M = 1, 16, 64, 256
    python bench/quant_kernels.py --device cpu --small   # CPU: the same layers scaled down 16x (a smoke run)
    python bench/quant_kernels.py --e2e                  # also decode tok/s of an 8B-shaped random model
    python bench/quant_kernels.py --device cpu --demo --skip-layers [--dtype float32]   # SmolLM2 dense vs 4-bit

Weights are random (timings do not depend on values). Achieved bandwidth counts the bytes each kernel
must read (weights + scales + activations) and write, over the measured time; it is compared with the
device's measured copy bandwidth (read + write of a large buffer). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.quant.weights import Int4Weight, Int8Weight  # noqa: E402

# Llama-3-8B: hidden 4096, intermediate 14336, 32 heads / 8 KV heads of 128 (fused qkv and gate_up).
LAYERS = {
    "qkv_proj": (4096, 6144),
    "o_proj": (4096, 4096),
    "gate_up_proj": (4096, 28672),
    "down_proj": (14336, 4096),
}
MS = (1, 16, 64, 256)
GROUP_SIZE = 128


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, min_time: float = 0.2) -> float:
    """Median seconds per call over repeats of about min_time / 5 each."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    reps = max(1, int(min_time / 5 / once))
    samples = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    nbytes = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), device)
    return 2 * nbytes / seconds


def random_int4(k: int, n: int, device: torch.device) -> Int4Weight:
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device)
    scales = (torch.rand(k // GROUP_SIZE, n, device=device) * 0.01).half()
    biases = -8 * scales.float()
    return Int4Weight(qweight, scales, biases, GROUP_SIZE)


def random_int8(k: int, n: int, device: torch.device) -> Int8Weight:
    fp8 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)
    if fp8:
        q = torch.randn(n, k, device=device).to(torch.float8_e4m3fn)
    else:
        q = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device)
    return Int8Weight(q, torch.rand(n, 1, device=device) * 0.01, k)


def bind(w: Int4Weight | Int8Weight, device: torch.device, dtype: torch.dtype):
    """x -> y with the kernel QuantLinear would pick for this weight, device and dtype."""
    if device.type == "cuda":
        from engine.quant import triton_kernels as tk

        mm = tk.w4a16_matmul if isinstance(w, Int4Weight) else tk.w8a16_matmul
        return lambda x: mm(x, w)
    from engine.quant import cpu

    if isinstance(w, Int8Weight):
        return lambda x: cpu.int8_matmul(x, w)
    if dtype == torch.bfloat16 and cpu.AtenInt4.supports(w):
        return cpu.AtenInt4(w).matmul
    return lambda x: cpu.int4_matmul(x, w)


def bench_layers(args, device: torch.device, dtype: torch.dtype) -> list[str]:
    scale = 16 if args.small else 1
    peak = copy_bandwidth(device)
    rows = [
        f"copy bandwidth: {peak / 1e9:.1f} GB/s",
        "",
        "| layer | K x N | M | dense ms | W4A16 ms | W8A16 ms | W4 speedup | W8 speedup "
        "| W4 GB/s (% copy) | W8 GB/s (% copy) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, (k, n) in LAYERS.items():
        k, n = k // scale, n // scale
        dense = torch.randn(n, k, device=device, dtype=dtype) * 0.02
        w4, w8 = random_int4(k, n, device), random_int8(k, n, device)
        w4_mm, w8_mm = bind(w4, device, dtype), bind(w8, device, dtype)
        w4_bytes = sum(t.numel() * t.element_size() for t in w4.tensors().values())
        w8_bytes = sum(t.numel() * t.element_size() for t in w8.tensors().values())
        for m in args.m:
            x = torch.randn(m, k, device=device, dtype=dtype)
            io = (m * k + m * n) * x.element_size()
            t_dense = timed(lambda: x @ dense.T, device)  # noqa: B023
            t4 = timed(lambda: w4_mm(x), device)  # noqa: B023
            t8 = timed(lambda: w8_mm(x), device)  # noqa: B023
            bw4, bw8 = (w4_bytes + io) / t4, (w8_bytes + io) / t8
            rows.append(
                f"| {name} | {k} x {n} | {m} | {t_dense * 1e3:.3f} | {t4 * 1e3:.3f} | {t8 * 1e3:.3f} "
                f"| {t_dense / t4:.2f}x | {t_dense / t8:.2f}x "
                f"| {bw4 / 1e9:.0f} ({100 * bw4 / peak:.0f}%) | {bw8 / 1e9:.0f} ({100 * bw8 / peak:.0f}%) |"
            )
    return rows


# ---- end-to-end decode ------------------------------------------------------------------------------


def random_model(fmt: str, device: torch.device, dtype: torch.dtype, small: bool):
    """An 8B-shaped (or 16x smaller) Llama with random weights in `fmt`: dense, fp8 or int4 (AWQ)."""
    from engine.models.llama import LlamaConfig, LlamaForCausalLM
    from engine.quant import QuantConfig

    div = 16 if small else 1
    config = LlamaConfig(
        architecture="llama",
        vocab_size=128256 // div,
        hidden_size=4096 // div,
        intermediate_size=14336 // div,
        num_layers=32 if not small else 4,
        num_heads=32 // div if small else 32,
        num_kv_heads=8 // div if small else 8,
        head_dim=128,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
    )
    if small:
        config.num_heads, config.num_kv_heads = 2, 1
    quant = {"dense": None, "fp8": QuantConfig("fp8"), "int4": QuantConfig("awq", GROUP_SIZE)}[fmt]
    with torch.device(device):
        model = LlamaForCausalLM(config, dtype=dtype, quant=quant)
    for name in sorted(model.expected_weights()):
        shape = _hf_shape(config, name)
        if fmt == "dense" or len(shape) == 1 or "layers" not in name:
            model.load_weight(name, _randn(shape, dtype, device))
        elif fmt == "fp8":
            base = name.removesuffix(".weight")
            model.load_weight(base + ".weight", _randn(shape, dtype, device).to(torch.float8_e4m3fn))
            model.load_weight(base + ".weight_scale", torch.full((shape[0], 1), 0.01, device=device))
        else:
            base, (n, k) = name.removesuffix(".weight"), shape
            model.load_weight(
                base + ".qweight", torch.randint(0, 2**31 - 1, (k, n // 8), dtype=torch.int32, device=device)
            )
            model.load_weight(
                base + ".qzeros",
                torch.full((k // GROUP_SIZE, n // 8), 0x77777777, dtype=torch.int32, device=device),
            )
            model.load_weight(base + ".scales", torch.full((k // GROUP_SIZE, n), 0.01, dtype=torch.float16, device=device))  # fmt: skip
    return model.eval(), config


def _randn(shape, dtype, device):
    return torch.randn(shape, dtype=torch.float32, device=device).mul_(0.02).to(dtype)


def _hf_shape(config, name: str) -> tuple[int, ...]:
    h, i, q, kv = (
        config.hidden_size,
        config.intermediate_size,
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
    )
    if name.endswith("norm.weight"):
        return (h,)
    if "embed_tokens" in name or "lm_head" in name:
        return (config.vocab_size, h)
    for part, shape in {
        "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
        "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
    }.items():  # fmt: skip
        if f".{part}." in name:
            return shape
    raise KeyError(name)


def decode_tokens_per_second(model, config, device: torch.device, dtype: torch.dtype, steps: int) -> float:
    """Batch-1 greedy decode through the paged cache (one block table, block size 16)."""
    from engine.layers.attention import AttentionMetadata, allocate_kv_cache

    block_size, context = 16, steps + 16
    blocks = (context + block_size - 1) // block_size
    caches = allocate_kv_cache(
        config.num_layers, blocks, block_size, config.num_kv_heads, config.head_dim, dtype, device
    )
    table = torch.arange(blocks, dtype=torch.int32, device=device).view(1, -1)

    def step(token: int, pos: int) -> int:
        attn = AttentionMetadata(
            slot_mapping=torch.tensor([pos], device=device),
            query_start_loc=torch.tensor([0, 1], dtype=torch.int32, device=device),
            seq_lens=torch.tensor([pos + 1], dtype=torch.int32, device=device),
            block_tables=table,
            max_query_len=1,
            max_seq_len=pos + 1,
            block_size=block_size,
            query_lens_cpu=[1],
            seq_lens_cpu=[pos + 1],
        )
        ids = torch.tensor([token], device=device)
        hidden = model(ids, torch.tensor([pos], device=device), caches, attn)
        return int(model.compute_logits(hidden).argmax(-1)[0])

    token = 1
    for pos in range(4):  # warm-up (compiles kernels)
        token = step(token, pos)
    sync(device)
    start = time.perf_counter()
    for pos in range(4, 4 + steps):
        token = step(token, pos)
    sync(device)
    return steps / (time.perf_counter() - start)


def demo_models(device: torch.device, dtype: torch.dtype):
    """The SmolLM2 demo GGUF loaded dequantized (dense) and kept 4-bit (engine/quant kernels)."""
    from engine.loader import demo_model_path, load_model
    from engine.quant import DEQUANTIZED, QuantConfig

    for label, quant in (
        ("dense (dequantized at load)", DEQUANTIZED),
        ("4-bit (packed Q4_1)", QuantConfig("gguf")),
    ):
        loaded = load_model(demo_model_path(), dtype=dtype, device=device, quant=quant)
        yield label, loaded.model, loaded.spec, loaded.weight_bytes
        del loaded


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--small", action="store_true", help="layers 16x smaller (CPU smoke runs)")
    parser.add_argument("--m", type=int, nargs="+", default=list(MS))
    parser.add_argument("--e2e", action="store_true", help="also time decode of an 8B-shaped random model")
    parser.add_argument("--e2e-steps", type=int, default=32)
    parser.add_argument(
        "--demo", action="store_true", help="decode tok/s of the SmolLM2 demo, dense vs 4-bit"
    )
    parser.add_argument("--skip-layers", action="store_true", help="skip the per-layer GEMM table")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({args.threads} threads)"
    print(
        f"# quant kernels on {name}, activations {args.dtype}, {'small' if args.small else 'Llama-3-8B'} shapes\n"
    )
    if not args.skip_layers:
        print("\n".join(bench_layers(args, device, dtype)))
    if args.demo:
        print(
            f"\n| SmolLM2-135M Q4_1 ({args.dtype}) | weight bytes | decode tok/s (batch 1) |\n|---|---|---|"
        )
        for label, model, spec, nbytes in demo_models(device, dtype):
            tps = decode_tokens_per_second(model, spec, device, dtype, args.e2e_steps)
            print(f"| {label} | {nbytes / 2**20:.1f} MiB | {tps:.1f} |")
    if args.e2e:
        print("\n| weights | decode tok/s (batch 1) |\n|---|---|")
        for fmt in ("dense", "fp8", "int4"):
            model, config = random_model(fmt, device, dtype, args.small)
            print(f"| {fmt} | {decode_tokens_per_second(model, config, device, dtype, args.e2e_steps):.1f} |")
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
