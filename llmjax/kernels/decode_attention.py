"""Attention for one new token per row against a contiguous KV cache (decode), split over the keys.

`decode_attention(q, k, v, lengths)`: q `[B, H, D]` (the row's one query token), k and v
`[B, S, KV, D]` (the cache of `llmjax.cache`: the token at position p sits at slot p), lengths `[B]`
int32 = the row's valid keys, slots `[0, lengths[b])`, the current token included. A row of length
0 gives zeros, never NaN. Grouped-query: `H` a multiple of `KV`, query head h reads kv head
`h // (H // KV)`. Scale `1/sqrt(D)`, scores and softmax in float32; the result has q's dtype.

Decode reads the whole cache for one token per row, so it is bound by memory, and the kernel exists
to read each cache byte once at full bandwidth (flash-decoding):
- one program per (key split, kv head, row) holds all the query heads of its kv head (padded to 16
  rows, what a tensor-core product needs), so each K/V block is loaded once for the whole group;
- the keys are split into `splits` chunks, each reduced by its own program with an online softmax,
  so a small batch still gives every SM work; each split writes its normalized partial output and
  its log-sum-exp, and a small jnp epilogue merges the splits (with one split, the kernel writes
  the result in q's dtype and nothing runs after it);
- blocks past a row's length are never read, so a cache longer than its rows costs only the launch
  of some idle programs;
- with one query head per kv head (multi-head attention), `vector=True` skips the tensor cores: the
  scores and the output are multiplies and sums on K and V as loaded, in float32 (`vector_block`).
`splits=None` picks enough splits for about `TARGET_PROGRAMS` programs.

`decode_attention_write(qkv, k, v, slots)` is the model's decode step: the same kernel taking the
step's queries, new key and new value as the q/k/v product lays them out (`[B, KV, G + 2, D]`), and
storing the new key and value into the cache at each row's slot as it attends (the caches are
aliased outputs, updated in place). What XLA ran before it, q's RoPE, k's RoPE with its write and
v's write, was three small kernels a layer; at batch 1 on the H200, Llama-2-7B int4 decodes 3.4%
faster so (BENCHMARKS.md, sixteenth session). On one device the model hands it the product's K
slices `[S, B, KV, G + 2, D]` and the step's RoPE tables (`rope`), and the kernel adds the slices and
rotates q and k as it reads them, so no XLA pass runs between the product and attention (+1.1% more,
seventeenth session). `write_reference` defines it.

Head dims must be powers of two >= 16 (`flash_attention.supported`); the model falls back to
`decode_attention_reference` for others.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels import dispatch
from llmjax.kernels.flash_attention import (LOG2E, MASKED, dispatch_attention, load_block, masked_softmax,
                                           online_softmax_block, supported)
from llmjax.models.rope import apply_rope

TARGET_PROGRAMS = 264  # two per SM on an H200 (132 SMs): enough to hide each program's tail
# Tuning on rocm where it differs from the H200 defaults: an MI300 has 64 KB of shared memory per
# workgroup; 3 stages take all of it, 2 stages 32 KB (benchmarks/triton_offline_compile.py).
ROCM_TUNING = dict(block_k=64, num_stages=2)
# Defaults on GPUs with large shared memory (compute capability 8.0 and 9.0: A100, H100, H200):
# 128-key blocks in 2 stages (benchmarks/decode_blocks.py, thirteenth session, H200: at batch 64 x
# 1k-32k 8-19% past 64-key blocks in 3 stages, e.g. 3.63 against 3.34 TB/s at 64 x 4k; at batch 1
# from -3% to +4%). At head dim 128 in bf16 a program takes 73.7 KB of shared memory and 192 registers
# a thread (Nsight Compute, fourteenth session: two programs an SM, bound by registers). Other NVIDIA
# GPUs (RTX 4090: 8.9, ~99 KB a program) would hold that too but have not been measured with it, so
# they keep 64 keys in 3 stages, as float32 caches do.
LARGE_BLOCKS, SMALL_BLOCKS = (128, 2), (64, 3)  # (block_k, num_stages)
LARGE_SHARED_MEMORY = ("8.0", "9.0")  # the capabilities that take LARGE_BLOCKS (the H200 measured; see above)


def default_tuning(dtype) -> tuple[int, int]:
    """(block_k, num_stages) for a cache of `dtype` on the default device (see `LARGE_BLOCKS`)."""
    large = dispatch.compute_capability() in LARGE_SHARED_MEMORY
    return LARGE_BLOCKS if large and jnp.dtype(dtype).itemsize <= 2 else SMALL_BLOCKS


def decode_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array) -> jax.Array:
    """The definition: one query token per row over the first `lengths[b]` cache slots, in jnp."""
    b, h, d = q.shape
    s, n_kv = k.shape[1], k.shape[2]
    qg = q.reshape(b, n_kv, h // n_kv, d)
    scores = jnp.einsum("bkgd,bskd->bkgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    visible = jnp.arange(s)[None, :] < lengths[:, None]  # [B, S]
    probs = masked_softmax(scores, visible[:, None, None, :])
    out = jnp.einsum("bkgs,bskd->bkgd", probs.astype(v.dtype), v)
    return out.reshape(b, h, d).astype(q.dtype)


def split_qkv(qkv: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`[B, KV, G + 2, D]` (each kv head's G query heads, then its key and value, the model's layout)
    -> q `[B, KV * G, D]`, k and v `[B, KV, D]`."""
    b, n_kv, rows, d = qkv.shape
    return qkv[:, :, :rows - 2].reshape(b, n_kv * (rows - 2), d), qkv[:, :, rows - 2], qkv[:, :, rows - 1]


