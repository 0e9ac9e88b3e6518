"""Decode throughput of an 8B-shaped random-weight Llama through the engine's own loop (scheduler, paged KV
cache, ModelRunner with or without CUDA graphs, sampler), against the bandwidth roofline and against
transformers' `generate` on the same weights.

    python bench/decode_bench.py --json decode.json                 # CUDA: Llama-3-8B shapes
    python bench/decode_bench.py --device cpu --small --dry-run     # CPU: 16x smaller, float32, a smoke run

Part 1, batch-1 decode tok/s for bf16, FP8 (weight-only, sm_89+) and 4-bit (AWQ layout, group 128)
weights, eager and with CUDA graphs (with graphs also `replay_only_tok_s`: the captured forward replayed
back to back, so host overhead per step = 1/decode_tok_s - 1/replay_only_tok_s, less the lm_head). Roofline: the copy bandwidth measured here (bytes read + written of a
1 GiB device-to-device copy) over the bytes a decode step must read — every weight but the embedding table,
of which a step reads one row. Part 2, batch 64: 64 prompts of 128 random tokens, 128 greedy tokens each
(no EOS), tokens/s of our engine and of transformers' generate (its default cache) on the same bf16
weights. Weights are random (made on the device; timings do not depend on values).

--dry-run (CPU): tiny step counts and the recording graph backend of tests/engine/test_cuda_graphs.py in
place of torch.cuda.CUDAGraph, so the whole script runs, not its numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_kernels import copy_bandwidth, random_model, sync  # noqa: E402

from engine.block_manager import BlockManager  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.loader import model_spec, resident_bytes  # noqa: E402
from engine.model_runner import ModelRunner  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.scheduler import Scheduler  # noqa: E402
from engine.sequence import Sequence  # noqa: E402


def make_runner(model, config, dtype, *, max_num_seqs: int, eager: bool, kv_bytes: int) -> ModelRunner:
    loaded = SimpleNamespace(model=model, spec=model_spec(config, dtype), weight_bytes=resident_bytes(model))
    device = next(model.parameters()).device
    engine_config = EngineConfig(model="random", device=device.type, dtype=dtype, block_size=16,
                                 kv_cache_memory=kv_bytes, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=max(1024, max_num_seqs), enforce_eager=eager,
                                 enable_prefix_caching=False, max_model_len=4096)
    return ModelRunner(loaded, engine_config)


def run_engine(runner: ModelRunner, prompts: list[list[int]], max_tokens: int, warmup_steps: int) -> dict:
    """Greedy decode of every prompt to max_tokens through Scheduler + ModelRunner (the engine's loop minus
    detokenizing). Returns total tok/s and the decode-only steps' tok/s after `warmup_steps` of them."""
    cfg = runner.config
    scheduler = Scheduler(BlockManager(runner.num_blocks, cfg.block_size, enable_prefix_caching=False),
                          max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
                          max_model_len=cfg.max_model_len)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for p in prompts:
        scheduler.add(Sequence("bench", p, params, max_tokens))
    device = runner.device
    decode_tokens, decode_time, decode_steps = 0, 0.0, 0
    sync(device)
    start = time.perf_counter()
    while scheduler.has_unfinished():
        batch = scheduler.schedule()
        decode = all(n == 1 for n in batch.num_new_tokens)
        t0 = time.perf_counter()
        seqs, result, _ = runner.run(batch)  # result.token_ids came to the host: the step is done
        elapsed = time.perf_counter() - t0
        sampled = {} if result is None else {s.seq_id: t for s, t in zip(seqs, result.token_ids, strict=True)}
        scheduler.update(batch, sampled)
        for s in seqs:
            if s.num_output_tokens >= s.max_tokens:
                scheduler.finish(s, "length")
        if decode:
            decode_steps += 1
            if decode_steps > warmup_steps:
                decode_tokens += len(batch.seqs)
                decode_time += elapsed
    total = time.perf_counter() - start
    return {"tok_s": len(prompts) * max_tokens / total,
            "decode_tok_s": decode_tokens / decode_time if decode_time else 0.0,
            "graph_replays": runner.graphs.replays if runner.graphs is not None else 0}


@torch.inference_mode()
def replay_only(runner: ModelRunner, device: torch.device, steps: int) -> float:
    """Back-to-back replays of the batch-1 graph (the last step's inputs): forward passes per second with
    no host work between them (no prepare, lm_head, sampling or scheduling)."""
    graph, _ = runner.graphs.graphs[1]
    graph.replay()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
    sync(device)
    return steps / (time.perf_counter() - start)


def decode_bytes(model) -> int:
    """Bytes a decode step reads: every weight but the embedding table (one row of it), unless tied."""
    embed = model.embed_tokens.weight
    tied = model.lm_head.weight is embed
    return resident_bytes(model) - (0 if tied else embed.numel() * embed.element_size())


