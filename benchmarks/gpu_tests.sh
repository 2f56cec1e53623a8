#!/bin/bash
# The test suite on the first GPU of a machine, a process per test file, JOBS at a time (each process
# grows its GPU memory as it needs, rather than taking 75% of it). Tests that need more devices than
# the machine has skip and say how many they need; interpret-mode tests run on the CPU backend
# beside the GPU. Prints each file's summary line; with OUT set, also writes OUT/<file>.xml (JUnit)
# and OUT/<file>.log.
# Usage (repository root, on the GPU machine): [OUT=DIR] bash benchmarks/gpu_tests.sh [JOBS] [FILE ...]
#   e.g. OUT=$OUT bash benchmarks/gpu_tests.sh 8
#        bash benchmarks/gpu_tests.sh 2 tests/test_quant.py tests/test_engine.py
set -uo pipefail
jobs=${1:-8}
shift $(( $# > 0 ? 1 : 0 ))
files=("$@")
[ ${#files[@]} -gt 0 ] || files=(tests/test_*.py)
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
export JAX_PLATFORMS=cuda,cpu PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
run_file() {
  local name
  name=$(basename "$1" .py)
  python -P -m pytest -q -p no:cacheprovider --tb=short -rfs --junitxml="$out/$name.xml" "$1" > "$out/$name.log" 2>&1
  echo "$name: $(tail -n 1 "$out/$name.log")"
}
export -f run_file
export out
printf '%s\n' "${files[@]}" | xargs -P "$jobs" -I{} bash -c 'run_file {}'
