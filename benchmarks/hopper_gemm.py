"""The engine's four bf16 products (Llama-2-7B) timed in XLA (cuBLAS or its Triton GEMMs, as the engine
runs them) and in JAX's example Hopper matmul in Mosaic GPU
(`jax.experimental.pallas.ops.gpu.hopper_matmul_mgpu`, part of the installed jax), over a few of its
tilings: does a warp-specialized TMA + wgmma kernel beat XLA's choice at the engine's shapes?

Kernel time only (`jax.experimental.mosaic.gpu.profiler.measure`, CUPTI), median of `--iterations`.
XLA multiplies x `[M, K]` by the weights as llmjax stores them, `[N, K]`, into bf16 as `gemv._dot` does;
the example takes `[K, N]`.

    PYTHONPATH=. python -P benchmarks/hopper_gemm.py --out DIR [--rows 512,33024] [--budget 30]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# Llama-2-7B's products: (name, N, K)
PRODUCTS = (("qkv", 12288, 4096), ("gate_up", 22016, 4096), ("o", 4096, 4096), ("down", 4096, 11008))


def _median_us(fn, *args, iterations):
    from jax.experimental.mosaic.gpu import profiler
    out, times_ms = profiler.measure(fn, iterations=iterations)(*args)
    return out, statistics.median(times_ms) * 1e3


def _configs(mm):
    dims = mm.MatmulDimension
    fields = {f.name for f in dataclasses.fields(mm.TuningConfig)}
    tiles = ((128, 128, dims.N), (128, 128, dims.M), (64, 256, dims.M))
    for (tm, tn, wg), cluster, width, minor, steps in itertools.product(
            tiles, (dims.M, dims.N, None), (8, 1), (dims.N, dims.M), (4,)):
        options = dict(tile_m=tm, tile_n=tn, tile_k=64, max_concurrent_steps=steps, epi_tile_n=64,
                       epi_tile_m=64, grid_minor_dim=minor, grid_tile_width=width, wg_dimension=wg,
                       cluster_dimension=cluster)
        yield mm.TuningConfig(**{k: v for k, v in options.items() if k in fields})


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rows", default="512,33024")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of tiling search a shape")
    args = parser.parse_args()
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as mm

    os.makedirs(args.out, exist_ok=True)
    print("jax", jax.__version__, jax.devices()[0].device_kind, flush=True)
    results = []
    for m in (int(r) for r in args.rows.split(",")):
        for name, n, k in PRODUCTS:
            kx, kw = jax.random.split(jax.random.key(m + n + k))
            x = jax.random.normal(kx, (m, k), jnp.bfloat16)
            w = (jax.random.normal(kw, (n, k), jnp.float32) * 0.02).astype(jnp.bfloat16)
            wt = jnp.asarray(w.T)
            flop = 2 * m * n * k
            xla = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))  # as gemv._dot
            ref, xla_us = _median_us(xla, x, w, iterations=args.iterations)
            ref = np.asarray(ref, np.float32)
            row = dict(m=m, name=name, n=n, k=k, xla_us=xla_us, xla_tflops=flop / xla_us / 1e6, tried=[])
            best = None
            start = time.perf_counter()
            for config in _configs(mm):
                if time.perf_counter() - start > args.budget:
                    break
                try:
                    out, us = _median_us(jax.jit(functools.partial(mm.matmul, config=config)), x, wt, None,
                                         iterations=args.iterations)
                except Exception as e:  # shared memory, divisibility, an unsupported option
                    row["tried"].append(dict(config=repr(config), error=str(e).splitlines()[0][:160]))
                    continue
                err = float(np.max(np.abs(np.asarray(out, np.float32) - ref)) / (np.max(np.abs(ref)) + 1e-9))
                row["tried"].append(dict(config=repr(config), us=us, tflops=flop / us / 1e6, rel_err=err))
                if err < 2e-2 and (best is None or us < best["us"]):
                    best = row["tried"][-1]
            row["best"] = best
            results.append(row)
            b = f"{best['us']:.1f} us, {best['tflops']:.0f} TFLOP/s ({best['config']})" if best else "none ran"
            print(f"M={m} {name} N={n} K={k}: XLA {xla_us:.1f} us, {row['xla_tflops']:.0f} TFLOP/s; "
                  f"example best of {len(row['tried'])}: {b}", flush=True)
            with open(os.path.join(args.out, "hopper_gemm.json"), "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