def write_reference(qkv: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array, rope=None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The definition of `decode_attention_write`: each row's new key and value (from `qkv`
    `[B, KV, G + 2, D]`, see `split_qkv`) written into the cache k, v `[B, S, KV, D]` at the row's slot
    `slots` `[B]` (nowhere when the slot is outside the cache), then `decode_attention_reference` of its
    queries over slots `[0, slot]`. Returns (out `[B, KV * G, D]`, k, v). `qkv` may also be the
    product's K slices `[S, B, KV, G + 2, D]` (summed in float32, rounded to the cache's dtype), and
    `rope` (cos, sin `[B, D]`) rotates its query and key heads first (`product_qkv`)."""
    q, k_new, v_new = split_qkv(product_qkv(qkv, k.dtype, rope))
    rows = jnp.arange(k.shape[0])
    k = k.at[rows, slots].set(k_new.astype(k.dtype), mode="drop", wrap_negative_indices=False)
    v = v.at[rows, slots].set(v_new.astype(v.dtype), mode="drop", wrap_negative_indices=False)
    return decode_attention_reference(q, k, v, jnp.clip(slots + 1, 0, k.shape[1])), k, v


def product_qkv(qkv: jax.Array, dtype, rope=None) -> jax.Array:
    """`[B, KV, G + 2, D]` from `decode_attention_write`'s `qkv` (itself, or the sum of its K slices
    rounded to `dtype`), its query and key heads rotated by `rope` (cos, sin `[B, D]`) as
    `llmjax.models.rope.apply_rope` rotates them (in float32, rounded once)."""
    if qkv.ndim == 5:
        qkv = jnp.sum(qkv.astype(jnp.float32), axis=0).astype(dtype)
    if rope is None:
        return qkv
    b, n_kv, rows, d = qkv.shape
    roped = apply_rope(qkv.reshape(b, 1, n_kv * rows, d), *(t[:, None] for t in rope)).reshape(qkv.shape)
    return jnp.where((jnp.arange(rows) == rows - 1)[:, None], qkv, roped)  # values unrotated


def vector_block(q, k_ref, v_ref, carry, exists=None):
    """`online_softmax_block` for a program of one query head (multi-head attention) on the CUDA
    cores: q `[1, D]` float32, already scaled so that `q . k` is the base-2 score. The scores are a
    multiply and a sum along the head dim, the output a multiply and a sum along the keys, both on K
    and V in the layout they are loaded in (a tensor-core product would pad the one query to 16 rows
    and, for float8 V, rearrange it a byte at a time in shared memory). The softmax update repeats
    `online_softmax_block`'s on 1-D scores: sharing it as `[1, block_k]` scores (e7a1de8) ran the
    engine's float8 decode rows 3-5% slower (BENCHMARKS.md, tenth session)."""
    acc, top, total = carry  # [1, D], [1], [1]
    k, v = load_block(k_ref, v_ref, exists)
    s = jnp.sum(k.astype(jnp.float32) * q, axis=1)  # [block_k]
    if exists is not None:
        s = jnp.where(exists, s, MASKED)
    new_top = jnp.maximum(top, jnp.max(s))
    p = jnp.exp2(s - new_top)
    rescale = jnp.exp2(top - new_top)
    acc = acc * rescale[:, None] + jnp.sum(p[:, None] * v.astype(jnp.float32), axis=0)[None, :]
    return acc, new_top, total * rescale + jnp.sum(p)


