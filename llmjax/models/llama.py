"""The Llama model: Flax Linen modules used functionally, the weights a plain nested dict.

One forward serves every use: prefill (many tokens per row), decode (one token per row) and scoring
(`llmjax.logits`, no cache). Each row carries its own positions, so ragged prompts batch exactly.
The layers are separate modules (`layer_0`, `layer_1`, ...) unrolled in Python: on the H200 a decode
step that scanned over stacked layer weights ran 2.3x slower than the unrolled one (84 vs 193 tok/s,
Llama-2-7B shape), because slicing stacked weights inside the loop costs copies. On a mesh with
pipeline stages, `Blocks` runs each stage's share of the layers and `llmjax.sharding.pipeline`
schedules the stages; `embed` and `head` let the pipelined decode apply the two ends alone.

Every parameter is declared once, in `Linear`, `Embed` or `RMSNorm`, with its shape and logical axes
(`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`, and `qkv` and `gate_up` for the slots of
the fused kernels); init, abstract shapes and shardings all derive from that declaration. Left out on purpose: training (dropout, gradients), Pallas kernels
(`llmjax.kernels` dispatches them), sharding (`llmjax.sharding` maps the logical axes).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from llmjax import cache as kv
from llmjax.config import LlamaConfig
from llmjax.kernels import gemv
from llmjax.models.rope import apply_rope, rope_tables
from llmjax.sharding import pipeline

_init = nn.initializers.normal(stddev=0.02)


class Linear(nn.Module):
    """Every projection of the model: one einsum with a kernel declared with its logical axes.

    Kernels are stored output dims first, `[out..., in...]`: Hugging Face's `[out, in]` with heads as
    their own axes, so conversion is a reshape. One-row products (batch-1 decode) read this layout
    5-10% faster than `[in, out]` on the H200 (`benchmarks/gemv_shapes.py`).
    """

    shape: tuple[int, ...]  # the kernel's shape, output dims first
    axes: tuple[str, ...]
    num_out_dims: int = 1
    use_bias: bool = False
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(_init, self.axes)
        kernel = self.param("kernel", init, self.shape, self.dtype)
        y = gemv.linear(x, kernel, self.num_out_dims)  # x [..., *in] -> [..., *out]
        if self.use_bias:
            out_shape, out_axes = self.shape[:self.num_out_dims], self.axes[:self.num_out_dims]
            init = nn.with_logical_partitioning(nn.initializers.zeros_init(), out_axes)
            bias = self.param("bias", init, out_shape, self.dtype)
            y = y + bias.reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
        return y


class Embed(nn.Module):
    vocab_size: int
    hidden_size: int
    dtype: Any = jnp.float32

    def setup(self):
        init = nn.with_logical_partitioning(_init, ("vocab", "embed"))
        self.embedding = self.param("embedding", init, (self.vocab_size, self.hidden_size), self.dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:  # [B, T] -> [B, T, D]
        return jnp.take(self.embedding, tokens, axis=0)

    def attend(self, x: jax.Array) -> jax.Array:  # tied LM head: [B, T, D] -> [B, T, V]
        return jnp.einsum("btd,vd->btv", x, self.embedding)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",))
        scale = self.param("scale", init, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.reshape((1,) * (x.ndim - 1) + (-1,)) * normed.astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """Causal grouped-query attention by positions; K/V are not repeated per query group.

    q `[B, T, H, D]`; k, v `[B, S, KV, D]`; q_pos `[B, T]`, k_pos `[B, S]`: key s is visible to query t
    when `k_pos[s] <= q_pos[t]`. Scores and softmax in float32.
    """
    b, t, h, d = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, t, n_kv, h // n_kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(d)
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    scores = jnp.where(visible[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


class Attention(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, positions, layer_cache):
        c, bias = self.config, self.config.attention_bias
        d, h, n_kv, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        g = h // n_kv  # query heads per kv head
        # q, k and v in one kernel `[kv_heads, g + 2, head_dim, embed]`: for kv head j, its g query
        # heads (HF heads j*g .. j*g+g-1), then its key, then its value. One wide product reads its
        # weights faster than three narrow ones, and sharding over kv_heads keeps each group whole.
        qkv = Linear((n_kv, g + 2, hd, d), ("kv_heads", "qkv", "head_dim", "embed"), num_out_dims=3,
                     use_bias=bias, dtype=self.dtype, name="qkv")(x)
        b, t = x.shape[:2]
        q = apply_rope(qkv[:, :, :, :g].reshape(b, t, h, hd), cos, sin)
        k = apply_rope(qkv[:, :, :, g], cos, sin)
        v = qkv[:, :, :, g + 1]
        if layer_cache is None:  # scoring a whole sequence: attend within it
            keys, values, k_pos = k, v, positions
        else:
            keys, values = kv.write(layer_cache[0], k, positions), kv.write(layer_cache[1], v, positions)
            k_pos = jnp.broadcast_to(jnp.arange(keys.shape[1]), keys.shape[:2])
            layer_cache = (keys, values)
        out = attention(q, keys, values, positions, k_pos)
        o = Linear((d, h, hd), ("embed", "heads", "head_dim"), use_bias=bias,
                   dtype=self.dtype, name="o")
        return o(out), layer_cache


class Mlp(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d, f, bias = self.config.hidden_size, self.config.intermediate_size, self.config.mlp_bias
        # gate and up in one kernel `[2, mlp, embed]`: on the H200 one 4096x22016 product reads its
        # weights at 3.2 TB/s where two 4096x11008 ones manage 2.0 (benchmarks/gemv_shapes.py).
        gate_up = Linear((2, f, d), ("gate_up", "mlp", "embed"), num_out_dims=2,
                         use_bias=bias, dtype=self.dtype, name="gate_up")(x)
        down = Linear((d, f), ("embed", "mlp"), use_bias=bias, dtype=self.dtype, name="down")
        return down(nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1])


class Block(nn.Module):
    config: LlamaConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, positions, layer_cache):
        eps = self.config.rms_norm_eps
        with jax.named_scope("attention"):
            h, layer_cache = Attention(self.config, self.dtype, name="attn")(
                RMSNorm(eps, self.dtype, name="attn_norm")(x), cos, sin, positions, layer_cache)
        x = x + h
        with jax.named_scope("mlp"):
            x = x + Mlp(self.config, self.dtype, name="mlp")(RMSNorm(eps, self.dtype, name="mlp_norm")(x))
        return x, layer_cache


class Blocks(nn.Module):
    """The blocks `layer_{i}` for i in `indices`, applied in order: a pipeline stage's share of the
    model (`llmjax.sharding.pipeline`), and a way to initialise some layers alone with the values a
    whole-model init gives them (a parameter's random key follows its name)."""

    config: LlamaConfig
    dtype: Any = jnp.float32
    indices: tuple[int, ...] = ()

    @nn.compact
    def __call__(self, x, positions, cache: kv.KVCache | None = None):
        cos, sin = rope_tables(self.config, positions)
        new_k, new_v = [], []
        for n, i in enumerate(self.indices):
            layer_cache = None if cache is None else (cache.k[n], cache.v[n])
            block = Block(self.config, self.dtype, name=f"layer_{i}")
            x, layer_cache = block(x, cos, sin, positions, layer_cache)
            if cache is not None:
                new_k.append(layer_cache[0])
                new_v.append(layer_cache[1])
        return x, None if cache is None else kv.KVCache(tuple(new_k), tuple(new_v))


class Llama(nn.Module):
    """`apply({"params": w}, tokens, positions, cache=None, logits_at=None) -> (logits, cache)`.

    tokens, positions `[B, T]` int32. With a `KVCache`, each token's keys and values are written at its
    position and attention reads the cache; without one, attention stays within `tokens`.
    `logits_at` `[B]` picks one position per row (the last prompt token), so prefill does not
    compute the LM head over the whole prompt. Logits are float32.
    On a mesh with pipeline stages the layers are stacked per stage (`w["stages"]`, see
    `llmjax.sharding.pipeline`) and run there; the embedding and the LM head stay here.
    """

    config: LlamaConfig
    dtype: Any = jnp.float32  # the dtype of freshly initialised weights; compute follows the weights
    mesh: Any = None  # the mesh the weights are sharded over (llmjax.sharding), or None

    @nn.compact
    def __call__(self, tokens, positions, cache: kv.KVCache | None = None, logits_at=None):
        c = self.config
        embed = Embed(c.embedding_rows, c.hidden_size, self.dtype, name="embed")
        x = embed(tokens)
        if pipeline.stages(self.mesh) > 1:
            if self.is_initializing():
                raise ValueError("initialise the model without a mesh; llmjax.init_random(mesh=...) "
                                 "places the weights on one")
            x, new_cache = pipeline.forward(self.mesh, stage_fn(c, self.dtype, self.mesh),
                                            self.variables["params"]["stages"], x, positions, cache)
        else:
            cos, sin = rope_tables(c, positions)
            new_k, new_v = [], []
            for i in range(c.num_layers):
                layer_cache = None if cache is None else (cache.k[i], cache.v[i])
                x, layer_cache = Block(c, self.dtype, name=f"layer_{i}")(x, cos, sin, positions, layer_cache)
                if cache is not None:
                    new_k.append(layer_cache[0])
                    new_v.append(layer_cache[1])
            new_cache = None if cache is None else kv.KVCache(tuple(new_k), tuple(new_v))
        x = RMSNorm(c.rms_norm_eps, self.dtype, name="final_norm")(x)
        if logits_at is not None:
            x = x[jnp.arange(x.shape[0]), logits_at][:, None]  # [B, 1, D]
        with jax.named_scope("lm_head"):
            lm_head = embed.attend if c.tie_word_embeddings else _lm_head(c, self.dtype, name="lm_head")
            logits = _true_vocab(c, lm_head(x))
        return logits, new_cache


def _lm_head(config: LlamaConfig, dtype=jnp.float32, name=None) -> Linear:
    return Linear((config.embedding_rows, config.hidden_size), ("vocab", "embed"), dtype=dtype, name=name)


def _true_vocab(config: LlamaConfig, logits: jax.Array) -> jax.Array:
    """float32 logits over the true vocabulary: rows added to split the vocabulary evenly over a
    tensor-parallel mesh have none."""
    return logits[..., :config.vocab_size].astype(jnp.float32)


def stage_fn(config: LlamaConfig, dtype, mesh):
    """`(weights, x, positions, cache) -> (x, cache)`: one pipeline stage's blocks, given that stage's
    weights `{"layer_j": ...}` and cache, as `llmjax.sharding.pipeline` calls them."""
    stage = Blocks(config, dtype, tuple(range(pipeline.layers_per_stage(config, pipeline.stages(mesh)))))

    def apply(weights, x, positions, cache):
        return stage.apply({"params": weights}, x, positions, cache)
    return apply


def embed(config: LlamaConfig, weights: dict, tokens: jax.Array) -> jax.Array:
    """The embedding of `tokens` `[B, T]` -> `[B, T, D]`, as `Llama` computes it."""
    return Embed(config.embedding_rows, config.hidden_size).apply({"params": weights["embed"]}, tokens)


def head(config: LlamaConfig, weights: dict, x: jax.Array) -> jax.Array:
    """The final norm and LM head on hidden states `[B, T, D]` -> float32 logits `[B, T, vocab]`, as
    `Llama` computes them (the pipelined decode applies them to each microbatch leaving the last stage)."""
    x = RMSNorm(config.rms_norm_eps).apply({"params": weights["final_norm"]}, x)
    with jax.named_scope("lm_head"):
        if config.tie_word_embeddings:
            logits = Embed(config.embedding_rows, config.hidden_size).apply(
                {"params": weights["embed"]}, x, method=Embed.attend)
        else:
            logits = _lm_head(config).apply({"params": weights["lm_head"]}, x)
    return _true_vocab(config, logits)


def _init_args():
    ids = jnp.zeros((1, 1), jnp.int32)
    return ids, ids


def abstract_params(config: LlamaConfig, dtype=jnp.bfloat16) -> dict:
    """The weights' shapes and dtypes (`jax.ShapeDtypeStruct`), with no memory allocated."""
    boxed = jax.eval_shape(Llama(config, dtype).init, jax.random.key(0), *_init_args())["params"]
    return nn.meta.unbox(boxed)


def logical_axes(config: LlamaConfig) -> dict:
    """A `PartitionSpec` of logical axis names for every weight, from the declarations above."""
    boxed = jax.eval_shape(Llama(config).init, jax.random.key(0), *_init_args())["params"]
    return nn.get_partition_spec(boxed)


def init_params(config: LlamaConfig, key: jax.Array, dtype=jnp.bfloat16, shardings=None) -> dict:
    """Random weights (normal, std 0.02; norms one): for tests and benchmarks. With `shardings` (a
    tree like the weights'), each weight is made in place on its devices."""
    def init(key):
        return nn.meta.unbox(Llama(config, dtype).init(key, *_init_args())["params"])
    return jax.jit(init, out_shardings=shardings)(key)


def init_layers(config: LlamaConfig, key: jax.Array, indices: tuple[int, ...], dtype=jnp.bfloat16,
                shardings=None) -> dict:
    """`{"layer_i": weights}` for i in `indices`, equal to what `init_params` gives those layers: a
    pipeline stage makes its own layers this way, on its own devices."""
    def init(key):
        x, positions = jnp.zeros((1, 1, config.hidden_size), dtype), jnp.zeros((1, 1), jnp.int32)
        return nn.meta.unbox(Blocks(config, dtype, tuple(indices)).init(key, x, positions)["params"])
    return jax.jit(init, out_shardings=shardings)(key)


def count_params(tree) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(tree))
