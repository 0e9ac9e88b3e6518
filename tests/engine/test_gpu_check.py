"""bench/gpu_check.sh, the prepared device check: valid, within its budget, and its benchmarks run on CPU.

The whole dry run (`bash bench/gpu_check.sh --dry-run`, about 4 minutes on 2 cores: the gpu tests, both
serve checks, the benchmarks) is the step before a device call; CI runs its benchmark stages.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def test_the_script_is_valid_bash_and_its_budget_leaves_room_for_the_machine_start():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    budget = int(re.search(r"GPU_CHECK_BUDGET:-(\d+)", text).group(1))
    assert budget + 90 <= 8 * 60  # 8 minutes of device time, about 90 s of them the machine's start
    carried = re.search(r"carry:\s+\[(.*)\]", text).group(1)
    ignored = (ROOT / ".gitignore").read_text().split()
    for path in re.findall(r'"([^"]+)"', carried):
        assert f"/{path}/" in ignored, f"{path} travels only if carried, so it must stay out of git"


@pytest.mark.slow
def test_the_dry_run_runs_the_decode_and_kernel_benchmarks_on_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "GPU_CHECK_ONLY": "decode,quant", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    summary = (tmp_path / "summary.txt").read_text()
    assert result.returncode == 0, summary + (tmp_path / "log.txt").read_text()[-3000:]
    assert re.search(r"^PASS decode ", summary, re.M) and re.search(r"^PASS quant ", summary, re.M)
    decode = json.loads((tmp_path / "decode.json").read_text())
    rows = {(r["weights"], r["graphs"]): r for r in decode["batch1"]}
    assert set(rows) == {(w, g) for w in ("dense", "fp8", "int4") for g in (False, True)}
    assert all(r["decode_tok_s"] > 0 and r["roofline_tok_s"] > 0 for r in rows.values())
    assert all((r["graph_replays"] > 0) == graphs for (_, graphs), r in rows.items())
    assert decode["batch64"]["transformers_tok_s"] > 0 and decode["batch64"]["graph_replays"] > 0
    assert "| qkv_proj |" in (tmp_path / "quant_kernels.md").read_text()
