"""Attention over a paged KV cache, keys found through a block table: decode rows (one query token
each, `paged_attention`) and prompt rows (many, `paged_prefill`).

Layout (what the continuous-batching engine keeps, one layer at a time):
- `k_pages`, `v_pages` `[num_pages, page_size, KV, D]`: the layer's page pool. A page holds
  `page_size` consecutive tokens of one sequence, all kv heads of each token together, the same
  per-token layout as the contiguous cache (`llmjax.cache`), so a page is a slice of one.
- `block_tables` `[B, max_pages]` int32: row b's token at position p lives in page
  `block_tables[b, p // page_size]`, slot `p % page_size`. Entries past a row's last page may hold
  any page id (0 included); they are never read.
- `lengths` `[B]` int32: the row's valid tokens, the current one included (it must already be
  written to its page). 0 marks an empty row, whose output is zeros, never NaN.
- `q` `[B, H, D]`, H a multiple of KV (grouped-query: query head h reads kv head `h // (H // KV)`).
- The pages are in q's dtype, or in float8_e4m3fn (the engine's `kv_dtype="float8_e4m3fn"`), which
  the kernel widens to q's dtype as it reads a block (cuda; the reference elsewhere).
Scale `1/sqrt(D)`, scores and softmax in float32; the result is `[B, H, D]` in q's dtype.

`paged_attention_reference` is the definition: gather each row's pages into a contiguous cache and
apply `decode_attention_reference`. The kernel is `decode_attention`'s (split-K, all query heads of a
kv head in one program, per-row lengths; `vector=True` multiplies one query head per kv head on the
CUDA cores) with one change: each block of `block_k` keys finds its pool rows through the block
table. When `block_k` divides `page_size` a block lies in one page and is read as one contiguous
slice; otherwise each token looks up its own page. Head dims must be powers of two >= 16;
`page_size` may be anything.

`paged_prefill(q, k_pages, v_pages, block_tables, q_offsets)` is the engine's prompt chunks: q
`[B, T, H, D]`, query t of row b at position `q_offsets[b] + t` of its sequence, seeing that
sequence's tokens at positions up to its own (earlier chunks' and its own, written before it runs).
It is the flash prefill kernel (`flash_attention.flash_program`) with the same block lookup, so the
keys are read from the pages in place, never gathered into a copy; `paged_prefill_reference`, which
gathers them, defines its result. `paged_prefill_rows(q, ..., first=F)` is the same on prompt rows
that lie in a flat `[N, H, D]` array of tokens from token F on (the engine's step: its decode rows
first): it reads their queries and writes their output there, so neither is copied (one H200, the
fixed set's prompt calls 1.2% shorter than slicing q and concatenating the outputs).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels.decode_attention import (decode_attention_reference, launch_splits, product_dtype,
                                            split_program)
from llmjax.kernels.flash_attention import (FLOAT8, dispatch_attention, flash_attention_reference, flash_program,
                                           launch_flash, supported)

# Tuning on rocm where it differs from the H200 defaults: an MI300 has 64 KB of shared memory per
# workgroup; 5 stages take 96 KB there, 3 stages 32 KB (benchmarks/triton_offline_compile.py).
ROCM_TUNING = dict(num_stages=3)
# The engine's tuning per page dtype, over the kernel's defaults. The engine's rows hold a few blocks
# each, so small programs (one or two warps, 2 stages of 32-key blocks) that an SM keeps many of in
# flight beat a deep pipeline. On 384 rows of 128-256 tokens, 7B heads, one H200
# (benchmarks/attention.py --only pool --pool-sweep): bf16 331-339 us against the defaults' 345-384
# us. A float8 cache with one query head per kv head multiplies on the CUDA cores (`vector`): the
# tensor-core product rearranges float8 V a byte at a time in shared memory; pages of 64, one call:
# 212.7 us against 273.5 (--pool-sweep vector). Grouped-query heads keep the tensor cores, in float16
# (one conversion instruction per pair of float8 values).
TUNING: dict[str, dict] = {
    "bfloat16": dict(block_k=32, num_warps=2, num_stages=2),
    "float8_e4m3fn": dict(block_k=32, num_warps=1, num_stages=2, vector=True, compute_dtype="float16"),
}


def gather_pages(pages: jax.Array, tables: jax.Array) -> jax.Array:
    """Each row's pages in order as one contiguous sequence: `[B, max_pages * page_size, KV, D]`."""
    return pages[tables].reshape(tables.shape[0], -1, *pages.shape[2:])


