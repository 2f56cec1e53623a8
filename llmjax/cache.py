"""The KV cache: preallocated, per layer, passed into the model and returned (and donated by callers).

Layout per layer: keys and values `[B, S, KV, head_dim]`, one array each, so the unrolled layer loop
touches each layer's cache without slicing a stacked array. A sequence's token at position p is
written at slot p; attention sees slots `<= p` of its own row. Slots past a row's last token hold
padding or stale values and are never attended to, which is what lets ragged prompts share a batch
(right-padded, each row with its own positions). A paged cache for continuous batching lives with
the engine.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from llmjax.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, S, KV, head_dim]
    v: tuple[jax.Array, ...]

    @classmethod
    def zeros(cls, config: LlamaConfig, batch: int, length: int, dtype) -> "KVCache":
        shape = (batch, length, config.num_kv_heads, config.head_dim)
        layers = range(config.num_layers)
        return cls(tuple(jnp.zeros(shape, dtype) for _ in layers),
                   tuple(jnp.zeros(shape, dtype) for _ in layers))

    @property
    def length(self) -> int:
        return self.k[0].shape[1]


def write(cache: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Writes `new` `[B, T, KV, D]` into `cache` `[B, S, KV, D]` at slots `positions` `[B, T]`.

    Positions at or past S are dropped: they belong to padding of a prompt bucket longer than needed.
    """
    rows = jnp.arange(cache.shape[0])[:, None]
    return cache.at[rows, positions].set(new.astype(cache.dtype), mode="drop")
