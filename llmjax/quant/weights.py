"""Quantized weights as data: the `QuantizedWeight` pytree, the schemes, and paired quantize/dequantize.

A projection kernel `[*out, *in]` (llmjax stores every projection output dims first) is quantized along
its flattened input width K, row by row:

- **int4, group-wise** (`int4-g32|g64|g128`): each row is cut into groups of `group_size` consecutive
  inputs; each group gets one bf16 scale (and, asymmetric, one integer zero point stored as bf16).
  Codes are 0..15: symmetric `round(w / s) + 8` (0 stays exact), asymmetric `round(w / s) + z`; a
  weight is `(code - 8) * s` or `(code - z) * s`. The scale is searched per group (`quantize_int4`).
- **int8, per channel** (`int8`): one bf16 scale per output row, codes `round(w / s)` in -127..127
  with `s = max|w| / 127`; a weight is `code * s`.

The int4 packing, chosen for the decode kernel (`llmjax.kernels.int4_matmul`): eight codes per uint32
word along K, interleaved within each group. A group of G inputs is W = G / 8 words, and input
`j * W + i` of the group is nibble j (bits 4j..4j+3) of word i. So (1) one row's group is W
contiguous words, read with wide loads, and one scale applies to all eight codes of a word; (2) the
inputs that meet nibble j of a group's words are a contiguous run of x, `x[g*G + j*W : g*G + (j+1)*W]`,
so the kernel reads x straight from memory with no transposed copy; (3) a nibble stays where it is in
its word and becomes a float by OR-ing it into a float's mantissa (no shift, no int->float convert;
see the kernel). Packing along the input axis keeps the output axes untouched, so a packed weight keeps
its kernel's output axes and sharding; the input axes collapse into one packed axis (a row-parallel
split of o or down is a split of that axis at group boundaries).

A weight whose input width the chosen group does not divide takes the largest of 64 and 32 that does
(`QuantScheme.group_for`): the bundled demo model's down projection (width 672) gets group 32 under
`int4-g128`. A weight whose width not even 32 divides stays in floating point (`QuantScheme.quantizes`;
no Llama release has one, test presets do).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.sharding.mesh import is_integer

GROUP_SIZES = (128, 64, 32)
NIBBLES = 8  # int4 codes per uint32 word
SCALE_DTYPE = jnp.bfloat16
# Standard deviation of a code minus its centre, for codes drawn uniformly (random weights): int4 codes
# 0..15 around 8, int8 codes -127..127 around 0.
_INT4_CODE_STD = math.sqrt(((np.arange(16) - 8.0) ** 2).mean())
_INT8_CODE_STD = math.sqrt((np.arange(-127, 128) ** 2.0).mean())
# The symmetric scales quantize_int4 tries per group: max|w| / divisor.
_SYMMETRIC_DIVISORS = (6.0, 6.5, 7.0, 7.5, 8.0)


@dataclasses.dataclass(frozen=True)
class QuantScheme:
    """How a checkpoint's projections are quantized; `parse("int4-g128")` and `.name` convert to and
    from the names the CLI takes. `lm_head` also quantizes an untied LM head (the embedding table
    always stays in floating point: decode reads one row of it per token)."""

    bits: int
    group_size: int | None = None  # int4: 32, 64 or 128; int8: None (one scale per output row)
    symmetric: bool = True
    lm_head: bool = False

    def __post_init__(self):
        # exact types: 4.0 or 128.0 would pass the comparisons below and fail later (a float group in a
        # reshape, a name "int4-g128.0"), and "no" would read as True. numpy's integers and bools become
        # Python's, as a manifest's JSON needs them.
        for name in ("bits", "group_size"):
            value = getattr(self, name)
            if value is not None and not is_integer(value):
                raise ValueError(f"{name} must be an int, got {value!r}")
            object.__setattr__(self, name, None if value is None else int(value))
        for name in ("symmetric", "lm_head"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
            object.__setattr__(self, name, bool(getattr(self, name)))
        if self.bits == 4:
            if self.group_size not in GROUP_SIZES:
                raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {self.group_size!r}")
        elif self.bits == 8:
            if self.group_size is not None or not self.symmetric:
                raise ValueError("int8 is per output channel and symmetric: no group size, no zero points")
        else:
            raise ValueError(f"bits must be 4 or 8, got {self.bits!r}")

    @property
    def name(self) -> str:
        if self.bits == 8:
            return "int8"
        return f"int4-g{self.group_size}" + ("" if self.symmetric else "-asym")

    @classmethod
    def parse(cls, name: str, *, lm_head: bool = False) -> "QuantScheme":
        """`int4-g128`, `int4-g64`, `int4-g32` (each with an optional `-asym` for zero points) or `int8`."""
        if name == "int8":
            return cls(8, lm_head=lm_head)
        base, asym = (name[:-5], True) if isinstance(name, str) and name.endswith("-asym") else (name, False)
        for g in GROUP_SIZES:
            if base == f"int4-g{g}":
                return cls(4, g, symmetric=not asym, lm_head=lm_head)
        raise ValueError(f"unknown quantization {name!r}; choose one of {', '.join(SCHEMES)} (int4 also "
                         "takes -asym for zero points, e.g. int4-g128-asym)")

    @classmethod
    def coerce(cls, scheme: "QuantScheme | str") -> "QuantScheme":
        """`scheme` as a `QuantScheme`: one already, or a name `parse` takes."""
        if isinstance(scheme, str):
            return cls.parse(scheme)
        if not isinstance(scheme, cls):
            raise ValueError(f"a quantization scheme must be a QuantScheme or one of its names ({', '.join(SCHEMES)}; "
                             f"int4 also takes -asym), got {scheme!r}")
        return scheme

    def group_for(self, width: int) -> int | None:
        """The int4 group of a weight of input width `width`: the scheme's group when it divides
        `width`, else the largest smaller one that does; None when none does (and for int8)."""
        if self.bits == 4:
            for g in GROUP_SIZES:
                if g <= self.group_size and width % g == 0:
                    return g
        return None

    def quantizes(self, width: int) -> bool:
        """Whether a projection of input width `width` is quantized (else it stays in floating point)."""
        return self.bits == 8 or self.group_for(width) is not None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "QuantScheme":
        return cls(**d)


SCHEMES = ("int4-g128", "int4-g64", "int4-g32", "int8")


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized projection kernel `[*out, *in]`: packed codes, scales, optional zero points.

    int4: `values` uint32 `[*out, K/8]` (layout in the module docstring), `scales` `[*out, K/group]`,
    `zeros` like scales or None (symmetric). int8: `values` int8 `[*out, K]`, `scales` `[*out]`.
    `bits` and `group_size` are static (part of the tree structure, so jit specialises on them).
    """

    values: Any
    scales: Any
    zeros: Any = None
    bits: int = 4
    group_size: int | None = 128

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape[:-1])

    @property
    def in_size(self) -> int:
        """K, the flattened input width."""
        return self.values.shape[-1] * (NIBBLES if self.bits == 4 else 1)

    @property
    def num_weights(self) -> int:
        return math.prod(self.out_shape) * self.in_size

    @property
    def scheme_name(self) -> str:
        if self.bits == 8:
            return "int8"
        return f"int4-g{self.group_size}" + ("" if self.zeros is None else "-asym")


