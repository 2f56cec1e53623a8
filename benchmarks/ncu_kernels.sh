#!/usr/bin/env bash
# Nsight Compute on the launches of benchmarks/ncu_kernels.py, one process per case:
#   benchmarks/ncu_kernels.sh OUT CASE [CASE ...]
# For each case, OUT gets NAME.ncu-rep (open it in Nsight Compute), NAME-details.txt (every section of
# the full set: throughput, occupancy, warp stalls, instruction mix) and NAME-sass.csv (per SASS
# instruction: executions and sampled stall reasons). The clocks are left alone (--clock-control none)
# and CUDA graphs are off, so that ncu sees every launch as a kernel.
set -euo pipefail
out=$1; shift
mkdir -p "$out"
ncu=${NCU:-ncu}
for case in "$@"; do
  name=$(echo "$case" | tr ':x' '__')
  case $case in
    int4:*) kernel='regex:_fma_kernel|_dot_kernel' ;;
    paged:*) kernel='regex:paged_attention' ;;
    decode:*) kernel='regex:decode_attention' ;;
    prefill:mosaic:*) kernel='regex:mosaic' ;;
    prefill:cudnn:*) kernel='regex:cudnn|fmha|flash|attn' ;;
    *) echo "unknown case $case" >&2; exit 2 ;;
  esac
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_command_buffer=" \
    "$ncu" --clock-control none --set full --import-source yes -k "$kernel" --launch-skip 2 --launch-count 1 \
    -f -o "$out/$name" python benchmarks/ncu_kernels.py "$case" > "$out/$name-run.txt" 2>&1 || {
      echo "ncu failed on $case:"; tail -20 "$out/$name-run.txt"; continue; }
  "$ncu" -i "$out/$name.ncu-rep" --page details > "$out/$name-details.txt"
  "$ncu" -i "$out/$name.ncu-rep" --page source --csv --print-source sass > "$out/$name-sass.csv" 2>&1 || true
  echo "$case: $(grep -m1 -E '^ +Duration' "$out/$name-details.txt" || echo 'no duration')"
done
