#!/bin/bash
# Every one-GPU goal of the issues, re-measured on the checkout: the figures the issues name, each
# with the command that gives it, so that a change that slows one shows. Each part writes its log to
# OUT/goals-<part>.log and prints the lines that carry the figure.
# Usage (repository root, on one H200): OUT=DIR bash benchmarks/goals.sh [PART ...]
# PARTS (default: all, about 12 minutes; give a device call two or three of them):
#   decode   batch-1 decode tok/s, prompt 8, 256 new tokens (goals: Llama-2-7B bf16 >= 250,
#            Llama-2-13B bf16 >= 130, Llama-3-8B bf16 >= 220, Llama-2-7B int4-g128 >= 600)
#   int4     the int4 kernel at one row (goals: >= 3.0 TB/s on 8192x28672, >= 2.5 on 4096x11008)
#   attention decode attention at batch 64 x 4k (goal: >= 80% of HBM bandwidth on cache bytes) and
#            prefill attention against cuDNN at 2k, 8k and 32k (goal: at least as fast)
#   engine   the engine on 1000 requests of 128 in / 128 out, Llama-2-7B bf16 (goal: >= 15,000 output
#            tok/s; the bf16 pool, then the float8 pool)
set -uo pipefail
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(decode int4 attention engine)
export PYTHONPATH=.
status=0

run() {  # run LOG LIMIT_S CMD...: the command under a time limit, its output appended to LOG
  local log=$1 limit=$2
  shift 2
  echo "\$ $*" >> "$log"
  timeout "$limit" "$@" >> "$log" 2>&1 || { echo "exit $? from: $*" | tee -a "$log"; status=1; }
}

for part in "${parts[@]}"; do
  log=$out/goals-$part.log
  : > "$log"
  case $part in
    decode)
      for spec in "llama2-7b bfloat16" "llama2-13b bfloat16" "llama3-8b bfloat16" "llama2-7b int4-g128"; do
        set -- $spec
        run "$log" 170 python -P -m llmjax bench --model "$1" --dtype "$2" --batch 1 --prompt-len 8 \
          --gen-len 256 --repeats 3
      done
      grep -E "^\\$|decode" "$log" ;;
    int4)
      run "$log" 300 python -P benchmarks/int4_matmul.py --out "$out/int4" --shapes 8192x28672,4096x11008 --rows 1
      grep -E "^\\$|TB/s|default" "$log" | head -40 ;;
    attention)
      run "$log" 400 python -P benchmarks/attention.py --out "$out/attention" --only check,prefill,decode
      grep -E "^\\$|FAILED|cudnn|Mosaic|contiguous kernel|paged kernel|decode" "$log" | head -60 ;;
    engine)
      run "$log" 280 python -P -m llmjax bench --throughput --model llama2-7b --no-mix
      run "$log" 280 python -P -m llmjax bench --throughput --model llama2-7b --no-mix --kv-dtype float8_e4m3fn --page-size 64
      grep -E "^\\$|tok/s" "$log" ;;
    *)
      echo "unknown part: $part (decode, int4, attention, engine)" >&2
      exit 2 ;;
  esac
done
exit $status
