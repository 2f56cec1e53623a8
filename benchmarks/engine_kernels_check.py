"""The engine step's two newest kernels against their references on the GPU, compiled (not in
interpret mode): `page_write.rope_write_pages` and `rms_norm.add_rms_norm`, on the engine's shapes
and awkward ones. Prints the largest difference of each output.

    PYTHONPATH=. python benchmarks/engine_kernels_check.py
"""

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.kernels import page_write as pw
from llmjax.kernels import rms_norm as rn


def largest_difference(got, want) -> list[float]:
    return [float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(got, want)]


def rope_write_case(n, kv_heads, groups, head_dim, pool_dtype, page_size=16):
    keys = jax.random.split(jax.random.key(0), 4)
    qkv = jax.random.normal(keys[0], (n, kv_heads, groups + 2, head_dim)).astype(jnp.bfloat16)
    positions = jax.random.randint(keys[1], (n,), 0, 4000)
    inv = 1.0 / (10000 ** (np.arange(0, head_dim, 2) / head_dim))
    freqs = positions[:, None] * inv[None]
    table = jnp.concatenate([freqs, freqs], -1)
    pages = 2 * n // page_size + 1
    pool = lambda key: jax.random.normal(key, (pages, page_size, kv_heads, head_dim)).astype(pool_dtype)  # noqa: E731
    slots = jnp.asarray(np.random.default_rng(0).permutation(pages * page_size + 7)[:n], jnp.int32)
    return qkv, pool(keys[2]), pool(keys[3]), jnp.cos(table), jnp.sin(table), slots


def main():
    print(jax.devices()[0].device_kind, "jax", jax.__version__)
    for n, kv_heads, groups, head_dim, pool_dtype in [(512, 32, 1, 128, jnp.bfloat16), (4133, 8, 4, 128, jnp.bfloat16),
                                                      (77, 8, 4, 64, jnp.float8_e4m3fn), (300, 5, 3, 80, jnp.bfloat16)]:
        case = rope_write_case(n, kv_heads, groups, head_dim, pool_dtype)
        want = jax.jit(pw.rope_write_reference)(*case)
        got = jax.jit(pw.rope_write_pages)(*case)
        print(f"rope_write_pages {n} tokens, {kv_heads} kv heads x {groups}, head_dim {head_dim}, "
              f"{jnp.dtype(pool_dtype).name} pool: q, k pages, v pages {largest_difference(got, want)}")
    for shape in [(512, 4096), (33280, 4096), (3, 5, 5120), (7, 100)]:
        keys = jax.random.split(jax.random.key(1), 3)
        x, delta = (jax.random.normal(k, shape).astype(jnp.bfloat16) for k in keys[:2])
        scale = (1 + 0.1 * jax.random.normal(keys[2], shape[-1:])).astype(jnp.bfloat16)
        want = jax.jit(rn.add_rms_norm_reference, static_argnums=3)(x, delta, scale, 1e-5)
        got = jax.jit(rn.add_rms_norm, static_argnums=3)(x, delta, scale, 1e-5)
        print(f"add_rms_norm {shape}: norm, sum {largest_difference(got, want)}")


if __name__ == "__main__":
    main()
