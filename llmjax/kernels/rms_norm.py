"""RMSNorm in one kernel: `scale * (x * rsqrt(mean(x**2) + eps))`, one program per row.

XLA compiles a norm as two kernels, the sum of squares (a reduction) and then the scaling (an
elementwise pass that needs the reduction's result). This kernel reads a row once, reduces it in
registers and writes the scaled row: one launch instead of two. On the H200 Llama-2-7B int4 decodes
at batch 1 2% slower with XLA's two (`LLMJAX_NORM=off`: 542.5 against 552.6 tok/s, BENCHMARKS.md,
sixteenth session).

`rms_norm_reference` is the definition, the arithmetic of `llmjax.models.llama.RMSNorm`: the sum of
squares and the normalization in float32, the normalized row rounded to x's dtype, then multiplied
by `scale` (the result in the promotion of the two dtypes, as jnp would give). `apply` is the
model's entry point: the Pallas kernel on cuda and rocm (Triton backend), the reference elsewhere;
`LLMJAX_NORM` overrides as `LLMJAX_ATTENTION` does (`off`, `interpret`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels import dispatch


def rms_norm_reference(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """The definition (see the module doc): x `[..., D]`, scale `[D]`."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.reshape((1,) * (x.ndim - 1) + (-1,)) * normed.astype(x.dtype)


def _kernel(x_ref, scale_ref, o_ref, *, width, block, eps):
    # x_ref, o_ref [R, D]; scale_ref [D]; one row per program, D padded to `block` (masked)
    row = pl.program_id(0)
    cols = jnp.arange(block)
    inside = cols < width if block != width else None
    other = None if inside is None else 0.0
    x = plgpu.load(x_ref.at[row, pl.ds(0, block)], mask=inside, other=other)
    scale = plgpu.load(scale_ref.at[pl.ds(0, block)], mask=inside, other=other)
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(x32 * x32) / width + eps)
    out = scale.astype(o_ref.dtype) * (x32 * inv).astype(x.dtype).astype(o_ref.dtype)
    plgpu.store(o_ref.at[row, pl.ds(0, block)], out, mask=inside)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, *, interpret: bool = False) -> jax.Array:
    """The Pallas kernel: x `[..., D]`, scale `[D]` -> `[..., D]` (see the module doc)."""
    _check(x, scale)
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    block = pl.next_power_of_2(width)
    out_dtype = jnp.result_type(scale.dtype, x.dtype)
    out = pl.pallas_call(
        functools.partial(_kernel, width=width, block=block, eps=eps),
        grid=(rows.shape[0],),
        out_shape=jax.ShapeDtypeStruct(rows.shape, out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=min(8, max(1, block // 512)), num_stages=1),
        interpret=interpret,
        name="rms_norm",
    )(rows, scale)
    return out.reshape(x.shape)


def _check(x: jax.Array, scale: jax.Array) -> None:
    if x.ndim < 1 or scale.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm takes x [..., D] and scale [D]; got x {x.shape}, scale {scale.shape}")


def apply(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """The model's entry point: the kernel on cuda and rocm, the reference elsewhere (`LLMJAX_NORM`
    overrides: `off`, `interpret`). Rows of zero size go to the reference (nothing to launch)."""
    _check(x, scale)
    if x.size == 0:
        return rms_norm_reference(x, scale, eps)
    return dispatch.dispatch(functools.partial(rms_norm, eps=eps), functools.partial(rms_norm_reference, eps=eps),
                             x, scale, variable="LLMJAX_NORM")
