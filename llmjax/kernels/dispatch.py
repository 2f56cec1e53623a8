"""Where a kernel runs: its Pallas kernel on cuda and rocm, its jnp reference everywhere else.

The choice is made when the program is lowered (`jax.lax.platform_dependent`), so one traced
function serves a GPU and a CPU alike. An environment variable per kernel family can override it:
`off` keeps the reference on every platform (to measure the kernel's worth, or to step around a
compiler bug), `interpret` runs the kernel in Pallas interpret mode on every platform (how tests
push the whole model through the kernels on a CPU). Gradients always come from the reference: the
kernels have no backward pass of their own, and training (examples/train_tiny.py) is rare enough
that recomputing the reference's backward is the right trade.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Callable

import jax

MODES = ("auto", "off", "interpret")

# Every `LLMJAX_*` environment variable llmjax reads, with the values a choice takes (None: not a choice;
# the all-reduce's integers are checked by `allreduce.check_settings`, the paths where they are used).
# Each is read only where it applies (a GPU, a mesh), so `check_settings` checks them all wherever llmjax
# traces: a misspelt value fails on a CPU as on a GPU.
SETTINGS = {
    "LLMJAX_ATTENTION": MODES, "LLMJAX_NORM": MODES, "LLMJAX_PAGE_WRITE": MODES,
    "LLMJAX_ATTENTION_MOSAIC": ("auto", "off"),  # Hopper's prefill kernel, or the Triton one
    "LLMJAX_PAGED_PREFILL": ("auto", "off"),  # the kernel's interpret mode is LLMJAX_ATTENTION's
    "LLMJAX_LOOP_GRAPH": ("auto", "off"), "LLMJAX_GEMM": ("auto", "triton"),
    "LLMJAX_GEMV": ("auto", "on", "off", "narrow"),
    "LLMJAX_ALLREDUCE": ("auto", "xla", "nvlink", "nvlink-eager"), "LLMJAX_TP_GRAPH": ("off", "on"),
    "LLMJAX_ALLREDUCE_BYTES": None, "LLMJAX_ALLREDUCE_BLOCKS": None, "LLMJAX_ALLREDUCE_TIMEOUT_S": None,
    "LLMJAX_NVCC": None, "LLMJAX_CACHE_DIR": None,
    "LLMJAX_TEST_DEVICES": None,  # the test suite's CPU devices (tests/conftest.py)
}


# What to set instead, for a value a variable refuses but a user might reach for.
HINTS = {("LLMJAX_PAGED_PREFILL", "interpret"): "LLMJAX_ATTENTION=interpret runs the prompt rows' kernel in "
                                                "interpret mode"}


def mode(variable: str, choices: tuple = MODES, default: str = "auto") -> str:
    """The mode the environment variable `variable` selects among `choices`: for a kernel family
    `auto` (the default), `off` or `interpret`."""
    value = os.environ.get(variable, default)
    if value not in choices:
        hint = HINTS.get((variable, value))
        raise ValueError(f"{variable} must be one of {', '.join(choices)}, got {value!r}{'; ' + hint if hint else ''}")
    return value


def check_settings() -> None:
    """Raises ValueError for an `LLMJAX_*` variable set to a value it does not take, and warns once for
    a name llmjax does not read (a misspelling would otherwise change nothing, silently)."""
    for name, value in os.environ.items():
        if not name.startswith("LLMJAX_"):
            continue
        if name not in SETTINGS:
            if name not in _unknown:
                _unknown.add(name)
                warnings.warn(f"{name} is set, but llmjax reads no such variable (it reads "
                              f"{', '.join(sorted(SETTINGS))})", stacklevel=3)
        elif SETTINGS[name] is not None:
            mode(name, SETTINGS[name])
    from llmjax.kernels import allreduce  # it imports this module
    allreduce.check_settings()


_unknown: set[str] = set()


def out_of_memory(error: Exception) -> bool:
    """Whether `error` is XLA running out of device memory (RESOURCE_EXHAUSTED), which callers turn
    into a MemoryError naming the sizes to lower."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


