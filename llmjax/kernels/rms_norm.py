"""RMSNorm in one kernel: `scale * (x * rsqrt(mean(x**2) + eps))`, one program per row.

XLA compiles a norm as two kernels, the sum of squares (a reduction) and then the scaling (an
elementwise pass that needs the reduction's result). This kernel reads a row once, reduces it in
registers and writes the scaled row: one launch instead of two. On the H200 the engine's 1000 x
128/128 ran 2% faster with it; batch-1 decode did not change, its small kernels hiding behind the
products (BENCHMARKS.md, "Sixth session").

`rms_norm_reference` is the definition, the arithmetic of `llmjax.models.llama.RMSNorm`: the sum of
squares and the normalization in float32, the normalized row rounded to x's dtype, then multiplied
by `scale` (the result in the promotion of the two dtypes, as jnp would give). `apply` is the
model's entry point: the Pallas kernel on cuda and rocm (Triton backend), the reference elsewhere;
`LLMJAX_NORM` overrides as `LLMJAX_ATTENTION` does (`off`, `interpret`).

`add_rms_norm(x, h, scale, eps)` is the residual add fused in front: it returns the sum `x + h` and
the norm of that sum, from one kernel that reads x and h once and writes both. `h` is x's shape, or
`[S, *x.shape]` partial sums (an int4 product's K slices, `llmjax.kernels.linear(..., partials=True)`):
h's slices are added in float32 and rounded to x's dtype, then added to x in x's dtype
(`add_partials`). A Llama layer adds each sublayer's output to the residual stream and normalizes the
sum for the next sublayer; at batch-1 int4 decode this one kernel replaces two, the reduction of the
product's K slices (with the add) and the norm.
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


def add_partials(x: jax.Array, h: jax.Array) -> jax.Array:
    """`x + h` in x's dtype, for h x's shape or `[S, *x.shape]` partial sums (added in float32 first)."""
    if h.ndim == x.ndim + 1:
        h = jnp.sum(h.astype(jnp.float32), axis=0)
    return x + h.astype(x.dtype)


def add_rms_norm_reference(x: jax.Array, h: jax.Array, scale: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """The definition of the fused form: `(total, rms_norm_reference(total, scale, eps))`, total
    `add_partials(x, h)`."""
    total = add_partials(x, h)
    return total, rms_norm_reference(total, scale, eps)


def _kernel(*refs, width, block, eps):
    # x_ref, o_ref (sum_ref) [R, D]; (h_ref [S, R, D]); scale_ref [D]; one row per program, D padded to
    # `block` (masked). With h_ref, x + h is written to sum_ref and normalized.
    fused = len(refs) == 5
    x_ref, h_ref, scale_ref, o_ref, sum_ref = refs if fused else (refs[0], None, refs[1], refs[2], None)
    row = pl.program_id(0)
    cols = jnp.arange(block)
    inside = cols < width if block != width else None
    other = None if inside is None else 0.0
    x = plgpu.load(x_ref.at[row, pl.ds(0, block)], mask=inside, other=other)
    if fused:
        h = sum(plgpu.load(h_ref.at[jnp.int32(s), row, pl.ds(0, block)], mask=inside, other=other).astype(jnp.float32)
                for s in range(h_ref.shape[0]))
        x = x + h.astype(x.dtype)
        plgpu.store(sum_ref.at[row, pl.ds(0, block)], x, mask=inside)
    scale = plgpu.load(scale_ref.at[pl.ds(0, block)], mask=inside, other=other)
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(x32 * x32) / width + eps)
    out = scale.astype(o_ref.dtype) * (x32 * inv).astype(x.dtype).astype(o_ref.dtype)
    plgpu.store(o_ref.at[row, pl.ds(0, block)], out, mask=inside)


def _launch(x: jax.Array, h: jax.Array | None, scale: jax.Array, eps: float, interpret: bool) -> list:
    """[norm] of x, or [norm, sum] of x + h, shaped as x."""
    width = x.shape[-1]
    rows = [x.reshape(-1, width)]
    shape = rows[0].shape
    if h is not None:
        rows.append(h.reshape(-1, *shape))  # [S, R, D]
    block = pl.next_power_of_2(width)
    outs = [jax.ShapeDtypeStruct(shape, jnp.result_type(scale.dtype, x.dtype))]
    if h is not None:
        outs.append(jax.ShapeDtypeStruct(shape, x.dtype))
    out = pl.pallas_call(
        functools.partial(_kernel, width=width, block=block, eps=eps),
        grid=(shape[0],),
        out_shape=tuple(outs),
        compiler_params=plgpu.CompilerParams(num_warps=min(8, max(1, block // 512)), num_stages=1),
        interpret=interpret,
        name="rms_norm" if h is None else "add_rms_norm",
    )(*rows, scale)
    return [o.reshape(x.shape) for o in out]


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, *, interpret: bool = False) -> jax.Array:
    """The Pallas kernel: x `[..., D]`, scale `[D]` -> `[..., D]` (see the module doc)."""
    _check(x, scale)
    return _launch(x, None, scale, eps, interpret)[0]


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm(x: jax.Array, h: jax.Array, scale: jax.Array, eps: float, *,
                 interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The fused Pallas kernel: `(x + h, norm(x + h))` for x `[..., D]`, h x's shape or `[S, *x.shape]`,
    scale `[D]` (see the module doc)."""
    _check(x, scale, h)
    normed, total = _launch(x, h, scale, eps, interpret)
    return total, normed


def _check(x: jax.Array, scale: jax.Array, h: jax.Array | None = None) -> None:
    if x.ndim < 1 or scale.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm takes x [..., D] and scale [D]; got x {x.shape}, scale {scale.shape}")
    if h is not None and (h.ndim not in (x.ndim, x.ndim + 1) or h.shape[h.ndim - x.ndim:] != x.shape):
        raise ValueError(f"add_rms_norm adds h (x's shape, or [S, *x.shape] partial sums) to x; got x {x.shape}, "
                         f"h {h.shape}")


def apply(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """The model's entry point: the kernel on cuda and rocm, the reference elsewhere (`LLMJAX_NORM`
    overrides: `off`, `interpret`). Rows of zero size go to the reference (nothing to launch)."""
    _check(x, scale)
    if x.size == 0:
        return rms_norm_reference(x, scale, eps)
    return dispatch.dispatch(functools.partial(rms_norm, eps=eps), functools.partial(rms_norm_reference, eps=eps),
                             x, scale, variable="LLMJAX_NORM")


def apply_add(x: jax.Array, h: jax.Array, scale: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """`apply` with the residual add fused in front: `(x + h, norm(x + h))`, as `add_rms_norm` (h x's
    shape or `[S, *x.shape]` partial sums)."""
    _check(x, scale, h)
    if x.size == 0:
        return add_rms_norm_reference(x, h, scale, eps)
    return dispatch.dispatch(functools.partial(add_rms_norm, eps=eps),
                             functools.partial(add_rms_norm_reference, eps=eps), x, h, scale, variable="LLMJAX_NORM")