def _flat(pages: jax.Array) -> jax.Array:
    """The pool as the kernels index it: `[num_pages * page_size, KV, D]` (a bitcast, no copy)."""
    return pages.reshape(-1, *pages.shape[2:])


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                              lengths: jax.Array) -> jax.Array:
    """The definition (see the module doc): each row's pages gathered in order, then decode attention."""
    k, v = (gather_pages(pages, block_tables).astype(q.dtype) for pages in (k_pages, v_pages))
    return decode_attention_reference(q, k, v, lengths)


def _page_blocks(tables_ref, page_size: int, block_k: int, d: int):
    """`block_index(b, kv, first, exists)` for keys in the page pool (`k_ref`, `v_ref` `[num_pages *
    page_size, KV, D]`, pages flattened; `tables_ref` `[B, max_pages]`): where tokens `[first, first +
    block_k)` of row b's sequence, kv head `kv`, sit. One slice when the block lies in one page, else
    a gather of one pool row per token (every index an array, which interpret mode requires of
    gathers)."""
    def block_index(b, kv, first, exists):
        if page_size % block_k == 0:
            page = tables_ref[b, jax.lax.div(first, page_size)]
            return pl.ds(page * page_size + jax.lax.rem(first, page_size), block_k), kv, slice(None)
        tokens = first + jnp.arange(block_k)
        pages = plgpu.load(tables_ref.at[b, jax.lax.div(tokens, page_size)], mask=exists, other=0)
        rows = pages * page_size + jax.lax.rem(tokens, page_size)
        return rows[:, None], kv, jnp.arange(d)[None, :]
    return block_index


def _kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, page_size, **params):
    block_index = _page_blocks(tables_ref, page_size, params["block_k"], k_ref.shape[2])
    split_program(lengths_ref[pl.program_id(2)], q_ref, k_ref, v_ref, o_ref, lse_ref, block_index,
                  kv_limit=tables_ref.shape[1] * page_size, **params)


@functools.partial(jax.jit, static_argnames=("block_k", "splits", "num_warps", "num_stages", "compute_dtype",
                                             "vector", "interpret"))
def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                    lengths: jax.Array, *, block_k: int = 64, splits: int | None = None, num_warps: int = 4,
                    num_stages: int = 5, compute_dtype: str | None = None, vector: bool = False,
                    interpret: bool = False) -> jax.Array:
    """Split-K paged decode attention with the Pallas kernel (see the module doc for the layout).

    More pipeline stages than `decode_attention`: Triton gives the block-table load its own stage, so
    5 stages keep two K/V blocks in flight where the contiguous kernel needs 3 for the same."""
    _check(q, k_pages, v_pages, block_tables, lengths)
    page_size, n_kv = k_pages.shape[1:3]
    operands = (lengths.astype(jnp.int32), block_tables.astype(jnp.int32), q, _flat(k_pages), _flat(v_pages))
    return launch_splits(functools.partial(_kernel, page_size=page_size), q, n_kv,
                         block_tables.shape[1] * page_size, operands, name="paged_attention", block_k=block_k,
                         splits=splits, num_warps=num_warps, num_stages=num_stages,
                         compute_dtype=compute_dtype, vector=vector, interpret=interpret)


def _check(q, k_pages, v_pages, block_tables, lengths) -> None:
    if q.ndim != 3 or lengths.shape != q.shape[:1]:
        raise ValueError(f"paged_attention takes q [B, H, D] and lengths [B]; got q {q.shape}, lengths "
                         f"{lengths.shape}")
    _check_pool("paged_attention", "q [B, H, D]", q, k_pages, v_pages, block_tables)


def _check_pool(name, q_layout, q, k_pages, v_pages, block_tables) -> None:
    """What both kernels ask of the pool and the tables, given q (`q_layout`: its axes, for the message)."""
    b, h, d = q.shape[0], q.shape[-2], q.shape[-1]
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape or k_pages.shape[3] != d:
        raise ValueError(f"{name} takes {q_layout} and k_pages, v_pages [num_pages, page_size, KV, D] with the "
                         f"same D; got q {q.shape}, k_pages {k_pages.shape}, v_pages {v_pages.shape}")
    if h % k_pages.shape[2]:
        raise ValueError(f"{name}: {h} query heads are not a multiple of {k_pages.shape[2]} kv heads")
    if block_tables.ndim != 2 or block_tables.shape[0] != b:
        raise ValueError(f"{name} takes block_tables [B, max_pages] with B = {b}; got {block_tables.shape}")
    if not supported(d):
        raise ValueError(f"{name} needs a head dim that is a power of two >= 16, got {d}; "
                         f"use {name}_reference")
    if not (q.dtype == k_pages.dtype or k_pages.dtype == FLOAT8) or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"{name} takes q and the pages in one dtype, or pages in float8_e4m3fn; got "
                         f"{q.dtype}, {k_pages.dtype}, {v_pages.dtype}")


