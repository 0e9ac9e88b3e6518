"""Engine throughput and latency vs transformers' batched generate, plus a prefix-sharing workload.

    .venv/bin/python bench/engine_throughput.py [--model PATH] [--requests 32] [--prompt-len 64]
        [--max-tokens 128] [--threads 2] [--device cpu|cuda] [--skip-transformers]

Workload 1 (throughput): `--requests` synthetic prompts of `--prompt-len` tokens (distinct, deterministic),
all submitted at once, greedy, `--max-tokens` output tokens each (ignore_eos). Our engine (continuous
batching, paged KV) is compared with transformers' batched `generate` on the same weights (fp32 on CPU,
left padding, min_new_tokens = max_new_tokens so both produce the same number of tokens) in the same run.
Reported: output tokens/s (wall clock, and per CPU-second of this process: on a shared machine the
second is the fairer comparison), TTFT and TPOT p50/p90/p99.

Workload 2 (prefix sharing): every request starts with the same long prefix (a shared system prompt) and
ends with its own question; run with the prefix cache off and on. Reported: cache hit rate, prompt tokens
actually computed (prefill saved), and time.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.loader import demo_model_path, load_model
from engine.sampling_params import SamplingParams


def percentiles(values: list[float]) -> dict:
    if not values:
        return {}
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


def synthetic_prompts(vocab: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(count)]


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Submit everything at once, step to completion; per-request TTFT/TPOT from the engine's timestamps."""
    computed = 0
    run = engine.runner.run

    def counting_run(batch):
        nonlocal computed
        computed += batch.num_tokens
        return run(batch)

    engine.runner.run = counting_run
    bm = engine.scheduler.block_manager
    bm.reset_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}-{start}", prompt, params, arrival_time=start)
    ttft, tpot, output_tokens = [], [], 0
    steps = 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            if out.finished:
                output_tokens += out.num_output_tokens
                ttft.append(out.first_token_time - start)
                if out.num_output_tokens > 1:
                    tpot.append((out.finish_time - out.first_token_time) / (out.num_output_tokens - 1))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    engine.runner.run = run
    return {
        "elapsed_s": elapsed, "output_tokens": output_tokens, "output_tok_per_s": output_tokens / elapsed,
        "cpu_s": cpu, "output_tok_per_cpu_s": output_tokens / cpu,
        "steps": steps, "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
        "tokens_computed": computed, "prefix_hit_rate": bm.prefix_hits / max(bm.prefix_queries, 1),
        "preemptions": engine.scheduler.num_preemptions,
    }


