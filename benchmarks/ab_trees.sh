#!/bin/bash
# Two versions of llmjax in turns in one device call: `llmjax bench` with the same arguments on the
# package in OLD_DIR and on the checkout's, TURNS times each, alternating (figures on a shared GPU
# drift between calls; ratios within one call do not).
# Make OLD_DIR from a commit before the call (the GPU machine's copy has no history):
#   mkdir -p old && git archive REV llmjax | tar -x -C old
# Usage (repository root, on the GPU): bash benchmarks/ab_trees.sh OLD_DIR TURNS BENCH_ARGS...
#   e.g. bash benchmarks/ab_trees.sh old 2 --model llama2-7b --dtype int4-g128 --batch 1 --gen-len 256
set -euo pipefail
old=$1 turns=$2
shift 2
[ -d "$old/llmjax" ] || { echo "$old/llmjax not found: make it with git archive (see the top of $0)" >&2; exit 2; }
for turn in $(seq "$turns"); do
  for tree in "$old" .; do
    echo "== turn $turn: $([ "$tree" = . ] && echo checkout || echo "$old")"
    # -P: `python -m` would otherwise put the working directory (the checkout) first on sys.path, ahead
    # of PYTHONPATH, and both turns would time the checkout
    PYTHONPATH=$tree python -P -c "import llmjax; print('package', llmjax.__file__)"
    PYTHONPATH=$tree python -P -m llmjax bench "$@" | grep -E "^decode|^fraction"
  done
done
