"""The RMSNorm kernel, alone and with the residual add before it, against its reference (interpret
mode, awkward widths and row counts), its lowering for cuda and rocm, the model's norms through it,
and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

import llmjax
from llmjax.kernels import rms_norm as rn
from llmjax.quant import quantize_params
from llmjax.sharding import make_mesh

from conftest import needs_devices


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


@pytest.mark.parametrize("shape", [(1, 96), (3, 100), (2, 5, 130), (33, 4096)])
@pytest.mark.parametrize("dtype, scale_dtype", [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16),
                                                (jnp.bfloat16, jnp.float32)])
def test_the_add_and_norm_match_the_reference(shape, dtype, scale_dtype):
    kx, kd, ks = jax.random.split(jax.random.key(sum(shape) + 1), 3)
    x = (3.0 * jax.random.normal(kx, shape, jnp.float32)).astype(dtype)
    delta = jax.random.normal(kd, shape, jnp.float32).astype(dtype)
    scale = (1.0 + 0.5 * jax.random.normal(ks, shape[-1:], jnp.float32)).astype(scale_dtype)
    normed, h = rn.add_rms_norm(x, delta, scale, 1e-5, interpret=True)
    want_normed, want_h = rn.add_rms_norm_reference(x, delta, scale, 1e-5)
    assert h.dtype == dtype and normed.dtype == want_normed.dtype and normed.shape == h.shape == shape
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(want_h, np.float32))  # one rounding
    tol = 1e-6 if dtype == jnp.float32 else 1e-2  # as for the norm alone
    np.testing.assert_allclose(np.asarray(normed, np.float32), np.asarray(want_normed, np.float32), rtol=tol,
                               atol=tol)


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
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(lambda x, d, s: rn.add_apply(x, d, s, 1e-5)).trace(args[0], *args).lower(
            lowering_platforms=(platform,)).as_text()
    assert 'name = "add_rms_norm"' in text and text.count("__gpu$xla.gpu.triton") == 1  # the add is inside


@pytest.mark.parametrize("on_mesh", [pytest.param(False, id="one-device"),
                                     pytest.param(True, marks=needs_devices(4), id="mesh")])
def test_the_model_through_the_kernel_matches_the_reference(monkeypatch, on_mesh):
    """Logits and greedy tokens with every norm in the kernel (interpret mode), on one device and on
    a mesh (each device its own rows), equal those of the reference norm on one device."""
    params = llmjax.init_random("tiny", dtype="float32", seed=8)
    prompts = [[1, 17, 300, 5, 9], [1, 500, 3]]

    def run(mode, p):
        monkeypatch.setenv("LLMJAX_NORM", mode)
        jax.clear_caches()
        return (np.asarray(llmjax.logits(p, jnp.asarray([[1, 5, 9, 44, 2, 80]]))),
                llmjax.generate(p, prompts, max_new_tokens=5))

    want_logits, want_tokens = run("off", params)
    p = llmjax.shard(params, make_mesh(tensor=2, data=2, devices=jax.devices()[:4])) if on_mesh else params
    logits, tokens = run("interpret", p)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
    assert tokens == want_tokens


@pytest.mark.parametrize("rows, width, slices", [(1, 4096, 8), (3, 100, 1), (2, 300, 5), (1, 512, 11)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_residual_add_matches_the_reference(rows, width, slices, dtype):
    kx, kp = jax.random.split(jax.random.key(rows * width + slices))
    x = (3.0 * jax.random.normal(kx, (rows, width), jnp.float32)).astype(dtype)
    partials = jax.random.normal(kp, (slices, rows, width), jnp.float32)
    h, squares = rn.residual_add(x, partials, interpret=True)
    want_h, want_squares = rn.residual_add_reference(x, partials)
    assert h.dtype == dtype and h.shape == x.shape and squares.shape == (rows, rn.square_parts(width))
    # the slices are added in another order: float32 to its rounding, bf16 to one unit in the last place
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(h, np.float32), np.asarray(want_h, np.float32), rtol=tol, atol=tol)
    # the squares are of the h it wrote (XLA's interpreter may square a bf16 sum before rounding it:
    # excess precision, 2**-8 at most)
    _, squares_of_h = rn.residual_add_reference(h, jnp.zeros((1,) + h.shape, jnp.float32))
    np.testing.assert_allclose(np.asarray(squares), np.asarray(squares_of_h), rtol=1e-5 if dtype == jnp.float32 else 4e-3)
    # the parts add up to the row's sum of squares, so the norm taken from them is the norm of h
    scale = jnp.linspace(0.5, 1.5, width).astype(dtype)
    got = rn.normalized_reference(want_h, want_squares, scale, 1e-5)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(rn.rms_norm_reference(want_h, scale, 1e-5),
                                                                           np.float32), rtol=tol, atol=tol)
    # a product of one slice in x's dtype (a product with a bias, or not an int4 one)
    h1, _ = rn.residual_add(x, partials[:1].astype(dtype), interpret=True)
    np.testing.assert_allclose(np.asarray(h1, np.float32), np.asarray(x + partials[0].astype(dtype), np.float32),
                               rtol=tol, atol=tol)


def test_the_residual_add_lowers_to_a_triton_call():
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind="gfx942", num_cores=None, platform="gpu"))
    args = (jax.ShapeDtypeStruct((1, 4096), jnp.bfloat16), jax.ShapeDtypeStruct((8, 1, 4096), jnp.float32))
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(rn.add).trace(*args).lower(lowering_platforms=("rocm",)).as_text()
    assert "__gpu$xla.gpu.triton" in text and 'name = "residual_add"' in text


def test_batch_one_int4_decode_without_norm_kernels_matches_the_norms(monkeypatch):
    """At batch-1 int4 decode the residual adds write each row's sum of squares and the int4 products
    normalize x themselves: the same greedy tokens as with the norms applied (`LLMJAX_NORM=off`, which
    also turns that path off), on a float32 model quantized in memory; so too at batch-2 decode, and
    the same logits for a forward of two rows (the path takes one or two rows)."""
    params = quantize_params(llmjax.init_random("tiny", dtype="float32", seed=3), "int4-g32")
    adds = []
    add = rn.add
    monkeypatch.setattr(rn, "add", lambda *a: adds.append(1) or add(*a))

    def run(mode):
        monkeypatch.setenv("LLMJAX_NORM", mode)
        jax.clear_caches()
        adds.clear()
        tokens = llmjax.generate(params, [1, 17, 300, 5, 9], max_new_tokens=12)
        count = len(adds)
        pair = llmjax.generate(params, [[1, 17, 300], [1, 44]], max_new_tokens=6)  # batch-2 decode
        return tokens, count, pair, np.asarray(llmjax.logits(params, jnp.asarray([[1, 17]])))  # two rows

    fused, fused_adds, fused_pair, fused_logits = run("auto")
    plain, plain_adds, plain_pair, plain_logits = run("off")
    assert fused == plain and len(fused) == 12 and fused_pair == plain_pair
    np.testing.assert_allclose(fused_logits, plain_logits, rtol=1e-5, atol=1e-5)
    assert fused_adds == 2 * params.config.num_layers and plain_adds == 0  # two adds a layer, traced once


def test_bad_input_is_refused(monkeypatch):
    from llmjax.kernels.linear import Normed

    with pytest.raises(ValueError, match="K slices"):
        rn.add(jnp.ones((2, 8)), jnp.ones((3, 2, 7)))
    with pytest.raises(ValueError, match="squares \\[..., P\\] with x's leading axes"):
        Normed(jnp.ones((1, 1, 8)), jnp.ones((2, 1)), jnp.ones((8,)), 1e-5)
    with pytest.raises(ValueError, match="scale \\[D\\]"):
        rn.apply(jnp.ones((2, 8)), jnp.ones((7,)), 1e-5)
    with pytest.raises(ValueError, match="delta of x's shape"):
        rn.add_apply(jnp.ones((2, 8)), jnp.ones((1, 8)), jnp.ones((8,)), 1e-5)
    monkeypatch.setenv("LLMJAX_NORM", "fast")
    with pytest.raises(ValueError, match="LLMJAX_NORM"):
        rn.apply(jnp.ones((2, 8)), jnp.ones((8,)), 1e-5)
