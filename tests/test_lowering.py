"""The XLA path lowers for AMD (rocm, gfx942) and NVIDIA (cuda, H200) on a CPU-only machine.

This proves lowering, not execution: no AMD GPU is reachable from llmjax's machines. Prefill and
decode are lowered as `generate` compiles them, under an abstract mesh whose device names the GPU.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from llmjax.cache import KVCache
from llmjax.config import LlamaConfig
from llmjax.models.llama import Llama, abstract_params
from llmjax.sampling import Sampling

gen = importlib.import_module("llmjax.generate")

GPUS = [("rocm", "gfx942"), ("cuda", "NVIDIA H200")]


def _lower(fn, args, platform, device_kind):
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _shapes(config, batch, length, cache_len):
    weights = abstract_params(config, jnp.bfloat16)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, batch, cache_len, jnp.bfloat16))
    ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return weights, cache, ids, rows


@pytest.mark.parametrize("platform, device_kind", GPUS)
def test_prefill_and_decode_lower_for_gpu(platform, device_kind):
    config = LlamaConfig.preset("tiny")
    model = Llama(config, jnp.bfloat16)
    weights, cache, ids, rows = _shapes(config, batch=2, length=16, cache_len=64)
    prefill = _lower(functools.partial(gen._prefill, model), (weights, ids, rows, cache), platform, device_kind)
    decode = _lower(functools.partial(gen._decode, model), (weights, rows, rows, cache), platform, device_kind)
    for text in (prefill, decode):
        assert "stablehlo.dot_general" in text and "bf16" in text
        assert "tensor<2x64x2x16xbf16>" in text  # the cache, [B, S, KV, head_dim]


@pytest.mark.parametrize("platform, device_kind", GPUS)
def test_whole_generate_loop_lowers_for_gpu(platform, device_kind):
    config = LlamaConfig.preset("tiny")
    weights, _, ids, rows = _shapes(config, batch=2, length=16, cache_len=64)
    sampling = Sampling(temperature=0.7, top_p=0.9)
    knobs = jax.eval_shape(lambda: sampling.arrays(2))
    fn = functools.partial(gen._generate_ids.__wrapped__, model=Llama(config, jnp.bfloat16), cache_len=64,
                           out_len=32, greedy=False, filters=True)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    args = (weights, ids, rows, jax.ShapeDtypeStruct((2,), jnp.bool_), scalar,
            jax.ShapeDtypeStruct((1,), jnp.int32), knobs, jax.eval_shape(lambda: jax.random.key(0)), rows)
    text = _lower(fn, args, platform, device_kind)
    assert "stablehlo.while" in text and "stablehlo.sort" in text
