"""Decode attention's default tuning against others, every shape of issue 7's decode table, in turns.

    PYTHONPATH=. python benchmarks/decode_blocks.py [--tunings 128:4:2,64:4:3,128:4:3] [--turns 5]
        [--shapes 64x4096,64x8192] [--kernel-time]

Each tuning is `block_k:num_warps:num_stages[:splits]` of `decode_attention` (by default: the H100/H200
default first, then the default before the thirteenth session and one other; no splits field: the
kernel's own plan, `decode_attention.split_plan`). For
batch 1 and 64 at contexts 1k, 4k (batch 64), 8k and 32k (Llama-3-8B heads: 32 query and 8 kv heads
of 128, bf16), each tuning's runner (`benchmarks/attention.runner`: many calls inside one jit over
distinct caches) takes `--turns` turns in alternation; the figure is the median turn, in TB/s of
cache bytes, also as a share of the H200's 4.8 TB/s and of the 4.14 TB/s measured read ceiling.
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks import attention as at
from llmjax.kernels import decode_attention as da

SHAPES = ((1, 1024), (1, 8192), (1, 32768), (64, 1024), (64, 4096), (64, 8192), (64, 32768))
SPEC = 4.8e12  # the H200's HBM3e bandwidth as NVIDIA states it


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tunings", default="128:4:2,64:4:3,128:4:3")
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--kernel-time", action="store_true", help="also the kernel's own time, from a profiler trace")
    p.add_argument("--shapes", default=",".join(f"{b}x{c}" for b, c in SHAPES),
                   help="comma-separated batch x context (default: issue 7's decode table)")
    args = p.parse_args()
    tunings = {t: parse_tuning(t) for t in args.tunings.split(",")}
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    for batch, context in shapes:
        q = at.normal(30, (batch, at.HEADS, at.HEAD_DIM))
        operands = at.decode_operands(batch, context)
        runners = {}
        for name, tuning in tunings.items():
            try:
                runners[name] = at.runner(lambda q, k, v, n, c=tuning: da.decode_attention(q, k, v, n, **c),
                                          q, operands)
            except Exception as e:  # e.g. more shared memory than a program has
                print(f"b{batch:<3d} {context:6d} {name:10s} {type(e).__name__}: {str(e).splitlines()[0][:120]}")
        seconds = {name: [] for name in runners}
        for _ in range(args.turns):
            for name, run in runners.items():
                seconds[name].append(run())
        for name in runners:
            tb_s = at.cache_bytes(batch, context) / statistics.median(seconds[name]) / 1e12
            line = (f"b{batch:<3d} {context:6d} {name:10s} {tb_s:5.2f} TB/s  {tb_s * 1e12 / SPEC:6.1%} of 4.8  "
                    f"{tb_s * 1e12 / at.HBM:6.1%} of 4.14")
            if args.kernel_time:
                kernel_s = kernel_seconds(runners[name])
                alone = at.cache_bytes(batch, context) / kernel_s
                line += (f"  | kernel alone {kernel_s * 1e6:8.1f} us  {alone / 1e12:5.2f} "
                         f"TB/s  {alone / SPEC:6.1%} of 4.8")
            print(line, flush=True)
        del operands, runners


def kernel_seconds(run) -> float:
    """Mean seconds a launch of the decode kernel, from a profiler trace of one more run of `run` (the
    mean over the kernels so named, should the trace hold more than one)."""
    from kernel_profile import launch_seconds  # benchmarks/, this script's folder

    kernels = launch_seconds(run)
    mine = [seconds for name, seconds in kernels.items() if "decode_attention" in name]
    if not mine:
        raise SystemExit(f"no decode_attention kernel in the trace: {sorted(kernels)[:8]}")
    return sum(mine) / len(mine)


def parse_tuning(text: str) -> dict:
    """`block_k:num_warps:num_stages[:splits[:vector]]` as `decode_attention`'s keyword arguments
    (vector 1: `vector=True`)."""
    tuning = dict(zip(("block_k", "num_warps", "num_stages", "splits", "vector"), map(int, text.split(":"))))
    if "vector" in tuning:
        tuning["vector"] = bool(tuning["vector"])
    return tuning


if __name__ == "__main__":
    main()
