"""Greedy tokens at batch-1 int4 decode with the norms inside the int4 products against the norm kernels.

    PYTHONPATH=. python benchmarks/fused_norm_check.py [--model llama2-7b] [--tokens 48]

At batch-1 int4 decode on one device the residual adds write each row's sum of squares and the int4
products normalize x themselves (`llmjax.kernels.rms_norm.residual_add`); `LLMJAX_NORM=off` turns that
off (every norm then runs as XLA's, the norm's reference). Prints whether the greedy tokens agree:
for a float32 tiny model quantized in memory (as `tests/test_rms_norm.py` checks on CPU), and for
random int4-g128 weights of `--model`, with the first position where they differ.
"""

import argparse
import os

import jax

import llmjax
from llmjax.quant import quantize_params


def greedy(params, prompt, tokens, mode):
    os.environ["LLMJAX_NORM"] = mode
    jax.clear_caches()
    return llmjax.generate(params, prompt, max_new_tokens=tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--tokens", type=int, default=48)
    a = p.parse_args()
    tiny = quantize_params(llmjax.init_random("tiny", dtype="float32", seed=3), "int4-g32")
    cases = [("tiny float32 as int4-g32", tiny),
             (f"{a.model} int4-g128, random", llmjax.init_random(a.model, dtype="int4-g128", seed=0))]
    for name, params in cases:
        prompt = [1, 15043, 29892, 920] if params.config.vocab_size > 15043 else [1, 17, 300, 5, 9]
        fused, plain = greedy(params, prompt, a.tokens, "auto"), greedy(params, prompt, a.tokens, "off")
        first = next((i for i, (x, y) in enumerate(zip(fused, plain)) if x != y), None)
        print(f"{name}: {'the same' if first is None else f'first difference at token {first}'} over {a.tokens} tokens")


if __name__ == "__main__":
    main()
