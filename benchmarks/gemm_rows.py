"""How XLA's bf16 products of a decode step scale with the number of rows the engine pads a step to.

    PYTHONPATH=. python benchmarks/gemm_rows.py [--rows 384,416,448,512] [--json FILE]

The engine runs each decode iteration on its rows padded to a bucket (`Engine._bucket`); at a few
hundred rows the products are compute-bound, so what matters is how the time of Llama-2-7B's four
products (q/k/v, o, gate/up, down; weights `[out, in]` as llmjax stores them, bf16 out) grows with
the rows: a bucket whose products run no faster than a larger one's wastes nothing by padding, and
one at a tile boundary may run faster per row. Timing as `gemv_shapes.py` (distinct weights, chained
rounds in one jit, median of 5 calls); prints microseconds and TFLOP/s per product and per layer.
"""

import argparse
import json

import jax
import jax.numpy as jnp

from gemv_shapes import time_product

SHAPES = {"qkv 4096x12288": (4096, 12288), "o 4096x4096": (4096, 4096), "gate/up 4096x22016": (4096, 22016),
          "down 11008x4096": (11008, 4096)}  # (K, N)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="256,320,384,416,448,480,512,576,640")
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        layer_s, layer_flops, cells = 0.0, 0.0, []
        for name, (k, n) in SHAPES.items():
            s = time_product((n, k), rows, k, lambda x, w: jnp.einsum("mk,nk->mn", x, w))
            flops = 2 * rows * k * n
            layer_s, layer_flops = layer_s + s, layer_flops + flops
            cells.append(f"{name.split()[0]} {s * 1e6:6.1f} us {flops / s / 1e12:4.0f}")
            results.append(dict(rows=rows, product=name, us=s * 1e6, tflop_s=flops / s / 1e12))
        print(f"rows {rows:4d}: layer {layer_s * 1e6:6.1f} us ({layer_flops / layer_s / 1e12:4.0f} TFLOP/s, "
              f"{layer_s * 1e9 / rows:5.1f} ns a row)  " + "  ".join(cells), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
