"""The attention kernels in Pallas interpret mode against their references, their lowering for rocm and
cuda, and the model pushed through them.

Each kernel case names the `*_reference` it is compared with. Shapes are small (interpret mode runs
the grid one program at a time) but awkward: lengths that are not block multiples, length 1, empty
rows, grouped-query groups of 1, 4 and 8, query offsets, pages that do and do not hold whole blocks.
"""

import dataclasses
import functools
import importlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

import llmjax
from llmjax.kernels import decode_attention as da, dispatch, flash_attention as fa, paged_attention as pa
from llmjax.models import llama
from llmjax.sharding import make_mesh

from conftest import needs_devices

gen = importlib.import_module("llmjax.generate")

TOLERANCE = {jnp.float32: 2e-5, jnp.bfloat16: 2e-2}  # of the largest |output|


def _normal(seed, *shapes, dtype):
    keys = jax.random.split(jax.random.key(seed), len(shapes))
    return [jax.random.normal(key, shape, dtype) for key, shape in zip(keys, shapes)]


def _assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[dtype] * max(1.0, np.abs(want).max()))


# (batch, queries, keys, heads, kv heads, head dim, q_offsets, kv_lengths, block_q, block_k, dtype)
FLASH_CASES = {
    "groups1-padded-rows": (2, 37, 37, 2, 2, 16, [0, 0], [37, 20], 16, 16, jnp.float32),
    "groups4-chunk-offsets": (2, 10, 45, 8, 2, 32, [35, 3], [45, 13], 16, 16, jnp.float32),
    "groups8": (1, 19, 19, 8, 1, 16, [0], [19], 16, 16, jnp.float32),
    "empty-and-length-1-rows": (3, 5, 20, 2, 1, 16, [0, 0, 0], [0, 1, 20], 16, 16, jnp.float32),
    "bf16-head-dim-64": (1, 33, 40, 4, 2, 64, [7], [40], 32, 16, jnp.bfloat16),
    "bf16-head-dim-128": (1, 17, 17, 2, 1, 128, [0], [17], 16, 32, jnp.bfloat16),
}


@pytest.mark.parametrize("case", FLASH_CASES)
def test_flash_attention_matches_flash_attention_reference(case):
    b, t, s, h, n_kv, d, offsets, lengths, block_q, block_k, dtype = FLASH_CASES[case]
    q, k, v = _normal(t * s + h, (b, t, h, d), (b, s, n_kv, d), (b, s, n_kv, d), dtype=dtype)
    offsets, lengths = jnp.array(offsets, jnp.int32), jnp.array(lengths, jnp.int32)
    got = fa.flash_attention(q, k, v, offsets, lengths, block_q=block_q, block_k=block_k, interpret=True)
    want = fa.flash_attention_reference(q, k, v, offsets, lengths)
    assert got.dtype == dtype
    _assert_close(got, want, dtype)
    if case == "empty-and-length-1-rows":
        assert not np.asarray(got[0]).any()  # a row without keys gives zeros
        only_value = np.broadcast_to(np.asarray(v[1, :1]).repeat(2, 1), (t, h, d))
        np.testing.assert_allclose(np.asarray(got[1]), only_value, atol=1e-6)  # one key: its value


def test_flash_attention_reference_is_the_models_attention_by_positions():
    """The reference agrees with attention written by explicit positions (the model's contract)."""
    q, k, v = _normal(3, (2, 6, 4, 16), (2, 11, 2, 16), (2, 11, 2, 16), dtype=jnp.float32)
    offsets = jnp.array([5, 0], jnp.int32)
    q_pos = offsets[:, None] + jnp.arange(6)[None, :]
    scores = jnp.einsum("bthd,bshd->bhts", q, jnp.repeat(k, 2, axis=2)) / 4.0
    visible = jnp.arange(11)[None, None, :] <= q_pos[:, :, None]
    probs = jax.nn.softmax(jnp.where(visible[:, None], scores, -jnp.inf), axis=-1)
    want = jnp.einsum("bhts,bshd->bthd", probs, jnp.repeat(v, 2, axis=2))
    got = fa.flash_attention_reference(q, k, v, offsets, jnp.array([11, 11], jnp.int32))
    _assert_close(got, want, jnp.float32)


# (batch, keys, heads, kv heads, head dim, lengths, block_k, splits, dtype)
DECODE_CASES = {
    "groups1-auto-splits": (3, 50, 2, 2, 16, [50, 1, 0], 16, None, jnp.float32),
    "groups4-three-splits": (3, 61, 8, 2, 32, [37, 17, 16], 16, 3, jnp.float32),
    "groups8-one-split-bf16": (2, 70, 8, 1, 64, [70, 5], 32, 1, jnp.bfloat16),
    # the default blocks (64 keys off the large-shared-memory GPUs), rows past one block and inside it
    "defaults-bf16-two-splits": (2, 300, 8, 2, 64, [300, 100], None, 2, jnp.bfloat16),
    # the large GPUs' 128-key blocks
    "large-blocks-bf16": (2, 300, 8, 2, 64, [300, 100], 128, 2, jnp.bfloat16),
}


# (batch, keys, heads, kv heads, head dim, slots, block_k, splits, vector, dtype): the slot of each row's
# new token, 0 (no cache keys below it), at a split's edge, the cache's last, and past the cache (dropped)
DECODE_WRITE_CASES = {
    "groups4-three-splits": (3, 61, 8, 2, 32, [36, 0, 60], 16, 3, False, jnp.float32),
    "groups1-split-edges": (3, 64, 2, 2, 16, [31, 32, 15], 16, 2, False, jnp.float32),
    "mha-vector-past-the-cache": (2, 50, 4, 4, 16, [49, 80], 16, 2, True, jnp.float32),
    "a-negative-slot-writes-nothing": (2, 40, 4, 2, 16, [-1, 20], 16, 2, False, jnp.float32),
    "large-blocks-bf16": (1, 300, 32, 8, 64, [200], 128, None, False, jnp.bfloat16),
}


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.skipif(
    jax.devices()[0].platform != "gpu", reason="needs a GPU"))])