jax.tree_util.register_dataclass(QuantizedWeight, data_fields=["values", "scales", "zeros"],
                                 meta_fields=["bits", "group_size"])


def is_quantized(x) -> bool:
    return isinstance(x, QuantizedWeight)


def _rows(w, num_out_dims: int):
    """`[*out, *in]` -> `[*out, K]` in float32. An axis count outside the kernel's would quantize
    another grouping of its weights (0: the whole kernel as one row; all its axes: each weight alone)."""
    w = jnp.asarray(w, jnp.float32)
    if not is_integer(num_out_dims) or not 1 <= num_out_dims < w.ndim:
        raise ValueError(f"num_out_dims must count the output axes of a kernel [*out, *in] of shape {tuple(w.shape)}: "
                         f"an int from 1 to {w.ndim - 1}, leaving at least one input axis; got {num_out_dims!r}")
    return w.reshape(*w.shape[:num_out_dims], -1)


# ------------------------------------------------------------------ int4


def pack_int4(codes: jax.Array, group_size: int) -> jax.Array:
    """Codes `[*out, K]` in 0..15 -> uint32 words `[*out, K/8]`, interleaved within each group."""
    *out, k = codes.shape
    w = group_size // NIBBLES
    c = codes.astype(jnp.uint32).reshape(*out, k // group_size, NIBBLES, w)
    shifts = (4 * jnp.arange(NIBBLES, dtype=jnp.uint32)).reshape((1,) * (c.ndim - 2) + (NIBBLES, 1))
    return jnp.sum(c << shifts, axis=-2, dtype=jnp.uint32).reshape(*out, k // NIBBLES)


def unpack_int4(words: jax.Array, group_size: int) -> jax.Array:
    """The inverse of `pack_int4`: uint32 `[*out, K/8]` -> codes `[*out, K]` (uint32, 0..15)."""
    *out, kw = words.shape
    w = group_size // NIBBLES
    g = words.reshape(*out, kw // w, 1, w)
    shifts = (4 * jnp.arange(NIBBLES, dtype=jnp.uint32)).reshape((1,) * (g.ndim - 2) + (NIBBLES, 1))
    return ((g >> shifts) & jnp.uint32(0xF)).reshape(*out, kw * NIBBLES)


@functools.partial(jax.jit, static_argnames=("num_out_dims", "group_size", "symmetric"))
def quantize_int4(w, *, num_out_dims: int, group_size: int, symmetric: bool = True) -> QuantizedWeight:
    """Group-wise int4 of a kernel `[*out, *in]` (K, the product of `in`, a multiple of `group_size`).

    Symmetric: each group takes, of the scales `max|w| / c` for c in 6..8 (codes -8..7 around 8),
    the one whose codes reproduce it with the least squared error. Clipping a group's one or two
    extreme weights for a finer grid for all the others is usually the better trade: on the bundled
    demo model, int4-g128's perplexity excess over bf16 falls from 4.5% (`max|w| / 7`) to 3.4%.
    Asymmetric: the min-max range over 15 steps and an integer zero point (the same search over
    shrunk ranges lowered the squared error there but raised the demo model's perplexity).
    """
    if not isinstance(symmetric, (bool, np.bool_)):  # ("no" would read as True)
        raise ValueError(f"symmetric must be True or False, got {symmetric!r}")
    rows = _rows(w, num_out_dims)
    *out, k = rows.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"int4 needs a group size in {GROUP_SIZES} that divides the input width; got "
                         f"group {group_size} for width {k}")
    g = rows.reshape(*out, k // group_size, group_size)
    if symmetric:
        amax = jnp.max(jnp.abs(g), axis=-1)
        candidates = [(_stored(amax / c), jnp.full(amax.shape, 8.0)) for c in _SYMMETRIC_DIVISORS]
    else:
        lo, hi = jnp.minimum(jnp.min(g, axis=-1), 0.0), jnp.maximum(jnp.max(g, axis=-1), 0.0)
        scale = _stored((hi - lo) / 15)
        candidates = [(scale, jnp.clip(jnp.round(-lo / _nonzero(scale)), 0, 15))]
    best = None
    for scale, zero in candidates:
        # codes from the stored scale, so dequantize reproduces what is measured here
        codes = jnp.clip(jnp.round(g / _nonzero(scale)[..., None]) + zero[..., None], 0, 15)
        err = jnp.sum(((codes - zero[..., None]) * scale[..., None] - g) ** 2, axis=-1)
        if best is None:
            best = (err, scale, zero, codes)
        else:
            take = err < best[0]
            best = (jnp.where(take, err, best[0]), jnp.where(take, scale, best[1]),
                    jnp.where(take, zero, best[2]), jnp.where(take[..., None], codes, best[3]))
    _, scale, zero, codes = best
    values = pack_int4(codes.reshape(*out, k).astype(jnp.uint32), group_size)
    zeros = None if symmetric else zero.astype(SCALE_DTYPE)
    return QuantizedWeight(values, scale.astype(SCALE_DTYPE), zeros, bits=4, group_size=group_size)


def dequantize_int4(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The weights `qw` stands for, `[*out, K]`."""
    codes = unpack_int4(qw.values, qw.group_size).astype(jnp.float32)
    *out, k = codes.shape
    g = codes.reshape(*out, k // qw.group_size, qw.group_size)
    zero = 8.0 if qw.zeros is None else qw.zeros.astype(jnp.float32)[..., None]
    return ((g - zero) * qw.scales.astype(jnp.float32)[..., None]).reshape(*out, k).astype(dtype)


def _stored(scale):
    """A float32 scale rounded to `SCALE_DTYPE`, the value the weight will store, still in float32.
    Not `.astype(SCALE_DTYPE).astype(float32)`: XLA on a GPU may drop that round trip inside a fusion
    (it allows excess precision), so the codes would be divided by the unrounded scale and
    dequantized with the rounded one: on an H200, int8 errors up to 1.84x the rounding bound
    (`benchmarks/quant_rounding.py`).
    `reduce_precision` is an operation of its own, and XLA keeps it."""
    info = jnp.finfo(SCALE_DTYPE)
    return jax.lax.reduce_precision(scale.astype(jnp.float32), exponent_bits=info.nexp, mantissa_bits=info.nmant)


def _nonzero(scale):
    """A float32 scale to divide by: an all-zero group has scale 0 (its codes all mean 0); divide by 1."""
    return jnp.where(scale == 0, 1.0, scale)


# ------------------------------------------------------------------ int8


@functools.partial(jax.jit, static_argnames=("num_out_dims",))
def quantize_int8(w, *, num_out_dims: int) -> QuantizedWeight:
    """Per-output-channel symmetric int8 of a kernel `[*out, *in]`."""
    rows = _rows(w, num_out_dims)
    scale = _stored(jnp.max(jnp.abs(rows), axis=-1) / 127)
    codes = jnp.clip(jnp.round(rows / _nonzero(scale)[..., None]), -127, 127).astype(jnp.int8)
    return QuantizedWeight(codes, scale.astype(SCALE_DTYPE), None, bits=8, group_size=None)


def dequantize_int8(qw: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    return (qw.values.astype(jnp.float32) * qw.scales.astype(jnp.float32)[..., None]).astype(dtype)


# ------------------------------------------------------------------ either


def quantize(w, scheme: QuantScheme | str, num_out_dims: int = 1) -> QuantizedWeight:
    """Quantizes a kernel `[*out, *in]` (the first `num_out_dims` axes are outputs) by `scheme` (a
    `QuantScheme` or its name, such as `"int4-g128"`)."""
    scheme = QuantScheme.coerce(scheme)
    if scheme.bits == 8:
        return quantize_int8(w, num_out_dims=num_out_dims)
    k = math.prod(np.shape(w)[num_out_dims:])
    if not scheme.quantizes(k):
        raise ValueError(f"no int4 group size ({', '.join(map(str, GROUP_SIZES))}) divides the input "
                         f"width {k}; quantize this weight to int8 or keep it in floating point")
    return quantize_int4(w, num_out_dims=num_out_dims, group_size=scheme.group_for(k),
                         symmetric=scheme.symmetric)


def dequantize(qw: QuantizedWeight, dtype=jnp.float32, in_shape: tuple[int, ...] | None = None) -> jax.Array:
    """The float kernel `qw` stands for: `[*out, K]`, or `[*out, *in_shape]` when given."""
    w = dequantize_int8(qw, dtype) if qw.bits == 8 else dequantize_int4(qw, dtype)
    return w if in_shape is None else w.reshape(*qw.out_shape, *in_shape)


def random_weight(key: jax.Array, shape: tuple[int, ...], num_out_dims: int, scheme: QuantScheme,
                  stddev: float = 0.02) -> QuantizedWeight:
    """Random codes with one scale everywhere, weights of standard deviation ~`stddev`: made directly
    in their quantized form (a benchmark's 70B model never exists in bf16 first)."""
    out, k = tuple(shape[:num_out_dims]), math.prod(shape[num_out_dims:])
    if scheme.bits == 8:
        codes = jax.random.randint(key, (*out, k), -127, 128, jnp.int32).astype(jnp.int8)
        return QuantizedWeight(codes, jnp.full(out, stddev / _INT8_CODE_STD, SCALE_DTYPE), None, 8, None)
    group = scheme.group_for(k)
    values = jax.random.bits(key, (*out, k // NIBBLES), jnp.uint32)
    scales = jnp.full((*out, k // group), stddev / _INT4_CODE_STD, SCALE_DTYPE)
    zeros = None if scheme.symmetric else jnp.full(scales.shape, 8.0, SCALE_DTYPE)
    return QuantizedWeight(values, scales, zeros, 4, group)


def leaf_axes(bits: int, axes: tuple, num_out_dims: int) -> tuple[tuple, tuple]:
    """Logical axes of (codes, scales) of a quantized kernel whose float kernel has `axes` (zero points
    follow the scales). Codes keep the output axes and take the major input axis for the packed one:
    splitting the flattened input at its major axis is splitting that axis. int4 scales likewise (their
    group axis splits with the input); int8 scales follow the output axes only."""
    out = tuple(axes[:num_out_dims])
    values = out + (axes[num_out_dims],)
    return values, (out if bits == 8 else values)