def load_transformers(model_path: Path, device: str):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch.float32 if device == "cpu" else torch.bfloat16}
    if model_path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(model_path.parent, gguf_file=model_path.name, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    return model.to(device).eval()


def run_transformers(model, prompts: list[list[int]], max_tokens: int, device: str) -> dict:
    from transformers import LogitsProcessor, LogitsProcessorList

    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    stamps: list[float] = []

    class StepClock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    with torch.inference_mode():
        model.generate(input_ids[:2, :8], attention_mask=attention_mask[:2, :8], max_new_tokens=2,
                       do_sample=False)  # warm-up
        stamps.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad,
                             logits_processor=LogitsProcessorList([StepClock()]))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    output_tokens = (out.shape[1] - width) * len(prompts)
    ttft = stamps[0] - start
    tpot = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return {"elapsed_s": elapsed, "output_tokens": output_tokens, "output_tok_per_s": output_tokens / elapsed,
            "cpu_s": cpu, "output_tok_per_cpu_s": output_tokens / cpu, "ttft_s": {"all requests": ttft}, "tpot_s": {"all requests": tpot}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(demo_model_path()))
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prefix-len", type=int, default=512, help="shared prefix of workload 2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate engine and transformers this many times (the best round is reported)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    loaded = load_model(args.model, device=args.device)
    vocab = loaded.spec.vocab_size
    results: dict = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
                     "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(),
                     "processor": platform.processor() or platform.machine(), "threads": args.threads,
                     "device": args.device, "model": Path(args.model).name, "torch": torch.__version__}
    if args.device == "cuda":
        results["gpu"] = torch.cuda.get_device_name()

    def engine(**overrides) -> LLMEngine:
        config = EngineConfig(model=args.model, device=args.device, max_num_seqs=max(args.requests, 64),
                              max_num_batched_tokens=4096, kv_cache_memory=1 << 30, **overrides)
        return LLMEngine(config, loaded=loaded, metrics=False)

    # Workload 1: throughput and latency.
    prompts = synthetic_prompts(vocab, args.requests, args.prompt_len)
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    ours = engine(enable_prefix_caching=False)
    run_engine(ours, prompts[:2], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
    reference = None if args.skip_transformers else load_transformers(Path(args.model), args.device)
    rounds: dict[str, list] = {"engine": [], "transformers": []}
    for _ in range(args.rounds):
        rounds["engine"].append(run_engine(ours, prompts, params))
        print(json.dumps({"engine": rounds["engine"][-1]}, indent=1), flush=True)
        if reference is not None:
            rounds["transformers"].append(run_transformers(reference, prompts, args.max_tokens, args.device))
            print(json.dumps({"transformers": rounds["transformers"][-1]}, indent=1), flush=True)
    for name, runs in rounds.items():
        if runs:
            results[name] = max(runs, key=lambda r: r["output_tok_per_s"])
            results[name]["all_rounds_tok_per_s"] = [r["output_tok_per_s"] for r in runs]
    if reference is not None:
        results["speedup"] = results["engine"]["output_tok_per_s"] / results["transformers"]["output_tok_per_s"]
        results["speedup_per_cpu_s"] = (results["engine"]["output_tok_per_cpu_s"]
                                        / results["transformers"]["output_tok_per_cpu_s"])
    del ours, reference
    gc.collect()

    # Workload 2: a shared prefix.
    rng = random.Random(1)
    prefix = [rng.randrange(100, vocab - 100) for _ in range(args.prefix_len)]
    shared = [prefix + [rng.randrange(100, vocab - 100) for _ in range(16)] for _ in range(args.requests)]
    short = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    for name, caching in (("prefix_cache_off", False), ("prefix_cache_on", True)):
        eng = engine(enable_prefix_caching=caching)
        eng.add_request("warm", prefix[:8], SamplingParams(max_tokens=1))
        while eng.has_unfinished():
            eng.step()
        # Arrivals in two waves, as a steady stream would give: the first request fills the cache.
        first = run_engine(eng, shared[:1], short)
        rest = run_engine(eng, shared[1:], short)
        queried = sum(len(p) for p in shared)
        computed = first["tokens_computed"] + rest["tokens_computed"]
        results[name] = {
            "elapsed_s": first["elapsed_s"] + rest["elapsed_s"],
            "prompt_tokens": queried,
            "tokens_computed": computed,
            "prefill_tokens_computed": computed - (len(shared) * short.max_tokens - len(shared)),
            "prefix_hit_rate_rest": rest["prefix_hit_rate"],
            "ttft_s_rest": rest["ttft_s"],
        }
        del eng
        gc.collect()
    off, on = results["prefix_cache_off"], results["prefix_cache_on"]
    results["prefill_saved"] = 1 - on["prefill_tokens_computed"] / off["prefill_tokens_computed"]
    print(json.dumps({k: results[k] for k in ("prefix_cache_off", "prefix_cache_on", "prefill_saved")}, indent=1))
    results["load_average_at_end"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if "speedup" in results:
        print(f"engine {results['engine']['output_tok_per_s']:.1f} tok/s vs transformers "
              f"{results['transformers']['output_tok_per_s']:.1f} tok/s: x{results['speedup']:.2f}")


if __name__ == "__main__":
    main()