@pytest.mark.parametrize("case", DECODE_WRITE_CASES)
def test_decode_attention_write_matches_its_reference(case, interpret):
    """The kernel that writes the new token and attends: its output against `write_reference`, and the
    caches it returns equal to the reference's writes exactly (every other slot untouched). Compiled
    on a GPU too (`JAX_PLATFORMS=cuda pytest -k write`; conftest otherwise keeps tests on the CPU)."""
    b, s, h, n_kv, d, slots, block_k, splits, vector, dtype = DECODE_WRITE_CASES[case]
    qkv, k, v = _normal(s + 7 * h, (b, n_kv, h // n_kv + 2, d), (b, s, n_kv, d), (b, s, n_kv, d), dtype=dtype)
    slots = jnp.array(slots, jnp.int32)
    out, keys, values = da.decode_attention_write(qkv, k, v, slots, block_k=block_k, splits=splits,
                                                  vector=vector, interpret=interpret)
    want, want_keys, want_values = da.write_reference(qkv, k, v, slots)
    assert out.dtype == dtype and out.shape == (b, h, d)
    _assert_close(out, want, dtype)
    np.testing.assert_array_equal(np.asarray(keys, np.float32), np.asarray(want_keys, np.float32))
    np.testing.assert_array_equal(np.asarray(values, np.float32), np.asarray(want_values, np.float32))
    for row, slot in enumerate(slots.tolist()):  # written where the slot is inside the cache, else untouched
        untouched = np.array_equal(np.asarray(keys[row], np.float32), np.asarray(k[row], np.float32))
        assert untouched == (not 0 <= slot < s), (row, slot)


# (slices, batch, keys, heads, kv heads, head dim, slots, block_k, splits, vector, dtype): the q/k/v product
# as K slices, summed and rotated inside the kernel
DECODE_WRITE_ROPE_CASES = {
    "four-slices-groups4": (4, 2, 61, 8, 2, 32, [36, 0], 16, 3, False, jnp.bfloat16),
    "one-slice-mha-vector": (1, 2, 50, 4, 4, 16, [49, 80], 16, 2, True, jnp.float32),
    "two-slices-large-blocks": (2, 1, 300, 32, 8, 64, [200], 128, None, False, jnp.bfloat16),
    # 0: the product as one array [B, KV, G + 2, D], rotated inside the kernel
    "whole-product-rotated": (0, 2, 40, 8, 2, 32, [17, 39], 16, 2, False, jnp.bfloat16),
}


def _rope_tables(b, d, seed):
    angles = jax.random.uniform(jax.random.key(seed), (b, d // 2), jnp.float32, 0.0, 40.0)
    return jnp.concatenate([jnp.cos(angles)] * 2, -1), jnp.concatenate([jnp.sin(angles)] * 2, -1)


@pytest.mark.parametrize("interpret", [True, pytest.param(False, marks=pytest.mark.skipif(
    jax.devices()[0].platform != "gpu", reason="needs a GPU"))])
@pytest.mark.parametrize("case", DECODE_WRITE_ROPE_CASES)
def test_decode_attention_write_adds_the_slices_and_rotates_as_its_reference(case, interpret):
    """`decode_attention_write` on the q/k/v product's K slices `[S, B, KV, G + 2, D]` with `rope`: the
    kernel sums them, rounds to the cache's dtype and applies RoPE to the query and key heads, against
    `write_reference`; the caches hold the rotated key and the value exactly as the reference writes."""
    n, b, s, h, n_kv, d, slots, block_k, splits, vector, dtype = DECODE_WRITE_ROPE_CASES[case]  # n 0: no slices
    parts, k, v = _normal(s + n, (max(n, 1), b, n_kv, h // n_kv + 2, d), (b, s, n_kv, d), (b, s, n_kv, d),
                          dtype=jnp.float32)
    parts = parts if n > 1 else parts.astype(dtype)  # one slice: the product itself, in the model's dtype
    parts = parts if n else parts[0]
    k, v = k.astype(dtype), v.astype(dtype)
    rope, slots = _rope_tables(b, d, s), jnp.array(slots, jnp.int32)
    out, keys, values = da.decode_attention_write(parts, k, v, slots, rope, block_k=block_k, splits=splits,
                                                  vector=vector, interpret=interpret)
    want, want_keys, want_values = da.write_reference(parts, k, v, slots, rope)
    assert out.dtype == dtype and out.shape == (b, h, d)
    _assert_close(out, want, dtype)
    # the rotated key is rounded once in both, but the float32 sums (the slices, the rotation's two
    # products) may run in another order or as a fused multiply-add: one unit in the last place
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(keys, np.float32), np.asarray(want_keys, np.float32), rtol=tol, atol=tol)
    if n <= 1:  # the value is not rotated: one slice (or the product itself) is stored exactly
        np.testing.assert_array_equal(np.asarray(values, np.float32), np.asarray(want_values, np.float32))
    else:
        np.testing.assert_allclose(np.asarray(values, np.float32), np.asarray(want_values, np.float32), rtol=tol,
                                   atol=tol)


def test_the_entry_point_keeps_what_the_kernel_does_not_take_on_the_reference(monkeypatch):
    """`attend_write` with `rope`: a product in another dtype than the cache, or a float8 cache, goes to
    `write_reference` (as `attend` does for such inputs), not to the kernel, whatever LLMJAX_ATTENTION."""
    monkeypatch.setenv("LLMJAX_ATTENTION", "interpret")
    qkv, k, v = _normal(9, (1, 2, 6, 32), (1, 20, 2, 32), (1, 20, 2, 32), dtype=jnp.float32)
    rope, slots = _rope_tables(1, 32, 9), jnp.array([7], jnp.int32)
    for k_, v_ in [(k.astype(jnp.bfloat16), v.astype(jnp.bfloat16)),
                   (k.astype(jnp.float8_e4m3fn), v.astype(jnp.float8_e4m3fn))]:
        got = da.attend_write(qkv, k_, v_, slots, rope)
        for a, b in zip(got, da.write_reference(qkv, k_, v_, slots, rope)):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_the_reference_rotates_as_the_model_does():
    """`product_qkv` (the reference's sum and rotation) against RoPE written out (rotate-half on the
    query and key heads, the value head as it is) in float32, where rounding cannot differ."""
    parts = _normal(3, (3, 2, 2, 6, 32), dtype=jnp.float32)[0]
    cos, sin = _rope_tables(2, 32, 4)
    got = da.product_qkv(parts, jnp.float32, (cos, sin))
    x = jnp.sum(parts, 0)  # [B, KV, G + 2, D]
    rotated = jnp.concatenate([-x[..., 16:], x[..., :16]], axis=-1)
    roped = x * cos[:, None, None] + rotated * sin[:, None, None]
    want = jnp.concatenate([roped[:, :, :5], x[:, :, 5:]], axis=2)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("positions", [[[17], [39]], [[0]]])
def test_a_decode_step_writes_and_attends_as_the_cache_write_and_attention_do(monkeypatch, positions):
    """`llama.decode_write_attention` (the model's decode step over a contiguous cache) against
    `kv.write` then `llama.attention`, with the kernel in interpret mode."""
    monkeypatch.setenv("LLMJAX_ATTENTION", "interpret")
    b = len(positions)
    qkv, cache_k, cache_v = _normal(5, (b, 1, 2, 6, 32), (b, 40, 2, 32), (b, 40, 2, 32), dtype=jnp.float32)
    q, k, v = qkv[:, :, :, :4].reshape(b, 1, 8, 32), qkv[:, :, :, 4], qkv[:, :, :, 5]
    positions = jnp.array(positions, jnp.int32)
    out, keys, values = llama.decode_write_attention(qkv, cache_k, cache_v, positions)
    want_keys = llmjax.cache.write(cache_k, k, positions)
    want_values = llmjax.cache.write(cache_v, v, positions)
    k_pos = jnp.broadcast_to(jnp.arange(40), (b, 40))
    monkeypatch.setenv("LLMJAX_ATTENTION", "off")
    want = llama.attention(q, want_keys, want_values, positions, k_pos)
    _assert_close(out, want, jnp.float32)
    np.testing.assert_array_equal(np.asarray(keys), np.asarray(want_keys))
    np.testing.assert_array_equal(np.asarray(values), np.asarray(want_values))


@pytest.mark.parametrize("platform,capability,dtype,tuning", [
    ("gpu", "9.0", jnp.bfloat16, (128, 2)), ("gpu", "8.0", jnp.float16, (128, 2)),
    ("gpu", "8.9", jnp.bfloat16, (64, 3)), ("gpu", "9.0", jnp.float32, (64, 3)), ("cpu", None, jnp.bfloat16, (64, 3))])
def test_decode_defaults_take_large_blocks_only_where_they_fit(monkeypatch, platform, capability, dtype, tuning):
    class Device:
        compute_capability = capability

    Device.platform = platform
    monkeypatch.setattr(da.jax, "devices", lambda *a: [Device()])
    assert da.default_tuning(dtype) == tuning


@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_attention_matches_decode_attention_reference(case):
    b, s, h, n_kv, d, lengths, block_k, splits, dtype = DECODE_CASES[case]
    q, k, v = _normal(s + h, (b, h, d), (b, s, n_kv, d), (b, s, n_kv, d), dtype=dtype)
    lengths = jnp.array(lengths, jnp.int32)
    got = da.decode_attention(q, k, v, lengths, block_k=block_k, splits=splits, interpret=True)
    want = da.decode_attention_reference(q, k, v, lengths)
    assert got.dtype == dtype
    _assert_close(got, want, dtype)
    if 0 in lengths:
        assert not np.asarray(got[list(lengths).index(0)]).any()


def test_decode_attention_reference_is_flash_attention_reference_for_one_query():
    q, k, v = _normal(5, (3, 4, 16), (3, 9, 2, 16), (3, 9, 2, 16), dtype=jnp.float32)
    lengths = jnp.array([9, 4, 0], jnp.int32)
    want = fa.flash_attention_reference(q[:, None], k, v, lengths - 1, lengths)[:, 0]
    _assert_close(da.decode_attention_reference(q, k, v, lengths), want, jnp.float32)


# (batch, heads, kv heads, head dim, page size, pages in the pool, max pages, lengths, block_k, splits, dtype)
PAGED_CASES = {
    "blocks-within-pages": (3, 4, 2, 16, 16, 20, 5, [70, 1, 0], 16, None, jnp.float32),
    "pages-of-5-gathered": (3, 8, 1, 32, 5, 40, 9, [45, 17, 16], 16, 3, jnp.float32),
    "big-pages-groups1-bf16": (2, 2, 2, 16, 32, 9, 4, [100, 33], 16, 2, jnp.bfloat16),
    "float8-pages-bf16-q": (3, 8, 2, 32, 16, 24, 6, [81, 1, 0], 16, 2, jnp.bfloat16),
    "float8-pages-of-5-float32-q": (2, 4, 1, 16, 5, 20, 8, [37, 12], 16, None, jnp.float32),
    "mha-float8-pages-bf16-q": (3, 4, 4, 32, 16, 30, 6, [81, 1, 0], 16, 2, jnp.bfloat16),
    "mha-pages-of-5-gathered": (2, 2, 2, 16, 5, 20, 8, [37, 12], 16, None, jnp.float32),
}


def _paged_inputs(case):
    """PAGED_CASES[case] made: q, the pool (rows own distinct pages in a shuffled order; table entries
    past a row's pages hold 0 or junk ids), tables and lengths; float8 pages for a float8 case."""
    b, h, n_kv, d, page, pool, max_pages, lengths, block_k, splits, dtype = PAGED_CASES[case]
    q, k_pages, v_pages = _normal(page + pool, (b, h, d), (pool, page, n_kv, d), (pool, page, n_kv, d),
                                  dtype=dtype)
    if "float8" in case:  # the engine's kv_dtype="float8_e4m3fn": the kernel widens the pages as it reads
        k_pages, v_pages = k_pages.astype(jnp.float8_e4m3fn), v_pages.astype(jnp.float8_e4m3fn)
    tables = np.array(jax.random.permutation(jax.random.key(pool), pool))[:b * max_pages].reshape(b, max_pages)
    for row, n in enumerate(lengths):
        unused = max_pages - -(-n // page)
        tables[row, max_pages - unused:] = np.where(np.arange(unused) % 2, pool - 1, 0)
    return q, k_pages, v_pages, jnp.asarray(tables, jnp.int32), jnp.array(lengths, jnp.int32)


@pytest.mark.parametrize("case", PAGED_CASES)
def test_paged_attention_matches_paged_attention_reference(case):
    *_, block_k, splits, dtype = PAGED_CASES[case]
    q, k_pages, v_pages, tables, lengths = _paged_inputs(case)
    got = pa.paged_attention(q, k_pages, v_pages, tables, lengths, block_k=block_k, splits=splits, interpret=True)
    want = pa.paged_attention_reference(q, k_pages, v_pages, tables, lengths)
    assert got.dtype == dtype
    _assert_close(got, want, dtype)
    if 0 in lengths:
        assert not np.asarray(got[list(lengths).index(0)]).any()


@pytest.mark.parametrize("case", ["big-pages-groups1-bf16", "mha-float8-pages-bf16-q", "mha-pages-of-5-gathered",
                                  "float8-pages-of-5-float32-q"])
def test_vector_products_match_the_reference(case):
    """vector=True: one query head per kv head multiplied on the CUDA cores (`vector_block`), over
    blocks inside a page, blocks gathered a token at a time, an empty row and a row of one key,
    float8 pages; a grouped-query case (the last) ignores it."""
    *_, block_k, splits, dtype = PAGED_CASES[case]
    q, k_pages, v_pages, tables, lengths = _paged_inputs(case)
    got = pa.paged_attention(q, k_pages, v_pages, tables, lengths, block_k=block_k, splits=splits, vector=True,
                             interpret=True)
    _assert_close(got, pa.paged_attention_reference(q, k_pages, v_pages, tables, lengths), dtype)
    if 0 in lengths:
        assert not np.asarray(got[list(lengths).index(0)]).any()


def test_vector_products_in_the_contiguous_decode_kernel():
    b, s, h, n_kv, d, lengths, block_k, splits, dtype = DECODE_CASES["groups1-auto-splits"]
    q, k, v = _normal(s, (b, h, d), (b, s, n_kv, d), (b, s, n_kv, d), dtype=dtype)
    lengths = jnp.array(lengths, jnp.int32)
    got = da.decode_attention(q, k, v, lengths, block_k=block_k, splits=splits, vector=True, interpret=True)
    _assert_close(got, da.decode_attention_reference(q, k, v, lengths), dtype)


# (rows, queries, heads, kv heads, head dim, page size, pages in the pool, max pages, q_offsets, block_q,
#  block_k, dtype, compute_dtype)
PREFILL_CASES = {
    "blocks-within-pages": (3, 20, 4, 2, 32, 16, 30, 5, [0, 37, 60], 16, 16, jnp.float32, None),
    "pages-of-5-gathered-groups8": (2, 9, 8, 1, 16, 5, 24, 8, [3, 31], 16, 16, jnp.float32, None),
    "blocks-of-two-pages-groups1": (2, 33, 2, 2, 16, 8, 20, 8, [0, 30], 16, 16, jnp.float32, None),
    "empty-row-bf16-head-dim-128": (2, 16, 2, 1, 128, 16, 10, 3, [0, 20], 16, 32, jnp.bfloat16, None),
    "float8-pages-float16-products": (3, 24, 8, 2, 32, 16, 24, 6, [0, 70, 40], 16, 32, jnp.bfloat16, "float16"),
}


@pytest.mark.parametrize("case", PREFILL_CASES)
def test_paged_prefill_matches_its_reference(case):
    """Prompt rows over the pool: each row's queries at its offset, its keys through its block table
    (shuffled pages, junk ids past the row's pages), blocks inside a page or spanning pages, query
    blocks past the row's end; float8 pages widened to float16."""
    b, t, h, n_kv, d, page, pool, max_pages, offsets, block_q, block_k, dtype, compute = PREFILL_CASES[case]
    q, k_pages, v_pages = _normal(t + pool, (b, t, h, d), (pool, page, n_kv, d), (pool, page, n_kv, d), dtype=dtype)
    if "float8" in case:
        k_pages, v_pages = k_pages.astype(jnp.float8_e4m3fn), v_pages.astype(jnp.float8_e4m3fn)
    tables = np.array(jax.random.permutation(jax.random.key(pool), pool))[:b * max_pages].reshape(b, max_pages)
    for row, offset in enumerate(offsets):
        used = -(-(offset + t) // page)
        tables[row, used:] = np.where(np.arange(max_pages - used) % 2, pool - 1, 0)
    if "empty-row" in case:
        tables[0] = 0  # a chunk row with no piece: zeros, as the engine leaves it
    got = pa.paged_prefill(q, k_pages, v_pages, jnp.asarray(tables, jnp.int32), jnp.array(offsets, jnp.int32),
                           block_q=block_q, block_k=block_k, compute_dtype=compute, interpret=True)
    want = pa.paged_prefill_reference(q, k_pages, v_pages, jnp.asarray(tables), jnp.array(offsets))
    assert got.dtype == dtype
    _assert_close(got, want, dtype)


@pytest.mark.parametrize("case", ["blocks-within-pages", "pages-of-5-gathered-groups8", "empty-row-bf16-head-dim-128",
                                  "float8-pages-float16-products"])
@pytest.mark.parametrize("first", [0, 5])
def test_paged_prefill_rows_read_and_write_the_flat_step_in_place(case, first):
    """`paged_prefill_rows`: the same prompt rows laid end to end after `first` other tokens of a flat
    `[N, H, D]` array (the engine's decode rows), read and written there: from `first` on it equals
    `paged_prefill` on those rows, row by row, query blocks past a row's end included (in the flat
    array the next row's start; that the kernel masks them, the test below checks). The reference
    gives the same rows and zeros before them."""
    b, t, h, n_kv, d, page, pool, max_pages, offsets, block_q, block_k, dtype, compute = PREFILL_CASES[case]
    q, k_pages, v_pages = _normal(t + pool + first, (first + b * t, h, d), (pool, page, n_kv, d),
                                  (pool, page, n_kv, d), dtype=dtype)
    if "float8" in case:
        k_pages, v_pages = k_pages.astype(jnp.float8_e4m3fn), v_pages.astype(jnp.float8_e4m3fn)
    tables = jnp.asarray(np.array(jax.random.permutation(jax.random.key(pool), pool))[:b * max_pages]
                         .reshape(b, max_pages), jnp.int32)
    offsets = jnp.array(offsets, jnp.int32)
    got = pa.paged_prefill_rows(q, k_pages, v_pages, tables, offsets, first=first, block_q=block_q,
                                block_k=block_k, compute_dtype=compute, interpret=True)
    assert got.shape == q.shape and got.dtype == dtype
    rows = pa.paged_prefill(q[first:].reshape(b, t, h, d), k_pages, v_pages, tables, offsets, block_q=block_q,
                            block_k=block_k, compute_dtype=compute, interpret=True)
    np.testing.assert_array_equal(np.asarray(got[first:], np.float32), np.asarray(rows.reshape(-1, h, d), np.float32))
    want = pa.paged_prefill_rows_reference(q, k_pages, v_pages, tables, offsets, first=first)
    _assert_close(got[first:], want[first:], dtype)
    assert not np.asarray(want[:first], np.float32).any()
    with pytest.raises(ValueError, match="rows of equal length"):
        pa.paged_prefill_rows(q[:-1], k_pages, v_pages, tables, offsets, first=first, interpret=True)


@pytest.mark.parametrize("case", ["blocks-within-pages", "pages-of-5-gathered-groups8", "blocks-of-two-pages-groups1"])
def test_paged_prefill_rows_write_nothing_outside_their_rows(case):
    """A query block past a row's end is masked, loads and stores: the kernel launched on rows that lie
    between other tokens (7 before, 5 after, which the engine never has: its chunk rows run to the
    end) writes those rows as `paged_prefill` does and nothing else. Interpret mode leaves what no
    program writes NaN, and the last row's overrun lands after the rows, where no later program
    writes, so a missing store mask shows there."""
    b, t, h, n_kv, d, page, pool, max_pages, offsets, block_q, block_k, dtype, compute = PREFILL_CASES[case]
    before, after = 7, 5
    q, k_pages, v_pages = _normal(3 * t + pool, (before + b * t + after, h, d), (pool, page, n_kv, d),
                                  (pool, page, n_kv, d), dtype=dtype)
    tables = jnp.asarray(np.array(jax.random.permutation(jax.random.key(pool), pool))[:b * max_pages]
                         .reshape(b, max_pages), jnp.int32)
    offsets = jnp.array(offsets, jnp.int32)
    assert t % min(block_q, max(16, 1 << (t - 1).bit_length())), "the case must have a block past a row's end"
    out = np.asarray(pa._launch_prefill(q, k_pages, v_pages, tables, offsets, (before, t), block_q=block_q,
                                        block_k=block_k, num_warps=4, num_stages=3, compute_dtype=compute,
                                        interpret=True), np.float32)
    assert np.isnan(out[:before]).all() and np.isnan(out[before + b * t:]).all()
    rows = pa.paged_prefill(q[before:before + b * t].reshape(b, t, h, d), k_pages, v_pages, tables, offsets,
                            block_q=block_q, block_k=block_k, compute_dtype=compute, interpret=True)
    np.testing.assert_array_equal(out[before:before + b * t], np.asarray(rows.reshape(-1, h, d), np.float32))


def test_paged_prefill_reference_is_attention_over_the_gathered_sequence():
    """The definition: what `llama.attention` gives over each row's pages laid end to end, query t of
    row b at position offsets[b] + t."""
    b, t, h, n_kv, d, page = 2, 6, 4, 2, 16, 4
    q, k_pages, v_pages = _normal(1, (b, t, h, d), (12, page, n_kv, d), (12, page, n_kv, d), dtype=jnp.float32)
    tables = jnp.array([[5, 2, 9], [0, 11, 7]], jnp.int32)
    offsets = jnp.array([4, 1], jnp.int32)
    keys = k_pages[tables].reshape(b, -1, n_kv, d)
    values = v_pages[tables].reshape(b, -1, n_kv, d)
    q_pos = offsets[:, None] + jnp.arange(t)[None, :]
    k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape[:2])
    _assert_close(pa.paged_prefill_reference(q, k_pages, v_pages, tables, offsets),
                  llama.attention(q, keys, values, q_pos, k_pos), jnp.float32)


@pytest.mark.slow
@pytest.mark.parametrize("on_mesh", [pytest.param(False, id="one-device"),
                                     pytest.param(True, marks=needs_devices(2), id="mesh")])
@pytest.mark.parametrize("dtype", ["float32", "int4-g32"])
def test_generate_through_the_decode_kernel_gives_the_references_tokens(monkeypatch, dtype, on_mesh):
    """Greedy tokens of `llmjax.generate` with each decode step's attention in the kernel (interpret
    mode: the q/k/v product's K slices summed, RoPE applied and the cache written inside it) equal
    those with the references, for a float and an int4 model, on one device and on a (data 2) mesh
    (where the step keeps XLA's RoPE and the kernel runs per device)."""
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), max_position_embeddings=96)
    params = llmjax.init_random(config, seed=5, dtype=dtype)
    prompts = [[5, 9, 2, 7], [11, 3]]

    def run(mode, p):
        monkeypatch.setenv("LLMJAX_ATTENTION", mode)
        jax.clear_caches()
        return llmjax.generate(p, prompts, max_new_tokens=6)

    p = llmjax.shard(params, make_mesh(data=2, devices=jax.devices()[:2])) if on_mesh else params
    assert run("interpret", p) == run("off", p)


@pytest.mark.slow
@pytest.mark.parametrize("on_mesh, options", [
    pytest.param(False, dict(page_size=8), id="pages-of-8"),
    pytest.param(False, dict(page_size=64, kv_dtype="float8_e4m3fn"), id="float8-pages-of-64"),
    pytest.param(True, dict(page_size=8), marks=needs_devices(4), id="mesh-pages-of-8")])
def test_the_engine_through_the_kernels_gives_the_references_tokens(monkeypatch, on_mesh, options):
    """Greedy tokens of the engine with its attention in the kernels (paged decode and the prompt
    chunks' paged prefill, interpret mode) equal those of the references: prompts spanning several
    chunk rows and steps, pages that hold whole key blocks (64) and pages gathered token by token (8),
    a float8 pool, and a (tensor 2, data 2) mesh where each device reads its own kv heads."""
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), max_position_embeddings=96)
    params = llmjax.init_random(config, seed=4, dtype="float32")
    rng = np.random.default_rng(6)
    prompts = [rng.integers(3, config.vocab_size, rng.integers(2, 40)).tolist() for _ in range(5)]
    small = dict(max_slots=4, prefill_tokens=32, prefill_row=8, decode_steps=3)

    def run(mode, p, **options):
        monkeypatch.setenv("LLMJAX_ATTENTION", mode)
        jax.clear_caches()
        llmjax.engine._EXECUTABLES.clear()
        return llmjax.LLM(p, **small, **options).generate(prompts, max_new_tokens=5, progress=False)

    p = llmjax.shard(params, make_mesh(tensor=2, data=2, devices=jax.devices()[:4])) if on_mesh else params
    assert run("interpret", p, **options) == run("off", p, **options)


def test_float8_pages_stay_close_to_the_exact_result():
    """The price of a float8 cache: e4m3 keeps 3 mantissa bits (~6% per stored value); over a row's
    keys the errors average out to a few percent of the output."""
    b, h, n_kv, d, page, pool = 4, 8, 2, 64, 16, 40
    q, k_pages, v_pages = _normal(3, (b, h, d), (pool, page, n_kv, d), (pool, page, n_kv, d), dtype=jnp.float32)
    tables = jnp.arange(b * 10, dtype=jnp.int32).reshape(b, 10)
    lengths = jnp.array([160, 77, 9, 1], jnp.int32)
    exact = pa.paged_attention_reference(q, k_pages, v_pages, tables, lengths)
    f8 = jnp.float8_e4m3fn
    got = pa.paged_attention(q, k_pages.astype(f8), v_pages.astype(f8), tables, lengths, interpret=True)
    error = np.abs(np.asarray(got - exact)).max() / np.abs(np.asarray(exact)).max()
    assert 1e-4 < error < 6e-2  # rounded (not silently exact), and close


@pytest.mark.parametrize("platform,device_kind,kernel", [("cuda", "NVIDIA H200", True), ("rocm", "gfx942", False)])
@pytest.mark.parametrize("entry, q", [(pa.attend, (4, 32, 128)), (pa.attend_prefill, (4, 64, 32, 128)),
                                      (functools.partial(pa.attend_prefill_rows, first=8), (8 + 4 * 64, 32, 128))],
                         ids=["attend", "attend_prefill", "attend_prefill_rows"])
def test_float8_pages_take_the_kernel_on_cuda_and_the_reference_on_rocm(platform, device_kind, kernel, entry, q):
    f8 = jnp.float8_e4m3fn
    args = (S(q, jnp.bfloat16), S((100, 16, 8, 128), f8), S((100, 16, 8, 128), f8),
            S((4, 20), jnp.int32), S((4,), jnp.int32))
    text = _lower(entry, args, platform, device_kind)
    assert ("__gpu$xla.gpu.triton" in text) == kernel and "f8E4M3FN" in text


@pytest.mark.parametrize("case", ["big-pages-groups1-bf16", "float8-pages-bf16-q"])
def test_float16_products_match_the_reference(case):
    """compute_dtype="float16": bfloat16 queries and the pages (a float8 cache widens to float16 in one
    instruction per pair) multiplied in float16 give the same attention."""
    b, h, n_kv, d, page, pool, max_pages, lengths, block_k, splits, dtype = PAGED_CASES[case]
    q, k_pages, v_pages = _normal(pool, (b, h, d), (pool, page, n_kv, d), (pool, page, n_kv, d), dtype=dtype)
    if "float8" in case:
        k_pages, v_pages = k_pages.astype(jnp.float8_e4m3fn), v_pages.astype(jnp.float8_e4m3fn)
    tables = jax.random.permutation(jax.random.key(page), pool)[:b * max_pages].reshape(b, max_pages)
    lengths = jnp.array(lengths, jnp.int32)
    got = pa.paged_attention(q, k_pages, v_pages, tables.astype(jnp.int32), lengths, block_k=block_k, splits=splits,
                             compute_dtype="float16", interpret=True)
    _assert_close(got, pa.paged_attention_reference(q, k_pages, v_pages, tables, lengths), dtype)
    b, s, h, n_kv, d, lengths, block_k, splits, _ = DECODE_CASES["groups4-three-splits"]
    q, k, v = _normal(s, (b, h, d), (b, s, n_kv, d), (b, s, n_kv, d), dtype=jnp.bfloat16)
    lengths = jnp.array(lengths, jnp.int32)
    got = da.decode_attention(q, k, v, lengths, block_k=block_k, splits=splits, compute_dtype="float16",
                              interpret=True)
    _assert_close(got, da.decode_attention_reference(q, k, v, lengths), jnp.bfloat16)


@pytest.mark.parametrize("pages", [jnp.bfloat16, jnp.float8_e4m3fn])
def test_float16_products_lower_for_cuda(pages):
    """A Triton call whose module Triton accepts (tests/conftest.py verifies every module lowered)."""
    args = (S((4, 32, 128), jnp.bfloat16), S((100, 16, 32, 128), pages), S((100, 16, 32, 128), pages),
            S((4, 20), jnp.int32), S((4,), jnp.int32))
    text = _lower(functools.partial(pa.paged_attention, compute_dtype="float16"), args, "cuda", "NVIDIA H200")
    assert "__gpu$xla.gpu.triton" in text and "f16" in text


def _kernel_jaxpr(jaxpr, name):
    """The program of the pallas_call `name` inside `jaxpr` (the Triton module in a lowering is bytecode)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call" and eqn.params["name"] == name:
            return eqn.params["jaxpr"]
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns") and (found := _kernel_jaxpr(sub, name)) is not None:
                    return found
    return None


@pytest.mark.parametrize("q_dtype,pages,kv_heads,products,warps", [
    (jnp.bfloat16, jnp.bfloat16, 32, "tensor cores", 2),
    (jnp.bfloat16, jnp.float8_e4m3fn, 32, "vector", 1),
    (jnp.bfloat16, jnp.float8_e4m3fn, 8, "tensor cores float16", 1),
    (jnp.float32, jnp.float8_e4m3fn, 8, "tensor cores", 1)])
def test_the_engines_entry_point_takes_the_tuning_of_its_page_dtype(q_dtype, pages, kv_heads, products, warps):
    """`paged_attention.attend` runs the kernel with `TUNING[pages' dtype]` (2 stages; 2 warps for
    bf16 pages; for float8, 1 warp, the CUDA-core products for multi-head attention and float16
    tensor-core products for grouped-query heads, the float16 ones only for 2-byte queries)."""
    args = (S((4, 32, 128), q_dtype), S((100, 16, kv_heads, 128), pages), S((100, 16, kv_heads, 128), pages),
            S((4, 20), jnp.int32), S((4,), jnp.int32))
    text = _lower(pa.attend, args, "cuda", "NVIDIA H200")
    assert f"num_stages = 2 : i32, num_warps = {warps} : i32" in text
    kernel_program = str(_kernel_jaxpr(jax.make_jaxpr(pa.attend)(*args).jaxpr, "paged_attention"))
    assert ("dot_general" in kernel_program) == products.startswith("tensor cores")
    assert bool(re.search(r"(?<!b)f16\[", kernel_program)) == products.endswith("float16")


@pytest.mark.parametrize("dtype,compute,message", [
    (jnp.bfloat16, "float8_e4m3fn", "compute_dtype must be None"),
    (jnp.float32, "float16", "would narrow float32"),
])
def test_bad_compute_dtypes_are_refused(dtype, compute, message):
    q, k = jnp.zeros((1, 2, 16), dtype), jnp.zeros((1, 16, 2, 16), dtype)
    with pytest.raises(ValueError, match=message):
        pa.paged_attention(q, k, k, jnp.zeros((1, 1), jnp.int32), jnp.ones((1,), jnp.int32), compute_dtype=compute,
                           interpret=True)


def test_paged_attention_reference_reads_pages_as_the_module_says():
    """A contiguous cache cut into pages (token p in page `table[p // page_size]`, slot
    `p % page_size`) gives decode attention over the contiguous cache."""
    b, s, page, n_kv, d = 2, 12, 4, 2, 16
    q, k, v = _normal(9, (b, 4, d), (b, s, n_kv, d), (b, s, n_kv, d), dtype=jnp.float32)
    tables = jnp.array([[5, 1, 3], [0, 4, 2]], jnp.int32)
    pool = jnp.zeros((6, page, n_kv, d))
    k_pages = pool.at[tables].set(k.reshape(b, s // page, page, n_kv, d))
    v_pages = pool.at[tables].set(v.reshape(b, s // page, page, n_kv, d))
    lengths = jnp.array([11, 5], jnp.int32)
    _assert_close(pa.paged_attention_reference(q, k_pages, v_pages, tables, lengths),
                  da.decode_attention_reference(q, k, v, lengths), jnp.float32)


GPUS = [("rocm", "gfx942"), ("cuda", "NVIDIA H200")]
S = jax.ShapeDtypeStruct
LOWERED = {
    "flash_attention": (fa.flash_attention, (S((2, 100, 32, 128), jnp.bfloat16), S((2, 300, 8, 128), jnp.bfloat16),
                                             S((2, 300, 8, 128), jnp.bfloat16), S((2,), jnp.int32),
                                             S((2,), jnp.int32))),
    "decode_attention": (da.decode_attention, (S((4, 32, 128), jnp.bfloat16), S((4, 1000, 8, 128), jnp.bfloat16),
                                               S((4, 1000, 8, 128), jnp.bfloat16), S((4,), jnp.int32))),
    "decode_attention_write": (da.decode_attention_write, (S((4, 8, 6, 128), jnp.bfloat16),
                                                           S((4, 1000, 8, 128), jnp.bfloat16),
                                                           S((4, 1000, 8, 128), jnp.bfloat16), S((4,), jnp.int32))),
    "decode_attention_write:slices-rope": (
        lambda qkv, k, v, slots, cos, sin: da.decode_attention_write(qkv, k, v, slots, (cos, sin)),
        (S((4, 4, 8, 6, 128), jnp.float32), S((4, 1000, 8, 128), jnp.bfloat16), S((4, 1000, 8, 128), jnp.bfloat16),
         S((4,), jnp.int32), S((4, 128), jnp.float32), S((4, 128), jnp.float32))),
    "paged_attention": (pa.paged_attention, (S((4, 32, 128), jnp.bfloat16), S((100, 16, 8, 128), jnp.bfloat16),
                                             S((100, 16, 8, 128), jnp.bfloat16), S((4, 20), jnp.int32),
                                             S((4,), jnp.int32))),
    "paged_prefill_attention": (pa.paged_prefill, (S((8, 64, 32, 128), jnp.bfloat16),
                                                   S((100, 64, 8, 128), jnp.bfloat16),
                                                   S((100, 64, 8, 128), jnp.bfloat16), S((8, 4), jnp.int32),
                                                   S((8,), jnp.int32))),
    "paged_prefill_attention:rows": (functools.partial(pa.paged_prefill_rows, first=40),
                                     (S((40 + 8 * 64, 32, 128), jnp.bfloat16), S((100, 64, 8, 128), jnp.bfloat16),
                                      S((100, 64, 8, 128), jnp.bfloat16), S((8, 4), jnp.int32),
                                      S((8,), jnp.int32))),
}


def _lower(fn, args, platform, device_kind):
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("platform,device_kind", GPUS)
@pytest.mark.parametrize("kernel", LOWERED)
def test_kernel_lowers_to_a_triton_call(kernel, platform, device_kind):
    fn, args = LOWERED[kernel]
    text = _lower(fn, args, platform, device_kind)
    assert "__gpu$xla.gpu.triton" in text and f'name = "{kernel.split(":")[0]}"' in text  # name[:variant]


@pytest.mark.parametrize("platform,device_kind,warps,stages",
                         [("rocm", "gfx942", 4, 2), ("cuda", "NVIDIA H200", 8, 3)])
def test_each_platform_gets_its_own_tuning(monkeypatch, platform, device_kind, warps, stages):
    """An MI300's 64 KB of shared memory per workgroup takes smaller tuning than an H200's 227 KB."""
    # On a real Hopper GPU `attend` takes the Mosaic GPU kernel instead (it asks the device, not the
    # abstract mesh): keep the Triton kernel, whose tuning this is, wherever the test runs.
    monkeypatch.setenv("LLMJAX_ATTENTION_MOSAIC", "off")
    args = LOWERED["flash_attention"][1]
    text = _lower(fa.attend, args, platform, device_kind)
    assert f"num_stages = {stages} : i32, num_warps = {warps} : i32" in text


@pytest.mark.parametrize("platform,device_kind", GPUS)
def test_model_prefill_and_decode_lower_through_the_kernels(platform, device_kind):
    config = llmjax.LlamaConfig.preset("tiny")
    model = llama.Llama(config, jnp.bfloat16)
    weights = llama.abstract_params(config, jnp.bfloat16)
    cache = jax.eval_shape(lambda: llmjax.cache.KVCache.zeros(config, 2, 64, jnp.bfloat16))
    ids, rows = S((2, 16), jnp.int32), S((2,), jnp.int32)
    prefill = _lower(lambda *a: gen._prefill(model, *a), (weights, ids, rows, cache), platform, device_kind)
    decode = _lower(lambda *a: gen._decode(model, *a), (weights, rows, rows, cache), platform, device_kind)
    assert 'name = "flash_attention"' in prefill and 'name = "decode_attention"' not in prefill
    # a decode step writes its keys and values into the cache inside the attention kernel
    assert 'name = "decode_attention_write"' in decode and 'name = "flash_attention"' not in decode
    assert "dynamic_update_slice" not in decode and "scatter" not in decode


PROMPTS = [[1, 17, 300, 5, 9, 44, 2, 80, 81, 3, 7, 19, 23, 29, 31, 37, 41, 43], [1, 500], [1, 4, 4, 4, 400]]


def _peaked(params):
    """Random weights whose attention is far from uniform (q and k scaled up), so that an error in
    attention shows in the logits instead of vanishing in an average of near-equal values."""
    def scale(path, w):
        return w * 12.0 if any(getattr(p, "key", None) == "qkv" for p in path) else w
    return dataclasses.replace(params, weights=jax.tree_util.tree_map_with_path(scale, params.weights))


def _run_model(params, mode, monkeypatch):
    """Logits without a cache (flash), of prefill into a cache (flash) and of three decode steps
    (split-K), and greedy tokens from `generate` (the same kernels inside its loop), under `mode`."""
    monkeypatch.setenv("LLMJAX_ATTENTION", mode)
    jax.clear_caches()  # the mode is read when a function is traced; make every function retrace
    ids = jnp.asarray(gen._pad(PROMPTS, 24))
    lengths = jnp.array([len(p) for p in PROMPTS], jnp.int32)
    model = gen._model(params)
    cache = llmjax.cache.KVCache.zeros(params.config, 3, 32, params.dtype)
    step, cache = jax.jit(gen._prefill, static_argnums=0)(model, params.weights, ids, lengths, cache)
    steps = [step]
    for i in range(3):
        step, cache = jax.jit(gen._decode, static_argnums=0)(model, params.weights, jnp.argmax(step, -1),
                                                            lengths + i, cache)
        steps.append(step)
    logits = np.concatenate([np.asarray(llmjax.logits(params, ids)).reshape(-1)] +
                            [np.asarray(s).reshape(-1) for s in steps])
    return logits, llmjax.generate(params, PROMPTS, max_new_tokens=6)


@pytest.mark.slow
def test_model_through_the_kernels_matches_the_reference_model(monkeypatch):
    params = _peaked(llmjax.init_random("tiny", dtype="float32", seed=3))  # head_dim 16, 3 q heads per kv head
    logits, tokens = _run_model(params, "interpret", monkeypatch)
    want_logits, want_tokens = _run_model(params, "off", monkeypatch)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert tokens == want_tokens


@pytest.mark.slow
@needs_devices(4)
def test_sharded_model_through_the_kernels_matches_one_device(monkeypatch):
    """On a mesh each device runs the kernel on its own rows and heads (shard_map)."""
    params = _peaked(llmjax.init_random("tiny", dtype="float32", seed=4))
    want_logits, want_tokens = _run_model(params, "off", monkeypatch)
    sharded = llmjax.shard(params, make_mesh(tensor=2, data=2, devices=jax.devices()[:4]))
    logits, tokens = _run_model(sharded, "interpret", monkeypatch)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-4, atol=1e-4)
    assert tokens == want_tokens


def test_gradients_through_a_kernel_are_the_references(monkeypatch):
    monkeypatch.setenv("LLMJAX_ATTENTION", "interpret")
    q, k, v = _normal(11, (1, 20, 4, 16), (1, 20, 2, 16), (1, 20, 2, 16), dtype=jnp.float32)
    offsets, lengths = jnp.zeros((1,), jnp.int32), jnp.full((1,), 20, jnp.int32)

    def loss(attend, q, k, v):
        return jnp.sum(jnp.sin(attend(q, k, v, offsets, lengths)))

    got = jax.grad(lambda *a: loss(fa.attend, *a), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(fa.flash_attention_reference, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        _assert_close(g, w, jnp.float32)


def test_attention_mode_is_checked(monkeypatch):
    monkeypatch.setenv("LLMJAX_ATTENTION", "fast")
    q = jnp.zeros((1, 2, 16))
    with pytest.raises(ValueError, match="LLMJAX_ATTENTION must be one of auto, off, interpret"):
        da.attend(q, jnp.zeros((1, 4, 1, 16)), jnp.zeros((1, 4, 1, 16)), jnp.ones((1,), jnp.int32))
    assert dispatch.mode("LLMJAX_SOMETHING_UNSET") == "auto"


@pytest.mark.parametrize("variable", sorted(name for name, choices in dispatch.SETTINGS.items() if choices)
                         + ["LLMJAX_ALLREDUCE_BYTES", "LLMJAX_ALLREDUCE_BLOCKS", "LLMJAX_ALLREDUCE_TIMEOUT_S"])
def test_every_setting_is_checked_on_a_cpu_where_it_does_not_apply(monkeypatch, variable):
    """Most settings are read only on a GPU or a mesh; a bad value must still fail where llmjax traces,
    naming the variable, not pass unnoticed on a CPU."""
    params = llmjax.init_random("tiny")
    monkeypatch.setenv(variable, "bogus")
    with pytest.raises(ValueError, match=f"{variable} must be "):
        llmjax.generate(params, [1, 2, 3], max_new_tokens=2)
    monkeypatch.setenv(variable, (dispatch.SETTINGS[variable] or ("16",))[0])  # a value it takes
    assert len(llmjax.generate(params, [1, 2, 3], max_new_tokens=2)) == 2


def test_a_variable_llmjax_does_not_read_is_warned_of_once(monkeypatch):
    params = llmjax.init_random("tiny")
    monkeypatch.setenv("LLMJAX_ATENTION", "off")  # misspelt
    monkeypatch.setattr(dispatch, "_unknown", set())
    with pytest.warns(UserWarning, match="LLMJAX_ATENTION is set, but llmjax reads no such variable"):
        llmjax.generate(params, [1, 2, 3], max_new_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llmjax.generate(params, [1, 2, 3], max_new_tokens=2)


@pytest.mark.parametrize("value, message", [("interpret", "got 'interpret'; LLMJAX_ATTENTION=interpret runs"),
                                            ("fast", "got 'fast'$")])
def test_paged_prefill_switch_is_checked(monkeypatch, value, message):
    monkeypatch.setenv("LLMJAX_PAGED_PREFILL", value)
    for check in (lambda: llama._gathers(None, 1), dispatch.check_settings):  # where it is read, and everywhere
        with pytest.raises(ValueError, match=f"LLMJAX_PAGED_PREFILL must be one of auto, off, {message}"):
            check()


def test_head_dims_the_kernels_do_not_take_fall_back_to_the_reference(monkeypatch):
    monkeypatch.setenv("LLMJAX_ATTENTION", "interpret")
    assert [fa.supported(d) for d in (8, 16, 24, 32, 64, 96, 128, 256)] == [False, True, False, True, True, False,
                                                                               True, True]
    q, k, v = _normal(12, (2, 6, 24), (2, 5, 3, 24), (2, 5, 3, 24), dtype=jnp.float32)
    lengths = jnp.array([5, 2], jnp.int32)
    _assert_close(da.attend(q, k, v, lengths), da.decode_attention_reference(q, k, v, lengths), jnp.float32)
    with pytest.raises(ValueError, match="power of two >= 16, got 24"):
        da.decode_attention(q, k, v, lengths, interpret=True)


@pytest.mark.parametrize("call, message", [
    (lambda: fa.flash_attention(jnp.zeros((1, 4, 6, 16)), jnp.zeros((1, 4, 4, 16)), jnp.zeros((1, 4, 4, 16)),
                                jnp.zeros((1,), jnp.int32), jnp.ones((1,), jnp.int32)), "not a multiple of 4 kv"),
    (lambda: fa.flash_attention(jnp.zeros((2, 4, 4, 16)), jnp.zeros((2, 4, 4, 16)), jnp.zeros((2, 4, 4, 16)),
                                jnp.zeros((1,), jnp.int32), jnp.ones((2,), jnp.int32)), r"shape \[B\] = \(2,\)"),
    (lambda: da.decode_attention(jnp.zeros((1, 4, 16)), jnp.zeros((1, 8, 4, 32)), jnp.zeros((1, 8, 4, 32)),
                                 jnp.ones((1,), jnp.int32)), "same B and D"),
    (lambda: pa.paged_attention(jnp.zeros((2, 4, 16)), jnp.zeros((3, 8, 2, 16)), jnp.zeros((3, 8, 2, 16)),
                                jnp.zeros((3, 2), jnp.int32), jnp.ones((2,), jnp.int32)),
     r"block_tables \[B, max_pages\]"),
    (lambda: da.decode_attention_write(jnp.zeros((1, 4, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)),
                                       jnp.ones((1,), jnp.int32)), r"qkv \[B, KV, G \+ 2, D\]"),
    (lambda: da.decode_attention_write(jnp.zeros((1, 4, 3, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)),
                                       jnp.ones((1,), jnp.int32)), r"\[B, S, KV, D\] = \[1, S, 4, 16\]"),
    (lambda: da.decode_attention_write(jnp.zeros((1, 2, 3, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)),
                                       jnp.ones((2,), jnp.int32)), r"slots of shape \[B\] = \(1,\)"),
    (lambda: da.decode_attention_write(jnp.zeros((2, 1, 2, 3, 16)), jnp.zeros((1, 8, 2, 16)), jnp.zeros((1, 8, 2, 16)),
                                       jnp.ones((1,), jnp.int32), (jnp.zeros((1, 8)), jnp.zeros((1, 8)))),
     r"rope as \(cos, sin\), each \[B, D\] = \[1, 16\]"),
    (lambda: pa.paged_attention(jnp.zeros((2, 4, 16), jnp.bfloat16), jnp.zeros((3, 8, 2, 16)),
                                jnp.zeros((3, 8, 2, 16)), jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)),
     "one dtype"),
    (lambda: pa.paged_prefill(jnp.zeros((2, 4, 16)), jnp.zeros((3, 8, 2, 16)), jnp.zeros((3, 8, 2, 16)),
                              jnp.zeros((2, 2), jnp.int32), jnp.zeros((2,), jnp.int32)), r"q \[B, T, H, D\]"),
    (lambda: pa.paged_prefill(jnp.zeros((2, 5, 4, 16)), jnp.zeros((3, 8, 2, 16)), jnp.zeros((3, 8, 2, 16)),
                              jnp.zeros((2, 2), jnp.int32), jnp.zeros((3,), jnp.int32)), r"q_offsets \[B\]"),
    (lambda: pa.paged_prefill(jnp.zeros((2, 5, 4, 16)), jnp.zeros((3, 8, 2, 16)), jnp.zeros((3, 8, 2, 16)),
                              jnp.zeros((3, 2), jnp.int32), jnp.zeros((2,), jnp.int32)),
     r"paged_prefill takes block_tables \[B, max_pages\] with B = 2"),
])
def test_bad_inputs_are_refused_with_the_reason(call, message):
    with pytest.raises(ValueError, match=message):
        call()