def split_program(length, q_ref, k_ref, v_ref, o_ref, lse_ref, block_index, *, kv_limit, groups,
                  block_h, block_k, chunk, exact, compute_dtype, load_q=None, new_key=None):
    """One program of flash-decoding, for the contiguous and the paged kernel alike: the query heads
    of kv head `kv` in row `b` (`[block_h, D]`, padded past `groups`) over that row's keys in split
    `split`, `block_k` at a time, with an online softmax. Full blocks run unmasked; only the last is
    masked. `block_index(b, kv, first, exists)` says where keys `[first, first + block_k)` lie in
    `k_ref`/`v_ref` (the only thing the two kernels do differently); `kv_limit` caps the row's
    length. The products take q, K and V in `compute_dtype` (a float8 cache is widened to it).
    `block_h` 1 (one query head per kv head) runs `vector_block` instead, in float32.
    `load_q(b, kv, in_group) -> [block_h, D]`, if given, reads the query heads of kv head `kv`
    (else they are `q_ref` `[B, H, D]`'s).
    `new_key(split, kv, b) -> last`, if given, is called first (its loads then overlap the cache's);
    `last(q, carry) -> carry` adds a key of its own after the cache's (the kernel that writes the new
    token, `_write_kernel`), q as the products take it (float32 and already scaled when `block_h` is 1).
    Writes the output normalized over this split and its base-2 log-sum-exp (MASKED where no key was
    seen), which `merge_splits` joins across splits.
    length: the row's keys (a scalar); q_ref [B, H, D]; o_ref [B, P, H, D]; lse_ref [B, P, H]."""
    split, kv, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    d = q_ref.shape[-1]
    in_group = jnp.arange(block_h) < groups
    heads = pl.ds(kv * groups, block_h)
    if load_q is None:
        q = plgpu.load(q_ref.at[b, heads, :], mask=in_group[:, None], other=0.0)  # [block_h, D]
    else:
        q = load_q(b, kv, in_group)
    last = None if new_key is None else new_key(split, kv, b)
    start = split * chunk
    stop = jnp.minimum(jnp.minimum(length, kv_limit), start + chunk)
    scale = LOG2E / math.sqrt(d)
    q = q.astype(jnp.float32) * scale if block_h == 1 else q.astype(compute_dtype)

    def step(j, carry, masked):
        first = start + j * block_k
        exists = first + jnp.arange(block_k) < stop
        index = block_index(b, kv, first, exists)
        if block_h == 1:
            return vector_block(q, k_ref.at[index], v_ref.at[index], carry, exists if masked else None)
        return online_softmax_block(q, k_ref.at[index], v_ref.at[index], carry, scale, exact,
                                    exists if masked else None, exists[None, :] if masked else None)

    keys = jnp.maximum(stop - start, 0)
    full = jax.lax.div(keys, block_k)
    carry = (jnp.zeros((block_h, d), jnp.float32), jnp.full((block_h,), MASKED, jnp.float32),
             jnp.zeros((block_h,), jnp.float32))
    carry = jax.lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
    acc, top, total = jax.lax.fori_loop(full, jax.lax.div(keys + block_k - 1, block_k),
                                        functools.partial(step, masked=True), carry)
    if last is not None:
        acc, top, total = last(q, (acc, top, total))
    seen = total > 0
    out = acc / jnp.where(seen, total, 1.0)[:, None]
    lse = jnp.where(seen, top + jnp.log2(jnp.where(seen, total, 1.0)), MASKED)  # base 2
    plgpu.store(o_ref.at[b, split, heads, :], out.astype(o_ref.dtype), mask=in_group[:, None])
    plgpu.store(lse_ref.at[b, split, heads], lse, mask=in_group)


