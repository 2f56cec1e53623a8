"""`llmjax.load`: a model folder in, a `Params` out (weights + config + tokenizer), ready for `generate`.

`load` reads an llmjax checkpoint (from `llmjax convert`, quantized or not) or a Hugging Face folder
directly (converted in memory through the same name map). `Params` is a pytree whose only leaves are
the weights; the config, tokenizer, mesh and quantization scheme ride along as static metadata, so
`jax.tree.map` and `jax.device_put` see weights.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import os
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np

from llmjax import checkpoint
from llmjax.config import LlamaConfig
from llmjax.convert.hf import (DTYPES, HOW_TO_GET_SAFETENSORS, SafetensorsFolder, check_tensors,
                               iter_weight_groups, leftovers_note, named_leaves, nonfinite_error, pickled_files,
                               resolve_dtype)
from llmjax.files import BUNDLED, check_folder, read_json, resolve
from llmjax.kernels import dispatch
from llmjax.models import llama
from llmjax.quant.tree import cast_floats, check_mesh, parse_dtype
from llmjax.quant.weights import QuantScheme
from llmjax.sampling import check_seed, seed_key
from llmjax.sharding import pipeline
from llmjax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class Params:
    weights: dict
    config: LlamaConfig
    tokenizer: Tokenizer | None = None
    mesh: jax.sharding.Mesh | None = None  # set when the weights are sharded over a mesh
    quant: QuantScheme | None = None  # set when the projections are quantized (llmjax.quant)

    @property
    def dtype(self):
        """The dtype of the floating-point weights (and so of the activations)."""
        return self.weights["embed"]["embedding"].dtype

    @property
    def num_params(self) -> int:
        return llama.count_params(self.weights)

    def __repr__(self):
        tok = "no tokenizer" if self.tokenizer is None else f"tokenizer vocab {self.tokenizer.vocab_size}"
        fmt = jnp.dtype(self.dtype).name + ("" if self.quant is None else f", projections {self.quant.name}")
        return f"Params({self.num_params / 1e6:.1f}M weights, {fmt}, {self.config.num_layers} layers, {tok})"


jax.tree_util.register_dataclass(Params, data_fields=["weights"],
                                 meta_fields=["config", "tokenizer", "mesh", "quant"])


def load(path: str | os.PathLike, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None) -> Params:
    """Loads an llmjax checkpoint, a Hugging Face Llama folder or a bundled model onto the first device.

    `path` is a folder, or the name of a model bundled with llmjax (`"tiny-stdlib"`, a 7.8M-parameter
    demo Llama trained on Python's standard library). `dtype` (`bfloat16`, `float16`, `float32`)
    casts the weights (of a quantized checkpoint, those outside the quantized kernels); by default
    they keep the stored dtype on a GPU and are widened to float32 on a CPU (`default_dtype`). A
    checkpoint converted with `--quant` loads quantized. With a `mesh`
    (`llmjax.sharding.make_mesh`), each weight group is read and placed straight into its sharding,
    a layer at a time: the model is never whole on one device. Weights holding a NaN or an infinity
    are refused, by name.
    """
    dispatch.refuse_x64()  # it traces the model to know the weights' shapes
    dispatch.refuse_context_mesh(mesh)
    path = resolve(path)
    if dtype is None and on_cpu(mesh):
        dtype = default_dtype(mesh)
    if dtype is not None:
        dtype = float_dtype_name(dtype, "(or None: as stored on a GPU, float32 on a CPU); loading never "
                                 "quantizes: quantize a checkpoint once with `llmjax convert --quant`"
                                 if str(dtype).startswith("int") else
                                 "(or None: as stored on a GPU, float32 on a CPU)")
    if not os.path.exists(path):
        note = leftovers_note(path)
        raise FileNotFoundError(f"{path}: no such model folder; give an llmjax checkpoint (made by "
                                "`llmjax convert`), a Hugging Face Llama folder, or a bundled model's "
                                f"name ({', '.join(BUNDLED)})" + (f". {note}; convert the model again" if note else ""))
    check_folder(path, "model folder")
    config = _with_generation_eos(LlamaConfig.from_hf(path), path)
    tokenizer = Tokenizer.from_dir(path)
    # a manifest that is there but no file (a folder, a broken link) is named by reading it, not taken
    # for a Hugging Face folder without weights
    is_ckpt = os.path.lexists(os.path.join(path, checkpoint.MANIFEST))
    if not is_ckpt and not (glob.glob(os.path.join(path, "*.safetensors")) or os.path.isfile(
            os.path.join(path, "model.safetensors.index.json"))):
        if os.path.isdir(os.path.join(path, checkpoint.WEIGHTS_DIR)):
            raise FileNotFoundError(f"{path} holds llmjax weights ({checkpoint.WEIGHTS_DIR}/) but no "
                                    f"{checkpoint.MANIFEST}, which says how to read them (deleted, or left behind "
                                    "in a copy); copy it back from the checkpoint this folder came from, or "
                                    "convert the model again")
        pickles = pickled_files(path)
        raise FileNotFoundError(f"{path} holds config.json but no weights: neither an llmjax checkpoint "
                                "(llmjax.json) nor *.safetensors" + (
                                    f"; only pickled weights ({', '.join(pickles)}). " + HOW_TO_GET_SAFETENSORS
                                    if pickles else ""))
    manifest = checkpoint.read_manifest(path) if is_ckpt else None  # read once for the whole load
    quant = _stored_quant(path, manifest, config) if is_ckpt else None
    if mesh is not None:
        return _check_finite(_load_sharded(path, manifest, config, tokenizer, dtype, mesh, quant), path, dtype)
    # A group at a time, each cast or placed before the next is read: the model is never there twice.
    if is_ckpt:
        target = checkpoint.default_target(llama.abstract_params(config, jnp.dtype(manifest["dtype"]), quant))
        checkpoint.check_groups(path, manifest, target)
        weights = {}
        for key in target:
            group = checkpoint.restore_weights(path, {key: target[key]}, manifest)[key]
            weights[key] = group if dtype is None else cast_floats(group, dtype)
    else:
        source = SafetensorsFolder(path)
        groups = iter_weight_groups(source, check_tensors(source, config), resolve_dtype(dtype or "auto", source),
                                    progress=False)
        weights = {key: jax.device_put(tree, jax.local_devices()[0]) for key, tree in groups}
    return _check_finite(Params(weights, config, tokenizer, quant=quant), path, dtype)


def _check_finite(params: Params, path: str, cast: str | None) -> Params:
    """`params`, once no float weight holds a NaN or an infinity (a damaged file, one saved from a
    run that diverged, or a `cast` to float16 that overflowed): such weights would decode garbage
    without a word."""
    named = [(names, w) for names, w in named_leaves(params.weights) if jnp.issubdtype(w.dtype, jnp.floating)]
    stacked = tuple(names[0] == "stages" for names, _ in named)  # [stage, ...]: one verdict per stage
    # One program per weight group (a layer; a place's layers stacked over the stages), every layer's the
    # same compilation: XLA's CPU backend holds each checked weight's mask whole, so one program over the
    # whole model took half of a bfloat16 model's bytes again.
    groups = defaultdict(list)
    for i, (names, _) in enumerate(named):
        groups[tuple(names[:2] if stacked[i] else names[:1])].append(i)
    finite = [None] * len(named)
    for group, ok in zip(groups.values(), jax.device_get([
            _all_finite([named[i][1] for i in group], tuple(stacked[i] for i in group)) for group in groups.values()])):
        for i, verdict in zip(group, ok):
            finite[i] = verdict
    bad = []
    layout = pipeline.stage_layout(params.config, pipeline.stages(params.mesh)) if any(stacked) else []
    for (names, _), ok, per_stage in zip(named, finite, stacked):
        if per_stage:  # stages/layer_{place}/... holds, on stage s, the model's layer layout[s][place]
            place = int(names[1][len("layer_"):])
            bad += [f"layer_{layout[s][place]}/" + "/".join(names[2:]) for s in range(len(ok)) if not ok[s]]
        elif not ok:
            bad.append("/".join(names))
    if bad:
        raise nonfinite_error(path, bad, cast)
    return params


@functools.partial(jax.jit, static_argnums=1)
def _all_finite(weights: list, stacked: tuple) -> list:
    # Scalars only: replicated on every device, so every process of a multi-host mesh reads them. A weight
    # stacked over the stages is reduced on each stage's own devices before a stage's verdict is picked:
    # slicing the weight by stage first gathered every stage's layers onto every device.
    def per_stage(w):
        ok = jnp.isfinite(w).all(axis=tuple(range(1, w.ndim)))
        return [ok[s] for s in range(w.shape[0])]
    return [per_stage(w) if stacked_w else jnp.isfinite(w).all() for w, stacked_w in zip(weights, stacked)]


def _stored_quant(path, manifest: dict, config: LlamaConfig) -> QuantScheme | None:
    """The quantization scheme a checkpoint's manifest names, if any. One that quantizes the LM head of
    a model whose config.json ties it to the embedding (which stays in floating point) is refused, as
    `convert` refuses to write it: the params would claim a quantized head they do not have."""
    stored = manifest.get("quant")
    try:
        quant = None if stored is None else QuantScheme.from_json(stored)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: its manifest names an unknown quantization {stored!r} ({e}); convert "
                         "the model again with this version of `llmjax convert`") from e
    if quant is not None and quant.lm_head and config.tie_word_embeddings:
        raise ValueError(f"{path}: its {checkpoint.MANIFEST} quantizes the LM head (lm_head true), but its config.json "
                         "ties the LM head to the embedding table, which stays in floating point; restore the files "
                         "written with it, or convert the model again")
    return quant


def _load_sharded(path, manifest, config, tokenizer, dtype, mesh, quant) -> Params:
    """`load` onto `mesh`; `manifest` is the checkpoint's, None for a Hugging Face folder."""
    from llmjax.sharding import mesh as meshes, rules

    fitted, repeat = meshes.fit_config(config, mesh)
    check_mesh(config, quant, mesh)
    if manifest is not None:
        stored = manifest["dtype"]
        abstract = llama.abstract_params(config, jnp.dtype(stored), quant)
        checkpoint.check_groups(path, manifest, abstract)
        if fitted == config and dtype in (None, stored) and pipeline.stages(mesh) == 1:
            # orbax reads every tensor straight into its sharding
            targets = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                   abstract, rules.weight_shardings(config, mesh, quant))
            return Params(checkpoint.restore_weights(path, targets, manifest), config, tokenizer, mesh, quant)
        host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        groups = ((key, jax.tree.map(np.asarray, checkpoint.restore_weights(
            path, {key: checkpoint.default_target(abstract[key], host)}, manifest)[key])) for key in abstract)
    else:
        source = SafetensorsFolder(path)
        groups = iter_weight_groups(source, check_tensors(source, config), resolve_dtype("auto", source),
                                    progress=False)
    return Params(_place(groups, config, fitted, repeat, mesh, dtype, quant), fitted, tokenizer, mesh, quant)


