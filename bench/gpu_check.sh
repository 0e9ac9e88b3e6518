#!/usr/bin/env bash
# The engine's one prepared device check (issue 10): correctness on CUDA, kernel and decode benchmarks.
# Fits 8 minutes of one H200 including the machine's start-up: the stages share a budget of
# GPU_CHECK_BUDGET seconds (default 390) and each is cut at its own limit, so the script always ends and
# whatever finished is under $OUT. It never needs a network.
#
# 1. Here, once, on a machine with PyPI (a developer's):
#        bash bench/gpu_prepare.sh      # .whl/ (wheels the GPU image lacks) and .gpu/ (SmolLM2 8-layer slice)
#        bash bench/gpu_check.sh --dry-run   # every stage on the CPU, small shapes (3-4 minutes on 2 cores)
# 2. On the device, one call of the device tool's `run`:
#        command:   bash bench/gpu_check.sh
#        carry:     [".whl", ".gpu"]          (about 53 MiB with the working tree; the limit is 64)
#        timeout_s: 480
#    Files back (at most 8): summary.txt, log.txt, pytest.xml, serve-tiny.json, serve-smollm2.json,
#    quant_kernels.md, decode.json.
# 3. Record the numbers in bench/RESULTS.md (date, machine, this command); fix what failed; rerun.
#
# Stages (name, limit s): env · pytest 130 (pytest -m gpu tests/engine/test_gpu.py) · serve-tiny 50 and
# serve-smollm2 60 (bench/serve_check.py: greedy == transformers, seeded repeat, mixed batch with prefix
# hits and chunked prefill, through `python -m engine serve` and the openai client) · decode 130
# (bench/decode_bench.py: batch-1 tok/s bf16/FP8/4-bit, eager and CUDA graphs, vs the roofline; batch 64 vs
# transformers generate) · quant 70 (bench/quant_kernels.py, Llama-3-8B layer shapes, M = 1 16 64 256).
# Correctness first: if the budget runs out, the last stages are skipped (and reported).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
: > "$OUT/log.txt"
BUDGET=${GPU_CHECK_BUDGET:-390}
ONLY=${GPU_CHECK_ONLY:-}  # comma-separated stage names to run (default: all)
T0=$(date +%s)

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}
  DEVICE=cpu
  export GPU_CHECK_DRY_RUN=1 TRITON_INTERPRET=1
else
  PY=${PYTHON:-python3}
  DEVICE=cuda
  if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$OUT/log.txt" 2>&1 || echo "wheel install failed (see log.txt)" | tee -a "$OUT/summary.txt"
    export PYTHONPATH=/tmp/site:$ROOT
  fi
fi
export PYTHONPATH=${PYTHONPATH:-$ROOT}:$ROOT PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1  # no network there: never wait on one
SMOL=${GPU_SMOLLM2_GGUF:-$ROOT/.gpu/smollm2-slice.gguf}
[ -f "$SMOL" ] || SMOL=$("$PY" -c 'from engine.loader import demo_model_path; print(demo_model_path())' 2>/dev/null)
export GPU_SMOLLM2_GGUF=$SMOL

FAILED=0
stage() {  # stage NAME LIMIT COMMAND...: run within its limit and what is left of the budget
  local name=$1 limit=$2
  shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then return; fi
  local left=$((BUDGET - ($(date +%s) - T0)))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt 5 ]; then
    echo "SKIP $name: budget spent" | tee -a "$OUT/summary.txt"
    FAILED=1
    return
  fi
  echo "===== $name (limit ${limit}s): $*" >>"$OUT/log.txt"
  local start=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >>"$OUT/log.txt" 2>&1
  local rc=$?
  local status=PASS
  [ "$rc" != 0 ] && status=FAIL && FAILED=1
  [ "$rc" = 124 ] && status="FAIL (timed out)"
  echo "$status $name rc=$rc $(($(date +%s) - start))s" | tee -a "$OUT/summary.txt"
}

env_info() {
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c 'import sys, torch, triton, transformers; print(sys.version.split()[0], "torch", torch.__version__,
"triton", triton.__version__, "transformers", transformers.__version__, "cuda", torch.cuda.is_available())'
  echo "SmolLM2: $SMOL"
}

if [ -z "$ONLY" ] || [[ ",$ONLY," == *",env,"* ]]; then
  env_info 2>&1 | tee -a "$OUT/summary.txt" >>"$OUT/log.txt"
fi
if [ "$DRY" = 1 ]; then
  stage pytest 300 "$PY" -m pytest -m gpu tests/engine/test_gpu.py -q -p no:cacheprovider -x --junitxml="$OUT/pytest.xml"
  stage serve-tiny 180 "$PY" bench/serve_check.py --tiny llama --device cpu --workdir /tmp/gpu-check-models \
    --json "$OUT/serve-tiny.json" --extra --threads 2
  stage serve-smollm2 240 "$PY" bench/serve_check.py --model "$SMOL" --device cpu --max-tokens 8 \
    --json "$OUT/serve-smollm2.json" --extra --threads 2
  stage decode 180 "$PY" bench/decode_bench.py --device cpu --dry-run --json "$OUT/decode.json"
  stage quant 120 bash -c "'$PY' bench/quant_kernels.py --device cpu --small --m 1 16 | tee '$OUT/quant_kernels.md'"
else
  stage pytest 130 "$PY" -m pytest -m gpu tests/engine/test_gpu.py -q -p no:cacheprovider -p no:django --durations=8 \
    --junitxml="$OUT/pytest.xml"
  stage serve-tiny 50 "$PY" bench/serve_check.py --tiny llama --device cuda --workdir /tmp/gpu-check-models \
    --json "$OUT/serve-tiny.json"
  stage serve-smollm2 60 "$PY" bench/serve_check.py --model "$SMOL" --device cuda --json "$OUT/serve-smollm2.json"
  stage decode 130 "$PY" bench/decode_bench.py --device cuda --json "$OUT/decode.json"
  stage quant 70 bash -c "'$PY' bench/quant_kernels.py --device cuda | tee '$OUT/quant_kernels.md'"
fi
echo "total $(($(date +%s) - T0))s; $([ $FAILED = 0 ] && echo 'all stages passed' || echo 'SOME STAGES FAILED')" \
  | tee -a "$OUT/summary.txt"
exit $FAILED
