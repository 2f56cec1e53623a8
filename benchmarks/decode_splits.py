"""Batch-1 decode with the contiguous decode-attention kernel at a fixed number of K splits against its
default plan (`decode_attention.split_plan`), in one process.

    PYTHONPATH=. python benchmarks/decode_splits.py [--model llama2-7b] [--dtype int4-g128] [--splits 1,2] [--rounds 2] [--gen-len 256]

At batch 1 the kernel has one program per kv head and split; more than one split adds a kernel that
merges them. Each round runs `llmjax bench` once with the default plan and once per `--splits` value.
"""

import argparse

import jax

from llmjax import cli
from llmjax.kernels import decode_attention


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--dtype", default="int4-g128")
    p.add_argument("--splits", default="1,2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gen-len", type=int, default=256)
    a = p.parse_args()
    attend = decode_attention.attend
    for r in range(a.rounds):
        for splits in [None] + [int(s) for s in a.splits.split(",")]:
            tuning = {} if splits is None else {"splits": splits}
            decode_attention.attend = lambda *args, t=tuning, **kw: attend(*args, **t, **kw)
            jax.clear_caches()
            print(f"== splits {splits or 'default'}, round {r}", flush=True)
            cli.main(["bench", "--model", a.model, "--dtype", a.dtype, "--gen-len", str(a.gen_len)])
    decode_attention.attend = attend


if __name__ == "__main__":
    main()
