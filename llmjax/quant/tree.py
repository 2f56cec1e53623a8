"""A model's weights, quantized: which kernels, and the tree-level operations around them.

The model declares which kernels are quantized (`llmjax.models.llama.Linear` with a `QuantScheme`: q/k/v,
o, gate/up and down, and the LM head when the scheme says so), so the quantized tree's shapes, logical
axes and shardings all come from `llama.abstract_params(config, quant=scheme)`; the functions here
walk a float tree beside that abstract one.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp

from llmjax.config import LlamaConfig
from llmjax.quant.weights import (GROUP_SIZES, QuantizedWeight, QuantScheme, dequantize, is_quantized,
                                  quantize_int4, quantize_int8)

STORAGE_FIELDS = ("values", "scales", "zeros")


def _quantize_like(w, like: QuantizedWeight) -> QuantizedWeight:
    num_out_dims = like.values.ndim - 1
    if like.bits == 8:
        return quantize_int8(w, num_out_dims=num_out_dims)
    return quantize_int4(w, num_out_dims=num_out_dims, group_size=like.group_size,
                         symmetric=like.zeros is None)


def quantize_tree(tree: dict, like: dict) -> dict:
    """Quantizes each float kernel of `tree` that `like` (a quantized tree, abstract or not, of the same
    weights) holds as a `QuantizedWeight`, with its bits, group and zero points; the rest stays."""
    return jax.tree.map(lambda w, a: _quantize_like(w, a) if is_quantized(a) else w, tree, like)


def dequantize_tree(tree: dict, like: dict, dtype) -> dict:
    """The float weights a quantized `tree` stands for, shaped as `like` (the float abstract tree)."""
    def back(w, a):
        if is_quantized(w):
            return dequantize(w, dtype, tuple(a.shape[len(w.out_shape):]))
        return w
    return jax.tree.map(back, tree, like, is_leaf=is_quantized)


def to_storage(tree):
    """Each `QuantizedWeight` as a plain dict of its arrays (what orbax stores; bits and group sizes
    live in the checkpoint's manifest scheme and the model's declaration)."""
    def store(x):
        if not is_quantized(x):
            return x
        return {k: getattr(x, k) for k in STORAGE_FIELDS if getattr(x, k) is not None}
    return jax.tree.map(store, tree, is_leaf=is_quantized)


def from_storage(tree, like):
    """The inverse of `to_storage`, given `like` (the same tree with its `QuantizedWeight`s)."""
    def load(x, a):
        if not is_quantized(a):
            return x
        return dataclasses.replace(a, **{k: x.get(k) for k in STORAGE_FIELDS})
    return jax.tree.map(load, tree, like, is_leaf=lambda x: is_quantized(x) or isinstance(x, dict) and
                        set(x) <= set(STORAGE_FIELDS) and "values" in x)


def cast_floats(tree, dtype):
    """Casts the float weights outside quantized kernels (embedding, norms, biases) to `dtype`; codes
    and scales keep theirs."""
    def cast(x):
        return x if is_quantized(x) else x.astype(jnp.dtype(dtype))
    return jax.tree.map(cast, tree, is_leaf=is_quantized)


def departures(config: LlamaConfig, scheme: QuantScheme | str) -> list[str]:
    """Where `scheme` (a `QuantScheme` or a name such as `"int4-g128"`) quantizes `config`'s projections
    otherwise than its name says: an int4 group that does not divide a projection's input width gives
    way to the largest smaller one that does, and where none does, the projection stays in floating
    point. Empty for Llama's own widths."""
    scheme = QuantScheme.coerce(scheme)
    split = _split_widths(config)
    widths = {"q/k/v": config.hidden_size, "o": split["o"], "gate/up": config.hidden_size, "down": split["down"]}
    if scheme.lm_head:
        widths["lm_head"] = config.hidden_size
    out = []
    for name, width in widths.items():
        group = scheme.group_for(width)
        if not scheme.quantizes(width):
            out.append(f"{name} (input width {width}) stays in floating point: no int4 group divides it")
        elif scheme.bits == 4 and group != scheme.group_size:
            out.append(f"{name} (input width {width}) takes int4 groups of {group}, the largest that divides it")
    return out


def _split_widths(config: LlamaConfig) -> dict[str, int]:
    """The input widths of the projections whose input a tensor-parallel mesh splits: o (the query
    heads) and down (the MLP width)."""
    return {"o": config.num_heads * config.head_dim, "down": config.intermediate_size}


