"""The Hopper prefill kernel (`llmjax.kernels.flash_attention_mgpu`) against the reference, in Mosaic GPU's
interpret mode on the CPU (threads, barriers and TMA copies emulated; the two products as `jnp.dot`s,
which that interpreter's wgmma cannot take), and its lowering and dispatch for an abstract H200.

The tensor-core products themselves run only on a GPU: `benchmarks/prefill_mgpu.py` checks the compiled
kernel against the reference there (BENCHMARKS.md records its runs).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import ShapeDtypeStruct as S
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from llmjax.kernels import flash_attention as fa, flash_attention_mgpu as mgpu

from conftest import needs_cpu

# (batch, queries, keys, heads, kv heads, head dim, q_offsets, kv_lengths, dtype, tuning)
CASES = {
    # row 0 pads its keys, row 1 is a chunk at an offset; queries and keys off the block grid
    "padded-row-and-chunk": (2, 70, 100, 4, 2, 64, [0, 30], [70, 95], jnp.bfloat16, {}),
    # rows of no key (zeros), one key (its value) and all keys
    "empty-and-length-1-rows": (3, 77, 77, 2, 2, 64, [0, 0, 0], [0, 1, 77], jnp.bfloat16, {}),
    # eight query heads per kv head, float16, three slots of 64 keys, five key blocks
    "groups8-float16-three-stages": (1, 40, 300, 8, 1, 128, [250], [290], jnp.float16,
                                     dict(block_kv=64, stages=3)),
    # with 64-key blocks the first consumer needs one block and its partner two: the first releases
    # the second block's slot without reading it; one program takes all four items in turn
    "partner-ends-first-one-program": (1, 256, 256, 2, 1, 64, [0], [256], jnp.bfloat16,
                                       dict(block_kv=64, programs=1)),
    # queries before position 0 (a negative offset) see no key and give zeros, in a consumer that has
    # key blocks for its later queries
    "negative-offset": (1, 128, 128, 1, 1, 64, [-100], [128], jnp.bfloat16, {}),
    # one program per item (no program takes a second)
    "a-program-per-item": (2, 70, 100, 2, 1, 64, [0, 0], [70, 33], jnp.bfloat16, dict(programs=0)),
    # items by kv head in chunks of 2 of the 5 query blocks (the last chunk 1): 2 kv heads of 2 queries
    "kv-head-order-in-chunks": (2, 600, 600, 4, 2, 64, [0, 0], [600, 411], jnp.bfloat16,
                                dict(chunk=2, programs=3)),
}


@needs_cpu
@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_the_reference_in_interpret_mode(case):
    b, t, s, h, n_kv, d, offsets, lengths, dtype, tuning = CASES[case]
    keys = jax.random.split(jax.random.key(t * s + h), 3)
    q, k, v = (jax.random.normal(key, shape, jnp.float32).astype(dtype)
               for key, shape in zip(keys, [(b, t, h, d), (b, s, n_kv, d), (b, s, n_kv, d)]))
    offsets, lengths = jnp.array(offsets, jnp.int32), jnp.array(lengths, jnp.int32)
    got = mgpu.flash_attention(q, k, v, offsets, lengths, interpret=True, **tuning)
    want = fa.flash_attention_reference(*(x.astype(jnp.float32) for x in (q, k, v)), offsets, lengths)
    assert got.shape == q.shape and got.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-2 * np.abs(want).max())
    if case == "negative-offset":
        assert not got[0, :100].any() and got[0, 100:].any()
    if case == "empty-and-length-1-rows":
        assert not got[0].any()  # a row without keys gives zeros
        np.testing.assert_allclose(got[1], np.broadcast_to(np.asarray(v[1, :1], np.float32), (t, h, d)),
                                   atol=1e-6)  # one key: its value


def test_block_steps_agree_with_brute_force():
    """`_steps`: the key blocks some query of a consumer sees, and those every query sees in full."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        block_q, block_kv = int(rng.choice([64, 128])), int(rng.choice([64, 128]))
        offset, length, first = (int(x) for x in rng.integers([-100, 0, 0], [300, 600, 400]))
        full, end, seen = (int(x) for x in mgpu._steps(jnp.int32(offset), jnp.int32(length), jnp.int32(first),
                                                       block_q, block_kv))
        pos = offset + first + np.arange(block_q)[:, None]
        for j in range(max(end, 0) + 2):
            key = j * block_kv + np.arange(block_kv)[None, :]
            visible = (key <= pos) & (key < length)
            assert visible.any() == (j < end), (offset, length, first, j)
            assert visible.all() == (j < full), (offset, length, first, j)
        assert seen == max(0, min(length, offset + first + block_q))


@pytest.mark.parametrize("h,b,tiles,groups,chunk", [(32, 1, 256, 4, 32), (32, 8, 16, 4, 33), (8, 3, 6, 8, 4),
                                                    (4, 2, 7, 1, 3), (6, 2, 5, 3, 0), (8, 1, 313, 4, 32)])
