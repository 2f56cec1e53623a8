"""The split-K GEMV kernel against gemv_reference (Pallas interpret mode), its lowering for rocm and
cuda into a Triton call, and the model's projections through `linear`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from llmjax.kernels import gemv as g


@pytest.mark.parametrize("m,n,k,block_n,block_k,splits", [
    (1, 100, 300, 32, 64, 3), (3, 77, 129, 32, 32, 2), (16, 64, 256, 64, 64, 4), (1, 33, 1000, 16, 128, 8),
    (7, 130, 70, 64, 32, 5), (16, 17, 513, 16, 256, 1), (1, 1, 1, 16, 16, 1)])
def test_kernel_matches_reference(m, n, k, block_n, block_k, splits):
    kx, kw = jax.random.split(jax.random.key(1000 * m + 10 * n + k))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = jax.random.normal(kw, (n, k), jnp.bfloat16)
    got = g.gemv(x, w, block_n=block_n, block_k=block_k, splits=splits, interpret=True)
    want = g.gemv_reference(x, w)
    assert got.shape == (m, n) and got.dtype == jnp.bfloat16
    # Both accumulate in float32; only the order of the additions differs.
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2 * float(jnp.abs(want.astype(jnp.float32)).max()))


def test_kernel_refuses_too_many_rows_or_mismatched_k():
    x = jnp.zeros((17, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="M<=16"):
        g.gemv(x, jnp.zeros((4, 8), jnp.bfloat16), interpret=True)
    with pytest.raises(ValueError):
        g.gemv(x[:2], jnp.zeros((4, 9), jnp.bfloat16), interpret=True)


def test_linear_matches_einsum_with_and_without_the_kernel(monkeypatch):
    x = jax.random.normal(jax.random.key(0), (2, 1, 3, 8), jnp.bfloat16)  # [b, t, heads, head_dim]
    w = jax.random.normal(jax.random.key(1), (5, 3, 8), jnp.bfloat16)  # [out, heads, head_dim]
    want = jnp.einsum("btnh,dnh->btd", x, w)
    for mode in ("off", "on"):  # on CPU, "on" still lowers to XLA's product
        monkeypatch.setenv("LLMJAX_GEMV", mode)
        np.testing.assert_array_equal(np.asarray(g.linear(x, w, 1)), np.asarray(want))
    monkeypatch.setenv("LLMJAX_GEMV", "fast")
    with pytest.raises(ValueError, match="LLMJAX_GEMV"):
        g.linear(x, w, 1)


def test_kernel_is_chosen_only_for_few_bf16_rows(monkeypatch):
    bf16 = jnp.bfloat16
    monkeypatch.setenv("LLMJAX_GEMV", "on")
    assert g.use_kernel(1, 4096, 4096, bf16) and g.use_kernel(16, 22016, 4096, bf16)
    assert not g.use_kernel(17, 4096, 4096, bf16) and not g.use_kernel(1, 4096, 4096, jnp.float32)
    monkeypatch.setenv("LLMJAX_GEMV", "narrow")
    assert g.use_kernel(1, 4096, 11008, bf16) and not g.use_kernel(1, 22016, 4096, bf16)
    monkeypatch.setenv("LLMJAX_GEMV", "auto")
    assert not g.use_kernel(1, 4096, 4096, bf16)


@pytest.mark.parametrize("platform,device_kind", [("rocm", "gfx942"), ("cuda", "NVIDIA H200")])
def test_linear_lowers_to_a_triton_call_on_gpus(platform, device_kind, monkeypatch):
    monkeypatch.setenv("LLMJAX_GEMV", "on")
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu"))
    x = jax.ShapeDtypeStruct((1, 1, 11008), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((4096, 11008), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(lambda x, w: g.linear(x, w, 1)).trace(x, w).lower(lowering_platforms=(platform,))
    assert "triton" in lowered.as_text()
