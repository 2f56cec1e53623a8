"""The page-write kernel against its reference (interpret mode: awkward widths, float8 saturation,
slots past the pool's end), its lowering for cuda and rocm, the engine through it on one device and
on a mesh, and bad input."""

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
from llmjax.sharding import make_mesh


def _case(seed, dtype, pages, page_size, kv_heads, head_dim, n, scale=1.0):
    keys = jax.random.split(jax.random.key(seed), 4)
    pool = lambda key: jax.random.normal(key, (pages, page_size, kv_heads, head_dim)).astype(dtype)  # noqa: E731
    k = scale * jax.random.normal(keys[2], (n, kv_heads, head_dim), jnp.float32)
    v = jax.random.normal(keys[3], (n, kv_heads, head_dim), jnp.float32)
    # distinct slots, some past the pool's end (those write nothing)
    slots = np.random.default_rng(seed).permutation(pages * page_size + 7)[:n]
    return pool(keys[0]), pool(keys[1]), k, v, jnp.asarray(slots, jnp.int32)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float8_e4m3fn])
@pytest.mark.parametrize("pages, page_size, kv_heads, head_dim, n", [
    (5, 4, 2, 16, 7),  # a row of 32 values
    (4, 16, 3, 32, 9),  # 96: not a power of two (a masked block)
    (3, 8, 1, 64, 1),  # one token
    (2, 64, 5, 20, 30),  # 100 values, pages of 64
])
def test_kernel_matches_the_reference(dtype, pages, page_size, kv_heads, head_dim, n):
    # scale 600: float8 keys past its largest finite value (448) saturate in both, never NaN
    case = _case(pages * n, dtype, pages, page_size, kv_heads, head_dim, n, scale=600.0)
    want = pw.write_pages_reference(*case)
    got = pw.write_pages(*case, interpret=True)
    for g, w, old in zip(got, want, case[:2]):
        assert g.dtype == w.dtype == old.dtype and g.shape == w.shape == old.shape
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))
        assert not np.isnan(np.asarray(g, np.float32)).any()
        # only the written slots changed
        changed = np.any(np.asarray(g, np.float32) != np.asarray(old, np.float32), axis=(2, 3)).reshape(-1)
        assert set(np.flatnonzero(changed)) <= set(np.asarray(case[4]).tolist())


def test_an_empty_step_returns_the_pools():
    k_pages, v_pages, k, v, slots = _case(1, jnp.float32, 2, 4, 1, 16, 3)
    got = pw.write_pages(k_pages, v_pages, k[:0], v[:0], slots[:0], interpret=True)
    np.testing.assert_array_equal(got[0], k_pages)
    np.testing.assert_array_equal(got[1], v_pages)


@pytest.mark.parametrize("platform, device_kind, pool_dtype", [
    ("rocm", "gfx942", jnp.bfloat16), ("cuda", "NVIDIA H200", jnp.bfloat16),
    ("cuda", "NVIDIA H200", jnp.float8_e4m3fn)])
@pytest.mark.parametrize("head_dim", [128, 20])  # rows of 1024 and of 160 values (masked)
def test_the_kernel_lowers_to_a_triton_call(platform, device_kind, pool_dtype, head_dim):
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu"))
    pool = jax.ShapeDtypeStruct((64, 16, 8, head_dim), pool_dtype)
    new = jax.ShapeDtypeStruct((40, 8, head_dim), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(pw.apply).trace(pool, pool, new, new, jax.ShapeDtypeStruct((40,), jnp.int32)).lower(
            lowering_platforms=(platform,)).as_text()
    assert "__gpu$xla.gpu.triton" in text and 'name = "page_write"' in text
    assert "scatter" not in text  # the pools are written by the kernel alone


def test_the_engine_through_the_kernel_gives_the_references_tokens(monkeypatch):
    """Greedy tokens of the engine with every page write in the kernel (interpret mode), on one device
    and on a (tensor 2, data 2) mesh (each device its own kv heads), equal those with XLA's scatters;
    float32 and float8 pools."""
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

    for kv_dtype in (None, "float8_e4m3fn"):
        want = run("off", params, kv_dtype)
        for p in (params, llmjax.shard(params, make_mesh(tensor=2, data=2, devices=jax.devices()[:4]))):
            assert run("interpret", p, kv_dtype) == want


def test_bad_input_is_refused(monkeypatch):
    k_pages, v_pages, k, v, slots = _case(2, jnp.float32, 2, 4, 2, 16, 3)
    with pytest.raises(ValueError, match="one shape"):
        pw.apply(k_pages, v_pages[:1], k, v, slots)
    with pytest.raises(ValueError, match="KV and D"):
        pw.apply(k_pages, v_pages, k[:, :1], v[:, :1], slots)
    with pytest.raises(ValueError, match="one slot per token"):
        pw.apply(k_pages, v_pages, k, v, slots[:2])
    monkeypatch.setenv("LLMJAX_PAGE_WRITE", "fast")
    with pytest.raises(ValueError, match="LLMJAX_PAGE_WRITE"):
        pw.apply(k_pages, v_pages, k, v, slots)
