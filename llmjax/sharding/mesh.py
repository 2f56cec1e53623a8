"""`make_mesh(tensor, stage, data)`: a device mesh with axes `data`, `stage`, `tensor`, and the checks
that a model fits it.

The mesh spans `jax.devices()`: the local devices, or every process's devices after
`jax.distributed.initialize`. Its axes are Auto (GSPMD places the collectives), ordered so that
`tensor`, the axis with the most traffic, runs over neighbouring devices.
"""

from __future__ import annotations

import collections
import dataclasses
import numbers

import jax
import numpy as np

from llmjax.config import LlamaConfig
from llmjax.sharding import pipeline

AXES = ("data", "stage", "tensor")


def is_integer(value) -> bool:
    """An integer, numpy's too, and not a bool: what a degree or a process count may be."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def make_mesh(tensor: int = 1, stage: int = 1, data: int = 1, devices=None) -> jax.sharding.Mesh:
    """A mesh of `data * stage * tensor` devices (all of `jax.devices()` unless `devices` is given: a
    sequence of distinct devices, or an array of them such as another mesh's `devices`, read in order)."""
    for name, value in (("tensor", tensor), ("stage", stage), ("data", data)):
        if not is_integer(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    tensor, stage, data = int(tensor), int(stage), int(data)
    if devices is None:
        devices = jax.devices()
    elif isinstance(devices, jax.Device):
        raise ValueError(f"devices must be a sequence of devices, got one device ({devices}); pass [device]")
    # a mesh's `devices` array (any shape) or a list: the devices in order
    devices = list(devices.flat) if isinstance(devices, np.ndarray) else list(devices)
    if not devices:
        raise ValueError("devices is empty; pass the devices the mesh spans (by default all of jax.devices())")
    counts = collections.Counter(devices)
    if len(counts) != len(devices):
        repeated = sorted(str(d) for d, n in counts.items() if n > 1)
        raise ValueError(f"devices lists {', '.join(repeated)} more than once; a mesh holds each device once")
    if tensor * stage * data != len(devices):
        raise ValueError(f"data * stage * tensor = {data} * {stage} * {tensor} = {tensor * stage * data}, "
                         f"but there are {len(devices)} devices; choose degrees whose product is "
                         f"{len(devices)} (or pass devices=...)")
    grid = np.asarray(devices, dtype=object).reshape(data, stage, tensor)
    return jax.sharding.Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def check_axes(mesh) -> None:
    """A mesh llmjax can place a model on: a `jax.sharding.Mesh` whose axes are Auto and named
    `data`, `stage` and `tensor`, as `make_mesh` builds (GSPMD places the collectives the rules
    imply; Explicit axes would need every sharding spelled out)."""
    if not isinstance(mesh, jax.sharding.Mesh):
        raise ValueError(f"mesh must be a jax.sharding.Mesh from llmjax.sharding.make_mesh(tensor=, stage=, "
                         f"data=), got {type(mesh).__name__}")
    auto = jax.sharding.AxisType.Auto
    types = getattr(mesh, "axis_types", None) or (auto,) * len(mesh.axis_names)
    if sorted(mesh.axis_names) != sorted(AXES) or any(t != auto for t in types):
        raise ValueError(f"llmjax places models on meshes with the Auto axes {AXES}, got axes "
                         f"{tuple(mesh.axis_names)} of types {tuple(str(t) for t in types)}; build the "
                         "mesh with llmjax.sharding.make_mesh(tensor=, stage=, data=, devices=)")


def fit_config(config: LlamaConfig, mesh: jax.sharding.Mesh) -> tuple[LlamaConfig, int]:
    """The config the model runs with on `mesh`, and how many times each kv head is repeated.

    The stage count must not exceed the layers (stages that hold fewer layers than others are padded,
    `pipeline.stage_layout`), and the tensor degree must divide the query heads and the MLP width.
    A vocabulary the tensor degree does not divide is padded with zero rows of the embedding and LM
    head (their logits are dropped). When it exceeds
    the kv heads, each kv head is repeated `tensor / kv_heads` times (an exact rewrite of the weights:
    every query head still reads the same key and value), so that every device holds whole heads.
    """
    check_axes(mesh)
    pipeline.layers_per_stage(config, pipeline.stages(mesh))
    tensor = mesh.shape["tensor"]
    problem = tensor_problem(config, tensor)
    if problem:
        raise ValueError(problem)
    rows = -(-config.vocab_size // tensor) * tensor
    if rows != config.embedding_rows:
        config = dataclasses.replace(config, padded_vocab_size=rows)
    kv = config.num_kv_heads
    if tensor <= kv:
        return config, 1
    repeat = tensor // kv
    return dataclasses.replace(config, num_kv_heads=kv * repeat), repeat


def tensor_problem(config: LlamaConfig, tensor: int) -> str | None:
    """Why `config` cannot be split over `tensor` devices (None: it can): the degree must divide the
    query heads and the MLP width, and divide the kv heads or be a multiple of them."""
    problems = [f"{what} ({value})" for what, value in (
        ("query heads", config.num_heads), ("MLP width", config.intermediate_size)) if value % tensor]
    if problems:
        return (f"tensor={tensor} does not divide the model's {', '.join(problems)}; choose a tensor degree "
                "that divides each of them")
    kv = config.num_kv_heads
    if tensor <= kv and kv % tensor:
        return (f"tensor={tensor} does not divide the {kv} kv heads; choose a tensor degree that divides {kv} "
                "or is a multiple of it")
    if tensor > kv and tensor % kv:
        return (f"tensor={tensor} is larger than the {kv} kv heads but not a multiple of them; choose a "
                f"divisor or a multiple of {kv}")
    return None
