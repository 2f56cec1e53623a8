"""The Llama model: Flax Linen modules used functionally, the weights a plain nested dict.

One forward serves every use: prefill (many tokens per row), decode (one token per row) and scoring
(`llmjax.logits`, no cache). Each row carries its own positions, so ragged prompts batch exactly.
The layers are separate modules (`layer_0`, `layer_1`, ...) unrolled in Python: on the H200 a decode
step that scanned over stacked layer weights ran 2.3x slower than the unrolled one (84 vs 193 tok/s,
Llama-2-7B shape), because slicing stacked weights inside the loop costs copies. On a mesh with
pipeline stages, `Blocks` runs each stage's share of the layers and `llmjax.sharding.pipeline`
schedules the stages; `embed` and `head` let the pipelined decode apply the two ends alone.

Every parameter is declared once, in `Linear`, `Embed` or `RMSNorm`, with its shape and logical axes
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, and `qkv` and `gate_up` for the slots of
the fused kernels); init, abstract shapes and shardings all derive from that declaration. Left out on purpose: training (dropout, gradients), Pallas kernels
(`llmjax.kernels` dispatches them), sharding (`llmjax.sharding` maps the logical axes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llmjax import cache as kv
from llmjax.config import LlamaConfig
from llmjax.kernels import allreduce, decode_attention, dispatch, flash_attention, paged_attention, rms_norm
from llmjax.kernels.dispatch import data_axis, free_axes, on_own_heads, per_device, splits_otherwise
from llmjax.kernels.linear import Normed, few_rows_int4, linear
from llmjax.models.rope import apply_rope, rope_tables
from llmjax.quant.weights import QuantScheme, is_quantized, leaf_axes, random_weight
from llmjax.sharding import pipeline

_init = nn.initializers.normal(stddev=0.02)


def _quantized_init(key, shape, dtype, *, scheme: QuantScheme, axes, num_out_dims):
    """A random quantized kernel (`llmjax.quant.random_weight`), each leaf boxed with its logical axes."""
    del dtype  # codes and scales have their own
    qw = random_weight(key, shape, num_out_dims, scheme)
    values, scales = leaf_axes(qw.bits, axes, num_out_dims)
    box = nn.Partitioned
    return dataclasses.replace(qw, values=box(qw.values, values), scales=box(qw.scales, scales),
                               zeros=None if qw.zeros is None else box(qw.zeros, scales))


class Linear(nn.Module):
    """Every projection of the model: one product (`llmjax.kernels.linear`) with a kernel declared with
    its logical axes.

    Kernels are stored output dims first, `[out..., in...]`: Hugging Face's `[out, in]` with heads as
    their own axes, so conversion is a reshape. One-row products (batch-1 decode) read this layout
    5-10% faster than `[in, out]` on the H200 (`benchmarks/gemv_shapes.py`). With a `quant` scheme the
    kernel is a `QuantizedWeight` (packed codes and scales, `llmjax.quant`) instead, unless no int4
    group divides its input width.
    """

    shape: tuple[int, ...]  # the kernel's shape, output dims first
    axes: tuple[str, ...]
    num_out_dims: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32
    quant: QuantScheme | None = None
    mesh: Any = None  # the mesh the kernel is split over (a quantized product, and a row-parallel one that
    # llmjax's NVLink all-reduce sums, run per device: `linear`)
    gather: bool = False  # the LM head: its vocab-split columns gathered through that all-reduce (`linear`)

    @nn.compact
    def __call__(self, x: jax.Array, partials: bool = False) -> jax.Array:
        """`[..., *in] -> [..., *out]`, or `[S, ..., *out]` partial sums with `partials` (see
        `llmjax.kernels.linear`)."""
        width = math.prod(self.shape[self.num_out_dims:])
        if self.quant is None or not self.quant.quantizes(width):
            init = nn.with_logical_partitioning(_init, self.axes)
        else:
            init = functools.partial(_quantized_init, scheme=self.quant, axes=self.axes,
                                     num_out_dims=self.num_out_dims)
        kernel = self.param("kernel", init, self.shape, self.dtype)
        y = linear(x, kernel, self.num_out_dims, len(self.shape) - self.num_out_dims,  # [..., *in] -> [..., *out]
                   mesh=self.mesh, axes=self.axes, partials=partials and not self.use_bias, gather=self.gather)
        if self.use_bias:
            out_shape, out_axes = self.shape[:self.num_out_dims], self.axes[:self.num_out_dims]
            init = nn.with_logical_partitioning(nn.initializers.zeros_init(), out_axes)
            bias = self.param("bias", init, out_shape, self.dtype)
            y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
            return y[None] if partials else y
        return y


class Embed(nn.Module):
    """The embedding table `[vocab, D]`: the lookup, and the tied LM head. On a `mesh` that splits the
    vocabulary, XLA's partitioner places both, or with `LLMJAX_TP_GRAPH=on` (`allreduce.vocab_axis`)
    each device works on its share and llmjax's NVLink all-reduce joins the shares."""

    vocab_size: int
    hidden_size: int
    dtype: Any = jnp.float32
    mesh: Any = None

    def setup(self):
        init = nn.with_logical_partitioning(_init, ("vocab", "embed"))
        self.embedding = self.param("embedding", init, (self.vocab_size, self.hidden_size), self.dtype)

    def _vocab_axis(self, rows: int, width: int) -> str | None:
        table = self.embedding
        return None if self.mesh is None else allreduce.vocab_axis(self.mesh, rows * width * table.dtype.itemsize,
                                                                   table.dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        axis = self._vocab_axis(tokens.size, self.hidden_size)
        if axis is None:
            return jnp.take(self.embedding, tokens, axis=0)

        def local(table, tokens):  # the tokens in this device's share of the vocabulary, zeros for the rest
            index = tokens - jax.lax.axis_index(axis) * table.shape[0]
            inside = (index >= 0) & (index < table.shape[0])
            found = jnp.take(table, jnp.clip(index, 0, table.shape[0] - 1), axis=0)
            return allreduce.psum(jnp.where(inside[..., None], found, 0), axis, self.mesh)

        rows = data_axis(self.mesh, free_axes(self.mesh), tokens.shape[0])
        return per_device(local, self.mesh, (P(axis, None), P(rows, None)), P(rows, None, None))(
            self.embedding, tokens)

    def attend(self, x: jax.Array) -> jax.Array:  # tied LM head: [B, T, D] -> [B, T, V]
        if self._vocab_axis(math.prod(x.shape[:-1]), self.vocab_size) is None:
            return jnp.einsum("btd,vd->btv", x, self.embedding)
        return linear(x, self.embedding, 1, 1, mesh=self.mesh, axes=("vocab", "embed"), gather=True)


class RMSNorm(nn.Module):
    """`llmjax.kernels.rms_norm` (one Pallas kernel on cuda and rocm, its jnp reference elsewhere). On
    a `mesh`, each device normalizes its own rows (`data`), so the kernel never sees a sharded array.
    Given `squares` (parts of each row's sum of squares, `rms_norm.residual_add`'s), it returns a
    `Normed` instead, which the next product applies (inside an int4 kernel of one or two rows)."""

    eps: float
    dtype: Any = jnp.float32
    mesh: Any = None

    @nn.compact
    def __call__(self, x: jax.Array, squares: jax.Array | None = None, residual: jax.Array | None = None):
        """The norm of x; given `residual`, (the norm of x + residual, x + residual) from one kernel
        (`rms_norm.add_apply`)."""
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
        scale = self.param("scale", init, (x.shape[-1],), self.dtype)
        if squares is not None:
            return Normed(x, squares, scale, self.eps)
        if residual is None:
            norm, operands = functools.partial(rms_norm.apply, eps=self.eps), (x, scale)
        else:
            norm, operands = functools.partial(rms_norm.add_apply, eps=self.eps), (x, residual, scale)
        free = free_axes(self.mesh) if self.mesh is not None else ()
        if not free:
            return norm(*operands)
        rows = P(data_axis(self.mesh, free, x.shape[0]))
        out_specs = rows if residual is None else (rows, rows)
        return per_device(norm, self.mesh, (rows,) * (len(operands) - 1) + (P(),), out_specs)(*operands)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array,
              mesh: Any = None) -> jax.Array:
    """Causal grouped-query attention by positions; K/V are not repeated per query group.

    q `[B, T, H, D]`; k, v `[B, S, KV, D]`; q_pos `[B, T]`, k_pos `[B, S]`: key s is visible to query t
    when `k_pos[s] <= q_pos[t]`. Scores and softmax in float32. Positions must count up by one along
    each row, as every caller's do (the cache's slots, a prompt's `arange`): the attention kernels
    work from each row's first query position relative to its first key. One query token per row
    (decode) goes to `llmjax.kernels.decode_attention`, more (prefill, scoring) to
    `llmjax.kernels.flash_attention`; each runs its Pallas kernel on cuda and rocm and its jnp
    reference elsewhere (`LLMJAX_ATTENTION` overrides). On a `mesh`, each device attends over its own
    rows (`data`) and heads (`tensor`), so the kernels never see a sharded array.
    """
    split = _rows_and_heads(mesh, q.shape[0])
    if split is not None:
        heads, rows = split
        return per_device(attention, mesh, (heads, heads, heads, rows, rows), heads)(q, k, v, q_pos, k_pos)
    offsets = q_pos[:, 0] - k_pos[:, 0]  # each row's first query position among its keys
    if q.shape[1] == 1:
        lengths = jnp.clip(offsets + 1, 0, k.shape[1])
        return decode_attention.attend(q[:, 0], k, v, lengths)[:, None]
    return flash_attention.attend(q, k, v, offsets, jnp.full(offsets.shape, k.shape[1], jnp.int32))


