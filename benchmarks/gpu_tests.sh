#!/bin/bash
# The test suite on one GPU (the first, unless CUDA_VISIBLE_DEVICES names another), a process per
# test file, JOBS at a time (each process grows its GPU memory as it needs, rather than taking 75% of
# it). Tests that need more devices than the process sees skip and say how many they need;
# interpret-mode tests run on the CPU backend beside the GPU (slowly: give them time). Prints each
# file's summary line and the folder holding OUT/<file>.log and OUT/<file>.xml (JUnit); exits 1 if
# any file failed.
# Usage (repository root, on the GPU machine): [OUT=DIR] bash benchmarks/gpu_tests.sh [JOBS] [FILE ...]
#   e.g. OUT=$OUT bash benchmarks/gpu_tests.sh 8
#        bash benchmarks/gpu_tests.sh 2 tests/test_quant.py tests/test_engine.py
set -uo pipefail
jobs=8
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
  jobs=$1
  shift
fi
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(tests/test_*.py)
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
echo "logs in $out"
export JAX_PLATFORMS=cuda,cpu PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
run_file() {
  local name rc
  name=$(basename "$1" .py)
  python -P -m pytest -q -p no:cacheprovider --tb=short -rfs --junitxml="$out/$name.xml" "$1" > "$out/$name.log" 2>&1
  rc=$?
  echo "$name: $(tail -n 1 "$out/$name.log")"
  return $rc
}
export -f run_file
export out
printf '%s\n' "${files[@]}" | xargs -P "$jobs" -I{} bash -c 'run_file "$1"' _ {} || exit 1
