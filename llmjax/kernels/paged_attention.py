"""Decode attention over a paged KV cache: one query token per row against that row's pages.

The pool holds one layer's keys and values in fixed-size pages, `[num_pages, page_size, KV, D]`; row
b's tokens live in pages `block_tables[b, 0]`, `block_tables[b, 1]`, ... in order, so token p sits at
page `block_tables[b, p // page_size]`, offset `p % page_size`. `lengths[b]` counts the row's valid
tokens including the current one; a row of length 0 is empty and gets zeros.

This file holds the definition (`paged_attention_reference`, pure jnp) and the entry point the engine
calls (`paged_attention`); the Pallas kernel that reads only a row's valid pages replaces the entry
point's body, keeping this interface.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def paged_attention_reference(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array,
                              block_tables: jax.Array, lengths: jax.Array) -> jax.Array:
    """Attention of q `[B, H, D]` over each row's first `lengths[b]` tokens of its pages.

    k_pages, v_pages `[num_pages, page_size, KV, D]`; block_tables `[B, max_pages]` int32 (entries
    past a row's pages may hold any page id); lengths `[B]` int32. Grouped-query: query head h reads
    kv head `h // (H // KV)`, without repeating K/V. Scores scaled by 1/sqrt(D), softmax in float32.
    Returns `[B, H, D]` in q's dtype; rows of length 0 are zeros.
    """
    b, h, d = q.shape
    n_kv = k_pages.shape[2]
    keys = k_pages[block_tables].reshape(b, -1, n_kv, d)  # [B, S, KV, D], S = max_pages * page_size
    values = v_pages[block_tables].reshape(b, -1, n_kv, d)
    q = q.reshape(b, n_kv, h // n_kv, d)
    scores = jnp.einsum("bkgd,bskd->bkgs", q, keys, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    visible = jnp.arange(keys.shape[1])[None, :] < lengths[:, None]  # [B, S]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    out = jnp.einsum("bkgs,bskd->bkgd", probs, values).reshape(b, h, d)
    return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                    lengths: jax.Array) -> jax.Array:
    """What the engine's decode rows call; see `paged_attention_reference` for the contract."""
    return paged_attention_reference(q, k_pages, v_pages, block_tables, lengths)
