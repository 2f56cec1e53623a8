"""One kernel launch on the shapes that matter, for Nsight Compute to read the hardware counters of.

    PYTHONPATH=. python benchmarks/ncu_kernels.py CASE [CASE ...]      # run the launches, no profiler
    benchmarks/ncu_kernels.sh OUT CASE [CASE ...]                       # under ncu: reports and text in OUT

Cases:
- `int4:KxN`: the one-row int4-g128 product `x [1, K] @ w.T`, w `[N, K]`, with the configuration
  `int4_matmul.default_config` gives that shape (the kernel batch-1 decode runs);
- `paged:DTYPE:PAGE`: the engine's decode attention on Llama-2-7B heads (32 query = kv heads of 128):
  410 rows of 128-256 tokens (what a steady 1000 x 128/128 call holds), pages of PAGE tokens
  scattered over the pool, pages in DTYPE (`bfloat16` or `float8_e4m3fn`), `paged_attention.TUNING`;
- `decode:BxC`: decode attention over a contiguous cache (`decode_attention`, its default tuning
  and split plan) on Llama-3-8B heads (32 query, 8 kv heads of 128), bf16, B rows of C tokens;
- `prefill:IMPL:TxB`: causal prefill attention on Llama-3-8B heads (32 query, 8 kv heads of 128), bf16,
  B rows of T tokens, by IMPL: `mosaic` (`flash_attention_mgpu`, what the model runs on Hopper) or
  `cudnn` (`jax.nn.dot_product_attention(implementation="cudnn")`).

Each case compiles, runs twice to warm up, then `LAUNCHES` more times; the shell script tells ncu to
skip the warm-ups and profile one launch (`--clock-control none`: the clocks are left as they run).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.kernels import decode_attention as da
from llmjax.kernels import flash_attention_mgpu as fm
from llmjax.kernels import int4_matmul as K
from llmjax.kernels import paged_attention as pa

WARMUPS, LAUNCHES = 2, 2
GROUP = 128
HEADS, HEAD_DIM, ROWS, LOW, HIGH = 32, 128, 410, 128, 257


def int4_case(spec: str):
    k, n = (int(v) for v in spec.split("x"))
    key = jax.random.key(0)
    values = jax.random.bits(key, (n, k // 8), jnp.uint32)
    scales = jax.random.uniform(key, (n, k // GROUP), jnp.float32, 0.002, 0.006).astype(jnp.bfloat16)
    x = jax.random.normal(key, (1, k), jnp.bfloat16)
    config = K.default_config(1, shape=(k, n))
    print(f"int4 {k}x{n}: {config}")
    return lambda: K.int4_matmul(x, values, scales, group_size=GROUP, config=config)


def paged_case(spec: str):
    dtype, page = spec.split(":")
    page = int(page)
    rng = np.random.default_rng(0)
    lengths = jnp.asarray(rng.integers(LOW, HIGH, ROWS), jnp.int32)
    max_pages = -(-(HIGH - 1) // page)
    tables = jnp.asarray(rng.permutation(ROWS * max_pages).reshape(ROWS, max_pages), jnp.int32)
    shape = (ROWS * max_pages, page, HEADS, HEAD_DIM)
    k_pages = jax.random.normal(jax.random.key(1), shape, jnp.bfloat16).astype(dtype)
    v_pages = jax.random.normal(jax.random.key(2), shape, jnp.bfloat16).astype(dtype)
    q = jax.random.normal(jax.random.key(3), (ROWS, HEADS, HEAD_DIM), jnp.bfloat16)
    tuning = pa.TUNING.get(jnp.dtype(dtype).name, {})
    nbytes = int(jnp.sum(lengths)) * HEADS * HEAD_DIM * 2 * jnp.dtype(dtype).itemsize
    print(f"paged {dtype} page {page}: {ROWS} rows, {nbytes / 1e6:.1f} MB of cache, tuning {tuning}")
    return lambda: pa.paged_attention(q, k_pages, v_pages, tables, lengths, **tuning)


def decode_case(spec: str):
    b, c = (int(v) for v in spec.split("x"))
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, 32, 128), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, c, 8, 128), jnp.bfloat16) for key in keys[1:])
    lengths = jnp.full((b,), c, jnp.int32)
    print(f"decode {b} x {c}: tuning {da.default_tuning(k.dtype)}, {k.nbytes * 2 / 1e6:.1f} MB of cache")
    return functools.partial(da.decode_attention, q, k, v, lengths)


def prefill_case(spec: str):
    impl, shape = spec.split(":")
    if impl not in ("mosaic", "cudnn"):
        raise SystemExit(f"unknown prefill implementation {impl!r}: mosaic or cudnn")
    t, b = (int(v) for v in shape.split("x"))
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, t, 32, 128), jnp.bfloat16)
    k, v = (jax.random.normal(key, (b, t, 8, 128), jnp.bfloat16) for key in keys[1:])
    print(f"prefill {impl} {t} x {b}")
    if impl == "cudnn":
        attend = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True, implementation="cudnn"))
    else:
        zeros, full = jnp.zeros((b,), jnp.int32), jnp.full((b,), t, jnp.int32)
        attend = jax.jit(lambda q, k, v: fm.flash_attention(q, k, v, zeros, full))
    return functools.partial(attend, q, k, v)


def main() -> None:
    cases = sys.argv[1:]
    if not cases:
        raise SystemExit(__doc__)
    makers = {"int4": int4_case, "paged": paged_case, "decode": decode_case, "prefill": prefill_case}
    for case in cases:
        kind, _, spec = case.partition(":")
        if kind not in makers:
            raise SystemExit(f"unknown case {case!r}: int4:KxN, paged:DTYPE:PAGE, decode:BxC or prefill:IMPL:TxB")
        call = makers[kind](spec)
        for _ in range(WARMUPS + LAUNCHES):
            jax.block_until_ready(call())


if __name__ == "__main__":
    main()
