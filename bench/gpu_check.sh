#!/usr/bin/env bash
# GPU validation in stages that each fit one 8-minute command on a GPU machine
# (CUDA GPU, torch with CUDA, triton, nvcc; no package registry needed).
#
#   bash bench/gpu_check.sh --stage smoke      # the first command on a GPU machine
#   bash bench/gpu_check.sh --stage build|smoke|tests|bench|all [--dry-run] [--force] ...
#
# Every stage is resumable and records its results under bench/results/gpu/
# (one line per run in summary.txt). `--help` says more; the logic is in
# bench/gpu_check.py. PYTHON picks the interpreter (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
# The checkout's own fastvision (and any libraries carried into it) first.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" bench/gpu_check.py "$@"
