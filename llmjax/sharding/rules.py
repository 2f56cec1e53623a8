"""One table from the model's logical axes to the mesh axes, and the shardings it implies.

Megatron's tensor parallelism: q/k/v and gate/up are split by their outputs (kv heads, MLP columns),
o and down by their inputs (query heads, MLP rows), the embedding and the LM head by the vocabulary;
each row-parallel product ends in an all-reduce (XLA's, or llmjax's NVLink kernel on CUDA GPUs:
`llmjax.kernels.allreduce`). The batch splits over `data`. The KV cache
follows the kv heads. Pipeline parallelism maps `layers` onto `stage`: the weights of each stage are
stacked along that axis (`pipeline.py`). Changing the parallelism is changing the mesh, never the model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax.config import LlamaConfig
from llmjax.models import llama
from llmjax.sharding import pipeline

RULES = (
    ("batch", "data"),
    ("vocab", "tensor"),
    ("embed", None),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("gate_up", None),
    ("layers", "stage"),
    ("cache_seq", None),
)

CACHE_SPEC = P("data", None, "tensor", None)  # [batch, cache_seq, kv_heads, head_dim]


def _is_spec(x) -> bool:
    return isinstance(x, P)


def weight_specs(config: LlamaConfig, quant=None, num_stages: int = 1) -> dict:
    """Every weight's mesh PartitionSpec under RULES (with a `quant` scheme, one per leaf of each
    quantized kernel: codes and scales follow the kernel's axes, `llmjax.quant.leaf_axes`); with
    pipeline stages, in the pipeline's layout (`stages/layer_j`, each weight with a leading `layers`
    axis)."""
    logical = llama.logical_axes(config, quant)
    if num_stages > 1:
        logical = pipeline.group_layers(logical, config, num_stages, lambda layers: jax.tree.map(
            lambda s: P("layers", *s), layers[0], is_leaf=_is_spec))
    return jax.tree.map(lambda s: nn.logical_to_mesh_axes(s, RULES), logical, is_leaf=_is_spec)


def weight_shardings(config: LlamaConfig, mesh: jax.sharding.Mesh, quant=None) -> dict:
    specs = weight_specs(config, quant, pipeline.stages(mesh))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def cache_sharding(mesh: jax.sharding.Mesh, batch: int) -> NamedSharding:
    """The KV cache's sharding for `batch` rows: by kv heads over `tensor`, and by rows over `data`
    when the rows split evenly (a single streamed prompt does not; its cache is copied over `data`).
    With pipeline stages every cache array has a leading axis split over `stage`."""
    spec = CACHE_SPEC if batch % mesh.shape["data"] == 0 else P(None, *CACHE_SPEC[1:])
    if pipeline.stages(mesh) > 1:
        spec = P(pipeline.AXIS, *spec)
    return NamedSharding(mesh, spec)


def fit_group(name: str, group, config: LlamaConfig, fitted: LlamaConfig, repeat: int):
    """Weight group `name` of `config`'s model as the mesh's model (`fitted`, with each kv head repeated
    `repeat` times: `mesh.fit_config`) holds it: a layer's kv heads repeated, the embedding and LM head
    padded to the fitted vocab rows, the rest as it is. Numpy arrays on the host, jax arrays inside a
    jitted function (`init_random` makes weights in place)."""
    if name.startswith("layer_"):
        return repeat_kv_heads(group, config, repeat)
    if name in ("embed", "lm_head"):
        return pad_vocab(group, fitted.embedding_rows)
    return group


def repeat_kv_heads(layer: dict, config: LlamaConfig, repeat: int) -> dict:
    """Rewrites one layer's fused q/k/v weights so each kv head appears `repeat` times (numpy arrays
    on the host, jax arrays inside a jitted function).

    `qkv` `[KV, G+2, hd, D]` becomes `[KV*repeat, G/repeat+2, hd, D]`: kv head j's G query heads are
    split among its copies in order, and each copy carries j's key and value. Biases alike, and the
    codes and scales of a quantized kernel (their first two axes are the kernel's).
    """
    if repeat == 1:
        return layer
    g = config.num_heads // config.num_kv_heads

    def rewrite(w):
        xp = jnp if isinstance(w, jax.Array) else np
        w = xp.asarray(w)
        kv, rest = w.shape[0], w.shape[2:]
        q = w[:, :g].reshape(kv, repeat, g // repeat, *rest)
        k = xp.broadcast_to(w[:, g:g + 1][:, None], (kv, repeat, 1, *rest))
        v = xp.broadcast_to(w[:, g + 1:g + 2][:, None], (kv, repeat, 1, *rest))
        return xp.concatenate([q, k, v], axis=2).reshape(kv * repeat, g // repeat + 2, *rest)

    attn = dict(layer["attn"])
    attn["qkv"] = jax.tree.map(rewrite, layer["attn"]["qkv"])
    return dict(layer, attn=attn)


def pad_vocab(group: dict, rows: int) -> dict:
    """The embedding or LM head group with zero rows appended up to `rows` (a quantized head's codes and
    scales alike: a zero scale makes a zero row)."""
    def pad(w):
        xp = jnp if isinstance(w, jax.Array) else np
        w = xp.asarray(w)
        return w if w.shape[0] == rows else xp.concatenate([w, xp.zeros((rows - w.shape[0],) + w.shape[1:],
                                                                        w.dtype)])
    return jax.tree.map(pad, group)
