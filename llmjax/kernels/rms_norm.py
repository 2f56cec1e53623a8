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

Every norm of a decoder layer follows a residual add. `add_rms_norm(x, delta, scale, eps)` does both
in one launch: it writes x + delta (added in float32 and rounded once, as XLA adds) and its norm,
reading x and delta once, where XLA's add and then the norm kernel read the sum again (four passes
over the rows instead of five, and one launch fewer). The model takes it for every norm that follows
a residual add within a run of blocks (a pipeline stage's first norm takes a plain add) unless its
products are int4 at one or two rows (below). On the H200 the engine's decode step at 512 rows takes
4.6 us a norm for it; with `page_write`'s kernel, the engine's device calls are ~1.7% shorter
(BENCHMARKS.md, twenty-third session; the two were not measured apart). `add_rms_norm_reference` is its definition; `add_apply` its entry point.

For one or two rows (batch-1 decode) a norm need not run as a kernel at all: `residual_add` adds a product's K slices to
the residual stream (the add that precedes every norm of a decoder layer) and also writes the new row's
sum of squares, in `SQUARE_COLUMNS`-wide parts, one per program; the int4 product that follows the
norm then reads those few floats and normalizes x as it loads it (`int4_matmul`'s `norm`). On the
H200 a norm kernel costs a decode layer twice ~1.7 us on the critical path. `normalized_reference`
defines the norm taken from such parts.
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


def _kernel(x_ref, scale_ref, *refs, width, block, eps, residual):
    # x_ref, o_ref [R, D]; scale_ref [D]; with `residual`, also d_ref (in) and h_ref (out) [R, D]:
    # x + d is written to h_ref and normalized. One row per program, D padded to `block` (masked).
    d_ref, o_ref, h_ref = refs if residual else (None, *refs, None)
    row = pl.program_id(0)
    cols = jnp.arange(block)
    inside = cols < width if block != width else None
    other = None if inside is None else 0.0
    x = plgpu.load(x_ref.at[row, pl.ds(0, block)], mask=inside, other=other)
    if residual:  # in float32, rounded once to the sum's dtype, as XLA adds
        d = plgpu.load(d_ref.at[row, pl.ds(0, block)], mask=inside, other=other)
        x = (x.astype(jnp.float32) + d.astype(jnp.float32)).astype(h_ref.dtype)
        plgpu.store(h_ref.at[row, pl.ds(0, block)], x, mask=inside)
    scale = plgpu.load(scale_ref.at[pl.ds(0, block)], mask=inside, other=other)
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.sum(x32 * x32) / width + eps)
    out = scale.astype(o_ref.dtype) * (x32 * inv).astype(x.dtype).astype(o_ref.dtype)
    plgpu.store(o_ref.at[row, pl.ds(0, block)], out, mask=inside)


def _launch(x, scale, eps, delta, interpret):
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    block = pl.next_power_of_2(width)
    residual = delta is not None
    x_dtype = jnp.result_type(x.dtype, delta.dtype) if residual else x.dtype
    normed = jax.ShapeDtypeStruct(rows.shape, jnp.result_type(scale.dtype, x_dtype))
    out = pl.pallas_call(
        functools.partial(_kernel, width=width, block=block, eps=eps, residual=residual),
        grid=(rows.shape[0],),
        out_shape=(normed, jax.ShapeDtypeStruct(rows.shape, x_dtype)) if residual else normed,
        compiler_params=plgpu.CompilerParams(num_warps=min(8, max(1, block // 512)), num_stages=1),
        interpret=interpret,
        name="add_rms_norm" if residual else "rms_norm",
    )(rows, scale, *((delta.reshape(rows.shape),) if residual else ()))
    return tuple(o.reshape(x.shape) for o in out) if residual else out.reshape(x.shape)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float, *, interpret: bool = False) -> jax.Array:
    """The Pallas kernel: x `[..., D]`, scale `[D]` -> `[..., D]` (see the module doc)."""
    _check(x, scale)
    return _launch(x, scale, eps, None, interpret)


def add_rms_norm_reference(x: jax.Array, delta: jax.Array, scale: jax.Array, eps: float
                           ) -> tuple[jax.Array, jax.Array]:
    """The definition of `add_rms_norm`: (the norm of x + delta, x + delta), the sum as jnp adds."""
    h = x + delta
    return rms_norm_reference(h, scale, eps), h


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def add_rms_norm(x: jax.Array, delta: jax.Array, scale: jax.Array, eps: float, *, interpret: bool = False
                 ) -> tuple[jax.Array, jax.Array]:
    """The Pallas kernel of `add_rms_norm_reference`: the residual add before a norm and the norm in
    one launch, which reads x and delta once and writes the sum and its norm (XLA's add and the norm
    kernel read the sum again)."""
    _check(x, scale, delta)
    return _launch(x, scale, eps, delta, interpret)


SQUARE_COLUMNS = 256  # columns per program of `residual_add`, and per part of its sum of squares


def square_parts(width: int) -> int:
    """How many parts `residual_add` splits a row's sum of squares into, for rows of `width`."""
    return pl.cdiv(width, SQUARE_COLUMNS)


def residual_add_reference(x: jax.Array, partials: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The definition of `residual_add`: x `[R, D]` plus the product whose K slices are `partials`
    `[S, R, D]` (summed in float32 and rounded to x's dtype, as the product's own sum is), in x's
    dtype, and that sum's squares (in float32) summed over each `SQUARE_COLUMNS` columns: `[R, P]`,
    P = `square_parts(D)`."""
    h = x + jnp.sum(partials.astype(jnp.float32), axis=0).astype(x.dtype)
    r, d = h.shape
    h32 = jnp.pad(h.astype(jnp.float32), ((0, 0), (0, square_parts(d) * SQUARE_COLUMNS - d)))
    return h, jnp.sum((h32 * h32).reshape(r, -1, SQUARE_COLUMNS), axis=-1)


def normalized_reference(x: jax.Array, squares: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """`rms_norm_reference(x, scale, eps)` with the mean square taken from `squares` `[R, P]` (parts of
    each row's sum of squares, `residual_add`'s) instead of from x: x `[R, D]`."""
    inv = jax.lax.rsqrt(jnp.sum(squares, axis=-1, keepdims=True) / x.shape[-1] + eps)
    return scale[None, :] * (x.astype(jnp.float32) * inv).astype(x.dtype)


def _residual_kernel(x_ref, p_ref, h_ref, sq_ref, *, width, slices):
    # x_ref, h_ref [R, D]; p_ref [S, R, D]; sq_ref [R, P]; program (column block, row)
    part, row = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(part * SQUARE_COLUMNS, SQUARE_COLUMNS)
    inside = part * SQUARE_COLUMNS + jnp.arange(SQUARE_COLUMNS) < width if width % SQUARE_COLUMNS else None
    other = None if inside is None else 0.0
    total = functools.reduce(jnp.add, [plgpu.load(p_ref.at[jnp.int32(s), row, cols], mask=inside, other=other
                                                  ).astype(jnp.float32) for s in range(slices)])
    x = plgpu.load(x_ref.at[row, cols], mask=inside, other=other)
    h = x + total.astype(x.dtype)
    plgpu.store(h_ref.at[row, cols], h, mask=inside)
    h32 = h.astype(jnp.float32)
    plgpu.store(sq_ref.at[row, pl.ds(part, 1)], jnp.sum(h32 * h32, keepdims=True))


@functools.partial(jax.jit, static_argnames=("interpret",))
def residual_add(x: jax.Array, partials: jax.Array, *, interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The Pallas kernel of `residual_add_reference` (see there): one program per `SQUARE_COLUMNS`
    columns of a row."""
    _check_residual(x, partials)
    r, d = x.shape
    parts = square_parts(d)
    return pl.pallas_call(
        functools.partial(_residual_kernel, width=d, slices=partials.shape[0]),
        grid=(parts, r),
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((r, parts), jnp.float32)),
        compiler_params=plgpu.CompilerParams(num_warps=2, num_stages=1),
        interpret=interpret,
        name="residual_add",
    )(x, partials)


def _check_residual(x: jax.Array, partials: jax.Array) -> None:
    if x.ndim != 2 or partials.ndim != 3 or partials.shape[1:] != x.shape:
        raise ValueError(f"residual_add takes x [R, D] and the product's K slices [S, R, D]; got x {x.shape}, "
                         f"partials {partials.shape}")


def add(x: jax.Array, partials: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The model's entry point for `residual_add`: the kernel on cuda and rocm, the reference elsewhere
    (`LLMJAX_NORM` overrides, as for the norm)."""
    _check_residual(x, partials)
    return dispatch.dispatch(residual_add, residual_add_reference, x, partials, variable="LLMJAX_NORM")


def _check(x: jax.Array, scale: jax.Array, delta: jax.Array | None = None) -> None:
    if x.ndim < 1 or scale.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm takes x [..., D] and scale [D]; got x {x.shape}, scale {scale.shape}")
    if delta is not None and delta.shape != x.shape:
        raise ValueError(f"add_rms_norm adds delta of x's shape {x.shape}; got {delta.shape}")


def apply(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """The model's entry point: the kernel on cuda and rocm, the reference elsewhere (`LLMJAX_NORM`
    overrides: `off`, `interpret`). Rows of zero size go to the reference (nothing to launch)."""
    _check(x, scale)
    if x.size == 0:
        return rms_norm_reference(x, scale, eps)
    return dispatch.dispatch(functools.partial(rms_norm, eps=eps), functools.partial(rms_norm_reference, eps=eps),
                             x, scale, variable="LLMJAX_NORM")


def add_apply(x: jax.Array, delta: jax.Array, scale: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """The model's entry point for `add_rms_norm`: (the norm of x + delta, x + delta), the kernel on
    cuda and rocm, the reference elsewhere (`LLMJAX_NORM` overrides, as for `apply`)."""
    _check(x, scale, delta)
    if x.size == 0:
        return add_rms_norm_reference(x, delta, scale, eps)
    return dispatch.dispatch(functools.partial(add_rms_norm, eps=eps), functools.partial(add_rms_norm_reference,
                             eps=eps), x, delta, scale, variable="LLMJAX_NORM")
