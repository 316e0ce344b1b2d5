#!/usr/bin/env bash
# GPU validation from a fresh clone on a machine with a CUDA GPU (and nvcc,
# torch with CUDA, triton; no package registry needed): builds the CUDA
# extension from source, runs the `gpu` tests (fp32/fp16/bf16), runs the
# benchmark suites on CUDA in every dtype, and writes everything under
# bench/results/ (or the folder given as $1).
#
#   bash bench/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results}
py=${PYTHON:-python3}
mkdir -p "$out"
status=0

gpu=$($py -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_'))") || {
  echo "gpu_check: torch sees no CUDA GPU" >&2; exit 1; }
tag="cuda-${gpu}"

echo "== build (nvcc, native arch) =="
# The machine's own architecture only: a full multi-arch build is for wheels.
arch=$($py -c "import torch; m, n = torch.cuda.get_device_capability(0); print(f'{m}{n}')")
FASTVISION_CUDA=1 CUDAARCHS="$arch" $py -m pip install --no-build-isolation --no-deps --no-index -q -e . \
  2>&1 | tee "$out/$tag-build.log" || { echo "gpu_check: build failed" >&2; exit 1; }

echo "== fastvision info =="
$py -m fastvision info | tee "$out/$tag-info.txt"

echo "== gpu tests =="
PYTHONUNBUFFERED=1 $py -m pytest -m gpu -q -rs tests/ 2>&1 | tee "$out/$tag-tests.log" || status=1

echo "== benchmarks =="
# A short time budget per measurement keeps three dtypes inside one
# 10-minute device command; plots only where matplotlib is installed.
plot_ok=$($py -c "import matplotlib" 2>/dev/null && echo 1 || echo 0)
for dtype in float32 float16 bfloat16; do
  plot=()
  [ "$plot_ok" = 1 ] && plot=(--plot "$out/$tag-$dtype.png")
  $py -m fastvision bench --device cuda --dtype "$dtype" --budget 0.5 --json "$out/$tag-$dtype.json" \
    "${plot[@]}" || status=1
done
exit $status
