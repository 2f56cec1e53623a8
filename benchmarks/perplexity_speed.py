"""`llmjax.perplexity` on random weights: scored tokens a second and the device memory a call takes,
for comparing versions of the package (run once per tree with PYTHONPATH=TREE python -P ...).

    PYTHONPATH=. python -P benchmarks/perplexity_speed.py --model llama2-7b --tokens 16384 --window 4096

Prints one line per run: the model, tokens scored, seconds (the second of two calls; the first
compiles), tokens a second, and the peak device memory in use where the device reports it.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import llmjax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama2-7b", help="a preset")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tokens", type=int, default=16384, help="token ids to score (one text)")
    parser.add_argument("--window", type=int, default=4096)
    parser.add_argument("--stride", type=int, default=None)
    args = parser.parse_args()

    params = llmjax.init_random(args.model, dtype=args.dtype, seed=0)
    rng = np.random.default_rng(0)
    ids = [1] + rng.integers(3, params.config.vocab_size, args.tokens - 1).tolist()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        result = llmjax.perplexity(params, ids, window=args.window, stride=args.stride)
        times.append(time.perf_counter() - start)
    stats = jax.local_devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    print(f"perplexity {args.model} {args.dtype}: {result.tokens} tokens, window {args.window}, "
          f"{times[1]:.3f} s ({result.tokens / times[1]:,.0f} tok/s; first call {times[0]:.1f} s), "
          f"peak memory {'n/a' if peak is None else f'{peak / 2**30:.2f} GiB'}, nll {result.nll:.6f}")


if __name__ == "__main__":
    main()
