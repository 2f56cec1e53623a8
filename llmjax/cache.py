"""The KV cache: preallocated, per layer, passed into the model and returned (and donated by callers).

Two kinds, both one array of keys and one of values per layer (so the unrolled layer loop touches each
layer's cache without slicing a stacked array), and both handed to the model layer by layer through
`layer(i)` and gathered back with `with_layers`:

- `KVCache`, contiguous, for `generate`: `[B, S, KV, head_dim]` per layer. A sequence's token at
  position p is written at slot p; attention sees slots `<= p` of its own row. Slots past a row's
  last token hold padding or stale values and are never attended to, which is what lets ragged
  prompts share a batch (right-padded, each row with its own positions).
- `PagedKVCache`, a pool of fixed-size pages for the engine (`llmjax.engine`): `[num_pages,
  page_size, KV, head_dim]` per layer, shared by every sequence. A sequence owns a list of pages (its
  block table); its token at position p lives in page `table[p // page_size]` at offset
  `p % page_size`. Memory is taken a page at a time as a sequence grows and returned whole when it
  ends, so sequences of any length share one pool without reserving their maximum length.
  `PagedView` pairs the pool with a `PagedBatch`, which says where this step's tokens are written
  and what each one attends to.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llmjax.config import LlamaConfig
from llmjax.kernels import page_write
from llmjax.kernels.dispatch import on_own_heads, splits_otherwise


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S, KV, head_dim]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, length: int, dtype) -> "KVCache":
        return cls(*_zeros_per_layer(config, (batch, length), dtype))

    @property
    def length(self) -> int:
        return self.k[0].shape[1]

    def layer(self, i: int) -> tuple[jax.Array, jax.Array]:
        return self.k[i], self.v[i]

    def with_layers(self, layers: list[tuple[jax.Array, jax.Array]]) -> "KVCache":
        return KVCache(tuple(k for k, _ in layers), tuple(v for _, v in layers))


def _zeros_per_layer(config: LlamaConfig, lead: tuple[int, int], dtype):
    """Zero keys and values `[*lead, KV, head_dim]` for every layer: the contiguous cache's
    (batch, length) and the page pool's (pages, page size) alike."""
    shape = (*lead, config.num_kv_heads, config.head_dim)
    layers = range(config.num_layers)
    return tuple(jnp.zeros(shape, dtype) for _ in layers), tuple(jnp.zeros(shape, dtype) for _ in layers)


def write(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Writes `new` `[B, T, KV, D]` into `cache` `[B, S, KV, D]` at slots `positions` `[B, T]`.

    Positions at or past S are dropped: they belong to padding of a prompt bucket longer than needed.
    A decode step (one token a row) does not come here: the model's decode attention kernel writes
    its key and value itself (`llmjax.kernels.decode_attention.decode_attention_write`).
    """
    rows = jnp.arange(cache.shape[0])[:, None]
    return cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop")


# ---------------------------------------------------------------- paged


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    """The page pool: per layer, keys and values `[num_pages, page_size, KV, head_dim]`."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: LlamaConfig, num_pages: int, page_size: int, dtype) -> "PagedKVCache":
        return cls(*_zeros_per_layer(config, (num_pages, page_size), dtype))

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """Where one step's tokens go. The step's N tokens are one flat row `[1, N]`: first one token for
    each of `rows` decode rows, then `chunk_rows x chunk_len` prefill tokens (pieces of prompts, one
    piece per chunk row, padded at the end). Every count is a static shape.

    slots `[N]`: the flat pool slot (page * page_size + offset) each token's keys and values are
    written to; the pool's size or more means "write nothing" (idle rows, padding).
    tables `[rows, max_pages]`, lengths `[rows]`: each decode row's pages and its valid tokens,
    the current one included (0 for an idle row), as `paged_attention` takes them.
    chunk_tables `[chunk_rows, max_pages]` or None: the pages of the sequence each prefill row
    belongs to; a prefill token at position p attends to that sequence's tokens at positions <= p.
    """

    slots: jax.Array
    tables: jax.Array
    lengths: jax.Array
    chunk_tables: jax.Array | None = None

    @property
    def rows(self) -> int:
        return self.tables.shape[0]


@dataclasses.dataclass(frozen=True)
class PagedLayer:
    """One layer's pages and the step's layout, as the attention module receives them."""

    k: jax.Array  # [num_pages, page_size, KV, D]
    v: jax.Array
    batch: PagedBatch

    def rope_write(self, qkv: jax.Array, cos: jax.Array, sin: jax.Array, mesh=None) -> tuple[jax.Array, "PagedLayer"]:
        """From the step's q/k/v product `[N, KV, G + 2, D]` and RoPE tables cos, sin `[N, D]`: its
        query and key heads rotated, its keys and values written into their slots. Returns (the
        rotated queries `[N, KV * G, D]`, the layer). `llmjax.kernels.page_write.apply`: one
        kernel on cuda and rocm. On a `mesh` whose `tensor` axis splits the pool's kv heads (as the
        engine places it), each device writes its own heads."""
        q, k, v = _rope_write(qkv, self.k, self.v, cos, sin, self.batch.slots, mesh)
        return q, PagedLayer(k, v, self.batch)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedView:
    """What the model takes as `cache` for a paged step: the pool and this step's layout."""

    pool: PagedKVCache
    batch: PagedBatch

    def layer(self, i: int) -> PagedLayer:
        return PagedLayer(self.pool.k[i], self.pool.v[i], self.batch)

    def with_layers(self, layers: list[PagedLayer]) -> "PagedView":
        return PagedView(PagedKVCache(tuple(x.k for x in layers), tuple(x.v for x in layers)), self.batch)


def page_slots(tables: jax.Array, positions: jax.Array, valid: jax.Array, page_size: int,
               num_pages: int) -> jax.Array:
    """Flat pool slots `[B, T]` of the tokens at `positions` `[B, T]` of the sequences whose pages are
    `tables` `[B, max_pages]`; past the pool's end (nothing written) where `valid` `[B, T]` is False."""
    index = jnp.clip(positions // page_size, 0, tables.shape[1] - 1)
    pages = jnp.take_along_axis(tables, index, axis=1)
    return jnp.where(valid, pages * page_size + positions % page_size, num_pages * page_size)


def _rope_write(qkv, k_pages, v_pages, cos, sin, slots, mesh):
    """`page_write.apply` where no mesh axis splits anything; on a mesh, per device when `tensor` splits
    the pool's kv heads (the engine's placement), else the reference (which GSPMD partitions)."""
    if splits_otherwise(mesh, k_pages.shape[2]):
        return page_write.rope_write_reference(qkv, k_pages, v_pages, cos, sin, slots)
    pool, heads = P(None, None, "tensor", None), P(None, "tensor", None)
    return on_own_heads(page_write.apply, mesh, k_pages.shape[2],
                        (P(None, "tensor", None, None), pool, pool, P(), P(), P()), (heads, pool, pool))(
        qkv, k_pages, v_pages, cos, sin, slots)
