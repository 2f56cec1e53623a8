"""Activations `[M, K]` times group-wise int4 weights `[N, K]` (`llmjax.quant`'s packing): `x @ w.T`.

Batch-1 decode reads every weight once per token, so an int4 weight is worth its 3.5x fewer bytes only
if the product reads it at memory speed. XLA does not fuse a group dequantization into its product
(on the H200 it reads int4-g128 at 0.39 TB/s, slower than bf16), hence these Pallas kernels on the
Triton backend (they lower for cuda and rocm). Weights arrive as uint32 words `[N, K/8]`: eight codes
per word, input `j*W + i` of a group of G = 8W inputs in nibble j of the group's word i.

Turning a nibble into a float costs one AND and one subtraction: the word is first split once into its
low five nibbles (in place) and its top three (shifted down by 12), each under the exponent bits of the
float 2**23; ANDing one nibble's bits and those exponent bits gives the float 2**23 + code * 16**pos,
where pos is where the nibble lies, and subtracting 2**23 + zero * 16**pos leaves (code - zero) *
16**pos exactly. No shift and no int-to-float conversion per nibble; the factor 16**pos is undone on
x's side, which the kernel multiplies by 16**-pos (exact: a power of two) as it reads x (float16 x,
whose exponents cannot go that low, has the dot kernel multiply its weights by 16**-pos instead). x
goes into the kernel as it comes, so no XLA pass over it runs before the product. An offline count
of the compiled H200 code (Triton 3.6) gives ~3.7 instructions per weight for the one-row kernel
(AND, subtract, multiply-add, and a little per word), where plain shift-mask-convert code needs ~6.

Two kernel bodies (one of them in three variants), one wrapper (`int4_matmul`), the choice in
`Int4Config.kind`:

- `fma`, for a few rows (batch-1 decode): CUDA-core multiply-adds, split-K. A program owns `block_n`
  outputs and one of `splits` slices of K, reads `block_k` inputs per step as `[block_n, groups, W]`
  words (wide loads of whole groups), sums the eight products of each word, scales the sum once (a
  word lies in one group) into a float32 `[block_n, groups, W]` accumulator, and reduces that once,
  after the K loop. Zero points subtract `zero * sum(x run)` per word.
- `hfma2`, one or two rows on cuda: the `fma` kernel with packed float16 math written in PTX
  (`elementwise_inline_asm`): ~17 instructions for a word's eight weights instead of ~30, products
  and each word's half sums in float16 (x scaled by `PACKED_X_SCALE` first), so its error is ~4e-3 of
  the largest output, bfloat16's own rounding. Interpreted, it runs the same arithmetic in jnp. On
  the H200 it reads 8192x28672 at 2.16 TB/s where `fma` reads 1.72 (BENCHMARKS.md).
- `hfma4`, the default for one or two rows on cuda (bfloat16 and float16 activations, symmetric
  weights): `hfma2` with four neighbouring words of a group summed in one float16 pair before the
  conversion and the scale, ~14 instructions a word where `hfma2` takes ~18 with its scale (x at
  `PACKED4_X_SCALE`); its error is up to ~6e-3 of the largest output. On the H200, batch-1 decode of
  Llama-2-7B int4-g128 went from 518 to 528 tok/s (BENCHMARKS.md, fourteenth session).
- `dot`, for more rows (decode batches and prefill): tensor cores. Each word is repeated for its eight
  nibbles, so `[block_n, groups, 8, W]` holds the step's weights in input order; they become x's dtype
  (exact: (code - zero) * 16**pos has four significant bits) and meet x in one product per step. When
  a step is one group (`block_k` = group) the scale multiplies the product's columns, else each weight.

Split-K partial sums `[splits, M, N]` (float32) are added after the kernel. Any M and N, and any K
that is a multiple of the group: loads past the edges are masked, and only where a shape needs it.
`int4_matmul_reference` defines the result: dequantize (`llmjax.quant.dequantize_int4`), then one
float32 product.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels import rms_norm
from llmjax.quant.weights import GROUP_SIZES, NIBBLES, QuantizedWeight, dequantize_int4

_MAGIC = 0x4B000000  # the float32 2**23: OR-ing an integer below 2**23 into it gives 2**23 + integer
_EXPONENT = 0xFF800000  # sign and exponent bits: ANDed with them, 2**23's bits survive
_TWO23 = float(2**23)
_IN_PLACE = 5  # nibbles 0..4 lie below bit 23 where they are; 5..7 are read after a shift by 12
_LOW_NIBBLES = (1 << (4 * _IN_PLACE)) - 1
_HIGH_SHIFT = 12
_NIBBLE_SCALE = tuple(16.0 ** -(j if j < _IN_PLACE else j - _HIGH_SHIFT // 4) for j in range(NIBBLES))


KINDS = ("fma", "hfma2", "hfma4", "dot")


@dataclasses.dataclass(frozen=True)
class Int4Config:
    """Tuning of one `int4_matmul` call. `kind`: `fma` (CUDA cores, few rows), `hfma2` and `hfma4`
    (the same with packed float16 math; cuda only, symmetric weights) or `dot` (tensor cores). Block
    sizes are powers of two; `block_k` (inputs per loop step) is a multiple of the group,
    and `dot` tiles are at least 16 wide. `splits` cuts K into that many slices, each its own program;
    None (the default) picks enough slices for about `TARGET_PROGRAMS` programs, at least `MIN_STEPS`
    steps each, so that a matrix with few outputs (o, down) still keeps every SM reading. `unroll`
    (the CUDA-core kernels) writes a program's K steps out one after another instead of looping over
    them, so that the compiler schedules one step's loads among the previous step's arithmetic."""

    kind: str = "fma"
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    splits: int | None = None
    num_warps: int = 4
    num_stages: int = 3
    unroll: bool = False

    def check(self, group_size: int) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"Int4Config.kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("block_m", "block_n", "block_k", "splits", "num_warps", "num_stages"):
            v = getattr(self, name)
            if name == "splits" and v is None:
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"Int4Config.{name} must be a positive integer, got {v!r}")
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"Int4Config.{name}={v} must be a power of two (a Triton block)")
        if self.block_k % group_size:
            raise ValueError(f"Int4Config.block_k={self.block_k} must be a multiple of the group size "
                             f"{group_size}")
        if self.kind == "hfma4" and group_size // NIBBLES < PACK:
            raise ValueError(f"the hfma4 kernel sums runs of {PACK} words of one group; group {group_size} "
                             f"has {group_size // NIBBLES} words (use kind 'hfma2')")
        if self.kind == "hfma4" and self.block_n * self.block_k // NIBBLES < PACK * 32 * self.num_warps:
            # each thread must hold runs of four words: with fewer words a thread, Triton fills the
            # assembly's four inputs with undefined values (on the H200: NaN)
            raise ValueError(f"the hfma4 kernel needs at least {PACK} words a thread: block_n * block_k / 8 >= "
                             f"{PACK} * 32 * num_warps; got block_n={self.block_n}, block_k={self.block_k}, "
                             f"num_warps={self.num_warps} (use larger blocks, fewer warps or kind 'hfma2')")
        if self.kind == "dot" and self.unroll:
            raise ValueError("Int4Config.unroll is for the CUDA-core kernels (fma, hfma2, hfma4), not 'dot'")
        if self.kind == "dot" and min(self.block_m, self.block_n) < 16:
            raise ValueError(f"the dot kernel's tiles must be at least 16 wide (tensor cores); got "
                             f"block_m={self.block_m}, block_n={self.block_n}")


# Defaults by rows. Up to FMA_MAX_ROWS rows a CUDA-core kernel (each extra row adds a multiply-add per
# weight), the tensor-core kernel beyond. Set from `benchmarks/int4_matmul.py` on the H200
# (BENCHMARKS.md). One row, cuda, a shape outside `ONE_ROW_BY_SHAPE` (and two rows): the packed float16
# kernel, 64 outputs by 512 inputs a step over 16 K slices, best or within noise of the best of 40
# configurations on Llama-2-7B's four shapes and 8192x28672 in the sixth session (54.4 us against the
# float32 kernel's 68.2; that sweep ran `hfma2`, and `hfma4` took its blocks unswept).
# rocm, float32 activations and weights with zero points: the float32 kernel, 64 outputs by 256 inputs
# over 16 K slices (first sweep: 62.5 us on 8192x28672 against 116.0 for 128/128/auto). 8 and 16 rows:
# 64-wide tiles over 8 K slices.
FMA_MAX_ROWS = 2
TARGET_PROGRAMS = 2048  # ~3 waves of 5 programs on each of the H200's 132 SMs (when splits is None)
MIN_STEPS = 2
DECODE_PACKED = Int4Config("hfma4", block_n=64, block_k=512, splits=16, num_warps=4, num_stages=3)
# A matrix that gives DECODE_PACKED fewer than NARROW_PROGRAMS programs takes 32-wide output blocks
# (twice the programs): when this rule served Llama-2-7B's q/k/v, o and down (before their table
# entries), batch-1 decode went from 506 to 522 tok/s on the H200 (13B: 314 to 319), where 8192x28672
# (7168 programs) keeps 64 (2.32 TB/s against 1.99 with 32; benchmarks/int4_shapes.py and
# int4_matmul.py, BENCHMARKS.md "Sixth session").
# The count is estimated as `int4_matmul` would split K at group sizes up to block_k.
DECODE_PACKED_NARROW = dataclasses.replace(DECODE_PACKED, block_n=32)
NARROW_PROGRAMS = 2048
DECODE_FMA = Int4Config("fma", block_n=64, block_k=256, splits=16, num_warps=4, num_stages=3)
DECODE_DOT = Int4Config("dot", block_m=16, block_n=64, block_k=128, splits=8, num_warps=4, num_stages=3)
PREFILL = Int4Config("dot", block_m=64, block_n=128, block_k=128, num_warps=4, num_stages=3)
ONE_ROW_KINDS = ("fma", "hfma2", "hfma4")
DEFAULT_ONE_ROW_KIND = "hfma4"  # 528 against hfma2's 518 tok/s, Llama-2-7B int4-g128 batch 1 on an H200
_one_row_kind = DEFAULT_ONE_ROW_KIND
# The packed kernel's configuration per weight shape (K, N), one row, where a sweep found better than
# the rule above; an entry serves only while the one-row kind is its own (its blocks were timed in that
# kind), else the rule does. Llama-2-7B's four projections come from a sweep of ~170 configurations a
# shape (`benchmarks/int4_matmul.py --grid --kernel-time`, fifteenth session): q/k/v and down take the
# fastest kernel alone (10.6 -> 9.5 and 10.9 -> 9.5 us), o and gate/up ones within 0.2 us of it that
# were faster as whole products; batch-1 decode went from 528 to 552 tok/s on the H200
# (`benchmarks/int4_shapes.py`, variant "sweep15"). The same blocks by role lost 2.4% at 13B, so the
# table is by exact shape; Llama-2-13B's o, gate/up and down take the fastest kernel alone of 16
# candidates each (its q/k/v keeps the rule's blocks, which were fastest): 326.4 -> 332.3 tok/s.
# Unrolled steps (`Int4Config.unroll`, eighteenth session) won where a program takes two steps of 128
# outputs by 512 inputs: 7B q/k/v 9.5 -> 9.2 us and 4096x11008 9.1 -> 8.8 us (2.56 TB/s); none of ~40
# unrolled tilings beat the other entries (down, gate/up, o, the LM heads, 13B's shapes).
ONE_ROW_BY_SHAPE: dict[tuple[int, int], Int4Config] = {
    (4096, 12288): Int4Config("hfma4", block_n=128, block_k=512, splits=4, num_warps=4, unroll=True),  # 7B q/k/v
    (4096, 4096): Int4Config("hfma4", block_n=64, block_k=512, splits=16, num_warps=8),  # 7B o
    (4096, 22016): Int4Config("hfma4", block_n=32, block_k=1024, splits=16, num_warps=4),  # 7B gate/up
    (11008, 4096): Int4Config("hfma4", block_n=64, block_k=512, splits=16, num_warps=4),  # 7B down
    (5120, 5120): Int4Config("hfma4", block_n=64, block_k=512, splits=8, num_warps=8),  # 13B o
    (5120, 27648): Int4Config("hfma4", block_n=32, block_k=1024, splits=16, num_warps=4),  # 13B gate/up
    (13824, 5120): Int4Config("hfma4", block_n=16, block_k=1024, splits=16, num_warps=2),  # 13B down
    # sixteenth session, the fastest kernel alone of ~180 (`--grid --kernel-time`):
    (4096, 11008): Int4Config("hfma4", block_n=128, block_k=512, splits=4, num_warps=4, unroll=True),  # 7B gate/up at tensor=2, 9.9 -> 9.0 us; unrolled (eighteenth session) 9.1 -> 8.8 us
    (4096, 32000): Int4Config("hfma4", block_n=128, block_k=512, splits=2, num_warps=4),  # 7B int4 LM head, 21.4 -> 20.2
    (5120, 32000): Int4Config("hfma4", block_n=128, block_k=512, splits=2, num_warps=4),  # 13B's (of 10), 26.3 -> 25.0
}


def set_one_row_kind(kind: str) -> None:
    """Which kernel serves one and two rows from now on in this process: `hfma4` (the default on cuda:
    packed float16 math, four words a float16 sum), `hfma2` (one word a float16 sum) or `fma`
    (float32 math everywhere)."""
    global _one_row_kind
    if kind not in ONE_ROW_KINDS:
        raise ValueError(f"the one-row int4 kernel is one of {ONE_ROW_KINDS}, got {kind!r}")
    _one_row_kind = kind


def default_config(m: int, *, asymmetric: bool = False, dtype=jnp.bfloat16, platform: str = "cuda",
                   shape: tuple[int, int] | None = None) -> Int4Config:
    """The configuration `int4_matmul` uses for `m` rows of `dtype` and weights of `shape` (K, N) when
    none is given. The packed float16 kernel serves one and two rows on cuda unless the weights have
    zero points or x is float32 (whose user asked for float32 products): for one row in
    `ONE_ROW_BY_SHAPE[shape]` where the shape has an entry of the kind `set_one_row_kind` chose (tuned
    at one row in that kind; a second row doubles the accumulators), else in 32-wide output blocks when
    64-wide ones would give fewer than `NARROW_PROGRAMS` programs."""
    if m <= FMA_MAX_ROWS:
        packed = (_one_row_kind != "fma" and platform == "cuda" and not asymmetric
                  and jnp.dtype(dtype) != jnp.float32)
        if not packed:
            return DECODE_FMA
        tuned = ONE_ROW_BY_SHAPE.get(shape) if m == 1 else None
        if tuned is not None and tuned.kind == _one_row_kind:
            return tuned
        config = DECODE_PACKED
        if shape is not None:
            k, n = shape
            c = DECODE_PACKED
            if pl.cdiv(n, c.block_n) * min(c.splits, pl.cdiv(k, c.block_k)) < NARROW_PROGRAMS:
                config = DECODE_PACKED_NARROW
        return dataclasses.replace(config, kind=_one_row_kind)
    return DECODE_DOT if m <= 16 else PREFILL


def int4_matmul_reference(x: jax.Array, values: jax.Array, scales: jax.Array, zeros: jax.Array | None,
                          *, group_size: int) -> jax.Array:
    """`x @ w.T` for x `[M, K]` and the int4 weights `[N, K]` that `values` `[N, K/8]`, `scales`
    (and `zeros`) `[N, K/group]` stand for; float32 products, returned in x's dtype."""
    w = dequantize_int4(QuantizedWeight(values, scales, zeros, 4, group_size))
    return jnp.einsum("mk,nk->mn", x.astype(jnp.float32), w,
                      precision=jax.lax.Precision.HIGHEST).astype(x.dtype)


