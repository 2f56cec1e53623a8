#!/bin/bash
# What removing a decode layer's small kernels could gain at most: `llmjax bench` on copies of the
# package with kernels taken out (WRONG results; timing only), beside the package as it is.
#   nonorm:  both RMSNorm kernels of a layer become x * scale (XLA fuses that into the residual add)
#   nowrite: a decode step writes nothing into the KV cache (attention still reads it): the store in
#            decode_attention_write, or, in trees before it, the batch-1 write in llmjax/cache.py
#   both:    the two together
# Usage (from the repository root, on the GPU): bash benchmarks/upper_bounds.sh [MODEL] [DTYPE] [GEN_LEN] [SRC]
# SRC: the folder holding the llmjax to measure (default: the checkout), e.g. an older tree made with
#   mkdir -p old && git archive REV llmjax | tar -x -C old
set -euo pipefail
model=${1:-llama2-7b}
dtype=${2:-int4-g128}
gen_len=${3:-256}
src=${4:-.}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

variant() {  # variant NAME PATCHES...: a copy of llmjax with the named patches applied
  local dir=$work/$1; shift
  mkdir -p "$dir" && cp -r "$src/llmjax" "$dir/"
  for patch in "$@"; do
    python - "$dir" "$patch" <<'PY'
import sys
root, patch = sys.argv[1], sys.argv[2]
edits = {  # each patch: (file, old, new) candidates, the first whose text is there applies
    "nonorm": [("llmjax/kernels/rms_norm.py", "    if x.size == 0:\n        return rms_norm_reference",
                "    return (x * scale).astype(x.dtype)\n    if x.size == 0:\n        return rms_norm_reference")],
    "nowrite": [("llmjax/kernels/decode_attention.py", "kv, :], x, mask=every)", "kv, :], x, mask=every & False)"),
                ("llmjax/cache.py", "    if new.shape[:2] == (1, 1):\n",
                 "    if new.shape[:2] == (1, 1):\n        return cache\n")],
}
for path, old, new in edits[patch]:
    text = open(f"{root}/{path}").read()
    if text.count(old) == 1:
        open(f"{root}/{path}", "w").write(text.replace(old, new))
        break
else:
    raise SystemExit(f"{patch}: the code it patches has changed")
PY
  done
}

run() {  # run NAME PYTHONPATH
  echo "== $1"
  # -P: `python -m` would otherwise import the checkout's llmjax (the working directory comes first)
  PYTHONPATH=$2 python -P -c "import llmjax; print('package', llmjax.__file__)"
  PYTHONPATH=$2 python -P -m llmjax bench --model "$model" --dtype "$dtype" --batch 1 --prompt-len 8 --gen-len "$gen_len" \
    | grep -E "^decode|^fraction"
}

variant nonorm nonorm
variant nowrite nowrite
variant both nonorm nowrite
run "as it is" "$src"
run nonorm "$work/nonorm"
run nowrite "$work/nowrite"
run both "$work/both"
run "as it is" "$src"
