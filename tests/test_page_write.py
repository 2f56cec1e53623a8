"""The rotate-and-write kernel against its reference (interpret mode: awkward head counts and widths,
float8 saturation, slots past the pool's end), its lowering for cuda and rocm, the engine through it
on one device and on a mesh, and bad input."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

import llmjax
from llmjax.config import LlamaConfig
from llmjax.engine import LLM
from llmjax.kernels import page_write as pw
from llmjax.models.rope import rope_tables
from llmjax.sharding import make_mesh

from conftest import needs_devices


def _case(seed, dtype, pool_dtype, pages, page_size, kv_heads, groups, head_dim, n, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 4)
    pool = lambda key: jax.random.normal(key, (pages, page_size, kv_heads, head_dim)).astype(pool_dtype)  # noqa: E731
    qkv = (scale * jax.random.normal(keys[2], (n, kv_heads, groups + 2, head_dim))).astype(dtype)
    positions = jax.random.randint(keys[3], (1, n), 0, 4096)
    cos, sin = rope_tables(dataclasses.replace(LlamaConfig.preset("tiny"), head_dim=head_dim), positions)
    # distinct slots, some past the pool's end (those write nothing)
    slots = np.random.default_rng(seed).permutation(pages * page_size + 7)[:n]
    return qkv, pool(keys[0]), pool(keys[1]), cos[0], sin[0], jnp.asarray(slots, jnp.int32)


@pytest.mark.parametrize("dtype, pool_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                               (jnp.bfloat16, jnp.float8_e4m3fn), (jnp.bfloat16, jnp.float32)])
@pytest.mark.parametrize("pages, page_size, kv_heads, groups, head_dim, n", [
    (5, 4, 2, 1, 16, 7),  # multi-head: 6 head rows a token, one masked block of 8
    (4, 16, 3, 4, 32, 9),  # groups of 4: 18 head rows (32-row blocks, masked)
    (3, 8, 1, 8, 64, 1),  # one token, groups of 8
    (2, 64, 5, 3, 20, 30),  # halves of 10 (masked columns), 25 head rows, pages of 64
    (2, 16, 16, 1, 8, 5),  # 48 head rows: two blocks of 32, the second partly masked
])
def test_kernel_matches_the_reference(dtype, pool_dtype, pages, page_size, kv_heads, groups, head_dim, n):
    # scale 150: rotated float8 keys past its largest finite value (448) saturate in both, never NaN
    case = _case(pages * n, dtype, pool_dtype, pages, page_size, kv_heads, groups, head_dim, n, scale=150.0)
    want = pw.rope_write_reference(*case)
    got = pw.rope_write_pages(*case, interpret=True)
    assert got[0].shape == want[0].shape == (n, kv_heads * groups, head_dim) and got[0].dtype == dtype
    # Both rotate in float32 and round once (`apply_rope`), so on a CPU bfloat16 queries and keys are
    # the same bits (a bfloat16 rotation rounded after each operation was a rounding apart); float32
    # ones may differ in the last bit (XLA may fuse a product and a sum). A GPU's XLA rounds the
    # reference's fusion its own way: a rounding apart there.
    tol = 1e-6 if dtype == jnp.float32 else 0 if jax.default_backend() == "cpu" else _rtol(dtype, pool_dtype)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        assert not np.isnan(g).any()
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * 150)
    # the values are not rotated, so they are the product's own (narrowed): every written slot exact
    flat = lambda pages: np.asarray(pages, np.float32).reshape(-1, kv_heads, head_dim)  # noqa: E731
    slots = np.asarray(case[5])
    inside = slots < pages * page_size
    want_v = np.asarray(pw.narrow(case[0][:, :, groups + 1], pool_dtype), np.float32)
    np.testing.assert_array_equal(flat(got[2])[slots[inside]], want_v[inside])
    # only the written slots changed
    for g, old in zip(got[1:], case[1:3]):
        changed = np.any(flat(g) != flat(old), axis=(1, 2))
        assert set(np.flatnonzero(changed)) <= set(slots[inside].tolist())


def _rtol(dtype, pool_dtype):  # a few roundings of the narrower dtype
    return 2 ** -3 if pool_dtype == jnp.float8_e4m3fn else {jnp.float32: 1e-6, jnp.bfloat16: 2 ** -6}[dtype]


def test_an_empty_step_returns_the_pools():
    qkv, k_pages, v_pages, cos, sin, slots = _case(1, jnp.float32, jnp.float32, 2, 4, 1, 1, 16, 3)
    q, k, v = pw.rope_write_pages(qkv[:0], k_pages, v_pages, cos[:0], sin[:0], slots[:0], interpret=True)
    assert q.shape == (0, 1, 16)
    np.testing.assert_array_equal(k, k_pages)
    np.testing.assert_array_equal(v, v_pages)


@pytest.mark.parametrize("platform, device_kind, pool_dtype", [
    ("rocm", "gfx942", jnp.bfloat16), ("cuda", "NVIDIA H200", jnp.bfloat16),
    ("cuda", "NVIDIA H200", jnp.float8_e4m3fn), ("cuda", "NVIDIA H200", jnp.float32)])
@pytest.mark.parametrize("head_dim", [128, 20])  # halves of 64 and of 10 (masked)
def test_the_kernel_lowers_to_a_triton_call(platform, device_kind, pool_dtype, head_dim):
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu"))
    pool = jax.ShapeDtypeStruct((64, 16, 8, head_dim), pool_dtype)
    qkv = jax.ShapeDtypeStruct((40, 8, 6, head_dim), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((40, head_dim), jnp.float32)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(pw.apply).trace(qkv, pool, pool, table, table, jax.ShapeDtypeStruct((40,), jnp.int32)).lower(
            lowering_platforms=(platform,)).as_text()
    assert "__gpu$xla.gpu.triton" in text and 'name = "rope_page_write"' in text
    assert "scatter" not in text  # the pools are written by the kernel alone


def test_a_float8_pool_takes_the_reference_on_rocm():
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind="gfx942", num_cores=None, platform="gpu"))
    pool = jax.ShapeDtypeStruct((64, 16, 8, 128), jnp.float8_e4m3fn)
    qkv = jax.ShapeDtypeStruct((40, 8, 6, 128), jnp.bfloat16)
    table = jax.ShapeDtypeStruct((40, 128), jnp.float32)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(pw.apply).trace(qkv, pool, pool, table, table, jax.ShapeDtypeStruct((40,), jnp.int32)).lower(
            lowering_platforms=("rocm",)).as_text()
    assert "rope_page_write" not in text and "scatter" in text


@pytest.mark.parametrize("on_mesh", [pytest.param(False, id="one-device"),
                                     pytest.param(True, marks=needs_devices(4), id="mesh")])
def test_the_engine_through_the_kernel_gives_the_references_tokens(monkeypatch, on_mesh):
    """Greedy tokens of the engine with every page write in the kernel (interpret mode), on one device
    and on a (tensor 2, data 2) mesh (each device its own kv heads), equal those with XLA's scatters on
    one device; float32 and float8 pools."""
    config = dataclasses.replace(LlamaConfig.preset("tiny"), max_position_embeddings=96)
    params = llmjax.init_random(config, seed=3, dtype="float32")
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, config.vocab_size, rng.integers(2, 20)).tolist() for _ in range(6)]
    small = dict(max_slots=4, page_size=8, prefill_tokens=32, prefill_row=16, decode_steps=3)

    def run(mode, p, kv_dtype):
        monkeypatch.setenv("LLMJAX_PAGE_WRITE", mode)
        jax.clear_caches()
        llmjax.engine._EXECUTABLES.clear()
        return LLM(p, kv_dtype=kv_dtype, **small).generate(prompts, max_new_tokens=6, progress=False)

    p = llmjax.shard(params, make_mesh(tensor=2, data=2, devices=jax.devices()[:4])) if on_mesh else params
    for kv_dtype in (None, "float8_e4m3fn"):
        assert run("interpret", p, kv_dtype) == run("off", params, kv_dtype)


def test_bad_input_is_refused(monkeypatch):
    qkv, k_pages, v_pages, cos, sin, slots = _case(2, jnp.float32, jnp.float32, 2, 4, 2, 1, 16, 3)
    with pytest.raises(ValueError, match="one shape"):
        pw.apply(qkv, k_pages, v_pages[:1], cos, sin, slots)
    with pytest.raises(ValueError, match="KV and D"):
        pw.apply(qkv[:, :1], k_pages, v_pages, cos, sin, slots)
    with pytest.raises(ValueError, match="G >= 1"):
        pw.apply(qkv[:, :, :2], k_pages, v_pages, cos, sin, slots)
    with pytest.raises(ValueError, match="cos, sin"):
        pw.apply(qkv, k_pages, v_pages, cos[:2], sin, slots)
    with pytest.raises(ValueError, match="one slot per token"):
        pw.apply(qkv, k_pages, v_pages, cos, sin, slots[:2])
    odd = _case(2, jnp.float32, jnp.float32, 2, 4, 2, 1, 15, 3)
    with pytest.raises(ValueError, match="D must be even"):
        pw.apply(*odd)
    monkeypatch.setenv("LLMJAX_PAGE_WRITE", "fast")
    with pytest.raises(ValueError, match="LLMJAX_PAGE_WRITE"):
        pw.apply(qkv, k_pages, v_pages, cos, sin, slots)
