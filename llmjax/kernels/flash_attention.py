"""Causal attention over many query tokens (prefill) without materializing the score matrix.

`flash_attention(q, k, v, q_offsets, kv_lengths)`: q `[B, T, H, D]`, k and v `[B, S, KV, D]`
(grouped-query: `H` a multiple of `KV`, query head h reads kv head `h // (H // KV)`; K/V are never
repeated in memory). Query t of row b sits at position `q_offsets[b] + t`; key s sits at position s
and exists when `s < kv_lengths[b]`. Key s is visible to query t when `s <= q_offsets[b] + t` and it
exists. So one call covers a whole prompt against itself (offsets 0, lengths T), a right-padded batch
(lengths per row), and a chunk of a prompt prefilled against a cache that already holds the row's
earlier tokens (offset = tokens already cached, keys = the cache). A query that sees no key (a row
of length 0) gets zeros, never NaN. Scale `1/sqrt(D)`, scores and softmax in float32.

The kernel (Pallas, Triton backend, so it lowers for cuda and rocm): one program per (query head,
block of `block_q` queries, row). It keeps its query block on chip and walks the key blocks with an
online softmax (running max and sum, in base 2), first the blocks every query of the block sees in
full, unmasked, then the few on the diagonal or at the length edge, masked. Only the key blocks some
query can see are read. Programs of the query heads sharing a kv head are launched side by side, so
their K/V blocks are read from DRAM once and then hit L2. Query blocks run last-first: the longest
ones start earliest, which evens the tail of a causal launch.

Head dims must be powers of two >= 16 (the tensor-core product needs 16; Triton blocks are powers of
two): 16 (the tiny preset), 32 (the demo model), 64 and 128 (every Llama preset) are. `supported`
says whether a head dim fits; `attend` falls back to `flash_attention_reference` for the rest (a
head dim of 80 or 96, for instance).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels import dispatch

LOG2E = math.log2(math.e)
MASKED = -1e30  # a finite "minus infinity": a fully masked block gives exp2(0), never NaN
# Tuning on rocm where it differs from the H200 defaults: an MI300 has 64 KB of shared memory per
# workgroup; 8 warps and 3 stages take 80 KB there, 4 warps and 2 stages 32 KB
# (benchmarks/triton_offline_compile.py), with 64-key blocks.
ROCM_TUNING = dict(block_k=64, num_warps=4, num_stages=2)


def flash_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, q_offsets: jax.Array,
                              kv_lengths: jax.Array) -> jax.Array:
    """The definition: causal grouped-query attention by offsets and lengths, in jnp (see module doc)."""
    b, t, h, d = q.shape
    s, n_kv = k.shape[1], k.shape[2]
    q_pos = q_offsets[:, None] + jnp.arange(t)[None, :]  # [B, T]
    keys = jnp.arange(s)[None, None, :]
    visible = (keys <= q_pos[:, :, None]) & (keys < kv_lengths[:, None, None])  # [B, T, S]
    qg = q.reshape(b, t, n_kv, h // n_kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    probs = masked_softmax(scores, visible[:, None, None])  # [B, KV, G, T, S]
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(b, t, h, d).astype(q.dtype)


def masked_softmax(scores: jax.Array, visible: jax.Array) -> jax.Array:
    """Softmax over the last axis among `visible` entries; all zeros where none is visible."""
    scores = jnp.where(visible, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    e = jnp.exp(scores - jnp.where(jnp.isfinite(top), top, 0.0))
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def supported(head_dim: int) -> bool:
    """Whether the kernel takes this head dim: a power of two, at least 16."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def load_block(k_ref, v_ref, exists=None):
    """A block of K and V; rows where `exists` is False read as zeros (None: all exist, no predicates)."""
    if exists is None:
        return plgpu.load(k_ref), plgpu.load(v_ref)
    return tuple(plgpu.load(ref, mask=exists[:, None], other=0.0) for ref in (k_ref, v_ref))


