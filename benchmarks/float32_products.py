"""How far a GPU's float32 logits are from a CPU's, for the demo model: the check that float32 models
run their products in full float32 on a GPU (not TensorFloat-32, XLA's default there).

    PYTHONPATH=. python -P benchmarks/float32_products.py [--rows 8] [--length 48]

Prints the largest absolute difference of the logits of `--rows` random prompts of `--length` tokens
between the first device and the CPU, both in float32, with the largest logit for scale. The CPU's
float32 logits match transformers' to ~1e-5 (tests/test_hf_parity.py).
"""

import argparse

import jax
import numpy as np

import llmjax


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--length", type=int, default=48)
    args = parser.parse_args()
    params = llmjax.load("tiny-stdlib", dtype="float32")
    ids = np.random.default_rng(0).integers(3, params.config.vocab_size, (args.rows, args.length)).tolist()
    here = np.asarray(llmjax.logits(params, ids))
    cpu = np.asarray(llmjax.logits(jax.device_put(params, jax.devices("cpu")[0]), ids))
    print(f"{jax.devices()[0].device_kind}: float32 logits, {args.rows} x {args.length} tokens: largest "
          f"difference from the CPU {np.abs(here - cpu).max():.3g} (largest logit {np.abs(cpu).max():.3g})")


if __name__ == "__main__":
    main()