def _cut_groups(config: LlamaConfig, scheme: QuantScheme, tensor: int) -> list[tuple[str, int, int]]:
    """(projection, input width, group) of each int4 product whose groups `tensor` devices would cut."""
    cuts = []
    for name, width in _split_widths(config).items():
        group = scheme.group_for(width)
        if scheme.bits == 4 and group is not None and (width // tensor) % group:
            cuts.append((name, width, group))
    return cuts


def check_mesh(config: LlamaConfig, scheme: QuantScheme | None, mesh) -> None:
    """Refuses a mesh quantized weights cannot run on: a tensor degree that would cut an int4 group
    (each device must hold whole groups). The message names the tensor degrees below it and the
    group sizes that would run: every product's groups whole, and the degree one the model and the
    mesh's device count take (`config`: the model's own, before its kv heads are repeated)."""
    from llmjax.sharding.mesh import tensor_problem  # the sharding package imports this one

    tensor = mesh.shape["tensor"]
    if scheme is None or tensor == 1 or not _cut_groups(config, scheme, tensor):
        return
    name, width, group = _cut_groups(config, scheme, tensor)[0]
    fits = [t for t in range(1, tensor) if mesh.size % t == 0 and not tensor_problem(config, t)
            and not _cut_groups(config, scheme, t)]
    smaller = [dataclasses.replace(scheme, group_size=g).name for g in GROUP_SIZES if g < group and not _cut_groups(
        config, dataclasses.replace(scheme, group_size=g), tensor)]
    raise ValueError(
        f"tensor={tensor} would cut int4 groups of {group}: the {name} projection's input width {width} "
        f"splits into {width // tensor} per device, not a multiple of {group}; use a tensor degree that "
        f"runs with whole groups (one of {fits}) or quantize with {' or '.join(smaller) if smaller else 'int8'} "
        "(llmjax convert --quant, or init_random's dtype)")


def parse_dtype(dtype: str) -> tuple[str, QuantScheme | None]:
    """A weight format name -> (the float dtype of the unquantized weights, the scheme or None):
    `bfloat16` -> ("bfloat16", None); `int4-g128` -> ("bfloat16", int4 group 128)."""
    if isinstance(dtype, str) and dtype.startswith("int"):
        return "bfloat16", QuantScheme.parse(dtype)
    return dtype, None


def quantize_params(params, scheme: QuantScheme | str):
    """The same model with its projections quantized by `scheme` (a `QuantScheme` or a name such as
    `"int4-g128"`), in memory: for checks and experiments. Checkpoints are quantized once, by
    `llmjax convert --quant`; loading never quantizes."""
    from llmjax.models import llama  # the model imports this package
    from llmjax.params import check_params

    check_params(params)
    scheme = QuantScheme.coerce(scheme)
    if params.quant is not None:
        raise ValueError(f"these params are already quantized ({params.quant.name}); quantize the float model "
                         "(llmjax.load of its unquantized checkpoint), not a quantized one")
    if params.mesh is not None:
        raise ValueError("quantize params before sharding them (llmjax.shard), not after")
    if scheme.lm_head and params.config.tie_word_embeddings:
        raise ValueError("lm_head=True: this model ties its LM head to the embedding table, which stays in "
                         "floating point; leave lm_head off")
    kept = [line for line in departures(params.config, scheme) if "stays in floating point" in line]
    if kept:  # `convert` prints these; in memory, a warning says what the scheme's name does not
        warnings.warn(f"quantize_params({scheme.name!r}): " + "; ".join(kept), stacklevel=2)
    like = llama.abstract_params(params.config, jnp.dtype(params.dtype), quant=scheme)
    return dataclasses.replace(params, weights=quantize_tree(params.weights, like), quant=scheme)


def dequantize_params(params, dtype=None):
    """The float model a quantized one stands for, every weight in `dtype` (each kernel dequantized, the
    rest cast; `dtype` defaults to that of the unquantized weights): the reference the quantized
    model's output is checked against. Sharded params (pipeline stages too) stay on their mesh, each
    float weight in the sharding llmjax's rules give it."""
    from llmjax.models import llama
    from llmjax.params import check_params, float_dtype_name
    from llmjax.sharding import pipeline, rules

    check_params(params)
    if params.quant is None:
        raise ValueError("these params are not quantized; dequantize_params takes quantized params (from "
                         "quantize_params, or llmjax.load of a checkpoint converted with --quant)")
    dtype = jnp.dtype(params.dtype if dtype is None else float_dtype_name(dtype, "(or None for the unquantized "
                                                                          "weights' dtype)"))
    like = llama.abstract_params(params.config, dtype)
    num_stages = pipeline.stages(params.mesh)
    if num_stages > 1:  # the pipeline's layout: each place's weights stacked over the stages
        like = pipeline.group_layers(like, params.config, num_stages, lambda layers: jax.tree.map(
            lambda a: jax.ShapeDtypeStruct((len(layers), *a.shape), a.dtype), layers[0]))
    weights = jax.tree.map(jnp.asarray, cast_floats(dequantize_tree(params.weights, like, dtype), dtype))
    if params.mesh is not None:  # each weight where the float model's rules put it
        weights = jax.device_put(weights, rules.weight_shardings(params.config, params.mesh))
    return dataclasses.replace(params, weights=weights, quant=None)