def _split_words(words):
    """Each word once: its low five nibbles in place, and its top three shifted down by 12, each under
    the exponent bits of the float 2**23 (so that one AND per nibble then isolates it)."""
    low = (words & jnp.uint32(_LOW_NIBBLES)) | jnp.uint32(_MAGIC)
    high = (words >> jnp.uint32(_HIGH_SHIFT)) | jnp.uint32(_MAGIC)
    return low, high


def _nibble(low, high, j):
    """Nibble j of each word as the float32 2**23 + code * 16**pos (exact), and pos, where it lies:
    subtracting 2**23 + zero * 16**pos in one operation then leaves (code - zero) * 16**pos."""
    src, pos = (low, j) if j < _IN_PLACE else (high, j - _HIGH_SHIFT // 4)
    bits = src & jnp.uint32(_EXPONENT | (0xF << (4 * pos)))  # 2**23's bits and the nibble
    return jax.lax.bitcast_convert_type(bits, jnp.float32), pos


def _mask(shape, *parts):
    """The AND of the masks in `parts` that exist (None: that edge needs none), broadcast to `shape`;
    None when no edge needs masking, so in-bounds loads carry no predicates."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    return jnp.broadcast_to(functools.reduce(jnp.logical_and, parts), shape)


def _edge(start, size, bound, needed):
    """`start + arange(size) < bound` when `needed`, else None."""
    return (start + jnp.arange(size)) < bound if needed else None


def _load(ref, mask):
    return plgpu.load(ref, mask=mask, other=None if mask is None else 0)


def _weight_block(v_ref, s_ref, z_ref, n_slice, n_edge, g_slice, g_edge):
    """One loop step's weights, as both kernels read them: the words of outputs `n_slice` in groups
    `g_slice` (with `v_ref`'s trailing axes), their scales and zero points (float32 `[BN, BG]`; None
    without `z_ref`), zero past N (`n_edge`) and past the last group (`g_edge`); no predicates where
    both edges are None."""
    mask2 = _mask((n_slice.size, g_slice.size), None if n_edge is None else n_edge[:, None],
                  None if g_edge is None else g_edge[None, :])
    trailing = v_ref.shape[2:]
    block = (n_slice, g_slice) + (slice(None),) * len(trailing)
    words = _load(v_ref.at[block], None if mask2 is None else _mask(
        (n_slice.size, g_slice.size, *trailing), mask2.reshape(mask2.shape + (1,) * len(trailing))))
    scale = _load(s_ref.at[n_slice, g_slice], mask2).astype(jnp.float32)
    zero = None if z_ref is None else _load(z_ref.at[n_slice, g_slice], mask2).astype(jnp.float32)
    return words, scale, zero


# ---------------------------------------------------------------- packed float16 (kind "hfma2")
# A word's eight codes become four float16 pairs with one LOP3 each (the codes under the exponent of
# 1024: nibbles 0/4 and 2/6 read as 1024 + code, 1/5 and 3/7 as 1024 + 16 * code, the second pair
# after one shift of the word by 8), one packed subtract or multiply-add each turns a pair into
# code - 8 (exact), and four packed multiply-adds against x's pairs (x_j, x_j+4) sum the word's eight
# products in float16, low and high halves apart, added in float32 at the end: ~17 instructions a
# word, where the float32 body issues ~30. x enters as float16 times PACKED_X_SCALE (a power of two:
# a half's sum stays below float16's 65504 for |x| up to ~32k, and inputs below ~1e-3 lose bits to
# float16's subnormals); the scale's inverse is folded into each group's scale.
PACKED_X_SCALE = 2.0 ** -4
# 0x64006400: 1024 in both halves; 0x64086408: 1032; 0x2c002c00: 1/16; 0xd480d480: -72, so that
# (1024 + 16 * code) / 16 - 72 = code - 8.

# The four-word variant (kind "hfma4"): one assembly block takes four neighbouring words of one group
# (Triton hands `pack=4` consecutive elements of a thread's registers to one block; the words' tile is
# loaded 16 bytes, four words, a thread along the group) and runs all their 32 products into one
# float16 pair, so the conversion to float32, the sum of the halves and the group's scale (a
# multiply-add into the float32 accumulator) come once per four words instead of once per word: ~14
# instructions a word instead of ~18. Each half then sums 16 products in float16, so x enters at
# PACKED4_X_SCALE, 4x smaller than PACKED_X_SCALE, to keep the same headroom below 65504 (inputs
# below ~4e-3 then lose bits to float16's subnormals, where hfma2's threshold is ~1e-3). Needs runs of
# four words inside a group (groups of at least 32: 4 words) and four words a thread (`Int4Config.check`).
PACKED4_X_SCALE = 2.0 ** -6
PACK = 4


PACKED_WORDS = {"hfma2": 1, "hfma4": PACK}  # words per assembly block, by kind


def _packed_asm(words: int) -> str:
    """The PTX block of a packed kernel over `words` words (1: `hfma2`, `PACK`: `hfma4`), its operands
    numbered as Triton binds them (outputs first, then each input's `words` registers): outputs
    $0..; the words $w + i; x's pair j (x_j, x_j+4) of word i at $2w + jw + i. `hfma2` returns the
    word's sum; `hfma4` also takes the scales ($6w + i; the first is used) and the accumulators
    ($7w + i), and returns the accumulators with the run's scaled sum added to the first."""
    lines = ["{", ".reg .b32 k0, k1, kg, c0, c1, c2, sh, t0, t1, t2, t3, a;", ".reg .b16 l16, h16;",
             ".reg .f32 f0, f1, r0, r1, r2, r3;",
             "mov.b32 k0, 0x000f000f;", "mov.b32 k1, 0x00f000f0;", "mov.b32 kg, 0x64006400;",
             "mov.b32 c0, 0x64086408;", "mov.b32 c1, 0x2c002c00;", "mov.b32 c2, 0xd480d480;"]
    for i in range(words):
        word = f"${words + i}"
        lines += [f"shr.u32 sh, {word}, 8;", f"lop3.b32 t0, {word}, k0, kg, 0xea;",
                  f"lop3.b32 t1, {word}, k1, kg, 0xea;", "lop3.b32 t2, sh, k0, kg, 0xea;",
                  "lop3.b32 t3, sh, k1, kg, 0xea;", "sub.rn.f16x2 t0, t0, c0;", "fma.rn.f16x2 t1, t1, c1, c2;",
                  "sub.rn.f16x2 t2, t2, c0;", "fma.rn.f16x2 t3, t3, c1, c2;"]
        for j in range(4):
            pair = f"${2 * words + j * words + i}"
            lines.append(f"mul.rn.f16x2 a, t0, {pair};" if i == j == 0 else f"fma.rn.f16x2 a, t{j}, {pair}, a;")
    lines += ["mov.b32 {l16, h16}, a;", "cvt.f32.f16 f0, l16;", "cvt.f32.f16 f1, h16;"]
    if words == 1:
        lines.append("add.f32 $0, f0, f1;")
    else:  # every input is read before any output is written: an output may share an input's register
        scale, acc = 6 * words, 7 * words
        lines += ["add.f32 f0, f0, f1;", f"fma.rn.f32 r0, f0, ${scale}, ${acc};"]
        lines += [f"mov.f32 r{i}, ${acc + i};" for i in range(1, words)]
        lines += [f"mov.f32 ${i}, r{i};" for i in range(words)]
    return "\n".join(lines + ["}"])


_PACKED_ASM = {kind: _packed_asm(words) for kind, words in PACKED_WORDS.items()}


def _f16_pair(low, high, emulate: bool):
    """Two float16 arrays as one int32 array, `low` in the low half of each word (int32: Triton's
    inline assembly returns signless integers only)."""
    if emulate:
        return jax.lax.bitcast_convert_type(jnp.stack([low, high], axis=-1), jnp.int32)
    return plgpu.elementwise_inline_asm("mov.b32 $0, {$1, $2};", args=[low, high], constraints="=r,h,h",
                                        pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(low.shape, jnp.int32)])[0]


def _emulated_half_sum(runs, half: int):
    """What the packed assembly's float16 chain gives in one half (0: nibbles 0..3 against x_0..3, 1:
    nibbles 4..7 against x_4..7), in jnp: `runs` the (words, their four int32 x pairs) in the order the
    assembly takes them, every product added in float32 and rounded to float16 as `fma.rn.f16x2` does."""
    acc = None
    for words, x_pairs in runs:
        for j in range(4):
            code = ((words >> jnp.uint32(4 * (4 * half + j))) & jnp.uint32(0xF)).astype(jnp.float32) - 8.0
            x = jax.lax.bitcast_convert_type(x_pairs[j], jnp.float16)[..., half].astype(jnp.float32)
            acc = (code * x if acc is None else code * x + acc).astype(jnp.float16).astype(jnp.float32)
    return acc


def _packed_word_sums(words, x_pairs, emulate: bool):
    """Per word, sum over its eight codes of (code - 8) * x (float32 of two float16 half sums), with
    `x_pairs` [4] the int32 pairs (x_j, x_j+4) broadcast to the words' shape. `emulate`: the same
    arithmetic in jnp (the interpreter cannot run PTX), rounding to float16 where the PTX does."""
    if not emulate:
        return plgpu.elementwise_inline_asm(
            _PACKED_ASM["hfma2"], args=[words, *x_pairs], constraints="=f,r,r,r,r,r", pack=1,
            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float32)])[0]
    return sum(_emulated_half_sum([(words, x_pairs)], half) for half in range(2))