def online_softmax_block(q, k_ref, v_ref, carry, scale, exact, exists=None, visible=None):
    """One block of keys into an online softmax (every kernel's inner step): the block's K and V
    (rows where `exists` is False read as zeros; None: all exist, no predicates), scores `q @ k.T`
    with those where `visible` is False masked (None: all visible), and the carry `(acc, top, total)`
    (the unnormalized output, the running max of the base-2 scores, their running sum) updated.
    K and V are widened to q's dtype in registers (a float8 cache)."""
    acc, top, total = carry
    k, v = (x.astype(q.dtype) for x in load_block(k_ref, v_ref, exists))
    s = plgpu.dot(q, k, trans_b=True, allow_tf32=not exact)  # [rows, block] f32, unscaled
    if visible is not None:
        s = jnp.where(visible, s, MASKED)
    new_top = jnp.maximum(top, jnp.max(s, axis=1) * scale)  # the running max, scaled
    p = jnp.exp2(s * scale - new_top[:, None])  # one multiply-add per score
    rescale = jnp.exp2(top - new_top)
    acc = acc * rescale[:, None] + plgpu.dot(p.astype(v.dtype), v, allow_tf32=not exact)
    return acc, new_top, total * rescale + jnp.sum(p, axis=1)


def flash_program(offsets_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, block_index, *, seq_k, groups,
                  block_q, block_k, exact, compute_dtype=None, flat=None):
    """One program of the causal prefill kernel, for contiguous keys and for keys in a page pool alike:
    query head `h`, the query block `block` (counted from the end), row `b`. `block_index(b, kv, first,
    exists)` says where keys `[first, first + block_k)` of kv head `kv` lie in `k_ref`/`v_ref` (the
    only thing the two kernels do differently); `seq_k` caps a row's keys. The products take q in
    `compute_dtype` (None: q's dtype), and K and V widened to it (a float8 cache).
    offsets_ref, lengths_ref [B]; q_ref, o_ref [B, T, H, D], or with `flat` = (first, T) `[N, H, D]`
    with row b's T queries at `first + b * T` (the engine's flat step, read and written in place)."""
    h, b = pl.program_id(0), pl.program_id(2)
    block = pl.num_programs(1) - 1 - pl.program_id(1)  # the longest query blocks first
    seq_q, d = (q_ref.shape[1] if flat is None else flat[1]), q_ref.shape[-1]
    kv = jax.lax.div(h, groups)
    t0 = block * block_q
    offset = offsets_ref[b]
    kv_len = jnp.minimum(lengths_ref[b], seq_k)
    rows = t0 + jnp.arange(block_q)
    q_pos = offset + rows
    if flat is None:
        at = (b, pl.ds(t0, block_q), h, slice(None))
    else:
        at = (pl.ds(flat[0] + b * seq_q + t0, block_q), h, slice(None))
    q = plgpu.load(q_ref.at[at], mask=(rows < seq_q)[:, None], other=0.0)
    q = q.astype(compute_dtype or q.dtype)
    scale = LOG2E / math.sqrt(d)  # scores in base 2: exp2 is the cheaper instruction

    def step(j, carry, masked):
        first = j * block_k
        cols = first + jnp.arange(block_k)
        exists = cols < kv_len
        index = block_index(b, kv, first, exists)
        visible = (cols[None, :] <= q_pos[:, None]) & exists[None, :] if masked else None
        return online_softmax_block(q, k_ref.at[index], v_ref.at[index], carry, scale, exact,
                                    exists if masked else None, visible)

    # Keys [0, full) are visible to every query of the block; [full, end) only to some.
    last_pos = offset + jnp.minimum(t0 + block_q, seq_q) - 1
    full = jax.lax.div(jnp.maximum(jnp.minimum(offset + t0 + 1, kv_len), 0), block_k)
    end = jax.lax.div(jnp.maximum(jnp.minimum(last_pos + 1, kv_len), 0) + block_k - 1, block_k)
    carry = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), MASKED, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    carry = jax.lax.fori_loop(0, full, functools.partial(step, masked=False), carry)
    acc, _, total = jax.lax.fori_loop(full, end, functools.partial(step, masked=True), carry)
    sees_a_key = (q_pos >= 0) & (kv_len > 0)  # key 0 is visible, so the sum counts real keys
    out = jnp.where(sees_a_key[:, None], acc / jnp.where(sees_a_key, total, 1.0)[:, None], 0.0)
    plgpu.store(o_ref.at[at], out.astype(o_ref.dtype), mask=(rows < seq_q)[:, None])