def batch1(args, device, dtype, bandwidth) -> list[dict]:
    rows = []
    formats = ["dense", "fp8", "int4"] if not args.formats else args.formats
    for fmt in formats:
        if fmt == "fp8" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
            continue
        model, config = random_model(fmt, device, dtype, args.small)
        nbytes = decode_bytes(model)
        roofline = bandwidth / nbytes
        prompt = [list(torch.randint(0, config.vocab_size, (32,)).tolist())]
        for eager in (True, False):
            runner = make_runner(model, config, dtype, max_num_seqs=1, eager=eager, kv_bytes=args.kv_bytes)
            result = run_engine(runner, prompt, args.steps, warmup_steps=4)
            if not eager:  # the forward alone: how much of a step is the GPU's, how much the host's
                result["replay_only_tok_s"] = replay_only(runner, device, args.steps)
            rows.append({"weights": fmt, "graphs": not eager, "decode_bytes": nbytes,
                         "roofline_tok_s": roofline, **result,
                         "of_roofline": result["decode_tok_s"] / roofline})
            replay = f"{result['replay_only_tok_s']:.1f}" if not eager else "-"
            print(f"| {fmt} | {'graphs' if not eager else 'eager'} | {nbytes / 1e9:.2f} GB | "
                  f"{result['decode_tok_s']:.1f} | {replay} | {roofline:.1f} | {100 * rows[-1]['of_roofline']:.0f}% |",
                  flush=True)
            del runner
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def batch64(args, device, dtype) -> dict:
    """Our engine (graphs on where CUDA) against transformers' generate on the same bf16 weights."""
    from transformers import AutoModelForCausalLM
    from transformers import LlamaConfig as HFConfig

    from engine.models.llama import LlamaConfig, LlamaForCausalLM

    div = 16 if args.small else 1
    hf_config = HFConfig(vocab_size=128256 // div, hidden_size=4096 // div, intermediate_size=14336 // div,
                         num_hidden_layers=4 if args.small else 32, num_attention_heads=2 if args.small else 32,
                         num_key_value_heads=1 if args.small else 8, head_dim=128, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype).eval()
    config = LlamaConfig(architecture="llama", vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
                         intermediate_size=hf_config.intermediate_size, num_layers=hf_config.num_hidden_layers,
                         num_heads=hf_config.num_attention_heads, num_kv_heads=hf_config.num_key_value_heads,
                         head_dim=128, max_position_embeddings=8192, rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    with torch.device(device):
        ours = LlamaForCausalLM(config, dtype=dtype).eval()
    for name, tensor in hf.state_dict().items():
        ours.load_weight(name, tensor)
    batch, prompt_len, new = args.batch, args.prompt_len, args.new_tokens
    prompts = torch.randint(0, config.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(0))

    runner = make_runner(ours, config, dtype, max_num_seqs=batch, eager=device.type != "cuda" and not args.dry_run,
                         kv_bytes=args.kv_bytes)
    run_engine(runner, prompts[:2].tolist(), 4, warmup_steps=0)  # warm-up
    ours_result = run_engine(runner, prompts.tolist(), new, warmup_steps=2)
    del runner, ours
    if device.type == "cuda":
        torch.cuda.empty_cache()

    ids = prompts.to(device)
    with torch.no_grad():
        hf.generate(ids[:2], attention_mask=torch.ones_like(ids[:2]), max_new_tokens=4, do_sample=False,
                    pad_token_id=0)
        sync(device)
        start = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=0)
        sync(device)
    hf_tok_s = (out.shape[1] - prompt_len) * batch / (time.perf_counter() - start)
    result = {"batch": batch, "prompt_len": prompt_len, "new_tokens": new, "engine_tok_s": ours_result["tok_s"],
              "engine_decode_tok_s": ours_result["decode_tok_s"], "graph_replays": ours_result["graph_replays"],
              "transformers_tok_s": hf_tok_s, "speedup": ours_result["tok_s"] / hf_tok_s}
    print(f"\nbatch {batch}: engine {ours_result['tok_s']:.0f} tok/s (decode steps {ours_result['decode_tok_s']:.0f}), "
          f"transformers generate {hf_tok_s:.0f} tok/s: {result['speedup']:.2f}x", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--small", action="store_true", help="16x smaller, 4 layers")
    parser.add_argument("--dry-run", action="store_true", help="CPU smoke run: few steps, recording graphs")
    parser.add_argument("--formats", nargs="+", choices=["dense", "fp8", "int4"])
    parser.add_argument("--steps", type=int, default=128, help="batch-1 decode steps")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--kv-bytes", type=int, default=4 << 30, help="KV pool bytes")
    parser.add_argument("--skip-batch64", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if args.dry_run:
        if device.type == "cuda":
            raise SystemExit("--dry-run is the CPU smoke run")
        from engine import model_runner
        from tests.engine.test_cuda_graphs import RecordingGraphs

        model_runner.make_graph_backend = lambda device: RecordingGraphs()
        args.small, args.steps, args.batch, args.prompt_len, args.new_tokens = True, 6, 4, 16, 4
        args.kv_bytes = 64 << 20
        torch.set_num_threads(2)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bandwidth = copy_bandwidth(device)
    print(f"# decode on {name}, {str(dtype)[6:]}, {'small' if args.small else 'Llama-3-8B'} shapes; "
          f"copy bandwidth {bandwidth / 1e9:.0f} GB/s\n")
    print("| weights | mode | bytes/token | decode tok/s (batch 1) | replay-only tok/s | roofline tok/s | of roofline |"
          "\n|---|---|---|---|---|---|---|")
    results = {"device": name, "dtype": str(dtype)[6:], "copy_bandwidth": bandwidth,
               "batch1": batch1(args, device, dtype, bandwidth)}
    if not args.skip_batch64:
        results["batch64"] = batch64(args, device, dtype)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
