"""Batch-1 greedy decode with the decode loop checking its condition every N steps
(`llmjax.generate.CHECK_EVERY`), several N in one process, in alternating rounds so that drift falls
on all of them.

    PYTHONPATH=. python benchmarks/decode_loop.py --model llama2-7b --dtype int4-g128 [--tensor 2] \
        [--checks 1,8] [--rounds 3] [--gen-len 256] [--json F]

XLA's while loop copies its condition to the host after every iteration and launches the next one
only once it has arrived; N = 1 is that, a copy per token. Each round times `llmjax bench`'s runner
(prompt 8, `--gen-len` new tokens, then one token for the prefill alone) and prints decode tok/s:
(gen_len - 1) / (time of the whole run - time of the prefill).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax

from llmjax import bench
from llmjax.sharding import make_mesh


def _seconds(run, n: int) -> float:
    start = time.perf_counter()
    jax.block_until_ready(run(n))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tensor", type=int, default=1)
    parser.add_argument("--checks", default="1,8", help="comma-separated steps between checks")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    checks = [int(n) for n in args.checks.split(",")]
    mesh = make_mesh(tensor=args.tensor) if args.tensor > 1 else None
    params = bench.random_params(bench._model_config(args.model, args.dtype), args.dtype, 0, mesh)
    runs = {}
    for n in checks:
        runs[n] = bench.greedy_runner(params, 1, 8, args.gen_len, check_every=n)[2]
        start = time.perf_counter()
        steps = int(runs[n](args.gen_len)[1])
        jax.block_until_ready(runs[n](1))
        print(f"check every {n}: compiled in {time.perf_counter() - start:.0f} s, {steps} steps", flush=True)
    tok_s = {n: [] for n in checks}
    for round_ in range(args.rounds):
        for n in checks:
            full = min(_seconds(runs[n], args.gen_len) for _ in range(2))
            first = min(_seconds(runs[n], 1) for _ in range(2))
            tok_s[n].append((args.gen_len - 1) / (full - first))
            print(f"round {round_ + 1} check every {n}: {tok_s[n][-1]:.1f} decode tok/s", flush=True)
    base = statistics.median(tok_s[checks[0]])
    for n in checks:
        median = statistics.median(tok_s[n])
        print(f"{args.model} {args.dtype} tensor={args.tensor}, check every {n}: median {median:.1f} decode tok/s "
              f"({min(tok_s[n]):.1f}-{max(tok_s[n]):.1f}); {median / base:.3f}x every {checks[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": jax.devices()[0].device_kind, "tok_s": tok_s}, f, indent=1)


if __name__ == "__main__":
    main()