def _place(groups, config, fitted, repeat, mesh, dtype, quant) -> dict:
    """Puts each `(key, numpy tree)` group onto the mesh in its sharding, one group at a time."""
    from llmjax.sharding import rules

    shardings = rules.weight_shardings(fitted, mesh, quant)
    num_stages = pipeline.stages(mesh)
    layout = pipeline.stage_layout(fitted, num_stages) if num_stages > 1 else []
    place_of = {i: (s, j) for s, places in enumerate(layout) for j, i in enumerate(places) if i is not None}
    weights, places = {}, {}
    for key, tree in groups:
        tree = rules.fit_group(key, tree, config, fitted, repeat)
        if dtype is not None:
            tree = cast_floats(jax.tree.map(np.asarray, tree), dtype)
        if num_stages > 1 and key.startswith("layer_"):
            # onto its stage's devices now, with a stage axis of size 1; stacked below
            stage, place = place_of[int(key[len("layer_"):])]
            targets = pipeline.on_stage(mesh, stage, shardings["stages"][f"layer_{place}"])
            layer = jax.tree.map(lambda w: np.asarray(w)[None], tree)
            places[stage, place] = _put(layer, targets)
            shapes = jax.tree.map(lambda w: jax.ShapeDtypeStruct(w.shape, w.dtype), layer)  # for padding
        else:
            # Every process holds the same host arrays and hands each of its devices its shard.
            weights[key] = _put(tree, shardings[key])
    if num_stages > 1:
        for stage, place in ((s, j) for s, p in enumerate(layout) for j, i in enumerate(p) if i is None):
            places[stage, place] = _put(pipeline.padding_layer(shapes),
                                        pipeline.on_stage(mesh, stage, shardings["stages"][f"layer_{place}"]))
        weights["stages"] = pipeline.stack_stages(places, shardings["stages"])
    return weights


