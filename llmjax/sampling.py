"""Choosing the next token: greedy, temperature, top-k, top-p (nucleus) and min-p; batched and seeded.

`Sampling` holds the knobs a caller gives and validates them on the host, where a bad value can be
named. Inside jit, the knobs are per-row arrays (so rows of one batch may differ, as the engine
needs), and two static flags keep work off the hot path: greedy decoding never draws random numbers,
and without top-k/top-p/min-p nothing sorts the vocabulary. The filters apply in the order
transformers applies them: temperature, then top-k, then top-p on what top-k kept, then min-p.
Each row draws from its own key, so a row's tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {t!r}")
        k = self.top_k
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {k!r}")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {p!r}")
        m = self.min_p
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 <= m <= 1):
            raise ValueError(f"min_p must be None or a number in [0, 1], got {m!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filters(self) -> bool:
        return not self.greedy and any(x is not None for x in (self.top_k, self.top_p, self.min_p))

    def arrays(self, batch: int) -> dict[str, jax.Array]:
        """The knobs as `[batch]` arrays; 0 disables top-k, 1 top-p, 0 min-p."""
        full = lambda v, dtype: jnp.full((batch,), v, dtype)  # noqa: E731
        return {"temperature": full(self.temperature, jnp.float32),
                "top_k": full(self.top_k or 0, jnp.int32),
                "top_p": full(1.0 if self.top_p is None else self.top_p, jnp.float32),
                "min_p": full(self.min_p or 0.0, jnp.float32)}


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array) -> jax.Array:
    """Masks `[B, V]` (temperature-scaled) logits to -inf outside top-k, top-p and min-p."""
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    vocab = logits.shape[-1]
    ordered = -jnp.sort(-logits, axis=-1)  # [B, V], descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [B, 1]
    logits = jnp.where(logits < kth, neg_inf, logits)
    ordered = jnp.where(jnp.arange(vocab)[None, :] < k[:, None], ordered, neg_inf)
    # Keep the smallest prefix whose probability reaches top_p: a token stays when the mass before it
    # is below top_p.
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.sum(mass_before < top_p[:, None], axis=-1)  # >= 1
    threshold = jnp.take_along_axis(ordered, (kept - 1)[:, None], axis=-1)
    logits = jnp.where(logits < threshold, neg_inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.where(probs < min_p[:, None] * probs.max(axis=-1, keepdims=True), neg_inf, logits)


def sample(logits: jax.Array, keys: jax.Array, knobs: dict[str, jax.Array], *, greedy: bool,
           filters: bool) -> jax.Array:
    """Next tokens `[B]` int32 from float32 logits `[B, V]`; `keys` `[B]` one key per row."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    temperature = knobs["temperature"]
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    if filters:
        scaled = filter_logits(scaled, knobs["top_k"], knobs["top_p"], knobs["min_p"])
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, best)
