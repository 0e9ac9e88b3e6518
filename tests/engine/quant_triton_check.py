"""Run the Triton W4A16 / W8A16 kernels under TRITON_INTERPRET=1 on CPU and print their errors as JSON.

Run as a subprocess (`python -m tests.engine.quant_triton_check`): the interpreter must be switched on
before triton is first imported, which a pytest process that imported torch/triton already cannot do.
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import torch  # noqa: E402

from engine.quant import triton_kernels as tk  # noqa: E402
from engine.quant.weights import Int4Weight, Int8Weight, pack_int4  # noqa: E402

# (M, K, N, group_size, config or None for the heuristic)
CASES = [
    (1, 96, 40, 32, None),
    (3, 160, 37, 32, tk.LaunchConfig(16, 32, 32, 3)),  # split-K with a K loop that does not divide evenly
    (17, 192, 72, 64, None),
    (70, 96, 101, 96, None),
    (200, 64, 24, 32, tk.LaunchConfig(64, 32, 32, 1)),
]


def _error(y: torch.Tensor, reference: torch.Tensor) -> float:
    return ((y.double() - reference).abs().max() / reference.abs().max()).item()


def main() -> None:
    torch.manual_seed(0)
    results = {"interpreted": type(tk._w4a16_kernel).__name__, "cases": []}
    for m, k, n, g, config in CASES:
        for dtype in (torch.float16, torch.bfloat16):
            x = torch.randn(m, k).to(dtype)
            w4 = Int4Weight(
                pack_int4(torch.randint(0, 16, (k, n))),
                (torch.rand(k // g, n) * 0.1 + 0.01).half(),
                torch.randn(k // g, n) * 0.3,
                g,
            )
            ref4 = x.double() @ w4.dequantize(dtype=torch.float64)
            y4 = tk.w4a16_matmul(x, w4, config)
            for qdtype in (torch.int8, torch.float8_e4m3fn):
                if qdtype == torch.int8:
                    codes = torch.randint(-127, 128, (n, k), dtype=torch.int8)
                else:
                    codes = (torch.randn(n, k) * 40).to(torch.float8_e4m3fn)
                w8 = Int8Weight(codes, torch.rand(n, k // g) * 0.02 + 0.001, g)
                ref8 = x.double() @ w8.dequantize(dtype=torch.float64).T
                y8 = tk.w8a16_matmul(x, w8, config)
                results["cases"].append(
                    {"kernel": f"w8a16-{str(qdtype)[6:]}", "m": m, "k": k, "n": n, "dtype": str(dtype)[6:],
                     "shape_ok": list(y8.shape) == [m, n] and y8.dtype == dtype, "error": _error(y8, ref8)}
                )  # fmt: skip
            results["cases"].append(
                {"kernel": "w4a16", "m": m, "k": k, "n": n, "dtype": str(dtype)[6:],
                 "shape_ok": list(y4.shape) == [m, n] and y4.dtype == dtype, "error": _error(y4, ref4)}
            )  # fmt: skip
    print(json.dumps(results))


if __name__ == "__main__":
    main()