def _put(tree, shardings):
    """Host arrays onto devices: every process holds the same arrays and hands each of its devices
    its shard."""
    return jax.tree.map(lambda w, s: jax.make_array_from_callback(w.shape, s, lambda index, w=w: w[index],
                                                                  dtype=w.dtype), tree, shardings)


def check_params(params, mesh=None) -> None:
    """Refuses anything but `Params`: a model's name or folder given where its loaded params go, say;
    and a context mesh (`jax.set_mesh`) other than the one the call runs on (`mesh`, by default the
    params')."""
    if not isinstance(params, Params):
        hint = (f"; load them first: params = llmjax.load({os.fspath(params)!r})"
                if isinstance(params, (str, os.PathLike)) else "")
        raise ValueError(f"params must be llmjax Params (from llmjax.load or llmjax.init_random), got "
                         f"{type(params).__name__}{hint}")
    _check_placement(params)
    dispatch.refuse_context_mesh(params.mesh if mesh is None else mesh)


def _check_placement(params: Params) -> None:
    """Refuses params whose weights left the devices of their mesh: `jax.device_put` (or a
    `dataclasses.replace` of the mesh) moves the weights but keeps the Params' mesh, which every
    program on them places its cache and activations on, and XLA's refusal names neither."""
    if params.mesh is None:
        return
    leaves = jax.tree.leaves(params.weights)
    want = set(params.mesh.devices.flat)
    for w in (leaves[0], leaves[-1]):  # the embedding and the last group: moved together or not at all
        if not isinstance(w, jax.Array) or isinstance(w, jax.core.Tracer):  # (inside a trace: no placement)
            continue
        have = w.sharding.device_set
        if have != want:
            raise ValueError(
                f"these params' mesh spans devices {sorted(d.id for d in want)}, but their weights lie on devices "
                f"{sorted(d.id for d in have)} (moved by jax.device_put, which keeps the mesh the params were "
                "sharded over); to run on other devices, llmjax.shard unsharded params onto a mesh of them (or "
                "llmjax.load / init_random with mesh=)")


