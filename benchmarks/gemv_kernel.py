"""The split-K Pallas GEMV kernel against XLA's product, by shape and kernel configuration.

    PYTHONPATH=. python benchmarks/gemv_kernel.py [--rows 1] [--json FILE]

Timed by `benchmarks/gemv_shapes.py`'s `time_product`: 16 distinct `[out, in]` bf16 weights, each
multiplied 8 times inside one jit with the rounds chained; the figure is the median call time over
those products, and TB/s counts the weight bytes.
"""

import argparse
import json

import jax
import jax.numpy as jnp

from gemv_shapes import time_product
from llmjax.kernels.gemv import gemv, gemv_reference

SHAPES = {"o 4096x4096": (4096, 4096), "down 4096x11008": (4096, 11008), "qkv 12288x4096": (12288, 4096),
          "gate_up 22016x4096": (22016, 4096), "13B down 5120x13824": (5120, 13824)}
CONFIGS = [(32, 256, 8, 4), (64, 256, 8, 4), (64, 512, 4, 4), (64, 256, 16, 4), (128, 256, 8, 4),
           (128, 128, 8, 4), (32, 512, 8, 4), (64, 256, 8, 8), (128, 512, 4, 8), (16, 512, 8, 2)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, rows {args.rows}")
    rows = []
    for name, (n, k) in SHAPES.items():
        s = time_product((n, k), args.rows, k, lambda x, w: jnp.einsum("mk,nk->mn", x, w))
        rows.append({"shape": name, "impl": "xla", "us": s * 1e6, "tb_s": n * k * 2 / s / 1e12})
        print(f"{name:22s} xla                  {s * 1e6:7.1f} us {n * k * 2 / s / 1e12:5.2f} TB/s", flush=True)
        x = jax.random.normal(jax.random.key(7), (args.rows, k), jnp.bfloat16)
        w = jax.random.normal(jax.random.key(8), (n, k), jnp.bfloat16)
        want = gemv_reference(x, w).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(gemv(x, w).astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
        print(f"{name:22s} kernel vs reference: max error {err:.2e} of the largest output", flush=True)
        for bn, bk, sp, nw in CONFIGS:
            def product(x, w, bn=bn, bk=bk, sp=sp, nw=nw):
                return gemv(x, w, block_n=bn, block_k=bk, splits=sp, num_warps=nw)
            try:
                s = time_product((n, k), args.rows, k, product)
            except Exception as e:  # a configuration the compiler refuses: say so and go on
                print(f"{name:22s} pallas {bn}/{bk}/{sp}/{nw}: {type(e).__name__}: {str(e)[:120]}")
                continue
            rows.append({"shape": name, "impl": f"pallas bn{bn} bk{bk} splits{sp} warps{nw}",
                         "us": s * 1e6, "tb_s": n * k * 2 / s / 1e12})
            print(f"{name:22s} pallas {bn:3d}/{bk:3d}/{sp:2d}/{nw}   {s * 1e6:7.1f} us "
                  f"{n * k * 2 / s / 1e12:5.2f} TB/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
