"""The engine's step into its pages: one kernel rotates the step's queries and keys and writes its
keys and values in place.

`rope_write_pages(qkv, k_pages, v_pages, cos, sin, slots)` takes the step's q/k/v product
`[N, KV, G + 2, D]` (each kv head's G query heads, then its key and its value: the model's layout),
each token's RoPE tables cos, sin `[N, D]` (float32) and its flat pool slot `slots` `[N]` (page *
page_size + offset; a slot past the pool's end writes nothing: idle rows, padding). It rotates the
query and key heads (rotate-half, as `llmjax.models.rope.apply_rope`), writes each token's key and
value into the pools `[num_pages, page_size, KV, D]` at its slot, narrowed to the pool's dtype
(`narrow`: into float8 they saturate), and returns (the rotated queries `[N, KV * G, D]`, k_pages,
v_pages).

XLA ran this as four passes over the step's rows a layer: the queries' rotation, the keys', the
values' slice, then the page write (before that, two scatters of ~11 us each for 512 rows). The
kernel (Pallas, Triton backend, so it lowers for cuda and rocm) is one program per token and block
of 32 of the product's head rows: it reads each value once, rotates in float32 and rounds once (as
the decode-attention kernel does), and writes it once; the pools are aliased to the outputs, so
nothing else is copied. Every token owns its slot (the engine gives each a distinct slot, or the
pool's end), and each of its programs writes its own heads there. On the H200 the engine's step at 512 rows takes 7.2 us a layer for it, and the
engine serves ~1% more tokens a second (BENCHMARKS.md, twenty-third session).

`rope_write_reference` is the definition, in jnp (the model's own rotation and `write_pages_reference`,
two scatters); `apply` is the model's entry point (the kernel on cuda and rocm, except float8 pools on
rocm, the reference elsewhere; `LLMJAX_PAGE_WRITE` overrides with `off` or `interpret`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels import dispatch
from llmjax.models.rope import apply_rope


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
    """The pools with `k` and `v` `[N, KV, D]` written at the flat `slots` `[N]`, as two scatters
    (a slot past the pool's end writes nothing)."""
    def one(pages, new):
        flat = pages.reshape(-1, *pages.shape[2:])
        return flat.at[slots].set(narrow(new, pages.dtype), mode="drop").reshape(pages.shape)

    return one(k_pages, k), one(v_pages, v)


def rope_write_reference(qkv: jax.Array, k_pages: jax.Array, v_pages: jax.Array, cos: jax.Array, sin: jax.Array,
                         slots: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The definition of `rope_write_pages` (see the module doc), as the model wrote it: the query and
    key heads rotated by `apply_rope` (in float32, rounded once to `qkv`'s dtype), then
    `write_pages_reference`."""
    n, n_kv, rows, d = qkv.shape
    g = rows - 2
    tables = cos[None], sin[None]
    q = apply_rope(qkv[None, :, :, :g].reshape(1, n, n_kv * g, d), *tables)[0]
    k = apply_rope(qkv[None, :, :, g], *tables)[0]
    k_pages, v_pages = write_pages_reference(k_pages, v_pages, k, qkv[:, :, g + 1], slots)
    return q, k_pages, v_pages


def _kernel(slots_ref, qkv_ref, cos_ref, sin_ref, k_in, v_in, q_out, k_out, v_out, *, rows, total, half,
            block_rows, block_half, limit):
    # qkv_ref [N, KV * rows, D] (rows = G + 2 per kv head); cos_ref, sin_ref [N, D] float32;
    # q_out [N, KV * G, D]; k_out, v_out (aliased to k_in, v_in) [num_slots, KV, D]
    del k_in, v_in  # the same buffers as the outputs
    n, j = pl.program_id(0), pl.program_id(1)
    r = j * block_rows + jnp.arange(block_rows)  # this program's head rows of the product
    kv, role = r // rows, r % rows  # role: < G a query head, G the key, G + 1 the value
    cols = jnp.arange(block_half)
    exists = r < total
    col_ok = cols < half
    mask = exists[:, None] & col_ok[None, :]
    dtype = qkv_ref.dtype
    lo, hi = cols, cols + half  # rotate-half: each head's first and second halves

    def load(ref, c):
        return plgpu.load(ref.at[n, r[:, None], c[None, :]], mask=mask, other=0.0).astype(jnp.float32)

    def table(ref, c):  # as the model's dtype holds the tables
        return plgpu.load(ref.at[n, c], mask=col_ok, other=0.0).astype(dtype).astype(jnp.float32)[None, :]

    x_lo, x_hi = load(qkv_ref, lo), load(qkv_ref, hi)
    cos_lo, cos_hi, sin_lo, sin_hi = table(cos_ref, lo), table(cos_ref, hi), table(sin_ref, lo), table(sin_ref, hi)
    rotate = (role < rows - 1)[:, None]  # values are not rotated
    out_lo = jnp.where(rotate, x_lo * cos_lo - x_hi * sin_lo, x_lo)
    out_hi = jnp.where(rotate, x_hi * cos_hi + x_lo * sin_hi, x_hi)

    # A masked row's index is one past its axis (never 0): a masked lane writes nothing on a GPU, and
    # interpret mode's scatter drops the row rather than racing a real write to the same place.
    # (Masked columns of a real row, past half in the first half's store, land on that row's second
    # half, which the second store then writes: correct in both.)
    g = rows - 2
    is_q = (role < g) & exists
    q_row = jnp.where(is_q, kv * g + role, q_out.shape[1])
    for c, out in ((lo, out_lo), (hi, out_hi)):
        plgpu.store(q_out.at[n, q_row[:, None], c[None, :]], out.astype(q_out.dtype),
                    mask=is_q[:, None] & col_ok[None, :])
    slot = slots_ref[n]
    inside = slot < limit
    target = jnp.where(inside, slot, 0)
    for which, ref in ((g, k_out), (g + 1, v_out)):
        mine = (role == which) & exists & inside
        head = jnp.where(mine, kv, ref.shape[1])
        for c, out in ((lo, out_lo), (hi, out_hi)):
            # rounded to the product's dtype first, as the reference's keys are (a float32 pool)
            plgpu.store(ref.at[target, head[:, None], c[None, :]], narrow(out.astype(dtype), ref.dtype),
                        mask=mine[:, None] & col_ok[None, :])


@functools.partial(jax.jit, static_argnames=("interpret", "block_rows", "num_warps"))
def rope_write_pages(qkv: jax.Array, k_pages: jax.Array, v_pages: jax.Array, cos: jax.Array, sin: jax.Array,
                     slots: jax.Array, *, block_rows: int = 32, num_warps: int = 4,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The Pallas kernel (see the module doc): (q `[N, KV * G, D]`, k_pages, v_pages). Inside a jit
    whose pools are donated (the engine's step) they are written in place."""
    _check(qkv, k_pages, v_pages, cos, sin, slots)
    n, n_kv, rows, d = qkv.shape
    num_slots = k_pages.shape[0] * k_pages.shape[1]
    total = n_kv * rows
    block_rows = min(block_rows, pl.next_power_of_2(total))
    q_shape = jax.ShapeDtypeStruct((n, n_kv * (rows - 2), d), qkv.dtype)
    if n == 0:
        return jnp.zeros(q_shape.shape, q_shape.dtype), k_pages, v_pages
    flat = lambda pages: pages.reshape(num_slots, n_kv, d)  # noqa: E731 (a bitcast: no copy)
    q, k_out, v_out = pl.pallas_call(
        functools.partial(_kernel, rows=rows, total=total, half=d // 2, block_rows=block_rows,
                          block_half=pl.next_power_of_2(d // 2), limit=num_slots),
        grid=(n, pl.cdiv(total, block_rows)),
        out_shape=(q_shape, jax.ShapeDtypeStruct(flat(k_pages).shape, k_pages.dtype),
                   jax.ShapeDtypeStruct(flat(v_pages).shape, v_pages.dtype)),
        input_output_aliases={4: 1, 5: 2},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="rope_page_write",
    )(slots.astype(jnp.int32), qkv.reshape(n, total, d), cos.astype(jnp.float32), sin.astype(jnp.float32),
      flat(k_pages), flat(v_pages))
    return q, k_out.reshape(k_pages.shape), v_out.reshape(v_pages.shape)


def _check(qkv, k_pages, v_pages, cos, sin, slots) -> None:
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"rope_write_pages takes pools [num_pages, page_size, KV, D] of one shape; got "
                         f"{k_pages.shape} and {v_pages.shape}")
    if qkv.ndim != 4 or qkv.shape[2] < 3 or (qkv.shape[1], qkv.shape[3]) != k_pages.shape[2:]:
        raise ValueError(f"rope_write_pages takes qkv [N, KV, G + 2, D] with G >= 1 and the pool's KV and D "
                         f"{k_pages.shape[2:]}; got {qkv.shape}")
    if qkv.shape[3] % 2:
        raise ValueError(f"rope_write_pages rotates halves of each head: D must be even, got {qkv.shape[3]}")
    want = (qkv.shape[0], qkv.shape[3])
    if cos.shape != want or sin.shape != want:
        raise ValueError(f"rope_write_pages takes cos, sin [N, D] = {list(want)}; got {cos.shape} and {sin.shape}")
    if slots.shape != qkv.shape[:1]:
        raise ValueError(f"rope_write_pages takes one slot per token: slots [{qkv.shape[0]}], got {slots.shape}")


def apply(qkv: jax.Array, k_pages: jax.Array, v_pages: jax.Array, cos: jax.Array, sin: jax.Array,
          slots: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The model's entry point: `rope_write_pages` on cuda and rocm, `rope_write_reference` elsewhere
    (`LLMJAX_PAGE_WRITE`: `off`, `interpret`). A float8 pool takes the reference on rocm: the kernel
    narrows to float8 itself, and an MI300's native float8 formats are not the pool's (unmeasured
    there, as the attention kernels' float8 reads are)."""
    _check(qkv, k_pages, v_pages, cos, sin, slots)
    return dispatch.dispatch(rope_write_pages, rope_write_reference, qkv, k_pages, v_pages, cos, sin, slots,
                             variable="LLMJAX_PAGE_WRITE", rocm=jnp.dtype(k_pages.dtype).itemsize > 1)