def shard(params: Params, mesh: jax.sharding.Mesh) -> Params:
    """The same model sharded over `mesh` by llmjax's rules (a layer at a time, through the host)."""
    check_params(params, mesh)
    if params.mesh is not None:
        raise ValueError("these params are already sharded over a mesh; load or init them unsharded, "
                         "then shard them once")
    from llmjax.sharding import mesh as meshes

    fitted, repeat = meshes.fit_config(params.config, mesh)
    check_mesh(params.config, params.quant, mesh)
    groups = ((key, jax.tree.map(np.asarray, tree)) for key, tree in params.weights.items())
    weights = _place(groups, params.config, fitted, repeat, mesh, None, params.quant)
    return Params(weights, fitted, params.tokenizer, mesh, params.quant)


def float_dtype_name(dtype, also: str = "(or None: as stored on a GPU, float32 on a CPU)") -> str:
    """`"bfloat16"`, `jnp.bfloat16` and `np.dtype("bfloat16")` alike, or a ValueError naming the
    float dtypes and `also` what else the caller takes."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)} {also}")
    return name


def on_cpu(mesh: jax.sharding.Mesh | None = None) -> bool:
    """Whether weights made or loaded now land on CPU devices (the mesh's, else the first local one)."""
    device = mesh.devices.flat[0] if isinstance(mesh, jax.sharding.Mesh) else jax.local_devices()[0]
    return device.platform == "cpu"  # (anything else given as a mesh is refused later, with the reason)


def default_dtype(mesh: jax.sharding.Mesh | None = None) -> str:
    """The float dtype of weights when none is named: bfloat16 on a GPU, float32 on a CPU.

    XLA's CPU backend computes bfloat16 through float32, rounding each operation's result back, so
    bfloat16 runs slower there (the demo model decodes one row 1.28x faster in float32) and each
    rounding can turn a near tie between two tokens on how the work was split (a request's batch,
    its neighbours in the engine, the mesh). In float32 the engine's greedy tokens have equalled
    `generate`'s in every case tried. Name `dtype="bfloat16"` to halve the memory."""
    return "float32" if on_cpu(mesh) else "bfloat16"


def _with_generation_eos(config: LlamaConfig, folder: str) -> LlamaConfig:
    """`generation_config.json`'s eos_token_id (often several ids) governs when generation stops."""
    eos = read_json(os.path.join(folder, "generation_config.json"), optional=True).get("eos_token_id")
    if eos is None:
        return config
    return dataclasses.replace(config, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))


