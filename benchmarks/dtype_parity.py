"""The demo model in float32 and in bfloat16 on the first device: decode time, and how many random
prompts get other greedy tokens from `llmjax.LLM` (the engine) than from `llmjax.generate` alone.

    PYTHONPATH=. python -P benchmarks/dtype_parity.py [--prompts 25] [--new-tokens 32] [--seed 7] [--repeats 5]

The figures behind `llmjax.params.default_dtype` (float32 is a CPU's default). Times are medians of
`--repeats` calls of `generate` after a compiling one, at one row and at 16 rows of 64 new tokens.
"""

import argparse
import statistics
import time

import numpy as np

import llmjax


def _seconds(call, repeats: int) -> float:
    call()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=25)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seconds = {}
    for dtype in ("float32", "bfloat16"):
        params = llmjax.load("tiny-stdlib", dtype=dtype)
        for rows in (1, 16):
            prompts = ["def fibonacci(n):"] * rows
            seconds[dtype, rows] = _seconds(lambda: llmjax.generate(params, prompts, max_new_tokens=64),
                                            args.repeats)
            print(f"{dtype:9s} {rows:2d} row(s) x 64 new tokens: {seconds[dtype, rows] * 1e3:7.1f} ms")
        rng = np.random.default_rng(args.seed)
        vocab = params.config.vocab_size
        prompts = [params.tokenizer.decode(rng.integers(3, vocab, rng.integers(1, 40)).tolist())
                   for _ in range(args.prompts)]
        alone = [llmjax.generate(params, p, max_new_tokens=args.new_tokens) for p in prompts]
        engine = llmjax.LLM(params).generate(prompts, max_new_tokens=args.new_tokens, progress=False)
        differ = sum(a != b for a, b in zip(alone, engine))
        print(f"{dtype:9s} engine vs generate alone: {differ} of {args.prompts} prompts differ "
              f"over {args.new_tokens} tokens")
    for rows in (1, 16):
        print(f"bfloat16 / float32 time at {rows} row(s): "
              f"{seconds['bfloat16', rows] / seconds['float32', rows]:.2f}x")


if __name__ == "__main__":
    main()
