#!/usr/bin/env bash
# Spectral-diagnostics benchmark on one CUDA GPU: Qwen3-8B-shaped matrices, all
# 36 layers (252 matrices), our spectral_drift (base precomputed) vs the fp32
# torch SVD baseline (layer 0, extrapolated), accuracy vs the float64 scipy
# reference on layer 0's q and k. Writes bench/results/spectral_<gpu-name>.json.
#
#   bash bench/gpu_spectral.sh                 # the full run (estimated 5-8 min on an H100,
#                                              # most of it bases and the float64 reference)
#   bash bench/gpu_spectral.sh --layers 4      # a shorter one; extra args go to the script
#
# Needs python with torch (CUDA), numpy, scipy: $PYTHON, else ./.venv, else
# python3. It imports compass_monitor from this checkout (no install needed; a
# box without the package's other dependencies works too). Only if none of
# them has the three packages does it try `pip install torch numpy scipy` into
# a new .venv-gpu (needs a package index; delete it afterwards).
set -euo pipefail
cd "$(dirname "$0")/.."

has_deps() { "$1" -c 'import torch, numpy, scipy; assert torch.cuda.is_available(), "no CUDA device"' 2>/dev/null; }

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  for candidate in .venv/bin/python python3; do
    if command -v "$candidate" >/dev/null 2>&1 && has_deps "$candidate"; then PY="$candidate"; break; fi
  done
fi
if [[ -z "$PY" ]]; then
  echo "no python with torch+CUDA, numpy and scipy; creating .venv-gpu (needs a package index)" >&2
  python3 -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install --quiet torch numpy scipy
  PY=.venv-gpu/bin/python
  has_deps "$PY" || { echo "torch in .venv-gpu sees no CUDA device" >&2; exit 1; }
fi

echo "python: $PY"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv 2>/dev/null || true
export PYTHONUNBUFFERED=1
# Spectral tests on the GPU first (seconds): CUDA numerics against the float64 reference.
# (They import the whole package, which needs its dependencies: skipped without them.)
if "$PY" -c 'import pytest, compass_monitor.spectral' 2>/dev/null; then
  "$PY" -m pytest -q -p no:cacheprovider tests/test_spectral.py -k cuda || echo "GPU tests FAILED (continuing to the benchmark)" >&2
else
  echo "skipping tests/test_spectral.py -k cuda: pytest or compass_monitor's dependencies missing" >&2
fi
exec "$PY" bench/bench_spectral.py --device cuda --shapes qwen3-8b "$@"
