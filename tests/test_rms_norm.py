"""The RMSNorm kernel against its reference (interpret mode, awkward widths and row counts), its
lowering for cuda and rocm, the model's norm through it, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

import llmjax
from llmjax.kernels import rms_norm as rn
from llmjax.sharding import make_mesh


@pytest.mark.parametrize("shape", [(1, 96), (3, 100), (77, 64), (2, 5, 130), (1, 1, 4096)])
@pytest.mark.parametrize("dtype, scale_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                                (jnp.bfloat16, jnp.float32)])
def test_kernel_matches_the_reference(shape, dtype, scale_dtype):
    kx, ks = jax.random.split(jax.random.key(sum(shape)))
    x = (3.0 * jax.random.normal(kx, shape, jnp.float32)).astype(dtype)
    scale = (1.0 + 0.5 * jax.random.normal(ks, shape[-1:], jnp.float32)).astype(scale_dtype)
    got = rn.rms_norm(x, scale, 1e-5, interpret=True)
    want = rn.rms_norm_reference(x, scale, 1e-5)
    assert got.dtype == want.dtype == jnp.result_type(scale_dtype, dtype) and got.shape == shape
    # The sum of squares is added in another order: float32 agrees to its rounding, bfloat16 to one
    # unit in the last place where a normalized value lands near a rounding boundary.
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol)
    if got.dtype == jnp.bfloat16:  # and nearly every value is the same bfloat16
        assert np.mean(np.asarray(got, np.float32) == np.asarray(want, np.float32)) > 0.98


def test_a_zero_row_gives_zeros_not_nan():
    x = jnp.zeros((2, 48), jnp.float32).at[1].set(1.0)
    got = np.asarray(rn.rms_norm(x, jnp.ones((48,)), 1e-6, interpret=True))
    np.testing.assert_array_equal(got[0], 0.0)
    np.testing.assert_allclose(got[1], 1.0, rtol=1e-5)


@pytest.mark.parametrize("platform, device_kind", [("rocm", "gfx942"), ("cuda", "NVIDIA H200")])
def test_the_kernel_lowers_to_a_triton_call(platform, device_kind):
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu"))
    args = (jax.ShapeDtypeStruct((1, 1, 4096), jnp.bfloat16), jax.ShapeDtypeStruct((4096,), jnp.bfloat16))
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(lambda x, s: rn.apply(x, s, 1e-5)).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert "__gpu$xla.gpu.triton" in text and 'name = "rms_norm"' in text


def test_the_model_through_the_kernel_matches_the_reference(monkeypatch):
    """Logits and greedy tokens with every norm in the kernel (interpret mode), on one device and on
    a mesh (each device its own rows), equal those of the reference norm."""
    params = llmjax.init_random("tiny", dtype="float32", seed=8)
    prompts = [[1, 17, 300, 5, 9], [1, 500, 3]]

    def run(mode, p):
        monkeypatch.setenv("LLMJAX_NORM", mode)
        jax.clear_caches()
        return (np.asarray(llmjax.logits(p, jnp.asarray([[1, 5, 9, 44, 2, 80]]))),
                llmjax.generate(p, prompts, max_new_tokens=5))

    want_logits, want_tokens = run("off", params)
    for p in (params, llmjax.shard(params, make_mesh(tensor=2, data=2, devices=jax.devices()[:4]))):
        logits, tokens = run("interpret", p)
        np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
        assert tokens == want_tokens


def test_bad_input_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="scale \\[D\\]"):
        rn.apply(jnp.ones((2, 8)), jnp.ones((7,)), 1e-5)
    monkeypatch.setenv("LLMJAX_NORM", "fast")
    with pytest.raises(ValueError, match="LLMJAX_NORM"):
        rn.apply(jnp.ones((2, 8)), jnp.ones((8,)), 1e-5)