def attend(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array, lengths: jax.Array,
           **tuning) -> jax.Array:
    """The engine's entry point: the kernel on cuda and rocm; the reference elsewhere, and for a head
    dim or a mix of dtypes the kernel does not take. The kernel's tuning is `TUNING[pages' dtype]`
    under `tuning` (float32 queries keep float32 products). `LLMJAX_ATTENTION` overrides as in
    `flash_attention.attend`."""
    return dispatch_attention(paged_attention, paged_attention_reference, q, k_pages, v_pages, block_tables,
                              lengths, tuning=_engine_tuning(TUNING, q, k_pages, tuning), rocm_tuning=ROCM_TUNING)


def _engine_tuning(table: dict, q, k_pages, tuning: dict) -> dict:
    """`table[pages' dtype]` under `tuning`, without float16 products for float32 queries (those are
    for 2-byte queries; float32 keeps its own)."""
    tuning = {**table.get(jnp.dtype(k_pages.dtype).name, {}), **tuning}
    if jnp.dtype(q.dtype).itemsize > 2:
        tuning.pop("compute_dtype", None)
    return tuning


# ---------------------------------------------------------------- prefill rows over the pool
# The engine's prompt chunks: rows of `T` prompt tokens, each attending to its sequence's tokens in
# the pool (earlier chunks' and its own, written before attention runs). The tuning per page dtype,
# over the defaults (64-key blocks, 4 warps, 3 stages), from the engine's chunks on one H200 (128 rows
# of 64 tokens, tables 256 tokens wide; benchmarks/attention.py --only chunk): bf16 pages of 16 take
# 32-key blocks (187 us against 212), float8 pages of 64 two stages (198 us against 214), widened to
# float16. A gathered copy and the flash kernel took 574 and 495 us.
PREFILL_TUNING: dict[str, dict] = {
    "bfloat16": dict(block_k=32),
    "float8_e4m3fn": dict(num_stages=2, compute_dtype="float16"),
}
PREFILL_ROCM_TUNING = dict(num_stages=2)


def paged_prefill_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                            q_offsets: jax.Array) -> jax.Array:
    """The definition of `paged_prefill`: each row's pages gathered in order into a contiguous
    sequence (in q's dtype), then causal attention with query t of row b at position `q_offsets[b] + t`
    (`flash_attention_reference`; every gathered key exists, causality alone masks)."""
    k, v = (gather_pages(pages, block_tables).astype(q.dtype) for pages in (k_pages, v_pages))
    return flash_attention_reference(q, k, v, q_offsets, jnp.full(q_offsets.shape, k.shape[1], jnp.int32))


def _prefill_kernel(offsets_ref, lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *, page_size, flat=None,
                    **params):
    block_index = _page_blocks(tables_ref, page_size, params["block_k"], k_ref.shape[2])
    flash_program(offsets_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, block_index,
                  seq_k=tables_ref.shape[1] * page_size, flat=flat, **params)


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "num_warps", "num_stages", "compute_dtype",
                                             "interpret"))
def paged_prefill(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                  q_offsets: jax.Array, *, block_q: int = 64, block_k: int = 64, num_warps: int = 4,
                  num_stages: int = 3, compute_dtype: str | None = None, interpret: bool = False) -> jax.Array:
    """Causal attention for prompt rows whose keys are in the page pool, with the flash kernel reading
    the pages through the block table (no gathered copy of the keys): q `[B, T, H, D]`, query t of row
    b at position `q_offsets[b] + t` of the sequence whose pages are `block_tables[b]`; it sees that
    sequence's tokens at positions <= its own. K and V as in `paged_attention` (float8 pages widen to
    `compute_dtype`, None: q's dtype). Returns `[B, T, H, D]` in q's dtype."""
    _check_prefill(q, k_pages, v_pages, block_tables, q_offsets)
    return _launch_prefill(q, k_pages, v_pages, block_tables, q_offsets, None, block_q=block_q, block_k=block_k,
                           num_warps=num_warps, num_stages=num_stages, compute_dtype=compute_dtype,
                           interpret=interpret)


