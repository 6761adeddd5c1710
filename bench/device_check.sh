#!/usr/bin/env bash
# The GPU check of issue 17, in one go on a machine with one NVIDIA GPU (parts capped at 100+160+140+80 s,
# about 8 minutes at most with the set-up):
#
#   1. gpu tests: every device result equal to the CPU result on the same weights
#      (tests/test_gpu_parity.py: fused and torch mask passes bit for bit, whole monitors in
#      fp32 and bf16, FSDP2 on one NCCL rank; tests/test_spectral.py -k cuda: spectra against
#      the float64 reference)                                  -> bench/results/gpu_tests_<card>.json
#   2. mask pass: fused Triton vs plain torch vs torch.compile vs the read floor, Qwen3-8B
#      shapes, fp32 masters and bf16                            -> bench/results/mask_pass_<card>.json
#   3. spectral: bench_spectral.py on the Qwen3-8B shapes      -> bench/results/spectral_<card>.json
#   4. HF Trainer step-time overhead, bf16 mixed precision     -> bench/results/hf_overhead_<card>.json
#
# Each part runs under its own time limit; a part that fails or runs out leaves the others
# running, and the script exits non-zero. The log and the JSONs are copied to $OUT if set.
#
#   bash bench/device_check.sh                  # everything
#   PARTS="tests mask" bash bench/device_check.sh
#   SPECTRAL_ARGS="--layers 36" bash bench/device_check.sh   # all 252 matrices timed (minutes more)
#
# Python: $PYTHON, else python3. It needs torch with CUDA, triton, numpy, scipy, pytest,
# transformers and accelerate (the H200 image here has them), plus zarr, numcodecs, donfig and
# google-crc32c, which it installs from wheels in .whl/ if present (no package index there).
# Fetch those here, for the device's Python (3.12, x86-64), into the ignored .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0
# compass_monitor itself is copied from this checkout into the same target.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PYTHON:-python3}"
PARTS="${PARTS:-tests mask spectral hf}"
# 6 of the 36 layers timed (42 matrices; the summary extrapolates to all 252) to fit the time limit:
# each matrix's base decomposition and the float64 reference take most of the part's time.
SPECTRAL_ARGS="${SPECTRAL_ARGS:---layers 6 --baseline-layers 1 --reference q --accuracy-drifts 1e-3 --repeats 1}"
LOG=bench/results/device_check.log
mkdir -p bench/results
: >"$LOG"
export PYTHONUNBUFFERED=1
say() { echo "[device_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

SITE=/tmp/compass-device-site
if ! "$PY" -c 'import zarr, numcodecs' 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl 2>&1 | tee -a "$LOG"
  else
    "$PY" -m pip install -q --target "$SITE" zarr numcodecs 2>&1 | tee -a "$LOG" || say "zarr/numcodecs missing and not installable: bring them in .whl/ (see the header)"
  fi
fi
# The package from this checkout, laid out as installed (pyproject maps ./integrations to
# compass_monitor.integrations): a copy, so no build backend is needed there.
mkdir -p "$SITE" && rm -rf "$SITE/compass_monitor" && cp -r compass_monitor "$SITE/" && cp -r integrations "$SITE/compass_monitor/integrations"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

CARD=$("$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))') || {
  say "no CUDA device visible to $PY"
  exit 2
}
"$PY" -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(0))' 2>&1 | tee -a "$LOG"
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,driver_version --format=csv 2>&1 | tee -a "$LOG"

failed=()
part() {  # part NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  case " $PARTS " in *" $name "*) ;; *) return 0 ;; esac
  say "part $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "part $name: exit $rc after $((SECONDS - start))s"
  [[ $rc -eq 0 ]] || failed+=("$name")
}

part tests 100 "$PY" -m pytest -q -p no:cacheprovider -rfEs --junitxml=/tmp/compass-gpu-tests.xml \
  tests/test_gpu_parity.py "tests/test_spectral.py::test_cuda_matches_reference"
if [[ -f /tmp/compass-gpu-tests.xml ]]; then
  "$PY" - "$CARD" <<'EOF' | tee -a "$LOG"
import json, sys, torch, xml.etree.ElementTree as ET
suite = ET.parse("/tmp/compass-gpu-tests.xml").getroot()
suite = suite if suite.tag == "testsuite" else suite[0]
cases = []
for case in suite.iter("testcase"):
    outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
    cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "seconds": float(case.get("time", 0))})
out = {
    "benchmark": "GPU parity tests (device results vs CPU results on the same weights)",
    "machine": {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda},
    "counts": {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failure", "error", "skipped")},
    "cases": cases,
}
path = f"bench/results/gpu_tests_{sys.argv[1]}.json"
open(path, "w").write(json.dumps(out, indent=1) + "\n")
print("wrote", path, out["counts"])
EOF
fi
part mask 160 "$PY" bench/bench_mask_pass.py --device cuda
# shellcheck disable=SC2086  # SPECTRAL_ARGS is a list of arguments
part spectral 140 "$PY" bench/bench_spectral.py --device cuda --shapes qwen3-8b $SPECTRAL_ARGS
part hf 80 "$PY" bench/bench_hf_overhead.py --device cuda --steps 15 --pairs 3 --every 1 10

if [[ -n "${OUT:-}" ]]; then
  cp "$LOG" "$OUT"/ 2>/dev/null
  cp bench/results/*_"$CARD".json "$OUT"/ 2>/dev/null
fi
if ((${#failed[@]})); then
  say "FAILED parts: ${failed[*]}"
  exit 1
fi
say "all parts passed; results: bench/results/*_${CARD}.json"
