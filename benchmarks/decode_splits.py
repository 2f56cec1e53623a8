"""Batch-1 decode with the contiguous decode-attention kernel at a fixed number of K splits against its
default plan (`decode_attention.split_plan`), in one process.

    PYTHONPATH=. python benchmarks/decode_splits.py [--model llama2-7b] [--dtype int4-g128] [--splits 1,2]
        [--tunings 64:4:3,128:4:2:1] [--rounds 2] [--gen-len 256]

At batch 1 the kernel has one program per kv head and split; more than one split adds a kernel that
merges them. Both entry points take the variant's tuning: `attend` and the decode step's `attend_write`. Each round runs `llmjax bench` once with the default plan, once per `--splits` value and
once per `--tunings` entry (`block_k:num_warps:num_stages[:splits]`, as in `decode_blocks.py`).
"""

import argparse

import jax

from benchmarks import decode_blocks
from llmjax import cli
from llmjax.kernels import decode_attention


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--dtype", default="int4-g128")
    p.add_argument("--splits", default="1,2", help="comma-separated split counts ('' for none)")
    p.add_argument("--tunings", default="", help="comma-separated block_k:num_warps:num_stages[:splits]")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--gen-len", type=int, default=256)
    a = p.parse_args()
    attend, attend_write = decode_attention.attend, decode_attention.attend_write
    variants = {"default": {}}
    variants.update({f"splits {s}": {"splits": int(s)} for s in a.splits.split(",") if s})
    variants.update({t: decode_blocks.parse_tuning(t) for t in a.tunings.split(",") if t})
    for r in range(a.rounds):
        for name, tuning in variants.items():
            decode_attention.attend = lambda *args, t=tuning, **kw: attend(*args, **t, **kw)
            decode_attention.attend_write = lambda *args, t=tuning, **kw: attend_write(*args, **t, **kw)
            jax.clear_caches()
            print(f"== {name}, round {r}", flush=True)
            cli.main(["bench", "--model", a.model, "--dtype", a.dtype, "--gen-len", str(a.gen_len)])
    decode_attention.attend, decode_attention.attend_write = attend, attend_write


if __name__ == "__main__":
    main()
