"""Rotary position embeddings in the Hugging Face layout (rotate-half), with Llama 3.1, linear and YaRN scaling.

Checkpoints converted from Hugging Face already carry q/k projections permuted for the rotate-half
convention, so this module does not implement Meta's interleaved one.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from llmjax.config import LlamaConfig


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """`[head_dim // 2]` float32 inverse frequencies, scaled as the config says."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    if scaling.rope_type == "linear":
        return (inv_freq / scaling.factor).astype(np.float32)
    if scaling.rope_type == "yarn":
        return _yarn_scaled(inv_freq, dim, config.rope_theta, scaling).astype(np.float32)
    return _llama3_scaled(inv_freq, scaling).astype(np.float32)


def _yarn_scaled(inv_freq: np.ndarray, dim: int, base: float, s) -> np.ndarray:
    # The dimension index at which a frequency turns `rotations` times over the original context
    def index(rotations: float) -> float:
        return dim * math.log(s.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = index(s.beta_fast), index(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    # 0 below `low` (fast rotations: kept), 1 above `high` (slow ones: divided by the factor)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    return inv_freq / s.factor * ramp + inv_freq * (1 - ramp)


def _llama3_scaled(inv_freq: np.ndarray, s) -> np.ndarray:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    old_len = s.original_max_position_embeddings
    low_freq_wavelen = old_len / s.low_freq_factor
    high_freq_wavelen = old_len / s.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    smooth = (old_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def rope_tables(config: LlamaConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin, each `[B, T, head_dim]` float32, for integer positions `[B, T]`."""
    inv_freq = jnp.asarray(inverse_frequencies(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]  # [B, T, head_dim/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    scaling = config.rope_scaling
    if scaling is not None and scaling.rope_type == "yarn" and scaling.attention_factor != 1:
        return jnp.cos(emb) * scaling.attention_factor, jnp.sin(emb) * scaling.attention_factor
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates `x` `[B, T, N, head_dim]` by the tables `[B, T, head_dim]` (rounded to x's dtype, as
    the model holds them) in float32, and rounds the result once to x's dtype. The kernels that rotate
    (the decode step's, the engine's page writes) do the same, so a bfloat16 key is the same whichever
    path wrote it; a bfloat16 rotation rounded after each operation gave keys one bfloat16 step apart,
    and a prompt's tokens then differed between `generate` and the engine."""
    half = x.shape[-1] // 2
    x32 = x.astype(jnp.float32)
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    cos, sin = (t[:, :, None, :].astype(x.dtype).astype(jnp.float32) for t in (cos, sin))
    return (x32 * cos + rotated * sin).astype(x.dtype)
