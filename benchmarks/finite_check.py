"""What `llmjax.load`'s NaN/infinity check costs: `params._check_finite` on random weights of a preset,
first call (compiling) and a second one, against the bytes it reads and the time to read them.

    PYTHONPATH=. python -P benchmarks/finite_check.py [--model llama2-7b] [--dtype bfloat16]
"""

import argparse
import time

import jax

import llmjax
from llmjax.params import _check_finite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    params = llmjax.init_random(args.model, dtype=args.dtype)
    jax.block_until_ready(params.weights)
    size = sum(w.nbytes for w in jax.tree.leaves(params.weights))
    for call in ("first (compiles)", "second"):
        start = time.perf_counter()
        _check_finite(params, args.model, None)
        seconds = time.perf_counter() - start
        print(f"{jax.devices()[0].device_kind} {args.model} {args.dtype}: {call} check {seconds * 1e3:.1f} ms "
              f"over {size / 1e9:.2f} GB ({size / seconds / 1e12:.2f} TB/s)")


if __name__ == "__main__":
    main()