def _packed4_update(acc, words, x_pairs, scale, emulate: bool):
    """`acc` plus, in the first word of each run of four along the last axis, the four words' products
    with x summed in one float16 pair per run and scaled by `scale` (float32, `words`' shape, equal
    along each run); the `hfma4` assembly on the GPU, the same arithmetic in jnp when `emulate`."""
    if not emulate:
        return plgpu.elementwise_inline_asm(
            _PACKED_ASM["hfma4"], args=[words, *x_pairs, scale, acc],
            constraints=",".join(["=f"] * PACK + ["r"] * PACK * 5 + ["f"] * PACK * 2), pack=PACK,
            result_shape_dtypes=[jax.ShapeDtypeStruct(words.shape, jnp.float32)])[0]
    shape = words.shape[:-1] + (words.shape[-1] // PACK, PACK)
    words, x_pairs = words.reshape(shape), [p.reshape(shape) for p in x_pairs]
    runs = [(words[..., i], [p[..., i] for p in x_pairs]) for i in range(PACK)]
    total = sum(_emulated_half_sum(runs, half) for half in range(2)) * scale.reshape(shape)[..., 0]
    return acc + jnp.zeros(shape, jnp.float32).at[..., 0].set(total).reshape(acc.shape)


def _fma_kernel(x_ref, v_ref, s_ref, *rest, rows, n, groups, block_n, block_groups, steps, mask_n, mask_g,
                asymmetric, packed=0, unroll=False, norm_eps=None, emulate=False):
    # x_ref [M, groups, 8, W] in x's dtype (x as it comes, reshaped); v_ref [N, groups, W] uint32;
    # s_ref [N, groups]; asymmetric: z_ref [N, groups] and xs_ref [M, groups, W] (x summed over each
    # word's inputs, float32); o_ref [splits, M, N] float32. packed: words per assembly block (0: fma).
    # norm_eps not None (symmetric weights): sq_ref [M, P] (parts of each row's sum of squares) and
    # ns_ref [groups, 8, W] (an RMSNorm's scale, x's dtype) come before o_ref, and x is normalized as
    # it is read (`normalized_reference`).
    *rest, o_ref = rest
    sq_ref, ns_ref = rest[-2:] if norm_eps is not None else (None, None)
    z_ref, xs_ref = rest[:2] if asymmetric else (None, None)
    i, split = pl.program_id(0), pl.program_id(1)
    w = v_ref.shape[-1]
    n_slice = pl.ds(i * block_n, block_n)
    n_edge = _edge(i * block_n, block_n, n, mask_n)
    g_first = split * steps * block_groups
    inv = None if sq_ref is None else [_row_inv(sq_ref, r, groups * NIBBLES * w, norm_eps) for r in range(rows)]

    def x_load(r, g_slice, j, x_edge):  # [BG, W]: row r's inputs of nibble j, normalized under a norm
        x = _load(x_ref.at[jnp.int32(r), g_slice, jnp.int32(j), :], x_edge)
        if inv is None:
            return x
        return _load(ns_ref.at[g_slice, jnp.int32(j), :], x_edge) * (x.astype(jnp.float32) * inv[r]).astype(x.dtype)

    def body(step, accs):
        g0 = g_first + step * block_groups
        g_slice, g_edge = pl.ds(g0, block_groups), _edge(g0, block_groups, groups, mask_g)
        words, scale, zero = _weight_block(v_ref, s_ref, z_ref, n_slice, n_edge, g_slice, g_edge)
        x_edge = None if g_edge is None else _mask((block_groups, w), g_edge[:, None])
        if packed:  # x's pairs once per step, shared by the block's outputs
            x_scale = PACKED4_X_SCALE if packed == PACK else PACKED_X_SCALE
            pairs = []
            for r in range(rows):
                xs = [(x_load(r, g_slice, j, x_edge).astype(jnp.float32) * x_scale).astype(jnp.float16)
                      for j in range(NIBBLES)]
                pairs.append([jnp.broadcast_to(_f16_pair(xs[j], xs[j + 4], emulate)[None], words.shape)
                              for j in range(NIBBLES // 2)])
            scale = scale * (1.0 / x_scale)
            if packed == PACK:
                scale = jnp.broadcast_to(scale[:, :, None], words.shape)
                return tuple(_packed4_update(acc, words, p, scale, emulate) for acc, p in zip(accs, pairs))
            sums = [_packed_word_sums(words, p, emulate) for p in pairs]
            return tuple(acc + s * scale[:, :, None] for acc, s in zip(accs, sums))
        low, high = _split_words(words)
        sums = [None] * rows
        for j in range(NIBBLES):
            raw, pos = _nibble(low, high, j)
            # (code - 8) * 16**pos; with zero points, code * 16**pos (the zero is subtracted per word)
            f = raw - (_TWO23 + (0.0 if asymmetric else 8.0 * 16.0 ** pos))
            for r in range(rows):  # x * 16**-pos (exact), [BG, W]; zero past K
                xj = x_load(r, g_slice, j, x_edge)
                term = f * (xj.astype(jnp.float32) * _NIBBLE_SCALE[j])[None]
                sums[r] = term if sums[r] is None else sums[r] + term
        if asymmetric:
            for r in range(rows):
                xs = _load(xs_ref.at[jnp.int32(r), g_slice, :], x_edge)
                sums[r] = sums[r] - zero[:, :, None] * xs[None]
        return tuple(acc + s * scale[:, :, None] for acc, s in zip(accs, sums))

    zeros = tuple(jnp.zeros((block_n, block_groups, w), jnp.float32) for _ in range(rows))
    if unroll:  # the steps one after another: the compiler may schedule across them
        accs = functools.reduce(lambda accs, step: body(jnp.int32(step), accs), range(steps), zeros)
    else:
        accs = jax.lax.fori_loop(0, steps, body, zeros)
    for r, acc in enumerate(accs):
        plgpu.store(o_ref.at[split, jnp.int32(r), n_slice], jnp.sum(acc, axis=(1, 2)), mask=n_edge)


def _row_inv(sq_ref, r, width, eps):
    """1 / the root mean square of row r, from the parts of its sum of squares in `sq_ref` `[M, P]`."""
    parts = sq_ref.shape[1]
    padded = pl.next_power_of_2(parts)
    inside = jnp.arange(padded) < parts if padded != parts else None
    squares = plgpu.load(sq_ref.at[jnp.int32(r), pl.ds(0, padded)], mask=inside,
                         other=None if inside is None else 0.0)
    return jax.lax.rsqrt(jnp.sum(squares) / width + eps)


def _dot_kernel(x_ref, v_ref, s_ref, *rest, m, n, groups, block_m, block_n, block_groups, steps, mask_n,
                mask_g, asymmetric, prescaled):
    # x_ref [M, K] as it comes (prescaled: each input multiplied here by 16**-pos of its nibble);
    # v_ref [N, groups, 1, W] uint32; s_ref, z_ref [N, groups]; o_ref [splits, M, N] float32
    z_ref, o_ref = rest if asymmetric else (None, rest[0])
    mi, ni, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    w = v_ref.shape[-1]
    block_k = block_groups * NIBBLES * w
    m_slice, n_slice = pl.ds(mi * block_m, block_m), pl.ds(ni * block_n, block_n)
    m_edge = _edge(mi * block_m, block_m, m, m % block_m != 0)
    n_edge = _edge(ni * block_n, block_n, n, mask_n)
    g_first = split * steps * block_groups
    # Where nibble j of a word lies once split (0..4, then 2..4 after the shift), and 16**that. Constant
    # along all but the nibble axis, so the compiler folds every per-nibble choice below.
    j = jnp.arange(NIBBLES).reshape(1, 1, NIBBLES, 1)
    pos = jnp.where(j < _IN_PLACE, j, j - _HIGH_SHIFT // 4)
    masks = jnp.uint32(_EXPONENT) | (jnp.uint32(0xF) << (4 * pos).astype(jnp.uint32))
    pow16 = jnp.exp2(4.0 * pos.astype(jnp.float32))
    # 16**-pos of every input of a step, in input order (group, nibble, word): what x is multiplied by
    x_scale = jnp.broadcast_to(1.0 / pow16, (1, block_groups, NIBBLES, w)).reshape(1, block_k)

    def body(step, acc):
        g0 = g_first + step * block_groups
        g_edge = _edge(g0, block_groups, groups, mask_g)
        words, scale, zero = _weight_block(v_ref, s_ref, z_ref, n_slice, n_edge, pl.ds(g0, block_groups), g_edge)
        zero = zero[:, :, None, None] if asymmetric else 8.0
        # Each word repeated for its eight nibbles: [BN, BG, 8, W] holds the step's inputs in order.
        low, high = _split_words(jnp.broadcast_to(words, (block_n, block_groups, NIBBLES, w)))
        raw = jax.lax.bitcast_convert_type(jnp.where(j < _IN_PLACE, low, high) & masks, jnp.float32)
        f = raw - (_TWO23 + zero * pow16)  # (code - zero) * 16**pos, exact in bf16 too
        if not prescaled:  # float16's exponent range cannot carry 16**+-pos: undo it on the weight
            f = f * (1.0 / pow16)
        k_edge = None if g_edge is None else jnp.broadcast_to(
            g_edge[:, None], (block_groups, NIBBLES * w)).reshape(1, block_k)
        xk = _load(x_ref.at[m_slice, pl.ds(g0 * NIBBLES * w, block_k)],
                   _mask((block_m, block_k), None if m_edge is None else m_edge[:, None], k_edge))
        if prescaled:
            xk = (xk * x_scale).astype(x_ref.dtype)
        if block_groups == 1:  # one group: one scale per output, applied to the product
            wk = f.astype(x_ref.dtype).reshape(block_n, block_k)
            return acc + plgpu.dot(xk, wk, trans_b=True, allow_tf32=False) * scale.reshape(1, block_n)
        wk = (f * scale[:, :, None, None]).astype(x_ref.dtype).reshape(block_n, block_k)
        return acc + plgpu.dot(xk, wk, trans_b=True, allow_tf32=False)

    acc = jax.lax.fori_loop(0, steps, body, jnp.zeros((block_m, block_n), jnp.float32))
    out_mask = _mask((block_m, block_n), None if m_edge is None else m_edge[:, None],
                     None if n_edge is None else n_edge[None, :])
    plgpu.store(o_ref.at[split, m_slice, n_slice], acc, mask=out_mask)


def _check_norm(x: jax.Array, squares: jax.Array, scale: jax.Array, what: str, scale_name: str) -> None:
    """Refuses an RMSNorm's squares and scale that do not fit x `[M, K]` (every platform alike)."""
    m, k = x.shape
    if squares.ndim != 2 or squares.shape[0] != m or scale.shape != (k,) or scale.dtype != x.dtype:
        raise ValueError(f"{what} [M, P] with M = {m} and {scale_name} [K] = [{k}] in x's dtype {x.dtype}; got "
                         f"squares {squares.shape}, {scale_name} {scale.dtype}{list(scale.shape)}")


def split_plan(config: Int4Config, m: int, n: int, groups: int, group_size: int) -> tuple[int, int]:
    """(splits, steps): the K slices the kernel's programs take under `config`, and the steps of
    `block_k` inputs in each."""
    block_groups = config.block_k // group_size
    steps_total = pl.cdiv(groups, block_groups)
    tiles = pl.cdiv(n, config.block_n) * (1 if config.kind != "dot" else pl.cdiv(m, config.block_m))
    splits = config.splits or pl.cdiv(TARGET_PROGRAMS, tiles)
    splits = max(1, min(splits, steps_total if config.splits else steps_total // MIN_STEPS))
    steps = pl.cdiv(steps_total, splits)
    return pl.cdiv(steps_total, steps), steps  # no split left without work


@functools.partial(jax.jit, static_argnames=("group_size", "config", "reduce", "norm_eps", "interpret"))
def int4_matmul(x: jax.Array, values: jax.Array, scales: jax.Array, zeros: jax.Array | None = None, *,
                group_size: int, config: Int4Config | None = None, reduce: bool = True,
                norm_squares: jax.Array | None = None, norm_scale: jax.Array | None = None, norm_eps: float = 0.0,
                interpret: bool = False) -> jax.Array:
    """`x @ w.T` with the Pallas kernels: x `[M, K]`, `values` uint32 `[N, K/8]`, `scales` (and
    `zeros`) `[N, K/group]`; returns `[M, N]` in x's dtype. `config` defaults by M and x's dtype
    (`default_config` for cuda; `matmul` picks rocm's on rocm). `reduce=False` returns instead the
    float32 sums of the K slices, `[splits, M, N]` (`split_plan`), for a consumer that adds them.

    With `norm_squares` `[M, P]` (parts of each row's sum of squares, `rms_norm.residual_add`'s) and
    `norm_scale` `[K]` (x's dtype), x is an RMSNorm's input and the product is of the normalized rows,
    `rms_norm.normalized_reference(x, norm_squares, norm_scale, norm_eps)`: the CUDA-core kernels
    normalize x as they read it (symmetric weights), otherwise x is normalized before the kernel."""
    if (norm_squares is None) != (norm_scale is None):
        raise ValueError("int4_matmul takes norm_squares and norm_scale together (an RMSNorm's), or neither")
    m, k = x.shape
    n = values.shape[0]
    if norm_scale is not None:
        _check_norm(x, norm_squares, norm_scale, "int4_matmul's norm takes norm_squares", "norm_scale")
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"int4_matmul needs a group size in {GROUP_SIZES} that divides K; got group "
                         f"{group_size}, K {k}")
    groups, w = k // group_size, group_size // NIBBLES
    if values.shape != (n, k // NIBBLES) or scales.shape != (n, groups) or values.dtype != jnp.uint32 or (
            zeros is not None and zeros.shape != scales.shape):
        raise ValueError(f"int4_matmul takes x [M, K] = {x.shape}, values uint32 [N, K/8], scales and zeros "
                         f"[N, K/group]; got values {values.dtype}{list(values.shape)}, scales "
                         f"{list(scales.shape)}, zeros {None if zeros is None else list(zeros.shape)}")
    config = config or default_config(m, asymmetric=zeros is not None, dtype=x.dtype, shape=(k, n))
    config.check(group_size)
    if norm_scale is not None and (zeros is not None or config.kind == "dot"):  # normalized before the kernel
        x = rms_norm.normalized_reference(x, norm_squares, norm_scale, norm_eps)
        norm_squares = norm_scale = None
    if config.kind in PACKED_WORDS and zeros is not None:
        raise ValueError(f"the {config.kind} int4 kernel takes symmetric weights only (no zero points); use kind 'fma'")
    block_groups = config.block_k // group_size
    splits, steps = split_plan(config, m, n, groups, group_size)
    visited = splits * steps * block_groups  # groups the programs step over, the last ones maybe past K
    asymmetric = zeros is not None
    common = dict(n=n, groups=groups, block_n=config.block_n, block_groups=block_groups, steps=steps,
                  mask_n=n % config.block_n != 0, mask_g=visited != groups, asymmetric=asymmetric)
    # The kernels multiply x by 16**-pos of each input's nibble as they read it (exact: a power of two;
    # float16 excepted, whose exponent range is too narrow, for the dot kernel), so x goes in as it
    # comes: no pass over it before the kernel.
    prescaled = config.kind != "dot" or x.dtype != jnp.float16
    operands = (values.reshape(n, groups, w), scales) + ((zeros,) if asymmetric else ())
    if config.kind != "dot":
        x4 = x.reshape(m, groups, NIBBLES, w)
        sums = (jnp.sum(x4.astype(jnp.float32), axis=2),) if asymmetric else ()
        operands = (x4,) + operands + sums
        packed = PACKED_WORDS.get(config.kind, 0)
        if norm_scale is not None:
            operands += (norm_squares.astype(jnp.float32), norm_scale.reshape(groups, NIBBLES, w))
        kernel = functools.partial(_fma_kernel, rows=m, packed=packed, unroll=config.unroll,
                                   norm_eps=None if norm_scale is None else norm_eps, emulate=interpret, **common)
        grid = (pl.cdiv(n, config.block_n), splits)
    else:
        operands = (x, values.reshape(n, groups, 1, w)) + operands[1:]
        kernel = functools.partial(_dot_kernel, m=m, block_m=config.block_m, prescaled=prescaled, **common)
        grid = (pl.cdiv(m, config.block_m), pl.cdiv(n, config.block_n), splits)
    partial = pl.pallas_call(
        kernel,
        grid=grid,
        out_shape=jax.ShapeDtypeStruct((splits, m, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
    )(*operands)
    if not reduce:
        return partial
    return (partial[0] if splits == 1 else partial.sum(axis=0)).astype(x.dtype)


def matmul(x: jax.Array, qw: QuantizedWeight, *, partials: bool = False, norm: tuple | None = None) -> jax.Array:
    """`x [M, K] @ w.T` for an int4 `QuantizedWeight` of any output shape: the Pallas kernel when lowered
    for cuda or rocm, the reference on every other platform. Returns `[M, N]`, N the flattened outputs.

    `partials=True` returns `[S, M, N]` float32 instead: S partial sums whose sum, rounded to x's dtype,
    is the product, S as cuda's plan splits K (the kernel's K slices on cuda and on rocm where its plan
    gives as many, else their sum and S - 1 zeros; the float32 reference product and S - 1 zeros
    elsewhere), for a consumer that adds them in its own kernel.

    `norm` = (squares `[M, P]`, scale `[K]`, eps): x is an RMSNorm's input, the product is of
    `rms_norm.normalized_reference(x, squares, scale, eps)` (normalized inside the kernel where it can,
    see `int4_matmul`)."""
    n = qw.values.size // qw.values.shape[-1]
    values = qw.values.reshape(n, -1)
    scales = qw.scales.reshape(n, -1)
    zeros = None if qw.zeros is None else qw.zeros.reshape(n, -1)
    m, k = x.shape

    def config_for(platform):
        return default_config(m, asymmetric=zeros is not None, dtype=x.dtype, platform=platform, shape=(k, n))

    count = split_plan(config_for("cuda"), m, n, k // qw.group_size, qw.group_size)[0] if partials else 0

    def padded(y):  # the float32 product as the first of `count` partial sums
        return jnp.zeros((count, m, n), jnp.float32).at[0].set(y.astype(jnp.float32))

    squares, norm_scale, eps = norm if norm is not None else (None, None, 0.0)
    if norm is not None:
        _check_norm(x, squares, norm_scale, "matmul's norm takes squares", "a scale")

    def kernel(x, values, scales, zeros, squares, norm_scale, platform="cuda"):
        y = int4_matmul(x, values, scales, zeros, group_size=qw.group_size, config=config_for(platform),
                        reduce=not partials, norm_squares=squares, norm_scale=norm_scale, norm_eps=eps)
        return padded(y.sum(axis=0)) if partials and y.shape[0] != count else y  # rocm's plan may differ

    def reference(x, values, scales, zeros, squares, norm_scale):
        if squares is not None:
            x = rms_norm.normalized_reference(x, squares, norm_scale, eps)
        if partials:  # x in float32: the product's float32 value, not rounded
            return padded(int4_matmul_reference(x.astype(jnp.float32), values, scales, zeros,
                                                group_size=qw.group_size))
        return int4_matmul_reference(x, values, scales, zeros, group_size=qw.group_size)

    return jax.lax.platform_dependent(x, values, scales, zeros, squares, norm_scale, cuda=kernel, default=reference,
                                      rocm=functools.partial(kernel, platform="rocm"))
