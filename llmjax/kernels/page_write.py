"""The engine's keys and values into their pages: one kernel writes a step's K and V rows in place.

`write_pages(k_pages, v_pages, k, v, slots)`: the pools `[num_pages, page_size, KV, D]` with the
step's `k` and `v` `[N, KV, D]` written at the flat slots `slots` `[N]` (page * page_size + offset);
a slot past the pool's end writes nothing (idle rows, padding). The new rows are narrowed to the
pool's dtype first (`narrow`: into float8 they saturate).

XLA writes each pool with a scatter: two kernels a layer and step, each about 11 us for the engine's
512 rows of 4 KiB (float8 pools of Llama-2-7B on the H200, `benchmarks/kernel_profile.py engine`),
0.2 TB/s. The kernel (Pallas, Triton backend, so it lowers for cuda and rocm) is one program per
token that copies the token's K row and V row (`KV * D` values each, contiguous in both the step and
the pool) to its slot; the pools are aliased to the outputs, so nothing else is copied. Every
program owns its slot: the engine gives each token a distinct slot, or the pool's end.

`write_pages_reference` is the definition, in jnp; `apply` is the model's entry point (the kernel on
cuda and rocm, the reference elsewhere; `LLMJAX_PAGE_WRITE` overrides with `off` or `interpret`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels import dispatch


def narrow(x: jax.Array, dtype) -> jax.Array:
    """`x` in the cache's `dtype`; into float8 it saturates at the largest finite value (a plain
    cast would make NaN of anything past it)."""
    dtype = jnp.dtype(dtype)
    if dtype.itemsize == 1 and jnp.issubdtype(dtype, jnp.floating):
        top = float(jnp.finfo(dtype).max)
        x = jnp.clip(x, -top, top)
    return x.astype(dtype)


def write_pages_reference(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                          slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The definition (see the module doc), as two scatters."""
    def one(pages, new):
        flat = pages.reshape(-1, *pages.shape[2:])
        return flat.at[slots].set(narrow(new, pages.dtype), mode="drop").reshape(pages.shape)

    return one(k_pages, k), one(v_pages, v)


def _kernel(slots_ref, k_ref, v_ref, k_in, v_in, k_out, v_out, *, width, block, limit):
    # slots_ref [N]; k_ref, v_ref [N, W]; k_out, v_out (aliased to k_in, v_in) [num_slots, W]
    del k_in, v_in  # the same buffers as the outputs
    n = pl.program_id(0)
    slot = slots_ref[n]
    inside = slot < limit
    cols = jnp.arange(block)
    within = cols < width if block != width else None  # a row narrower than its block: masked
    mask = inside if within is None else within & inside
    target = jnp.where(inside, slot, 0)
    for src, dst in ((k_ref, k_out), (v_ref, v_out)):
        # no `other`: lanes past the row are never stored (and Triton has no cast of a fill value
        # to float8)
        row = plgpu.load(src.at[n, pl.ds(0, block)], mask=within)
        plgpu.store(dst.at[target, pl.ds(0, block)], row, mask=jnp.broadcast_to(mask, (block,)))


@functools.partial(jax.jit, static_argnames=("interpret",))
def write_pages(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array, *,
                interpret: bool = False) -> tuple[jax.Array, jax.Array]:
    """The Pallas kernel (see the module doc). Inside a jit whose pools are donated (the engine's
    step) they are written in place; called on its own, XLA copies them first."""
    _check(k_pages, v_pages, k, v, slots)
    num_slots = k_pages.shape[0] * k_pages.shape[1]
    width = k_pages.shape[2] * k_pages.shape[3]
    block = pl.next_power_of_2(width)
    flat = lambda pages: pages.reshape(num_slots, width)  # noqa: E731 (a bitcast: no copy)
    rows = lambda new, pages: narrow(new, pages.dtype).reshape(-1, width)  # noqa: E731
    n = k.shape[0]
    if n == 0:
        return k_pages, v_pages
    k_out, v_out = pl.pallas_call(
        functools.partial(_kernel, width=width, block=block, limit=num_slots),
        grid=(n,),
        out_shape=(jax.ShapeDtypeStruct((num_slots, width), k_pages.dtype),
                   jax.ShapeDtypeStruct((num_slots, width), v_pages.dtype)),
        input_output_aliases={3: 0, 4: 1},
        compiler_params=plgpu.CompilerParams(num_warps=min(4, max(1, block // 1024)), num_stages=1),
        interpret=interpret,
        name="page_write",
    )(slots.astype(jnp.int32), rows(k, k_pages), rows(v, v_pages), flat(k_pages), flat(v_pages))
    return k_out.reshape(k_pages.shape), v_out.reshape(v_pages.shape)


def _check(k_pages, v_pages, k, v, slots) -> None:
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"write_pages takes pools [num_pages, page_size, KV, D] of one shape; got "
                         f"{k_pages.shape} and {v_pages.shape}")
    if k.shape != v.shape or k.ndim != 3 or k.shape[1:] != k_pages.shape[2:]:
        raise ValueError(f"write_pages takes k, v [N, KV, D] with the pool's KV and D {k_pages.shape[2:]}; "
                         f"got {k.shape} and {v.shape}")
    if slots.shape != k.shape[:1]:
        raise ValueError(f"write_pages takes one slot per token: slots [{k.shape[0]}], got {slots.shape}")


def apply(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
          slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The model's entry point: the kernel on cuda and rocm, the reference elsewhere
    (`LLMJAX_PAGE_WRITE`: `off`, `interpret`)."""
    _check(k_pages, v_pages, k, v, slots)
    return dispatch.dispatch(write_pages, write_pages_reference, k_pages, v_pages, k, v, slots,
                             variable="LLMJAX_PAGE_WRITE")