def _cache_blocks(block_k: int):
    """`split_program`'s `block_index` for a contiguous cache `[B, S, KV, D]`: a block is one slice of
    its row."""
    return lambda b, kv, first, exists: (b, pl.ds(first, block_k), kv, slice(None))


def _kernel(lengths_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, **params):
    split_program(lengths_ref[pl.program_id(2)], q_ref, k_ref, v_ref, o_ref, lse_ref,
                  _cache_blocks(params["block_k"]), kv_limit=k_ref.shape[1], **params)


def _one_key(q, k, v, carry, scale, owns):
    """The online softmax over one more key (`k`, `v` `[D]`, float32) where `owns`, else the carry
    unchanged. q `[block_h, D]` float32; `scale` None when q is already scaled."""
    acc, top, total = carry
    s = jnp.sum(q * k[None, :], axis=1)  # [block_h]
    s = s if scale is None else s * scale
    new_top = jnp.where(owns, jnp.maximum(top, s), top)
    p = jnp.where(owns, jnp.exp2(s - new_top), 0.0)
    rescale = jnp.exp2(top - new_top)
    return acc * rescale[:, None] + jnp.where(owns, p[:, None] * v[None, :], 0.0), new_top, total * rescale + p


def _product_rows(qkv_ref, b, kv, rows, mask, dtype, rope):
    """Rows `rows` (int32 `[R]`) of kv head `kv` in row `b` of the q/k/v product's K slices `qkv_ref`
    `[S, B, KV, G + 2, D]`: summed in float32 and rounded to `dtype` (as the product's own sum is),
    then, with `rope` (cos_ref, sin_ref `[B, D]`), rotated as `llmjax.models.rope.apply_rope` does
    (in float32 here, rounded once by the caller). Float32 `[R, D]`; zeros where `mask` is False."""
    d = qkv_ref.shape[-1]
    cols = jnp.arange(d)
    full = None if mask is None else jnp.broadcast_to(mask[:, None], (rows.size, d))

    def total(cols):
        parts = [plgpu.load(qkv_ref.at[jnp.int32(s), b, kv, rows[:, None], cols[None, :]], mask=full,
                            other=None if full is None else 0.0).astype(jnp.float32)
                 for s in range(qkv_ref.shape[0])]
        return functools.reduce(jnp.add, parts).astype(dtype).astype(jnp.float32)

    x = total(cols)
    if rope is None:
        return x
    cos_ref, sin_ref = rope
    cos = plgpu.load(cos_ref.at[b, cols]).astype(dtype).astype(jnp.float32)
    sin = plgpu.load(sin_ref.at[b, cols]).astype(dtype).astype(jnp.float32)
    partner = total((cols + d // 2) % d)  # rotate-half: the other half of each head
    rotated = jnp.where(cols < d // 2, -partner, partner)
    return x * cos[None, :] + rotated * sin[None, :]


def _write_kernel(slots_ref, qkv_ref, k_ref, v_ref, *refs, **params):
    # slots_ref [B]: the new token's slot; qkv_ref [B, KV, G + 2, D]: each kv head's G query heads, then
    # the new key and value (or [S, B, KV, G + 2, D]: the product's K slices, with `rope`: then refs
    # start with the cos and sin tables [B, D]); k_ref, v_ref [B, S, KV, D] aliased to k_out_ref,
    # v_out_ref. The cache is read below the slot; the new key joins from registers in the split that
    # holds its slot, whose program also stores it there.
    rope = params.pop("rope")
    cos_sin, (o_ref, lse_ref, k_out_ref, v_out_ref) = (refs[:2], refs[2:]) if rope else (None, refs)
    seq, d, groups = k_ref.shape[1], k_ref.shape[3], params["groups"]
    scale = None if params["block_h"] == 1 else LOG2E / math.sqrt(d)
    slices = qkv_ref.ndim == 5

    def row_of(b, kv, row, dtype, rotate):
        if not slices:
            return plgpu.load(qkv_ref.at[b, kv, jnp.int32(row), :]).astype(dtype)
        x = _product_rows(qkv_ref, b, kv, jnp.full((1,), row, jnp.int32), None, k_ref.dtype,
                          cos_sin if rotate else None)
        return x.reshape(d).astype(k_ref.dtype).astype(dtype)

    def new_key(split, kv, b):
        slot = slots_ref[b]
        owns = (slot >= 0) & (slot < seq) & (jax.lax.div(slot, params["chunk"]) == split)
        every = jnp.broadcast_to(owns, (d,))
        new = [(row_of(b, kv, row, out_ref.dtype, row == groups), out_ref)  # as the cache holds it
               for row, out_ref in ((groups, k_out_ref), (groups + 1, v_out_ref))]

        def last(q, carry):
            # stored after the cache's keys are read (none of them is the slot), so that no store
            # stands between this program's first loads and the cache's
            for x, out_ref in new:
                plgpu.store(out_ref.at[b, jnp.clip(slot, 0, seq - 1), kv, :], x, mask=every)
            return _one_key(q.astype(jnp.float32), *(x.astype(jnp.float32) for x, _ in new), carry, scale, owns)
        return last

    def load_q(b, kv, in_group):  # the query heads (summed over the slices and rotated)
        if not slices:
            return plgpu.load(qkv_ref.at[b, kv, pl.ds(0, params["block_h"]), :], mask=in_group[:, None], other=0.0)
        rows = jnp.arange(params["block_h"], dtype=jnp.int32)
        return _product_rows(qkv_ref, b, kv, rows, in_group, k_ref.dtype, cos_sin).astype(k_ref.dtype)

    reads = jnp.clip(slots_ref[pl.program_id(2)], 0, seq)  # the cache's keys below the new one
    split_program(reads, qkv_ref, k_ref, v_ref, o_ref, lse_ref, _cache_blocks(params["block_k"]), kv_limit=seq,
                  load_q=load_q, new_key=new_key, **params)


def merge_splits(out: jax.Array, lse: jax.Array, dtype) -> jax.Array:
    """Joins per-split results: out `[B, P, H, D]` (each normalized over its split), lse `[B, P, H]`
    (base-2 log-sum-exp, `MASKED` for a split without keys) -> `[B, H, D]` in `dtype`."""
    if out.shape[1] == 1:
        return out[:, 0].astype(dtype)
    weight = jnp.exp2(lse - jnp.max(lse, axis=1, keepdims=True))  # [B, P, H]; an empty row: all ones
    merged = jnp.sum(weight[..., None] * out, axis=1) / jnp.sum(weight, axis=1)[..., None]
    return merged.astype(dtype)


def split_plan(seq: int, block_k: int, programs: int, splits: int | None) -> tuple[int, int]:
    """(splits, keys per split) for `seq` keys and `programs` programs per split; the chunk is a whole
    number of blocks. `splits=None` aims at `TARGET_PROGRAMS` programs in all."""
    if splits is None:
        splits = pl.cdiv(TARGET_PROGRAMS, programs)
    splits = max(1, min(splits, pl.cdiv(seq, block_k)))
    chunk = pl.cdiv(pl.cdiv(seq, splits), block_k) * block_k
    return pl.cdiv(seq, chunk), chunk


@functools.partial(jax.jit, static_argnames=("block_k", "splits", "num_warps", "num_stages", "compute_dtype",
                                             "vector", "interpret"))
def decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, *, block_k: int | None = None,
                     splits: int | None = None, num_warps: int = 4, num_stages: int | None = None,
                     compute_dtype: str | None = None, vector: bool = False, interpret: bool = False) -> jax.Array:
    """Split-K decode attention with the Pallas kernel (see the module doc for the arguments;
    `compute_dtype` and `vector` as in `launch_splits`; `block_k`, `num_stages` None: `default_tuning`)."""
    _check(q, k, v, lengths)
    default_k, default_stages = default_tuning(k.dtype)
    block_k, num_stages = block_k or default_k, num_stages or default_stages
    return launch_splits(_kernel, q, k.shape[2], k.shape[1], (lengths.astype(jnp.int32), q, k, v),
                         name="decode_attention", block_k=block_k, splits=splits, num_warps=num_warps,
                         num_stages=num_stages, compute_dtype=compute_dtype, vector=vector, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_k", "splits", "num_warps", "num_stages", "compute_dtype",
                                             "vector", "interpret"))
def decode_attention_write(qkv: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array, rope=None, *,
                           block_k: int | None = None, splits: int | None = None, num_warps: int = 4,
                           num_stages: int | None = None, compute_dtype: str | None = None, vector: bool = False,
                           interpret: bool = False):
    """Decode attention that also writes the new token (`write_reference` defines it): `qkv`
    `[B, KV, G + 2, D]` (the queries, new key and new value of each kv head, as the model's q/k/v
    product lays them out), the cache k, v `[B, S, KV, D]` and the new token's slot `[B]` int32.
    One kernel where a write per cache and then `decode_attention` were three launches, and no slicing
    of q, k and v out of one array before it: the cache is read below each row's slot, the new key and
    value join the softmax from registers, and the program whose split holds the slot stores them
    there (the caches are the kernel's outputs too, aliased, so XLA updates them in place). Returns
    (out `[B, KV * G, D]`, k, v).

    `qkv` may instead be the product's K slices `[S, B, KV, G + 2, D]` (float32 partial sums, an int4
    product's `reduce=False` output), which the kernel adds up as it reads them, and `rope` (cos, sin
    `[B, D]`, each row's tables at its position) has it rotate the query and key heads: so no XLA
    pass over the product runs between it and this kernel."""
    slices = qkv.ndim == 5
    if qkv.ndim not in (4, 5) or qkv.shape[-2] < 3:
        raise ValueError(f"decode_attention_write takes qkv [B, KV, G + 2, D] (or its K slices [S, B, KV, G + 2, D]) "
                         f"with G >= 1 query heads per kv head; got {qkv.shape}")
    b, n_kv, rows, d = qkv.shape[-4:]
    if k.ndim != 4 or k.shape != v.shape or (k.shape[0], k.shape[2], k.shape[3]) != (b, n_kv, d):
        raise ValueError(f"decode_attention_write takes the cache k, v as [B, S, KV, D] = [{b}, S, {n_kv}, {d}] "
                         f"for qkv {qkv.shape}; got k {k.shape}, v {v.shape}")
    if rope is not None and (len(rope) != 2 or any(t.shape != (b, d) for t in rope)):
        raise ValueError(f"decode_attention_write takes rope as (cos, sin), each [B, D] = [{b}, {d}]; got "
                         f"{[getattr(t, 'shape', t) for t in rope]}")
    q = jax.ShapeDtypeStruct((b, n_kv * (rows - 2), d), k.dtype if slices else qkv.dtype)
    _check(q, k, v, slots, name="decode_attention_write", lengths_name="slots")
    if rope is not None and not slices:
        qkv = qkv[None]  # the rotating kernel reads slices
    default_k, default_stages = default_tuning(k.dtype)
    block_k, num_stages = block_k or default_k, num_stages or default_stages
    operands = (slots.astype(jnp.int32), qkv, k, v) + (() if rope is None else tuple(rope))
    return launch_splits(functools.partial(_write_kernel, rope=rope is not None), q, n_kv, k.shape[1], operands,
                         name="decode_attention_write", block_k=block_k, splits=splits, num_warps=num_warps,
                         num_stages=num_stages, compute_dtype=compute_dtype, vector=vector, interpret=interpret,
                         caches=(2, 3))


def launch_splits(kernel, q: jax.Array, n_kv: int, keys: int, operands: tuple, *, name: str, block_k: int,
                  splits: int | None, num_warps: int, num_stages: int, interpret: bool,
                  compute_dtype: str | None = None, vector: bool = False, caches: tuple = ()):
    """Runs a `split_program` kernel over the grid (splits, kv heads, rows), for rows of up to `keys`
    keys, and merges the splits. The products take `compute_dtype` (None: q's dtype; "float16" for
    bfloat16 queries over a float8 cache, which widens to float16 in one instruction per pair).
    `vector=True` with one query head per kv head (multi-head attention) multiplies on the CUDA cores
    in float32 (`vector_block`) instead of the tensor cores; grouped-query heads ignore it.
    `caches`: positions in `operands` of arrays the kernel also writes (aliased to outputs after the
    two of every split kernel); then the result is (out, *those arrays)."""
    b, h, d = q.shape
    groups = h // n_kv
    compute = product_dtype(name, q.dtype, compute_dtype)
    splits, chunk = split_plan(keys, block_k, b * n_kv, splits)
    block_h = 1 if vector and groups == 1 else max(16, pl.next_power_of_2(groups))
    kernel = functools.partial(kernel, groups=groups, block_h=block_h, block_k=block_k, chunk=chunk,
                               exact=compute == jnp.float32, compute_dtype=compute)
    # One split writes the result in q's dtype: no convert kernel after it. More write float32 partials.
    out, lse, *written = pl.pallas_call(
        kernel,
        grid=(splits, n_kv, b),
        out_shape=(jax.ShapeDtypeStruct((b, splits, h, d), q.dtype if splits == 1 else jnp.float32),
                   jax.ShapeDtypeStruct((b, splits, h), jnp.float32),
                   *(jax.ShapeDtypeStruct(operands[i].shape, operands[i].dtype) for i in caches)),
        input_output_aliases={i: 2 + n for n, i in enumerate(caches)},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*operands)
    out = merge_splits(out, lse, q.dtype)
    return (out, *written) if caches else out


def product_dtype(name: str, q_dtype, compute_dtype: str | None) -> jnp.dtype:
    """The dtype a kernel's products take: q's (`compute_dtype` None) or float16 for bfloat16 or
    float16 queries (a float8 cache widens to float16 in one instruction per pair)."""
    compute = jnp.dtype(compute_dtype or q_dtype)
    if compute not in (q_dtype, jnp.dtype(jnp.float16)):
        raise ValueError(f"{name}: compute_dtype must be None (q's dtype) or 'float16', got {compute_dtype!r}")
    if compute.itemsize < jnp.dtype(q_dtype).itemsize:
        raise ValueError(f"{name}: compute_dtype={compute_dtype!r} would narrow {q_dtype} queries; it is for "
                         "bfloat16 or float16 queries (leave it None for float32)")
    return compute


def _check(q, k, v, lengths, name: str = "decode_attention", lengths_name: str = "lengths") -> None:
    b, h, d = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"{name} takes q [B, H, D] and k, v [B, S, KV, D] with the same B and D; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if h % k.shape[2]:
        raise ValueError(f"{name}: {h} query heads are not a multiple of {k.shape[2]} kv heads")
    if lengths.shape != (b,):
        raise ValueError(f"{name} takes {lengths_name} of shape [B] = ({b},); got {lengths.shape}")
    if not supported(d):
        raise ValueError(f"{name} needs a head dim that is a power of two >= 16, got {d}; "
                         "use decode_attention_reference (llmjax.models.llama does so by itself)")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"{name} takes q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def attend_write(qkv: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array, rope=None, **tuning):
    """The model's entry point for a decode step over a contiguous cache: `decode_attention_write`
    on cuda and rocm, `write_reference` elsewhere (as `attend` chooses; `qkv` as K slices and `rope` as
    the kernel takes them). Returns (out, k, v)."""
    if qkv.ndim == 4 and rope is None:
        return dispatch_attention(decode_attention_write, write_reference, qkv, k, v, slots, tuning=tuning,
                                  rocm_tuning=ROCM_TUNING)
    if (not supported(k.shape[-1]) or k.dtype != v.dtype or k.dtype == jnp.float8_e4m3fn
            or (qkv.ndim == 4 and qkv.dtype != k.dtype)):  # what the kernel does not take (as `attend`)
        return write_reference(qkv, k, v, slots, rope)
    return dispatch.dispatch(functools.partial(decode_attention_write, **tuning), write_reference, qkv, k, v, slots,
                             rope, variable="LLMJAX_ATTENTION", rocm_tuning={**ROCM_TUNING, **tuning})


def attend(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array, **tuning) -> jax.Array:
    """Decode attention over a cache already written (`llama.attention` for one query token; the
    model's decode step takes `attend_write`): the kernel on cuda and rocm; the reference elsewhere,
    and for a head dim or a mix of dtypes the kernel does not take. `LLMJAX_ATTENTION` overrides as in
    `flash_attention.attend`."""
    return dispatch_attention(decode_attention, decode_attention_reference, q, k, v, lengths, tuning=tuning,
                              rocm_tuning=ROCM_TUNING)