def refuse_x64() -> None:
    """llmjax's programs index with 32-bit integers; with `jax_enable_x64` on, Python integers in
    them become 64-bit and tracing fails deep inside a kernel. Called wherever llmjax traces."""
    if jax.config.jax_enable_x64:
        raise ValueError("llmjax runs with jax_enable_x64 off (its kernels index with 32-bit integers), but it "
                         "is on (JAX_ENABLE_X64 or jax.config.update); turn it off: unset JAX_ENABLE_X64, or "
                         "call jax.config.update('jax_enable_x64', False) before calling llmjax")


def refuse_context_mesh(mesh) -> None:
    """llmjax places its programs on the params' own mesh (`mesh`; None: one device). A mesh set with
    `jax.set_mesh` becomes the context of every jit, and where it is another, JAX refuses deep inside
    (incompatible devices, a shard_map's mesh that does not match the context's, an Explicit axis's
    sharding assert). Inside a trace the tracer's caller chose the context: nothing to check."""
    if jax.sharding.get_abstract_mesh().empty:
        return
    try:
        context = jax.sharding.get_mesh()
    except ValueError:  # inside jax.jit
        return
    if context.empty or context == mesh:
        return
    where = "one device" if mesh is None else f"their own mesh {dict(mesh.shape)}"
    raise ValueError(f"a mesh {dict(context.shape)} is set with jax.set_mesh, but llmjax runs these params on "
                     f"{where}; call llmjax outside `with jax.set_mesh(...)` (or after jax.set_mesh(None)), and "
                     "place a model on a mesh with llmjax.load(path, mesh=mesh) or llmjax.shard(params, mesh)")


def trace_settings() -> tuple:
    """Every `LLMJAX_*` environment variable and its value: what llmjax reads when it traces a program
    (the kernel modes, the all-reduce), for a cache of compiled programs to key on."""
    refuse_x64()
    check_settings()
    return tuple(sorted((name, value) for name, value in os.environ.items() if name.startswith("LLMJAX_")))


def gemm_options() -> dict:
    """XLA compiler options for the products of a program: with LLMJAX_GEMM=triton, on an NVIDIA GPU,
    every product is one of XLA's Triton GEMMs (cuBLAS and cuDNN are not used); `auto`, the default,
    lets XLA's autotuner choose between cuBLAS and its Triton GEMMs per product."""
    if mode("LLMJAX_GEMM", ("auto", "triton")) == "triton" and compute_capability() is not None:
        return {"xla_gpu_experimental_disable_binary_libraries": True}
    return {}


def compute_capability(device=None) -> str | None:
    """`device`'s (default: the default device's) CUDA compute capability ("9.0" on an H100 or H200);
    None off NVIDIA GPUs (a rocm device reports its gfx name there, "gfx942", which is not one)."""
    device = jax.devices()[0] if device is None else device
    capability = getattr(device, "compute_capability", None) if device.platform == "gpu" else None
    return capability if capability and capability[0].isdigit() else None


def kernel_runs(variable: str, device, rocm: bool = True) -> bool:
    """Whether `dispatch` under `variable` (with its `rocm`) runs the kernel on `device`, compiled or
    in interpret mode, rather than the reference: what a caller sizing memory for one path or the
    other needs to know before it traces anything."""
    chosen = mode(variable)
    if chosen != "auto":
        return chosen == "interpret"
    return device.platform == "gpu" and (rocm or compute_capability(device) is not None)


