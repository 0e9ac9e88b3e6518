"""Measure launch configurations of the W4A16 / W8A16 Triton GEMMs per Llama-3-8B layer shape and M, and
write the fastest of each as JSON: the table issue 10 asks to measure once on the GPU and check in.

    python bench/tune_quant.py --json quant_tuning.json          # CUDA: ~350 configs, each a compile (~5 min)
    TRITON_INTERPRET=1 python bench/tune_quant.py --dry-run      # CPU: small shapes, 2 configs, no timing value

Not part of bench/gpu_check.sh (it does not fit those 8 minutes): a device call of its own,
`run(command="python3 bench/tune_quant.py --json $OUT/quant_tuning.json", timeout_s=540)` (or fewer `--m`). Each candidate is
checked against the heuristic's output before it is timed (a wrong config never wins). What to do with the
table: `engine.quant.triton_kernels.choose_config` reads nothing yet; check the JSON in and look it up there
by (kernel, N, K, M bucket), keeping the heuristic for shapes it lacks.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quant_kernels import GROUP_SIZE, LAYERS, random_int4, random_int8, timed  # noqa: E402

from engine.quant import triton_kernels as tk  # noqa: E402


def candidates(m: int, k: int, full: bool) -> list[tk.LaunchConfig]:
    """A small grid around the heuristic: tiles by M class, split-K for decode shapes."""
    if not full:
        return [tk.LaunchConfig(16, 32, 32, 1), tk.LaunchConfig(16, 32, 32, 2)]
    if m <= 16:  # decode: streaming the weight, split-K decides
        grid = itertools.product([(16, 64, 128), (16, 128, 128)], [2, 4, 8, 16], [4], [3, 4])
    elif m <= 64:
        grid = itertools.product([(64, 64, 64), (32, 64, 128)], [1, 2, 4], [4], [3])
    else:
        grid = itertools.product([(64, 128, 64), (128, 128, 64), (128, 64, 64)], [1], [4, 8], [3])
    out = []
    for (bm, bn, bk), split, warps, stages in grid:
        if bk * split <= k and k % bk == 0:
            out.append(tk.LaunchConfig(bm, bn, bk, split, num_warps=warps, num_stages=stages))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1: small, 2 configs")
    parser.add_argument("--json")
    args = parser.parse_args()
    device = torch.device("cpu" if args.dry_run else "cuda")
    scale, ms = (16, [1]) if args.dry_run else (1, args.m)
    layers = {name: LAYERS[name] for name in ("o_proj", "down_proj")} if args.dry_run else LAYERS
    table = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
             "group_size": GROUP_SIZE, "entries": []}
    for name, (k, n) in layers.items():
        k, n = k // scale, n // scale
        weights = {"w4a16": (random_int4(k, n, device), tk.w4a16_matmul),
                   "w8a16": (random_int8(k, n, device), tk.w8a16_matmul)}
        for m, (kernel, (w, mm)) in itertools.product(ms, weights.items()):
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            reference = mm(x, w).float()
            default = tk.choose_config(m, n, k, device)
            results = []
            for config in [default, *candidates(m, k, not args.dry_run)]:
                y = mm(x, w, config).float()
                if not torch.allclose(y, reference, atol=2e-2 * reference.abs().max().item(), rtol=0):
                    continue
                seconds = timed(lambda config=config: mm(x, w, config), device, min_time=0.05)  # noqa: B023
                results.append((seconds, config))
            best_s, best = min(results, key=lambda r: r[0])
            entry = {"layer": name, "kernel": kernel, "m": m, "n": n, "k": k, "best": vars(best),
                     "best_ms": best_s * 1e3, "heuristic_ms": results[0][0] * 1e3, "tried": len(results)}
            table["entries"].append(entry)
            print(f"{name:13} {kernel} M={m:<4} best {best_s * 1e3:.4f} ms vs heuristic "
                  f"{results[0][0] * 1e3:.4f} ms ({results[0][0] / best_s:.2f}x) {vars(best)}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