def _kernel(offsets_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, **params):
    # k_ref, v_ref [B, S, KV, D]: a block is one slice of its row
    def block_index(b, kv, first, exists):
        return b, pl.ds(first, params["block_k"]), kv, slice(None)
    flash_program(offsets_ref, lengths_ref, q_ref, k_ref, v_ref, o_ref, block_index, seq_k=k_ref.shape[1],
                  **params)


# Defaults: the best of six configurations on the H200 (benchmarks/attention.py, 2 x 8192 tokens, 32
# query and 8 kv heads of 128): 409.8 TFLOP/s with 128-key blocks, 369.6 with 64. float32 halves the
# key block: its 128-key K and V tiles, pipelined, would ask 272 KB of shared memory for head dim
# 128, past the H200's 227 KB (seen on the GPU: RESOURCE_EXHAUSTED).
BLOCK_K = 128
BLOCK_K_FLOAT32 = 64


@functools.partial(jax.jit, static_argnames=("block_q", "block_k", "num_warps", "num_stages", "interpret"))
def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offsets: jax.Array, kv_lengths: jax.Array,
                    *, block_q: int = 128, block_k: int | None = None, num_warps: int = 8, num_stages: int = 3,
                    interpret: bool = False) -> jax.Array:
    """Causal grouped-query attention with the Pallas kernel (see the module doc for the arguments)."""
    _check(q, k, v, q_offsets, kv_lengths)
    block_k = block_k or (BLOCK_K if q.dtype.itemsize <= 2 else BLOCK_K_FLOAT32)
    return launch_flash(_kernel, q, k.shape[2], (q_offsets.astype(jnp.int32), kv_lengths.astype(jnp.int32), q, k, v),
                        name="flash_attention", block_q=block_q, block_k=block_k, num_warps=num_warps,
                        num_stages=num_stages, compute=q.dtype, interpret=interpret)


def launch_flash(kernel, q: jax.Array, n_kv: int, operands: tuple, *, name: str, block_q: int, block_k: int,
                 num_warps: int, num_stages: int, compute, interpret: bool, flat: tuple[int, int] | None = None
                 ) -> jax.Array:
    """Runs a `flash_program` kernel over the grid (query heads, query blocks, rows) for q `[B, T, H, D]`
    against `n_kv` kv heads; `compute` is the products' dtype. Returns `[B, T, H, D]` in q's dtype.
    With `flat` = (first, T) (which the kernel is given), q is `[N, H, D]` holding rows of T queries
    from token `first` on (the whole rows that fit); the result is `[N, H, D]` with only those rows
    written."""
    if flat is None:
        b, t = q.shape[:2]
    else:
        t = flat[1]
        b = (q.shape[0] - flat[0]) // t
        kernel = functools.partial(kernel, flat=flat)
    h = q.shape[-2]
    block_q = min(block_q, max(16, pl.next_power_of_2(t)))
    kernel = functools.partial(kernel, groups=h // n_kv, block_q=block_q, block_k=block_k,
                               exact=compute == jnp.float32, compute_dtype=compute)
    return pl.pallas_call(
        kernel,
        grid=(h, pl.cdiv(t, block_q), b),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(*operands)


def _check(q, k, v, q_offsets, kv_lengths) -> None:
    b, t, h, d = q.shape
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"flash_attention takes q [B, T, H, D] and k, v [B, S, KV, D] with the same B and D; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if h % k.shape[2]:
        raise ValueError(f"flash_attention: {h} query heads are not a multiple of {k.shape[2]} kv heads")
    if q_offsets.shape != (b,) or kv_lengths.shape != (b,):
        raise ValueError(f"flash_attention takes q_offsets and kv_lengths of shape [B] = ({b},); got "
                         f"{q_offsets.shape} and {kv_lengths.shape}")
    if not supported(d):
        raise ValueError(f"flash_attention needs a head dim that is a power of two >= 16, got {d}; "
                         "use flash_attention_reference (llmjax.models.llama does so by itself)")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"flash_attention takes q, k, v of one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_offsets: jax.Array, kv_lengths: jax.Array,
           **tuning) -> jax.Array:
    """The model's prefill entry point: the kernel on cuda and rocm; the reference elsewhere, and for a
    head dim or a mix of dtypes the kernel does not take. On an NVIDIA Hopper GPU (H100, H200) the cuda
    kernel is `flash_attention_mgpu`'s, where it takes the operands and no Triton `tuning` is given;
    `LLMJAX_ATTENTION_MOSAIC=off` keeps the Triton kernel there. `LLMJAX_ATTENTION` overrides: `off`
    (the reference everywhere) or `interpret` (the kernel in interpret mode everywhere, for tests: the
    Triton kernel, or on a Hopper GPU the Mosaic GPU one)."""
    from llmjax.kernels import flash_attention_mgpu as mgpu  # it imports this module

    if not tuning and mgpu.chosen(q, k, v):
        return dispatch_attention(mgpu.flash_attention, flash_attention_reference, q, k, v, q_offsets,
                                  kv_lengths, tuning={}, rocm_tuning=ROCM_TUNING, rocm_kernel=flash_attention)
    return dispatch_attention(flash_attention, flash_attention_reference, q, k, v, q_offsets, kv_lengths,
                              tuning=tuning, rocm_tuning=ROCM_TUNING)