def init_random(config: LlamaConfig | str, *, seed: int = 0, dtype: str | None = None,
                tokenizer: Tokenizer | None = None, mesh: jax.sharding.Mesh | None = None,
                quant_lm_head: bool = False) -> Params:
    """Random weights for a config or preset name: for benchmarks and tests. `dtype` is a float dtype
    (by default bfloat16 on a GPU, float32 on a CPU: `default_dtype`) or a quantization (`int4-g128`,
    ..., `int8`: random codes made directly in quantized form, the other weights bfloat16;
    `quant_lm_head` quantizes an untied LM head too, as `llmjax convert --quant-lm-head` does).
    With a `mesh`, each weight is created in its sharding (a 70B model never sits whole on one
    device)."""
    if isinstance(config, str):
        config = LlamaConfig.preset(config)
    if not isinstance(config, LlamaConfig):
        raise TypeError(f"config must be an llmjax.LlamaConfig or a preset's name (such as 'tiny' or 'llama2-7b'), "
                        f"got {config!r}")
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be an llmjax Tokenizer (Tokenizer.from_dir(folder), or "
                        f"llmjax.load(name).tokenizer for a bundled model's), got {tokenizer!r}")
    check_seed(seed)
    dispatch.refuse_x64()
    dispatch.refuse_context_mesh(mesh)
    dtype, quant = parse_dtype(default_dtype(mesh) if dtype is None else dtype)
    dtype = float_dtype_name(dtype, "or a quantization such as 'int4-g128', 'int4-g32-asym' or 'int8'")
    if quant_lm_head:
        if quant is None:
            raise ValueError(f"quant_lm_head quantizes the LM head with the projections' scheme, but dtype "
                             f"{dtype!r} quantizes nothing; pass a quantized dtype such as 'int4-g128'")
        if config.tie_word_embeddings:
            raise ValueError("quant_lm_head: this model ties its LM head to the embedding table, which stays "
                             "in floating point; leave quant_lm_head off")
        quant = dataclasses.replace(quant, lm_head=True)
    if mesh is None:
        weights = llama.init_params(config, seed_key(seed), jnp.dtype(dtype), quant=quant)
        return Params(weights, config, tokenizer, quant=quant)
    from llmjax.sharding import mesh as meshes, rules

    fitted, repeat = meshes.fit_config(config, mesh)
    check_mesh(config, quant, mesh)
    shardings = rules.weight_shardings(fitted, mesh, quant)
    key, dtype = seed_key(seed), jnp.dtype(dtype)
    # the one-device model's weights, fitted to the mesh as `shard` fits them
    fit = functools.partial(rules.fit_group, config=config, fitted=fitted, repeat=repeat)
    if pipeline.stages(mesh) == 1:
        weights = llama.init_params(config, key, dtype, shardings, quant, fit)
    else:
        weights = _init_stacked(config, key, dtype, mesh, shardings, quant, fit)
    return Params(weights, fitted, tokenizer, mesh, quant)


def _init_stacked(config: LlamaConfig, key, dtype, mesh, shardings, quant=None, fit=None) -> dict:
    """Random weights in the pipeline's layout, equal to `init_params`'s: each stage makes its own
    layers on its own devices, so no device ever holds more than its share."""
    outer = {name: s for name, s in shardings.items() if name != "stages"}
    weights = llama.init_outer(config, key, dtype, outer, quant, fit)
    init = llama.layer_init(config, dtype, quant, fit)
    places = {}
    for stage, layers in enumerate(pipeline.stage_layout(config, pipeline.stages(mesh))):
        # every place of a stage lands alike ([1, ...] on the stage's devices): one compiled program
        # for its layers, one for its padding (zeros shaped like a layer)
        targets = pipeline.on_stage(mesh, stage, shardings["stages"]["layer_0"])
        make = pipeline.run_on_stage(lambda key: jax.tree.map(lambda w: w[None], init(key)), targets)
        pad = pipeline.run_on_stage(lambda key: pipeline.padding_layer(jax.tree.map(lambda w: w[None], init(key))),
                                    targets)
        for place, i in enumerate(layers):
            places[stage, place] = make(llama.layer_key(key, i)) if i is not None else pad(llama.layer_key(key, 0))
    weights["stages"] = pipeline.stack_stages(places, shardings["stages"])
    return weights
