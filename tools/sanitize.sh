#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer run of the CPU kernels:
#
#   bash tools/sanitize.sh [extra pytest args]
#
# Builds fastvision/_C with FASTVISION_SANITIZE=address,undefined (its own
# virtualenv .venv-sanitize and build directory build/sanitize, so the normal
# .venv and build/ are untouched), then runs the direct-call fuzz, the
# entry-point reproductions and the CPU family (and conformance) tests with
# the sanitizer runtimes preloaded into the (uninstrumented) Python. Every
# child process the tests start inherits them. Reports go to
# build/sanitize/reports/; the run fails unless there are none.
#
# The mask codecs' fuzz corpus (tests/test_masks.py: pycocotools strings and
# R-RLE texts mutated by hypothesis, malformed RLEs, the direct-call fuzz of
# every codec op) runs alone with:
#
#   bash tools/sanitize.sh tests/test_masks.py -k "fuzz or malformed or mismatched or gigapixel or exact_path or prepared"
#
# (extra arguments go to pytest; a test file given there is run instead of the default list).
#
# Environment: FASTVISION_SANITIZE (default address,undefined),
# SANITIZE_VENV (default .venv-sanitize), TORCH_SPEC (default: the torch of
# .venv if there is one, else torch==2.13.0).
set -euo pipefail
cd "$(dirname "$0")/.."

sanitize=${FASTVISION_SANITIZE:-address,undefined}
venv=${SANITIZE_VENV:-.venv-sanitize}
build=build/sanitize
reports="$PWD/$build/reports"

if [ -z "${TORCH_SPEC:-}" ]; then
  if [ -x .venv/bin/python ] && v=$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null); then
    TORCH_SPEC="torch==$v"
  else
    TORCH_SPEC="torch==2.13.0"
  fi
fi

if [ ! -x "$venv/bin/python" ]; then
  echo "sanitize: creating $venv ($TORCH_SPEC)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "$TORCH_SPEC" scikit-build-core ninja numpy pytest pycocotools hypothesis
fi

echo "sanitize: building _C with -fsanitize=$sanitize into $build"
# install.strip=false keeps the debug info, so reports name functions and lines.
FASTVISION_SANITIZE="$sanitize" FASTVISION_CUDA=0 "$venv/bin/pip" install -q --no-build-isolation --no-deps \
  -C build-dir="$build" -C install.strip=false -e .

libs=()
[[ ",$sanitize," == *,address,* ]] && libs+=(libasan.so)  # first in the preload list, as ASan requires
[[ ",$sanitize," == *,undefined,* ]] && libs+=(libubsan.so)
preload=""
for lib in "${libs[@]}"; do
  path=$(${CXX:-g++} -print-file-name="$lib")
  [ -e "$path" ] || { echo "sanitize: $lib not found (${CXX:-g++} -print-file-name=$lib)" >&2; exit 1; }
  preload="${preload:+$preload:}$path"
done

rm -rf "$reports" && mkdir -p "$reports"
tests=(tests/test_fuzz.py tests/test_entry_points.py tests/test_selective_scan.py tests/test_neighborhood.py
       tests/test_criss_cross.py tests/test_super_token.py tests/test_masks.py
       tests/test_deform_conv.py tests/test_dcn.py tests/test_deform_attn.py)
[ -e tests/test_conformance.py ] && tests+=(tests/test_conformance.py)
# A test file among the arguments replaces the default list.
for arg in "$@"; do
  if [[ "$arg" == tests/*.py* ]]; then tests=(); break; fi
done

echo "sanitize: running ${tests[*]} with LD_PRELOAD=$preload"
set +e
# abort_on_error: a report kills the process with SIGABRT, which the fuzz and
# the child-process tests record as a crash. allocator_may_return_null: an
# allocation too large for ASan fails like an ordinary out-of-memory.
LD_PRELOAD="$preload" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:allocator_may_return_null=1:log_path=$reports/asan" \
UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$reports/ubsan" \
TORCHINDUCTOR_COMPILE_THREADS=1 \
  "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "not triton and not gpu" "${tests[@]}" "$@"
status=$?
set -e

n=$(find "$reports" -type f | wc -l)
if [ "$n" -ne 0 ]; then
  echo "sanitize: $n sanitizer report(s):" >&2
  for f in "$reports"/*; do echo "==== $f" >&2; head -60 "$f" >&2; done
  exit 1
fi
if [ "$status" -ne 0 ]; then
  echo "sanitize: tests failed (exit $status), no sanitizer reports" >&2
  exit "$status"
fi
echo "sanitize: tests passed, 0 sanitizer reports ($sanitize)"
