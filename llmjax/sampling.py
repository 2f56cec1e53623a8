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
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.sharding.mesh import is_integer


def scalar(value):
    """The number a 0-d array holds (numpy's, jax's, torch's: `np.array(4)`, a `jnp.sum`), as a numpy
    scalar, so it passes the checks a plain number passes; anything else unchanged."""
    if isinstance(value, (numbers.Number, str)) or getattr(value, "ndim", None) != 0:
        return value
    return np.asarray(value)[()] if hasattr(value, "__array__") else value


def check_seed(seed) -> None:
    seed = scalar(seed)
    if not is_integer(seed) or not -2**63 <= seed < 2**63:
        raise ValueError(f"seed must be a signed 64-bit integer, in [-2**63, 2**63), got {seed!r}")


def seed_key(seed: int) -> jax.Array:
    """The random key of a 64-bit seed. `jax.random.key` keeps only a seed's low 32 bits (without
    jax_enable_x64), so 0 and 2**32 would draw alike: the high 32 bits (two's complement), where
    not 0, are folded in. A seed in [0, 2**32) keeps its plain key. One compiled call for every
    seed (as eager operations on a GPU, ~0.3 ms)."""
    return _words_key(*seed_words(seed))


def seed_words(seed: int) -> tuple[np.uint32, np.uint32]:
    """A 64-bit seed's low and high 32-bit words (two's complement), `words_key`'s arguments."""
    seed = int(seed)
    return np.uint32(seed & 0xFFFFFFFF), np.uint32((seed >> 32) & 0xFFFFFFFF)


def words_key(low, high) -> jax.Array:
    """`seed_key` of a seed's two words, traceable: a compiled caller builds the key inside its own
    program (the engine folds a request's index in with it)."""
    key = jax.random.key(low)
    folded = jax.random.key_data(jax.random.fold_in(key, high))
    return jax.random.wrap_key_data(jnp.where(high != 0, folded, jax.random.key_data(key)))


_words_key = jax.jit(words_key)


# Far above this, sampling is uniform in all but name; near float32's largest values (~1e38), logits
# divided by the temperature underflow (to 0 where the device flushes denormals), so tokens of
# different logits tie and top-k keeps them all. The cap refuses the whole useless range.
MAX_TEMPERATURE = 1e6


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self):
        t, k, p, m = (scalar(x) for x in (self.temperature, self.top_k, self.top_p, self.min_p))
        if not _is_real(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 means greedy; larger "
                             f"ones sample uniformly in all but name), got {t!r}")
        if k is not None and (not is_integer(k) or k < 1):
            raise ValueError(f"top_k must be None or an integer >= 1, got {k!r}")
        if p is not None and (not _is_real(p) or not 0 < p <= 1):
            raise ValueError(f"top_p must be None or a number in (0, 1], got {p!r}")
        if m is not None and (not _is_real(m) or not 0 <= m <= 1):
            raise ValueError(f"min_p must be None or a number in [0, 1], got {m!r}")
        # numpy scalars become Python numbers, so equal knobs hash and compare equal.
        object.__setattr__(self, "temperature", float(t))
        # top_k past the vocabulary keeps it all; past int32 (the knobs' arrays) it would wrap
        object.__setattr__(self, "top_k", None if k is None else min(int(k), 2**31 - 1))
        object.__setattr__(self, "top_p", None if p is None else float(p))
        object.__setattr__(self, "min_p", None if m is None else float(m))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def top_p_cut(self) -> float:
        """Top-p's threshold, the mass the tokens after the kept prefix may hold: 1 - top_p in float64,
        rounded to float32 where the comparison happens, as transformers computes it (float32's
        1 - float32(top_p) differs in the last bits: 0.1000000238 for 0.9, not 0.1000000015, and a
        tail between the two was cut here and kept there). 0 keeps every token."""
        return 0.0 if self.top_p is None else 1 - self.top_p

    @property
    def filters(self) -> bool:
        return not self.greedy and any(x is not None for x in (self.top_k, self.top_p, self.min_p))

    def arrays(self, batch: int) -> dict[str, jax.Array]:
        """The knobs as `[batch]` arrays; 0 disables top-k, top-p (its cut) and min-p."""
        full = lambda v, dtype: jnp.full((batch,), v, dtype)  # noqa: E731
        return {"temperature": full(self.temperature, jnp.float32),
                "top_k": full(self.top_k or 0, jnp.int32),
                "top_p_cut": full(self.top_p_cut, jnp.float32),
                "min_p": full(self.min_p or 0.0, jnp.float32)}


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def filter_logits(logits: jax.Array, top_k: jax.Array, top_p_cut: jax.Array, min_p: jax.Array) -> jax.Array:
    """Masks `[B, V]` (temperature-scaled) logits to -inf outside top-k, top-p (`Sampling.top_p_cut`)
    and min-p.

    As in transformers, top-k keeps every token tied with the k-th, while top-p cuts by rank in the
    sorted order: tokens tied at its cut-off are kept only as far as the prefix reaches top_p (as
    many as transformers keeps; which of them is the sort's choice: here the lower ids, in
    transformers whatever torch's unstable sort leaves last).
    """
    neg_inf = jnp.array(-jnp.inf, logits.dtype)
    batch, vocab = logits.shape
    order = jnp.argsort(-logits, axis=-1)  # [B, V], stable, descending
    ordered = jnp.take_along_axis(logits, order, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = jnp.take_along_axis(ordered, (k - 1)[:, None], axis=-1)  # [B, 1]
    ordered = jnp.where(ordered < kth, neg_inf, ordered)
    # Keep the smallest prefix whose probability reaches top_p: a token stays when the mass from it to
    # the end of the order exceeds the cut, 1 - top_p, summed from the smallest up (as transformers
    # sums, and exact in the tail that a top_p near 1 cuts). A cut of 0 (top_p = 1) keeps everything.
    probs = jax.nn.softmax(ordered, axis=-1)
    tail = jnp.flip(jnp.cumsum(jnp.flip(probs, axis=-1), axis=-1), axis=-1)
    keep_sorted = (tail > top_p_cut[:, None]) | (top_p_cut[:, None] <= 0)
    keep_sorted = keep_sorted.at[:, 0].set(True) & jnp.isfinite(ordered)
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(batch)[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, neg_inf)
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
        scaled = filter_logits(scaled, knobs["top_k"], knobs["top_p_cut"], knobs["min_p"])
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, best)
