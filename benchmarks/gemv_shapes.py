"""How fast XLA multiplies one row by each of a decode step's weight matrices, by shape and layout.

    PYTHONPATH=. python benchmarks/gemv_shapes.py [--batch 1] [--json FILE]

Batch-1 decode is a chain of such products; this says which shapes read their weights near the
bandwidth bound and which do not, and so whether fusing q/k/v (and gate/up) into one wider matrix
pays. Each figure: `LAYERS` distinct weights (so the cache cannot help), each multiplied `ROUNDS`
times inside one jit, the rounds chained so none can be hoisted; time per product is the median
call time over `LAYERS * ROUNDS`. Layout `kn` is llmjax's `[in, out]`; `nk` is `[out, in]`.
"""

import argparse
import json
import jax
import jax.numpy as jnp

from llmjax.bench import _median_time, measure_bandwidth

LAYERS, ROUNDS = 16, 8
SHAPES = {  # (K, N): Llama-2-7B's, separate and fused, and the 70B MLP's
    "q|o 4096x4096": (4096, 4096), "qkv fused 4096x12288": (4096, 12288),
    "gate|up 4096x11008": (4096, 11008), "gate+up fused 4096x22016": (4096, 22016),
    "down 11008x4096": (11008, 4096), "70B up 8192x28672": (8192, 28672), "70B down 28672x8192": (28672, 8192),
}


def time_product(weight_shape: tuple[int, int], rows: int, k: int, product) -> float:
    """Seconds per `product(x, w)` for x `[rows, k]` bf16, over `LAYERS` distinct weights of
    `weight_shape`, `ROUNDS` chained rounds in one jit; the median of 5 calls."""
    weights = [jax.random.normal(jax.random.key(i), weight_shape, jnp.bfloat16) for i in range(LAYERS)]

    @jax.jit
    def run(x, ws):
        def body(_, x):
            acc = jnp.zeros((), jnp.float32)
            for w in ws:
                acc += product(x, w).astype(jnp.float32).sum()
            return x + (acc * 1e-9).astype(x.dtype)
        return jax.lax.fori_loop(0, ROUNDS, body, x)

    x = jnp.ones((rows, k), jnp.bfloat16)
    run(x, weights).block_until_ready()
    return _median_time(lambda: run(x, weights), 5) / (LAYERS * ROUNDS)


def time_products(k: int, n: int, layout: str, batch: int) -> float:
    shape = (k, n) if layout == "kn" else (n, k)
    eq = "mk,kn->mn" if layout == "kn" else "mk,nk->mn"
    return time_product(shape, batch, k,
                        lambda x, w: jnp.einsum(eq, x, w, preferred_element_type=jnp.float32))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    bandwidth = measure_bandwidth()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, XLA read bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, batch {args.batch}")
    rows = []
    for name, (k, n) in SHAPES.items():
        for layout in ("kn", "nk"):
            s = time_products(k, n, layout, args.batch)
            tb_s = k * n * 2 / s / 1e12
            rows.append({"shape": name, "layout": layout, "us": s * 1e6, "tb_s": tb_s})
            print(f"{name:26s} {layout}  {s * 1e6:8.1f} us  {tb_s:5.2f} TB/s  "
                  f"{tb_s * 1e12 / bandwidth:6.1%} of measured", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bandwidth, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
