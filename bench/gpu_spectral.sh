#!/usr/bin/env bash
# Spectral-diagnostics benchmark on one CUDA GPU (Qwen3-8B shapes, 252 matrices): now the
# "spectral" part of bench/device_check.sh, which sets up the environment, runs the CUDA
# spectral tests with the other GPU parity tests, and writes bench/results/spectral_<card>.json.
#
#   bash bench/gpu_spectral.sh                      # the parity tests, then the spectral part
#   bash bench/gpu_spectral.sh --layers 4           # other arguments for bench/bench_spectral.py
set -euo pipefail
cd "$(dirname "$0")/.."
if (($#)); then export SPECTRAL_ARGS="$*"; fi
PARTS="tests spectral" exec bash bench/device_check.sh