FLOAT8 = jnp.dtype(jnp.float8_e4m3fn)  # the one narrow cache dtype the kernels read (cuda only)


def dispatch_attention(kernel, reference, q, k, v, *rest, tuning: dict, rocm_tuning: dict, rocm_kernel=None):
    """What every attention entry point does: `reference(q, k, v, *rest)` for a head dim or a mix of
    dtypes the kernels do not take; otherwise `kernel` with `tuning` (and `rocm_tuning` under it on
    rocm) through `llmjax.kernels.dispatch`, which `LLMJAX_ATTENTION` steers. K and V in float8
    (e4m3fn) with a wider q run the kernel on cuda (which widens them as it reads) and the reference
    elsewhere. `rocm_kernel` (None: `kernel`) is what runs on rocm."""
    if not kernels_take(q.shape[-1], q.dtype, k.dtype, v.dtype):
        return reference(q, k, v, *rest)
    return dispatch.dispatch(functools.partial(kernel, **tuning), reference, q, k, v, *rest,
                             variable="LLMJAX_ATTENTION", rocm_tuning={**rocm_tuning, **tuning},
                             rocm=not _float8(q.dtype, k.dtype, v.dtype), rocm_kernel=rocm_kernel)


def kernels_take(head_dim: int, q_dtype, k_dtype, v_dtype) -> bool:
    """Whether the attention kernels take this head dim and these dtypes: one dtype for q, K and V, or
    float8 K and V under a wider q."""
    same = jnp.dtype(q_dtype) == jnp.dtype(k_dtype) == jnp.dtype(v_dtype)
    return supported(head_dim) and (same or _float8(q_dtype, k_dtype, v_dtype))


def kernel_runs_for(head_dim: int, q_dtype, k_dtype, v_dtype, device) -> bool:
    """Whether `dispatch_attention` runs its kernel (compiled, or interpreted under
    `LLMJAX_ATTENTION=interpret`) for these shapes on `device`, rather than the reference."""
    return kernels_take(head_dim, q_dtype, k_dtype, v_dtype) and dispatch.kernel_runs(
        "LLMJAX_ATTENTION", device, rocm=not _float8(q_dtype, k_dtype, v_dtype))


def _float8(q_dtype, k_dtype, v_dtype) -> bool:
    return jnp.dtype(k_dtype) == jnp.dtype(v_dtype) == FLOAT8 and jnp.dtype(q_dtype) != FLOAT8
