"""Whether quantizing on this device divides by the scale it stores: random weights quantized with
`llmjax.quant.weights`, each code checked against the weight it stands for.

- int8: the largest |dequantized - weight| over half the stored scale; 1.0 is rounding to the stored
  grid, more means the codes came from another scale than the stored one.
- int4 (symmetric, group 128): the groups whose squared error exceeds that of the plain grid
  max|w| / 7 with the stored scale, which the scale search never does when it measures with the
  stored scale.
- `--demo`: the demo model converted with each scheme (`llmjax.convert`, float32), and a digest of
  its codes, scales and zero points: a GPU and a CPU write the same bytes when the digests agree.

    PYTHONPATH=. python -P benchmarks/quant_rounding.py [--rows 4096 --cols 4096] [--demo]
"""

import argparse
import hashlib
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import llmjax
from llmjax.quant.weights import (SCALE_DTYPE, dequantize_int4, dequantize_int8, is_quantized, quantize_int4,
                                  quantize_int8)


def demo_digests() -> None:
    for scheme in ("int8", "int4-g128", "int4-g32-asym"):
        with tempfile.TemporaryDirectory() as tmp:
            folder = llmjax.convert("tiny-stdlib", os.path.join(tmp, "model"), dtype="float32", quant=scheme,
                                    progress=False)
            weights = llmjax.load(folder, dtype="float32").weights
        digest = hashlib.sha256()
        for leaf in jax.tree.leaves(weights, is_leaf=is_quantized):
            if is_quantized(leaf):
                for array in (leaf.values, leaf.scales, leaf.zeros):
                    if array is not None:
                        digest.update(np.asarray(array).tobytes())
        print(f"{jax.devices()[0].device_kind}: the demo model as {scheme}, digest {digest.hexdigest()[:16]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--demo", action="store_true", help="also the demo model's digests")
    args = parser.parse_args()
    w = jax.random.normal(jax.random.key(0), (args.rows, args.cols), jnp.float32)
    host = np.asarray(w)

    q8 = quantize_int8(w, num_out_dims=1)
    scale8 = np.asarray(q8.scales, np.float32)[:, None]
    ratio8 = np.abs(np.asarray(dequantize_int8(q8)) - host) / (scale8 / 2)
    print(f"{jax.devices()[0].device_kind}: int8, largest |error| / (stored scale / 2) = {ratio8.max():.4f}, "
          f"weights past 1.0001: {(ratio8 > 1.0001).sum()} of {ratio8.size}")

    q4 = quantize_int4(w, num_out_dims=1, group_size=args.group)
    groups = host.reshape(args.rows, -1, args.group)
    err = ((np.asarray(dequantize_int4(q4)).reshape(groups.shape) - groups) ** 2).sum(-1)
    plain_s = np.asarray(jnp.asarray(np.abs(groups).max(-1) / 7, SCALE_DTYPE), np.float32)[..., None]
    plain = ((np.clip(np.round(groups / plain_s), -8, 7) * plain_s - groups) ** 2).sum(-1)
    worse = err > plain * (1 + 1e-6)
    print(f"{jax.devices()[0].device_kind}: int4-g{args.group}, groups worse than the plain grid: "
          f"{worse.sum()} of {worse.size} (squared error {err.sum():.2f} against {plain.sum():.2f})")
    if args.demo:
        demo_digests()


if __name__ == "__main__":
    main()