def dispatch(kernel: Callable, reference: Callable, *args, variable: str, rocm_tuning: dict | None = None,
             rocm: bool = True, rocm_kernel: Callable | None = None):
    """`kernel(*args, interpret=...)` or `reference(*args)`, as the platform and `variable` decide.

    `kernel` takes its tuning as keyword defaults (chosen for the H200) and an `interpret` keyword;
    on rocm, `rocm_tuning` overrides some of them (an MI300 has 64 KB of shared memory per workgroup
    where an H200 has 227 KB), `rocm_kernel` replaces `kernel` there (`kernel` being cuda-only), and
    `rocm=False` keeps the reference there. `reference` computes the
    same result in jnp. Under `jax.grad` the backward pass is the reference's.
    """
    chosen = mode(variable)
    if chosen == "off":
        return reference(*args)
    if chosen == "interpret":
        forward = functools.partial(kernel, interpret=True)
    else:
        on_rocm = functools.partial(rocm_kernel or kernel, **(rocm_tuning or {})) if rocm else reference

        def forward(*a):
            return jax.lax.platform_dependent(*a, cuda=kernel, rocm=on_rocm, default=reference)

    @jax.custom_vjp
    def run(*a):
        return forward(*a)

    def run_fwd(*a):
        return forward(*a), a

    def run_bwd(saved, cotangent):
        return jax.vjp(reference, *saved)[1](cotangent)

    run.defvjp(run_fwd, run_bwd)
    return run(*args)


def free_axes(mesh) -> frozenset:
    """The axes of `mesh` of more than one device that the code being traced has not split already:
    all of them, except inside an enclosing `shard_map` (a pipeline stage runs inside one over
    `stage` and `data`, `tensor` left to GSPMD), whose axes are manual there."""
    manual = _manual_context()[1]
    return frozenset(a for a in mesh.axis_names if a not in manual and mesh.shape[a] > 1)


def data_axis(mesh, free, rows: int) -> str | None:
    """`data` when it is among the `free` axes of `mesh` (`free_axes`) and `rows` split evenly over it:
    the axis a per-device call splits its rows over; None keeps every row on every device."""
    return "data" if "data" in free and rows % mesh.shape["data"] == 0 else None


def splits_heads(mesh, heads: int) -> bool:
    """Whether `tensor` is among the free axes of `mesh` and divides `heads`: then a call per device
    over `tensor` sees whole heads (the engine's page pool is split so, by kv heads)."""
    return mesh is not None and "tensor" in free_axes(mesh) and heads % mesh.shape["tensor"] == 0


def splits_otherwise(mesh, heads: int) -> bool:
    """Whether some free axis of `mesh` splits the work but `tensor` does not split `heads`: then a
    per-device kernel over its own heads does not fit, and the caller takes a path GSPMD partitions."""
    return mesh is not None and bool(free_axes(mesh)) and not splits_heads(mesh, heads)


def on_own_heads(fn: Callable, mesh, heads: int, in_specs, out_specs) -> Callable:
    """`fn` per device over `tensor` when `tensor` splits `heads` (`splits_heads`: each device runs it on
    its own heads, as the engine's page pool is placed), `fn` itself otherwise."""
    return per_device(fn, mesh, in_specs, out_specs) if splits_heads(mesh, heads) else fn


def _manual_context():
    """The mesh of the enclosing `shard_map` (None outside one) and its manual axes."""
    context = jax.sharding.get_abstract_mesh()
    if context is None or context.empty:
        return None, set()
    manual = {name for name, kind in zip(context.axis_names, context.axis_types)
              if kind == jax.sharding.AxisType.Manual}
    return (context if manual else None), manual


def per_device(fn: Callable, mesh, in_specs, out_specs) -> Callable:
    """`fn` run on each device's shards (`shard_map` over every axis of `mesh` not split already), so
    that a Pallas call inside it, which XLA cannot split, never sees a sharded array. The specs may
    name only such axes. check_vma=False: a Pallas call's output carries no record of which mesh axes
    it varies over."""
    # Inside an enclosing shard_map the nested one must name the enclosing (abstract) mesh.
    context, manual = _manual_context()
    return jax.shard_map(fn, mesh=context or mesh, in_specs=in_specs, out_specs=out_specs,
                         axis_names={a for a in mesh.axis_names if a not in manual}, check_vma=False)
