#!/usr/bin/env bash
# Prepare, on a machine with PyPI access (a developer's), what bench/gpu_check.sh carries to the GPU machine:
#   .whl/  the wheels of bench/gpu_wheels.txt for Python 3.12 / manylinux x86_64 (~10 MiB)
#   .gpu/  the first SMOLLM2_LAYERS (default 8) layers of the SmolLM2-135M demo GGUF, real tokenizer and
#          embeddings (~48 MiB; the whole 98 MB file is over the 64 MiB a device call carries)
# Both folders are git-ignored. Usage: bash bench/gpu_prepare.sh   (then see bench/gpu_check.sh's header)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl .gpu
grep -v '^#' bench/gpu_wheels.txt | grep . | while read -r req; do
  name=${req%%==*}
  if ls .whl/ | grep -qi "^$(echo "$name" | tr '-' '_')-${req##*==}-"; then continue; fi
  found=0
  for n in 17 28 27 24 31 34 35; do
    if "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform "manylinux_2_${n}_x86_64" --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
        --platform any -d .whl "$req" 2>/dev/null; then found=1; break; fi
  done
  [ "$found" = 1 ] || { echo "no wheel for $req" >&2; exit 1; }
done
"$PY" bench/smollm2_slice.py --layers "${SMOLLM2_LAYERS:-8}" --out .gpu/smollm2-slice.gguf
du -sh .whl .gpu
tracked=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
carried=$(du -cb .whl .gpu | tail -1 | cut -f1)
echo "working tree ~$((tracked / 1048576)) MiB + carried $((carried / 1048576)) MiB (limit 64 MiB)"