def _launch_prefill(q, k_pages, v_pages, block_tables, q_offsets, flat, *, compute_dtype, **tuning):
    """`paged_prefill`'s kernel on q `[B, T, H, D]`, or with `flat` = (first, T) on the rows of q `[N, H, D]`
    from `first` on (`paged_prefill_rows`)."""
    page_size, n_kv = k_pages.shape[1:3]
    t = q.shape[1] if flat is None else flat[1]
    offsets = q_offsets.astype(jnp.int32)  # a row's keys end at its last query's position
    operands = (offsets, offsets + t, block_tables.astype(jnp.int32), q, _flat(k_pages), _flat(v_pages))
    return launch_flash(functools.partial(_prefill_kernel, page_size=page_size), q, n_kv, operands,
                        name="paged_prefill_attention", **tuning,
                        compute=product_dtype("paged_prefill", q.dtype, compute_dtype), flat=flat)


@functools.partial(jax.jit, static_argnames=("first", "block_q", "block_k", "num_warps", "num_stages",
                                             "compute_dtype", "interpret"))
def paged_prefill_rows(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                       q_offsets: jax.Array, *, first: int, block_q: int = 64, block_k: int = 64,
                       num_warps: int = 4, num_stages: int = 3, compute_dtype: str | None = None,
                       interpret: bool = False) -> jax.Array:
    """`paged_prefill` on prompt rows that lie in a flat array of tokens, read and written in place: q
    `[N, H, D]` whose tokens from `first` on are `B = block_tables.shape[0]` rows of `T = (N - first) / B`
    queries each (the engine's step: decode rows first, then the chunk's). Returns `[N, H, D]`: from
    `first` on, what `paged_prefill` gives for those rows; the first `first` rows are left unwritten (any
    values), for the caller to fill (the engine puts the decode rows' attention there), so no copy of
    the prompt rows' queries or output is ever made."""
    b = block_tables.shape[0]
    if q.ndim != 3 or not 0 <= first < q.shape[0] or (q.shape[0] - first) % b:
        raise ValueError(f"paged_prefill_rows takes q [N, H, D] whose rows from first={first} on are "
                         f"{b} rows of equal length; got q {q.shape}")
    t = (q.shape[0] - first) // b
    _check_prefill(jax.ShapeDtypeStruct((b, t, *q.shape[1:]), q.dtype), k_pages, v_pages, block_tables, q_offsets)
    return _launch_prefill(q, k_pages, v_pages, block_tables, q_offsets, (first, t), block_q=block_q,
                           block_k=block_k, num_warps=num_warps, num_stages=num_stages,
                           compute_dtype=compute_dtype, interpret=interpret)


def paged_prefill_rows_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                                 q_offsets: jax.Array, *, first: int) -> jax.Array:
    """The definition of `paged_prefill_rows`: `paged_prefill_reference` on q's rows from `first` on, in
    place of them; the first `first` rows zeros."""
    b, (h, d) = block_tables.shape[0], q.shape[1:]
    rows = paged_prefill_reference(q[first:].reshape(b, -1, h, d), k_pages, v_pages, block_tables, q_offsets)
    return jnp.concatenate([jnp.zeros((first, h, d), q.dtype), rows.reshape(-1, h, d)])


def _check_prefill(q, k_pages, v_pages, block_tables, q_offsets) -> None:
    if q.ndim != 4 or q_offsets.shape != q.shape[:1]:
        raise ValueError(f"paged_prefill takes q [B, T, H, D] and q_offsets [B]; got q {q.shape}, q_offsets "
                         f"{q_offsets.shape}")
    _check_pool("paged_prefill", "q [B, T, H, D]", q, k_pages, v_pages, block_tables)


def attend_prefill_rows(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                        q_offsets: jax.Array, first: int, **tuning) -> jax.Array:
    """The engine's entry point for prompt rows in its step's flat array of tokens: `paged_prefill_rows`
    (their queries read and their output written in place) on cuda and rocm with
    `PREFILL_TUNING[pages' dtype]` under `tuning`; its reference elsewhere, and for a head dim or a mix
    of dtypes the kernel does not take (float8 pages on rocm too). `LLMJAX_ATTENTION` overrides as in
    `flash_attention.attend`."""
    return dispatch_attention(functools.partial(paged_prefill_rows, first=first),
                              functools.partial(paged_prefill_rows_reference, first=first), q, k_pages, v_pages,
                              block_tables, q_offsets, tuning=_engine_tuning(PREFILL_TUNING, q, k_pages, tuning),
                              rocm_tuning=PREFILL_ROCM_TUNING)


def attend_prefill(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                   q_offsets: jax.Array, **tuning) -> jax.Array:
    """`attend_prefill_rows` for prompt rows given as q `[B, T, H, D]` (laid end to end, from token 0)."""
    b, t, h, d = q.shape
    out = attend_prefill_rows(q.reshape(b * t, h, d), k_pages, v_pages, block_tables, q_offsets, 0, **tuning)
    return out.reshape(q.shape)
