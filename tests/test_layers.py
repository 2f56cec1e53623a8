"""Each part of the model against transformers' own: RMSNorm, rotary embeddings, attention."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama import modeling_llama as hf

from llmjax.config import LlamaConfig
from llmjax.models import llama, rope

from conftest import hf_config


def test_rms_norm_matches():
    x = np.random.default_rng(0).normal(size=(3, 5, 96)).astype(np.float32)
    w = np.random.default_rng(1).normal(size=(96,)).astype(np.float32)
    theirs = hf.LlamaRMSNorm(96, eps=1e-5)
    theirs.weight.data = torch.tensor(w)
    ours = llama.RMSNorm(1e-5).apply({"params": {"scale": jnp.asarray(w)}}, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(ours), theirs(torch.tensor(x)).detach().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rope_scaling", [None, {"rope_type": "linear", "factor": 4.0},
                                          {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                                          {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                                          {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64,
                                           "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.5,
                                           "truncate": False},
                                          {"rope_type": "yarn", "factor": None, "attention_factor": 1.3,
                                           "original_max_position_embeddings": 40},
                                          # the pretraining length from max_position_embeddings, as transformers
                                          {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0},
                                          {"rope_type": "yarn", "factor": 2.0}])
@pytest.mark.parametrize("top_level_original", [None, 24])
def test_rotary_embedding_matches(rope_scaling, top_level_original):
    extra = {} if top_level_original is None else {"original_max_position_embeddings": top_level_original}
    cfg = hf_config(rope_scaling=rope_scaling, rope_theta=5000.0, head_dim=24, **extra)
    assert LlamaConfig.from_hf(LlamaConfig.from_hf(cfg.to_dict()).to_hf()) == LlamaConfig.from_hf(cfg.to_dict())
    ours_cfg = LlamaConfig.from_hf(cfg.to_dict())
    positions = np.array([[0, 1, 2, 7, 50, 127], [3, 3, 9, 64, 100, 5]])
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 24)).astype(np.float32)  # [B, T, H, D]
    emb = hf.LlamaRotaryEmbedding(cfg)
    xt = torch.tensor(x).transpose(1, 2)
    cos, sin = emb(xt, torch.tensor(positions))
    theirs, _ = hf.apply_rotary_pos_emb(xt, xt, cos, sin)
    ours_cos, ours_sin = rope.rope_tables(ours_cfg, jnp.asarray(positions))
    np.testing.assert_allclose(np.asarray(ours_cos), cos.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ours_sin), sin.numpy(), rtol=1e-5, atol=1e-5)
    ours = rope.apply_rope(jnp.asarray(x), ours_cos, ours_sin)
    np.testing.assert_allclose(np.asarray(ours), theirs.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads", [(6, 6), (6, 2), (6, 1)])
def test_attention_matches_repeated_kv_reference(heads, kv_heads):
    rng = np.random.default_rng(heads + kv_heads)
    b, t, s, d = 2, 5, 9, 16
    q = rng.normal(size=(b, t, heads, d)).astype(np.float32)
    k = rng.normal(size=(b, s, kv_heads, d)).astype(np.float32)
    v = rng.normal(size=(b, s, kv_heads, d)).astype(np.float32)
    q_pos = np.array([[4, 5, 6, 7, 8], [0, 1, 2, 3, 4]])
    k_pos = np.broadcast_to(np.arange(s), (b, s))
    # transformers' eager attention with K/V repeated per group and an additive causal mask.
    mask = np.where(k_pos[:, None, :] <= q_pos[:, :, None], 0.0, -np.inf)[:, None].astype(np.float32)
    module = type("M", (), {"num_key_value_groups": heads // kv_heads, "training": False})()
    theirs, _ = hf.eager_attention_forward(
        module, torch.tensor(q).transpose(1, 2), torch.tensor(k).transpose(1, 2),
        torch.tensor(v).transpose(1, 2), torch.tensor(mask), scaling=d ** -0.5, dropout=0.0)
    ours = llama.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(q_pos), jnp.asarray(k_pos))
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-5, atol=1e-5)


def test_cache_write_drops_positions_past_the_end():
    from llmjax.cache import write

    cache = jnp.zeros((2, 4, 1, 1))
    new = jnp.arange(1, 7, dtype=jnp.float32).reshape(2, 3, 1, 1)
    out = write(cache, new, jnp.array([[2, 3, 4], [0, 1, 2]]))
    np.testing.assert_array_equal(np.asarray(out)[..., 0, 0], [[0, 0, 1, 2], [4, 5, 6, 0]])
    assert jax.tree.leaves(out)[0].dtype == jnp.float32


def test_random_weights_differ_between_layers_and_have_the_declared_spread():
    """Every layer draws its own values (layer i from `layer_key(key, i)`, one compiled init for all
    layers), at the declared spread: kernels normal(0.02), norms one."""
    import llmjax

    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_layers=3)
    w = llmjax.init_random(config, dtype="float32", seed=1).weights
    kernels = [np.asarray(w[f"layer_{i}"]["mlp"]["down"]["kernel"]) for i in range(3)]
    for a, b in ((0, 1), (1, 2), (0, 2)):
        assert not np.allclose(kernels[a], kernels[b])
    assert all(abs(k.std() - 0.02) < 0.002 for k in kernels)
    np.testing.assert_array_equal(np.asarray(w["layer_2"]["attn_norm"]["scale"]), 1.0)
    again = llmjax.init_random(config, dtype="float32", seed=1).weights
    np.testing.assert_array_equal(np.asarray(again["layer_2"]["mlp"]["down"]["kernel"]), kernels[2])
    other = llmjax.init_random(config, dtype="float32", seed=2).weights
    assert not np.allclose(np.asarray(other["layer_0"]["mlp"]["down"]["kernel"]), kernels[0])


def test_a_float32_model_asks_for_full_float32_products_unless_told_otherwise():
    # A GPU runs float32 products at XLA's default precision as TensorFloat-32 (10-bit mantissas), in
    # XLA and in Pallas kernels alike. A float32 model asks for HIGHEST in `Llama` and in the pieces the
    # pipelined decode calls on their own (a stage, the head), unless the caller chose a precision.
    # The jaxpr holds every platform's branch, the GPU kernels' products included.
    config = LlamaConfig.preset("tiny")
    weights = llama.init_params(config, jax.random.key(0), jnp.float32)
    tokens, positions = jnp.ones((2, 5), jnp.int32), jnp.broadcast_to(jnp.arange(5), (2, 5))
    x = jnp.ones((2, 5, config.hidden_size), jnp.float32)
    stage = llama.stage_fn(config, jnp.float32, None)
    layers = {k: v for k, v in weights.items() if k.startswith("layer_")}
    programs = {"model": lambda: llama.Llama(config).apply({"params": weights}, tokens, positions),
                "stage": lambda: stage(layers, x, positions, None),
                "head": lambda: llama.head(config, weights, x)}

    def counts(run) -> tuple[int, int]:  # (products at HIGHEST, products)
        text = str(jax.make_jaxpr(run)())
        return text.count("precision=(Precision.HIGHEST, Precision.HIGHEST)"), text.count("dot_general[")

    for name, run in programs.items():
        with jax.default_matmul_precision(None):  # as a user runs it (conftest asks for "highest")
            at_highest, products = counts(run)
        assert 0 < products == at_highest, (name, at_highest, products)
        with jax.default_matmul_precision("tensorfloat32"):  # the caller's choice stands
            assert counts(run)[0] < products, name