def test_every_item_order_takes_each_item_once_longest_first_per_chunk(h, b, tiles, groups, chunk):
    at = mgpu._order(h, b, tiles, groups, chunk)
    items = [tuple(int(x) for x in at(jnp.int32(i))) for i in range(h * b * tiles)]
    assert sorted(items) == [(hd, r, t) for hd in range(h) for r in range(b) for t in range(tiles)]
    c = min(chunk, tiles) if chunk else tiles
    per_chunk = h * b * c  # each chunk's items cover its c query blocks (the last: what is left)
    for start in range(0, len(items), per_chunk):
        top = tiles - start // per_chunk * c
        blocks = {t for _, _, t in items[start:start + per_chunk]}
        assert blocks == set(range(max(top - c, 0), top))
    if chunk:  # the query heads that share a kv head come together
        for start in range(0, len(items), groups):
            heads = [hd for hd, _, _ in items[start:start + groups]]
            assert heads == list(range(heads[0], heads[0] + groups)) and heads[0] % groups == 0


def test_long_rows_take_chunks_by_their_length():
    assert [mgpu.default_chunk(rows) for rows in (1, 8192, 16383, 16384, 32768, 65535, 65536, 131072)] == \
        [0, 0, 0, 24, 24, 24, 32, 32]


def _abstract_h200():
    return AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind="NVIDIA H200", num_cores=None, platform="gpu"))


def _lower(fn, args, platform):
    """A fresh trace each time (a new function for jit's cache): the choice of kernel is made while tracing."""
    with jax.sharding.use_abstract_mesh(_abstract_h200()):
        return jax.jit(lambda *a: fn(*a)).trace(*args).lower(lowering_platforms=(platform,)).as_text()


ARGS = (S((2, 300, 32, 128), jnp.bfloat16), S((2, 300, 8, 128), jnp.bfloat16), S((2, 300, 8, 128), jnp.bfloat16),
        S((2,), jnp.int32), S((2,), jnp.int32))


@pytest.mark.parametrize("tuning,head_dim", [({}, 128), (dict(block_kv=64, stages=3), 128), (dict(chunk=32), 128),
                                             (dict(block_kv=192), 64)])  # 192 keys: blocks not halved
def test_kernel_lowers_to_a_mosaic_gpu_call(tuning, head_dim):
    args = [S(x.shape[:3] + (head_dim,), x.dtype) for x in ARGS[:3]] + list(ARGS[3:])
    text = _lower(lambda *a: mgpu.flash_attention(*a, **tuning), args, "cuda")
    assert "mosaic_gpu" in text and "__gpu$xla.gpu.triton" not in text


@pytest.mark.parametrize("platform,hopper,env,head_dim,mosaic", [
    ("cuda", True, None, 128, True),
    ("cuda", True, "off", 128, False),  # LLMJAX_ATTENTION_MOSAIC=off: the Triton kernel
    ("cuda", True, None, 32, False),  # a head dim it does not take
    ("cuda", False, None, 128, False),  # not a Hopper GPU
    ("rocm", True, None, 128, False),  # AMD: always the Triton kernel
])
def test_attend_takes_the_mosaic_kernel_on_hopper_only(monkeypatch, platform, hopper, env, head_dim, mosaic):
    monkeypatch.setattr(mgpu, "on_hopper", lambda: hopper)
    monkeypatch.setattr(mgpu, "miscompiling_cuda", lambda: False)
    if env:
        monkeypatch.setenv("LLMJAX_ATTENTION_MOSAIC", env)
    q, k, v, offsets, lengths = ARGS
    q, k, v = (S(x.shape[:3] + (head_dim,), x.dtype) for x in (q, k, v))
    text = _lower(fa.attend, (q, k, v, offsets, lengths), platform)
    assert ("mosaic_gpu" in text) == mosaic and ("__gpu$xla.gpu.triton" in text) == (not mosaic)


@pytest.mark.parametrize("change,message", [
    (dict(dtype=jnp.float32), "bf16 or float16"),
    (dict(head_dim=32), "head dim 64 or 128"),
    (dict(tuning=dict(block_kv=96)), "multiples of 64"),
    (dict(tuning=dict(stages=1)), "stages >= 2"),
    (dict(head_dim=128, tuning=dict(stages=3)), "shared memory"),  # 64 KB of queries + 3 x 64 KB of K/V
])
def test_bad_operands_and_tunings_are_refused(change, message):
    dtype, d = change.get("dtype", jnp.bfloat16), change.get("head_dim", 64)
    q, k = jnp.zeros((1, 64, 2, d), dtype), jnp.zeros((1, 64, 1, d), dtype)
    rows = jnp.zeros((1,), jnp.int32)
    with pytest.raises(ValueError, match=message):
        mgpu.flash_attention(q, k, k, rows, rows + 64, interpret=True, **change.get("tuning", {}))


def test_a_cuda_with_the_ptxas_miscompilation_keeps_the_triton_kernel(monkeypatch):
    monkeypatch.setattr(mgpu, "on_hopper", lambda: True)
    monkeypatch.setattr(mgpu, "miscompiling_cuda", lambda: True)
    assert "__gpu$xla.gpu.triton" in _lower(fa.attend, ARGS, "cuda")