def _rows_and_heads(mesh: Any, batch: int) -> tuple[P, P] | None:
    """Where attention on `mesh` runs per device: the specs of a `[B, T, heads, D]` array (rows over
    `data`, heads over `tensor`) and of a `[B, T]` one; None when no free axis splits either."""
    free = free_axes(mesh) if mesh is not None else ()
    if "data" not in free and "tensor" not in free:
        return None
    rows = data_axis(mesh, free, batch)
    return P(rows, None, "tensor" if "tensor" in free else None, None), P(rows, None)


def decode_write_attention(qkv: jax.Array, cache_k: jax.Array, cache_v: jax.Array, positions: jax.Array,
                           mesh: Any = None, rope: tuple | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A decode step over a contiguous cache: each row's one new token, `qkv` `[B, 1, KV, G + 2, D]`
    (its G query heads per kv head, then its key and its value) or that product's K slices
    `[S, B, 1, KV, G + 2, D]` (`Linear(partials=True)`), has its query and key heads rotated by `rope`
    (cos, sin `[B, 1, D]`; None: already rotated), its key and value written into the cache
    `[B, S, KV, D]` at its position (`positions` `[B, 1]`; the cache's slot p holds position p) and
    its queries attend over slots up to it, as `kv.write` and then `attention` would (a position past
    the cache writes nothing; `generate` sizes the cache so that none is), in one kernel
    (`llmjax.kernels.decode_attention.attend_write`, which also adds the slices and rotates) on cuda
    and rocm. Returns (out `[B, 1, KV * G, D]`, cache_k, cache_v). On a `mesh`, per device over its
    rows and kv heads, the slices added and rotated before (`decode_attention.product_qkv`, the
    kernel's arithmetic)."""
    qkv = qkv[:, :, 0] if qkv.ndim == 6 else qkv[:, 0]  # [S, B, KV, G + 2, D] or [B, KV, G + 2, D]
    tables = None if rope is None else tuple(t[:, 0] for t in rope)
    split = _rows_and_heads(mesh, qkv.shape[-4])
    if split is not None:
        heads, rows = split
        qkv = decode_attention.product_qkv(qkv, cache_k.dtype, tables)[:, None]
        return per_device(decode_write_attention, mesh, (P(*heads, None), heads, heads, rows), (heads,) * 3)(
            qkv, cache_k, cache_v, positions)
    out, cache_k, cache_v = decode_attention.attend_write(qkv, cache_k, cache_v, positions[:, 0], tables)
    return out[:, None], cache_k, cache_v


def _paged_decode(q, k_pages, v_pages, tables, lengths, mesh):
    """`paged_attention.attend` on each device's own heads when the pool is split by kv heads over
    `tensor` (as the engine places it), so the kernel never sees a sharded array."""
    heads, pool = P(None, "tensor", None), P(None, None, "tensor", None)
    return on_own_heads(paged_attention.attend, mesh, k_pages.shape[2], (heads, pool, pool, P(), P()), heads)(
        q, k_pages, v_pages, tables, lengths)


def _gathered_chunk(q, k_pages, v_pages, tables, offsets, mesh):
    """The prompt rows' attention where `_gathers` says so (`LLMJAX_PAGED_PREFILL=off`, or a mesh whose
    axes split something other than the pool's kv heads): each row's pages gathered into a contiguous
    copy for `attention` (which places the work by itself). q `[rows, T, H, D]`."""
    keys = paged_attention.gather_pages(k_pages, tables).astype(q.dtype)  # [rows, S, KV, D]
    values = paged_attention.gather_pages(v_pages, tables).astype(q.dtype)
    k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape[:2])
    q_pos = offsets[:, None] + jnp.arange(q.shape[1])[None, :]
    return attention(q, keys, values, q_pos, k_pos, mesh)


def _gathers(mesh, kv_heads: int) -> bool:
    """Whether the engine's prompt rows gather their pages into contiguous copies (on `mesh`, under the
    environment's `LLMJAX_PAGED_PREFILL`) rather than handing the pool to `attend_prefill_rows`."""
    chosen = dispatch.mode("LLMJAX_PAGED_PREFILL", dispatch.SETTINGS["LLMJAX_PAGED_PREFILL"])
    return chosen == "off" or splits_otherwise(mesh, kv_heads)


def paged_chunk_in_place(config: LlamaConfig, dtype, kv_dtype, mesh, device) -> bool:
    """Whether the engine's prompt rows (`paged_step_attention`) read their keys from the pages in place
    through the prefill kernel on `device`; otherwise each row's pages are gathered into a contiguous
    copy and, off the kernels, its float32 scores materialize too (memory the engine sets aside)."""
    return not _gathers(mesh, config.num_kv_heads) and paged_decode_in_place(config, dtype, kv_dtype, device)


def paged_decode_in_place(config: LlamaConfig, dtype, kv_dtype, device) -> bool:
    """Whether the engine's decode rows (`paged_step_attention`) read their pages in place through the
    decode kernel on `device`; otherwise its reference gathers each row's pages into a contiguous copy
    and materializes float32 scores (memory the engine sets aside)."""
    return flash_attention.kernel_runs_for(config.head_dim, dtype, kv_dtype, kv_dtype, device)


def paged_step_attention(q: jax.Array, positions: jax.Array, layer: kv.PagedLayer, mesh: Any = None) -> jax.Array:
    """Attention for the engine's flat step `q` `[1, N, H, D]` (see `cache.PagedBatch`), after the
    step's keys and values are in `layer`'s pages.

    Decode rows (one token each) go through `paged_attention.attend` (on a GPU a kernel that reads only
    each row's valid pages).
    Prefill rows (a piece of a prompt each, its positions counting up from the row's first) go through
    `paged_attention.attend_prefill_rows`: a prompt token sees every earlier token of its sequence,
    whether written by an earlier step or by an earlier row of this one, read from the pages in place;
    the kernel reads the rows' queries from `q` and writes their output at their own positions of its
    result, whose head the decode rows' output then fills (on one device, or per device where `tensor`
    splits the pool's kv heads). Elsewhere (`_gathers`) each row's pages are gathered into a copy.
    """
    batch, rows = layer.batch, layer.batch.rows
    h, d = q.shape[2:]
    out = _paged_decode(q[0, :rows], layer.k, layer.v, batch.tables, batch.lengths, mesh)  # [rows, H, D]
    if batch.chunk_tables is None:
        return out[None]
    chunk_rows = batch.chunk_tables.shape[0]
    offsets = positions[0, rows:].reshape(chunk_rows, -1)[:, 0]
    if _gathers(mesh, layer.k.shape[2]):
        chunk = _gathered_chunk(q[0, rows:].reshape(chunk_rows, -1, h, d), layer.k, layer.v, batch.chunk_tables,
                                offsets, mesh)
        return jnp.concatenate([out, chunk.reshape(-1, h, d)])[None]
    # The prompt rows' queries read and their output written in place in the step's flat array; the
    # decode rows' output then fills its head (where the kernel runs, the prompt rows' queries and
    # output are never copied; the reference, elsewhere, slices and concatenates).
    heads = P(None, "tensor", None)  # q's and the output's second axis, the pool's third
    pool = P(None, None, "tensor", None)
    both = on_own_heads(functools.partial(paged_attention.attend_prefill_rows, first=rows), mesh,
                        layer.k.shape[2], (heads, pool, pool, P(), P()), heads)(
        q[0], layer.k, layer.v, batch.chunk_tables, offsets)
    return both.at[:rows].set(out)[None]


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    quant: QuantScheme | None = None
    mesh: Any = None  # where attention and quantized products run per device, or None

    @nn.compact
    def __call__(self, x, cos, sin, positions, layer_cache, partials: bool = False):
        """-> (o's product, or its K slices `[S, B, T, D]` with `partials`; the layer's cache)."""
        c, bias = self.config, self.config.attention_bias
        d, h, n_kv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        g = h // n_kv  # query heads per kv head
        # q, k and v in one kernel `[kv_heads, g + 2, head_dim, embed]`: for kv head j, its g query
        # heads (HF heads j*g .. j*g+g-1), then its key, then its value. One wide product reads its
        # weights faster than three narrow ones, and sharding over kv_heads keeps each group whole.
        product = Linear((n_kv, g + 2, hd, d), ("kv_heads", "qkv", "head_dim", "embed"), num_out_dims=3,
                         use_bias=bias, dtype=self.dtype, quant=self.quant, mesh=self.mesh, name="qkv")
        o = Linear((d, h, hd), ("embed", "heads", "head_dim"), use_bias=bias,
                   dtype=self.dtype, quant=self.quant, mesh=self.mesh, name="o")
        b, t = (x.x if isinstance(x, Normed) else x).shape[:2]
        paged = isinstance(layer_cache, kv.PagedLayer)
        if t == 1 and layer_cache is not None and not paged:
            # a decode step: the cache write and the attention in one kernel, which on one device also
            # adds up the product's K slices and applies RoPE, so nothing runs between the product and it
            out, *layer_cache = decode_write_attention(product(x, partials=True), *layer_cache, positions,
                                                       self.mesh, (cos, sin))
            return o(out, partials=partials), tuple(layer_cache)
        qkv = product(x)
        if paged:  # the engine's step: a page pool; RoPE and the page writes in one kernel
            q, layer_cache = layer_cache.rope_write(qkv[0], cos[0], sin[0], self.mesh)
            out = paged_step_attention(q[None], positions, layer_cache, self.mesh)
            return o(out, partials=partials), layer_cache
        q = apply_rope(qkv[:, :, :, :g].reshape(b, t, h, hd), cos, sin)
        k = apply_rope(qkv[:, :, :, g], cos, sin)
        v = qkv[:, :, :, g + 1]
        if layer_cache is None:  # scoring a whole sequence: attend within it
            out = attention(q, k, v, positions, positions, self.mesh)
        else:
            keys, values = kv.write(layer_cache[0], k, positions), kv.write(layer_cache[1], v, positions)
            k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape[:2])
            layer_cache = (keys, values)
            out = attention(q, keys, values, positions, k_pos, self.mesh)
        return o(out, partials=partials), layer_cache


class Mlp(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    quant: QuantScheme | None = None
    mesh: Any = None

    @nn.compact
    def __call__(self, x, partials: bool = False):
        d, f, bias = self.config.hidden_size, self.config.intermediate_size, self.config.mlp_bias
        # gate and up in one kernel `[2, mlp, embed]`: on the H200 one 4096x22016 product reads its
        # weights at 3.2 TB/s where two 4096x11008 ones manage 2.0 (benchmarks/gemv_shapes.py).
        gate_up = Linear((2, f, d), ("gate_up", "mlp", "embed"), num_out_dims=2, use_bias=bias,
                         dtype=self.dtype, quant=self.quant, mesh=self.mesh, name="gate_up")(x)
        down = Linear((d, f), ("embed", "mlp"), use_bias=bias, dtype=self.dtype, quant=self.quant,
                      mesh=self.mesh, name="down")
        return down(nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], partials=partials)


class Block(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32
    quant: QuantScheme | None = None
    mesh: Any = None

    @nn.compact
    def __call__(self, x, cos, sin, positions, layer_cache):
        """x: the residual stream `[B, T, D]`, a `Stream` (it and its rows' sums of squares, which the
        previous block leaves for one or two rows of int4 products) or a `Pending` (it and the previous
        block's last product, which this block's first norm adds). Returns (a `Stream` for one or two
        rows of int4 products, else a `Pending`; the layer's cache)."""
        eps, q, mesh = self.config.rms_norm_eps, self.quant, self.mesh
        pending = x.delta if isinstance(x, Pending) else None
        squares = x.squares if isinstance(x, Stream) else None
        x = x.x if isinstance(x, (Stream, Pending)) else x
        # With one or two rows (batch-1 or batch-2 decode) of int4 products on one device, each residual
        # add also writes the new rows' sums of squares (`rms_norm.residual_add`), and the int4 product
        # after each norm normalizes x itself: no norm kernel runs past the first layer's first norm
        # (+2.5% at Llama-2-7B batch 1, BENCHMARKS.md, eighteenth session). LLMJAX_NORM=off turns it off.
        fused = (few_rows_int4(None if q is None else q.bits, x.shape[0] * x.shape[1], mesh)
                 and dispatch.mode("LLMJAX_NORM") != "off")

        def add(x, product):  # x + the product, and (fused) the new rows' sums of squares
            h, sq = rms_norm.add(x.reshape(-1, x.shape[-1]), product.reshape(product.shape[0], -1, x.shape[-1]))
            return h.reshape(x.shape), sq.reshape(*x.shape[:-1], -1)

        def add_norm(norm, x, product, squares):  # (the norm of x + product, x + product, its squares)
            if product is None:  # the first block's first norm; fused, the previous block left squares
                return norm(x, squares), x, squares
            if fused:  # the product after the norm normalizes x itself
                x, squares = add(x, product)
                return norm(x, squares), x, squares
            # Otherwise the residual add is the norm kernel's: one launch that reads x and the product
            # once, where XLA's add and the norm read the sum again.
            return *norm(x, residual=product), None

        with jax.named_scope("attention"):
            normed, x, squares = add_norm(RMSNorm(eps, self.dtype, mesh, name="attn_norm"), x, pending, squares)
            h, layer_cache = Attention(self.config, self.dtype, q, mesh, name="attn")(
                normed, cos, sin, positions, layer_cache, partials=fused)
        with jax.named_scope("mlp"):
            normed, x, squares = add_norm(RMSNorm(eps, self.dtype, mesh, name="mlp_norm"), x, h, squares)
            h = Mlp(self.config, self.dtype, q, mesh, name="mlp")(normed, partials=fused)
        if not fused:  # the next block's first norm (or `_stream`) adds it
            return Pending(x, h), layer_cache
        x, squares = add(x, h)
        return Stream(x, squares), layer_cache


@dataclasses.dataclass(frozen=True)
class Stream:
    """The residual stream between blocks for one or two rows of int4 products: x `[B, T, D]` and the parts of each
    row's sum of squares `[B, T, P]` (`rms_norm.residual_add`), for the next block's first norm."""

    x: jax.Array
    squares: jax.Array


@dataclasses.dataclass(frozen=True)
class Pending:
    """The residual stream between blocks when each residual add is the next norm's (`RMSNorm` with
    `residual`): x `[B, T, D]` and the last product `[B, T, D]`, not yet added to it."""

    x: jax.Array
    delta: jax.Array


def _stream(x) -> jax.Array:
    """The residual stream's array, from a block's output."""
    if isinstance(x, Pending):
        return x.x + x.delta
    return x.x if isinstance(x, Stream) else x


class Blocks(nn.Module):
    """The blocks `layer_{i}` for i in `indices`, applied in order: a pipeline stage's share of the
    model (`llmjax.sharding.pipeline`), and, as `Blocks(config, dtype, (0,))`, the one-layer module
    that `init_layers` initialises each layer with."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    indices: tuple[int, ...] = ()
    quant: QuantScheme | None = None
    # The whole mesh, when a pipeline stage runs these blocks inside its shard_map over stage and data:
    # attention and quantized products then run per device over what is left (tensor).
    mesh: Any = None

    @nn.compact
    def __call__(self, x, positions, cache: kv.KVCache | None = None):
        cos, sin = rope_tables(self.config, positions)
        new_k, new_v = [], []
        for n, i in enumerate(self.indices):
            layer_cache = None if cache is None else (cache.k[n], cache.v[n])
            block = Block(self.config, self.dtype, self.quant, self.mesh, name=f"layer_{i}")
            x, layer_cache = block(x, cos, sin, positions, layer_cache)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        return _stream(x), None if cache is None else kv.KVCache(tuple(new_k), tuple(new_v))


class Llama(nn.Module):
    """`apply({"params": w}, tokens, positions, cache=None, logits_at=None) -> (logits, cache)`.

    tokens, positions `[B, T]` int32. With a `KVCache`, each token's keys and values are written at its
    position and attention reads the cache; with a `cache.PagedView` (the engine's step), they are
    written into pages and attention reads each sequence's pages; without a cache, attention stays
    within `tokens`. `logits_at` `[B]` picks one position per row (the last prompt token), so
    prefill does not compute the LM head over the whole prompt; `[B, M]` picks M positions per row
    (the engine's flat step). Logits are float32.
    On a mesh with pipeline stages the layers are stacked per stage (`w["stages"]`, see
    `llmjax.sharding.pipeline`) and run there; the embedding and the LM head stay here.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32  # the dtype of freshly initialised weights; compute follows the weights
    mesh: Any = None  # the mesh the weights are sharded over (llmjax.sharding), or None
    quant: QuantScheme | None = None  # how the projections are quantized (llmjax.quant), or None
    # The LLMJAX_* environment the model is traced under (`dispatch.trace_settings()`, which the
    # callers fill in): jitted functions take the model as a static argument, so a program traced
    # under other kernel settings is never reused. The module itself never reads it.
    settings: tuple = ()

    @nn.compact
    def __call__(self, tokens, positions, cache: kv.KVCache | None = None, logits_at=None, with_head=True):
        """`(float32 logits, cache)`; with `with_head=False`, `(final-normed hidden states [B, T, D],
        cache)`, which `project` turns into logits a slice at a time."""
        embed = Embed(self.config.embedding_rows, self.config.hidden_size, self.dtype, self.mesh, name="embed")
        x = embed(tokens)
        with float_products(x.dtype):
            return self._layers_and_head(embed, x, positions, cache, logits_at, with_head)

    def _layers_and_head(self, embed, x, positions, cache, logits_at, with_head):
        c = self.config
        if pipeline.stages(self.mesh) > 1:
            if self.is_initializing():
                raise ValueError("initialise the model without a mesh; llmjax.init_random(mesh=...) "
                                 "places the weights on one")
            x, new_cache = pipeline.forward(self.mesh, stage_fn(c, self.dtype, self.mesh, self.quant),
                                            self.variables["params"]["stages"], x, positions, cache)
        else:
            cos, sin = rope_tables(c, positions)
            layers = []
            for i in range(c.num_layers):
                layer_cache = None if cache is None else cache.layer(i)
                block = Block(c, self.dtype, self.quant, self.mesh, name=f"layer_{i}")
                x, layer_cache = block(x, cos, sin, positions, layer_cache)
                layers.append(layer_cache)
            new_cache = None if cache is None else cache.with_layers(layers)
        final_norm = RMSNorm(c.rms_norm_eps, self.dtype, self.mesh, name="final_norm")
        x = final_norm(x.x, residual=x.delta)[0] if isinstance(x, Pending) else final_norm(_stream(x))
        if logits_at is not None:
            picks = logits_at if logits_at.ndim == 2 else logits_at[:, None]  # [B, M]
            x = jnp.take_along_axis(x, picks[:, :, None], axis=1)  # [B, M, D]
        if not with_head:
            return x, new_cache
        with jax.named_scope("lm_head"):
            if c.tie_word_embeddings:
                logits = embed.attend(x)
            else:
                logits = _lm_head(c, self.dtype, "lm_head", self.quant, self.mesh)(x)
        return _true_vocab(c, logits), new_cache


def _lm_head(config: LlamaConfig, dtype=jnp.float32, name=None, quant: QuantScheme | None = None,
             mesh: Any = None) -> Linear:
    head_quant = quant if quant is not None and quant.lm_head else None
    return Linear((config.embedding_rows, config.hidden_size), ("vocab", "embed"), dtype=dtype, quant=head_quant,
                  mesh=mesh, gather=True, name=name)


def _true_vocab(config: LlamaConfig, logits: jax.Array) -> jax.Array:
    """float32 logits over the true vocabulary: rows added to split the vocabulary evenly over a
    tensor-parallel mesh have none."""
    return logits[..., :config.vocab_size].astype(jnp.float32)


def stage_fn(config: LlamaConfig, dtype, mesh, quant: QuantScheme | None = None):
    """`(weights, x, positions, cache) -> (x, cache)`: one pipeline stage's blocks, given that stage's
    weights `{"layer_j": ...}` and cache, as `llmjax.sharding.pipeline` calls them."""
    stage = Blocks(config, dtype, tuple(range(pipeline.layers_per_stage(config, pipeline.stages(mesh)))), quant,
                   mesh)

    def apply(weights, x, positions, cache):
        with float_products(x.dtype):  # (the pipelined decode calls stages outside `Llama`)
            return stage.apply({"params": weights}, x, positions, cache)
    return apply


def float_products(dtype):
    """The context a model of `dtype` runs its products under. A GPU's float32 products default to
    TensorFloat-32 (10-bit mantissas), but a float32 model is there to be exact: it asks for full
    float32, unless the caller has chosen a precision (`jax.default_matmul_precision`). Other dtypes
    run as they are."""
    if jnp.dtype(dtype) == jnp.float32 and jax.config.jax_default_matmul_precision is None:
        return jax.default_matmul_precision("highest")
    return contextlib.nullcontext()


def embed(config: LlamaConfig, weights: dict, tokens: jax.Array) -> jax.Array:
    """The embedding of `tokens` `[B, T]` -> `[B, T, D]`, as `Llama` computes it."""
    return Embed(config.embedding_rows, config.hidden_size).apply({"params": weights["embed"]}, tokens)


def head(config: LlamaConfig, weights: dict, x: jax.Array, mesh: Any = None,
         quant: QuantScheme | None = None) -> jax.Array:
    """The final norm and LM head on hidden states `[B, T, D]` -> float32 logits `[B, T, vocab]`, as
    `Llama` computes them (the pipelined decode applies them to each microbatch leaving the last stage,
    on the model's `mesh`, with its `quant` scheme: a quantized LM head stays quantized)."""
    x = RMSNorm(config.rms_norm_eps, mesh=mesh).apply({"params": weights["final_norm"]}, x)
    return project(config, weights, x, mesh, quant)


def project(config: LlamaConfig, weights: dict, x: jax.Array, mesh: Any = None,
            quant: QuantScheme | None = None) -> jax.Array:
    """The LM head alone, on final-normed hidden states `[B, T, D]` -> float32 logits `[B, T, vocab]`."""
    with jax.named_scope("lm_head"), float_products(x.dtype):
        if config.tie_word_embeddings:
            logits = Embed(config.embedding_rows, config.hidden_size).apply(
                {"params": weights["embed"]}, x, method=Embed.attend)
        else:
            logits = _lm_head(config, quant=quant, mesh=mesh).apply({"params": weights["lm_head"]}, x)
    return _true_vocab(config, logits)


def _init_args():
    ids = jnp.zeros((1, 1), jnp.int32)
    return ids, ids


def abstract_params(config: LlamaConfig, dtype=jnp.bfloat16, quant: QuantScheme | None = None) -> dict:
    """The weights' shapes and dtypes (`jax.ShapeDtypeStruct`), with no memory allocated; with `quant`,
    the quantized kernels as `QuantizedWeight`s of them."""
    boxed = jax.eval_shape(Llama(config, dtype, quant=quant).init, jax.random.key(0), *_init_args())["params"]
    return nn.meta.unbox(boxed)


def logical_axes(config: LlamaConfig, quant: QuantScheme | None = None) -> dict:
    """A `PartitionSpec` of logical axis names for every weight, from the declarations above."""
    boxed = jax.eval_shape(Llama(config, quant=quant).init, jax.random.key(0), *_init_args())["params"]
    return nn.get_partition_spec(boxed)


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.bfloat16, shardings=None,
                quant: QuantScheme | None = None, fit=None) -> dict:
    """Random weights (normal, std 0.02; norms one; quantized kernels random codes of about that
    spread): for tests and benchmarks. With `shardings` (a tree like the weights'), each weight is
    made in place on its devices. The embedding, final norm and head come from `key`; layer i from
    `layer_key(key, i)` through one compiled program shared by every layer (`init_layers`), so an
    80-layer model compiles one layer's init rather than 80 (a whole-model init took 80-106 s to
    make a 70B model on an H200, nearly all of it compiling). `fit(name, group)`, if given, rewrites
    each group of weights as it is made (a mesh's, `llmjax.sharding.rules.fit_group`)."""
    layer_sharding = None if shardings is None else shardings["layer_0"]  # every layer's is alike
    outer = None if shardings is None else {n: s for n, s in shardings.items() if not n.startswith("layer_")}
    return {**init_outer(config, key, dtype, outer, quant, fit),
            **init_layers(config, key, range(config.num_layers), dtype, layer_sharding, quant, fit)}


def init_outer(config: LlamaConfig, key: jax.Array, dtype=jnp.bfloat16, shardings=None,
               quant: QuantScheme | None = None, fit=None) -> dict:
    """The weights outside the layers (embedding, final norm, head), as `init_params` makes them."""
    one_layer = dataclasses.replace(config, num_layers=1)

    def init(key):  # the one layer is left out of the result, so XLA never makes it
        weights = nn.meta.unbox(Llama(one_layer, dtype, quant=quant).init(key, *_init_args())["params"])
        return {name: fit(name, w) if fit else w for name, w in weights.items() if not name.startswith("layer_")}
    return jax.jit(init, out_shardings=shardings)(key)


def layer_key(key: jax.Array, index: int) -> jax.Array:
    """The key layer `index`'s random weights come from, under `init_params`' `key`."""
    return jax.random.fold_in(key, index)


def layer_init(config: LlamaConfig, dtype=jnp.bfloat16, quant: QuantScheme | None = None, fit=None):
    """`key -> one layer's weights`, the same function (so one compilation) for every layer (`fit` as
    `init_params`')."""
    def init(key):
        x, positions = jnp.zeros((1, 1, config.hidden_size), dtype), jnp.zeros((1, 1), jnp.int32)
        layer = nn.meta.unbox(Blocks(config, dtype, (0,), quant).init(key, x, positions)["params"])["layer_0"]
        return fit("layer_0", layer) if fit else layer
    return init


def init_layers(config: LlamaConfig, key: jax.Array, indices, dtype=jnp.bfloat16, sharding=None,
                quant: QuantScheme | None = None, fit=None) -> dict:
    """`{"layer_i": weights}` for i in `indices`, the values `init_params` gives those layers, each
    placed by `sharding` (one layer's shardings)."""
    init = jax.jit(layer_init(config, dtype, quant, fit), out_shardings=sharding)
    return {f"layer_{i}": init(layer_key(key, i)) for i in indices}


def count_params(tree) -> int:
    """Weights in a tree; a quantized kernel counts the weights it stands for, not its packed words."""
    leaves = jax.tree.leaves(tree, is_leaf=is_quantized)
    return sum(x.num_weights if is_quantized(x) else int(x.size) for x in leaves)
