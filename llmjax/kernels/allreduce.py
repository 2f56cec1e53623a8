"""The tensor-parallel all-reduce: XLA's `psum`, or llmjax's one-shot kernel over NVLink peer memory.

A row-parallel product (o, down) leaves each device of a `tensor` group a partial sum that the group
adds together: two all-reduces per layer per step. At batch-1 decode they are a few KiB each, and
through XLA's `psum` (NCCL) each costs ~20 us on two H200s, mostly not moving bytes: a quarter of a
Llama-2-13B step at tensor=2. `allreduce.cu` beside this file is an XLA FFI custom call that does it
on the compute stream in one kernel: each device pushes its values into its peers' memory over
NVLink, raises a flag there, waits for theirs, and adds the members' values in rank order (so every
member holds the same bits).

`LLMJAX_ALLREDUCE` chooses, when a program is traced:
- `auto` (the default): `nvlink` where the kernel runs and was measured faster (groups of two CUDA GPUs
  of compute capability 8 or more, driven by one process, that reach each other's memory, a kernel
  that nvcc built or had built, sums that fit `LLMJAX_ALLREDUCE_BYTES`), `xla` elsewhere: on other
  platforms, larger groups, older GPUs, larger sums and multi-process meshes silently, and with one
  warning where the GPUs cannot reach each other's memory or nvcc is missing or fails. On two H200s
  with NVLink it decodes Llama-2-13B bf16 at tensor=2 13.5% faster than `xla`, and 70B 6.7%
  (BENCHMARKS.md, twentieth session).
- `xla`: XLA's partitioner places the products and `psum`s them.
- `nvlink`: every row-parallel product runs per device (`shard_map`) and its sum goes through the
  kernel, on CUDA GPUs driven by one process, for sums of at most `LLMJAX_ALLREDUCE_BYTES` (default
  2 MiB) per device: decode. Larger sums (prefill), other platforms and multi-process meshes keep
  `psum`; GPUs that cannot reach each other's memory, or a missing nvcc, are an error. XLA may capture
  the kernel in its CUDA graphs.
- `nvlink-eager`: the same kernel, never captured in a CUDA graph (to measure what capture gives).

The kernel is compiled with `nvcc` (`LLMJAX_NVCC`, else the one on `PATH`, else
`/usr/local/cuda/bin/nvcc`) the first time it is needed, against JAX's FFI headers, and cached in
`LLMJAX_CACHE_DIR` (default `~/.cache/llmjax`), keyed by the source, the flags, the compiler and JAX.
`LLMJAX_TP_GRAPH=on` (default `off`: a trial not yet measured on two GPUs) sends a tensor-parallel
model's other two collectives through the kernel too, where it sums the products: the embedding's
lookup (each device looks up the tokens in its share of the vocabulary, zeros for the others, and the
shares add) and the LM head's logits (each device places its columns in zeros of the whole width, and
the widths add: `gather`). Each sum has one nonzero term per value, so the results are the values
XLA's collectives give (a negative zero comes out positive), and the sampling after the head runs on
every device by itself instead of on vocab-split logits (XLA's partitioned argmax: two NCCL all-gathers
a step; top-p's sort adds more). With no NCCL collective left in a decode step on a tensor-only mesh,
`generate` compiles its decode loop for one CUDA graph there (`graph_loop`), as on one GPU.

`LLMJAX_ALLREDUCE_BLOCKS` fixes its grid (default: one block per 32 KiB, at most 32).
`LLMJAX_ALLREDUCE_TIMEOUT_S` (default 120, at most a week) is how long a GPU waits for a peer before it stops with a
message: the GPUs' programs diverged, or one was held up. It, like the slot size, is fixed when a
group's buffers are set up, on the first trace.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.kernels import dispatch

VARIABLE = "LLMJAX_ALLREDUCE"
MODES = dispatch.SETTINGS[VARIABLE]  # auto, xla, nvlink, nvlink-eager
GRAPH_VARIABLE = "LLMJAX_TP_GRAPH"
SLOT_BYTES = 2 << 20
MAX_GROUP = 8  # kMaxRanks in allreduce.cu
MAX_BLOCKS = 64  # kMaxBlocks
DTYPES = ("bfloat16", "float16", "float32")
TIMEOUT_S = 120
MAX_TIMEOUT_S = 7 * 24 * 3600  # a week: longer is never what a program wants
SOURCE = Path(__file__).with_name("allreduce.cu")
BUILD_TIMEOUT_S = 600  # nvcc builds it in ~20 s; a compiler that hangs must not hang the first trace
ARCHS = ("-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
         "-gencode=arch=compute_90,code=compute_90")


def mode() -> str:
    """The all-reduce `LLMJAX_ALLREDUCE` selects: `auto` (the default), `xla`, `nvlink` or `nvlink-eager`."""
    return dispatch.mode(VARIABLE, MODES, "auto")


# `auto` takes the kernel only where it was measured faster than psum: groups of two GPUs (two H200s,
# BENCHMARKS.md, twentieth session). Larger groups keep psum unless LLMJAX_ALLREDUCE=nvlink.
AUTO_GROUP = 2
MIN_CAPABILITY = 8  # the library holds sm_80 and sm_90 code (ARCHS)


def kernel_mode(mesh, axis: str, nbytes: int = 16, dtype=np.dtype(np.float32)) -> str | None:
    """The kernel's mode (`nvlink` or `nvlink-eager`) for row-parallel sums of `nbytes` of `dtype` per
    device over `axis` of `mesh`, or None where XLA's partitioner places the products and sums them
    (`xla`, or `auto` where the kernel cannot run or would not take sums of that size)."""
    chosen = mode()
    if chosen == "auto":
        return "nvlink" if _kernel_runs(mesh, axis, nbytes, np.dtype(dtype)) else None
    return None if chosen == "xla" else chosen


def _kernel_runs(mesh, axis: str, nbytes: int, dtype) -> bool:
    """Whether `auto` takes the kernel over `axis` of `mesh`: a mesh and a sum it takes (`_why_not`), a
    group of `AUTO_GROUP` GPUs of compute capability 8 or more, whose buffers could be set up over a
    library nvcc could build."""
    if _why_not(mesh, axis, nbytes, dtype) is not None or mesh.shape[axis] != AUTO_GROUP or not _capable(mesh):
        return False
    return _groups_set_up(tuple(tuple(row) for row in groups(mesh, axis).tolist()))


def _capable(mesh) -> bool:
    """Whether every GPU of `mesh` runs the library's code (compute capability `MIN_CAPABILITY` or more)."""
    capabilities = [dispatch.compute_capability(d) for d in mesh.devices.flat]
    return all(c is not None and int(c.split(".")[0]) >= MIN_CAPABILITY for c in capabilities)


@functools.cache
def _groups_set_up(table: tuple) -> bool:
    check_settings()
    try:
        for row in table:
            setup(list(row))
        _register()
    except Exception as e:  # no nvcc, a failed build or load, GPUs that cannot reach each other
        _warn_once(f"{VARIABLE}=auto: XLA's psum sums the tensor-parallel products, because the NVLink "
                   f"all-reduce cannot run: {e} (set {VARIABLE}=xla to silence this)")
        return False
    return True


def allreduce_reference(parts: jax.Array) -> jax.Array:
    """The sum the kernel computes, in jnp: `parts` `[members, ...]` (member r's values at index r)
    added in rank order in float32 and rounded once to their dtype, so every member's result is the
    same bits. (XLA's psum, the fallback, may add in another order: equal up to rounding.)"""
    total = parts[0].astype(jnp.float32)
    for r in range(1, parts.shape[0]):
        total = total + parts[r].astype(jnp.float32)
    return total.astype(parts.dtype)


def _int_setting(variable: str, default: int, minimum: int, maximum: int | None = None) -> int:
    raw = os.environ.get(variable)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ValueError(f"{variable} must be an integer {bounds}, got {raw!r}")
    return value


def check_settings() -> None:
    """Raises ValueError for an integer setting of the kernel out of its range (`dispatch.check_settings`
    calls this wherever llmjax traces, so a bad one fails on every platform, not only where it is read)."""
    slot_bytes(), _int_setting("LLMJAX_ALLREDUCE_TIMEOUT_S", TIMEOUT_S, 1, MAX_TIMEOUT_S)
    _int_setting("LLMJAX_ALLREDUCE_BLOCKS", 0, 0, MAX_BLOCKS)


def slot_bytes() -> int:
    """The most bytes per device one call of the kernel sums (`LLMJAX_ALLREDUCE_BYTES`): the size of
    each member's receive slot. Set it before the first call: the buffers are allocated once."""
    value = _int_setting("LLMJAX_ALLREDUCE_BYTES", SLOT_BYTES, 16)
    if value % 16:
        raise ValueError(f"LLMJAX_ALLREDUCE_BYTES must be a multiple of 16, got {value}")
    return value


def groups(mesh, axis: str) -> np.ndarray:
    """The devices that sum together over `axis` of `mesh`, `[groups, mesh.shape[axis]]`, each row in
    rank order (the device's index along `axis`), as CUDA ordinals (`local_hardware_id`)."""
    ids = np.vectorize(lambda d: d.local_hardware_id if d.local_hardware_id is not None else d.id,
                       otypes=[np.int64])(mesh.devices)
    along = np.moveaxis(ids, list(mesh.axis_names).index(axis), -1)
    return along.reshape(-1, mesh.shape[axis])


def _why_not(mesh, axis: str, nbytes: int, dtype=np.dtype(np.float32)) -> str | None:
    """Why the kernel cannot sum `nbytes` of `dtype` per device over `axis` of `mesh` (None: it can)."""
    if isinstance(mesh, jax.sharding.AbstractMesh):
        return "platform"  # no devices to reach (a program lowered for a platform it does not run on)
    devices = list(mesh.devices.flat)
    if any(d.platform != "gpu" or "cuda" not in d.client.platform_version.lower() for d in devices):
        return "platform"  # not a CUDA GPU: psum, as any kernel's reference elsewhere
    if any(d.process_index != jax.process_index() for d in devices):
        return "the mesh spans several processes; the kernel sums the GPUs of one process"
    if not 2 <= mesh.shape[axis] <= MAX_GROUP:
        return f"{axis} has {mesh.shape[axis]} devices; the kernel sums 2 to {MAX_GROUP}"
    if nbytes % 16 or nbytes > slot_bytes() or dtype.name not in DTYPES:
        return "size"  # prefill-sized or odd sums: psum
    return None


def psum(y: jax.Array, axis: str, mesh) -> jax.Array:
    """The sum of `y` over `axis`, inside a `shard_map` over `mesh` that makes `axis` manual: XLA's
    `psum`, or the NVLink kernel where `LLMJAX_ALLREDUCE` asks for it and it can run (see above)."""
    chosen = kernel_mode(mesh, axis, y.size * y.dtype.itemsize, y.dtype)
    if chosen is None:
        return jax.lax.psum(y, axis)
    reason = _why_not(mesh, axis, y.size * y.dtype.itemsize, np.dtype(y.dtype))
    if reason is not None:
        if reason not in ("platform", "size"):
            _warn_once(f"{VARIABLE}={chosen}: using XLA's psum, because {reason}")
        return jax.lax.psum(y, axis)
    table = groups(mesh, axis)
    for row in table:
        setup(row.tolist())
    target = _register()[chosen]
    return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(y.shape, y.dtype))(
        y, groups=table.reshape(-1), group_size=np.int64(table.shape[1]),
        blocks=np.int64(_int_setting("LLMJAX_ALLREDUCE_BLOCKS", 0, 0, MAX_BLOCKS)))


def vocab_axis(mesh, nbytes: int, dtype) -> str | None:
    """The axis over which the embedding's lookup and the LM head's logits, `nbytes` of `dtype` per
    device when whole, go through `psum` and `gather` (`LLMJAX_TP_GRAPH=on`): `tensor` when it splits the
    vocabulary on `mesh` and the kernel would sum the products; None leaves them to XLA's partitioner."""
    if mesh is None or dispatch.mode(GRAPH_VARIABLE, dispatch.SETTINGS[GRAPH_VARIABLE], "off") == "off":
        return None
    if "tensor" not in dispatch.free_axes(mesh) or kernel_mode(mesh, "tensor", nbytes, np.dtype(dtype)) is None:
        return None
    return "tensor"


def graph_loop(mesh, nbytes: int = 16, dtype=np.float32) -> bool:
    """Whether every collective of a decode step on `mesh` goes through the kernel in a form a CUDA
    graph captures (`LLMJAX_TP_GRAPH=on`, the `nvlink` handler, `tensor` the mesh's only axis of more
    than one device, and the step's largest sum, its whole logits of `nbytes` of `dtype` per device, fits
    the kernel's slots), so that `generate`'s decode loop can be one graph on several GPUs. (It is what
    llmjax compiles for; XLA captures the loop only if every instruction of its body can be captured.)"""
    if mesh is None or any(size > 1 for axis, size in mesh.shape.items() if axis != "tensor"):
        return False
    return mesh.shape["tensor"] > 1 and vocab_axis(mesh, nbytes, dtype) is not None and \
        kernel_mode(mesh, "tensor", nbytes, dtype) == "nvlink" and nbytes <= slot_bytes() and \
        _why_not(mesh, "tensor", nbytes, np.dtype(dtype)) is None


def gather(y: jax.Array, axis: str, mesh, along: int = -1) -> jax.Array:
    """The members' `y` along `along`, concatenated in rank order over `axis` (a tiled all-gather), inside
    a `shard_map` over `mesh` that makes `axis` manual: as a `psum` of each member's `y` placed in zeros
    of the whole width (one nonzero term per value: the same values), so that the kernel does it where
    it sums the products; XLA's all-gather where the kernel is not chosen or the whole width outgrows its
    slots (a psum of the zero-padded width where `psum` falls back for another reason)."""
    along %= y.ndim
    members = mesh.shape[axis]
    shape = y.shape[:along] + (y.shape[along] * members,) + y.shape[along + 1:]
    nbytes = math.prod(shape) * y.dtype.itemsize
    if kernel_mode(mesh, axis, nbytes, y.dtype) is None or _why_not(mesh, axis, nbytes, np.dtype(y.dtype)) == "size":
        return jax.lax.all_gather(y, axis, axis=along, tiled=True)  # twice the bytes as a sum
    start = jax.lax.axis_index(axis) * y.shape[along]
    return psum(jax.lax.dynamic_update_slice_in_dim(jnp.zeros(shape, y.dtype), y, start, along), axis, mesh)


@functools.cache
def _warn_once(message: str) -> None:
    warnings.warn(message, stacklevel=3)


def setup(ordinals: list[int]) -> None:
    """Allocate the kernel's buffers for one group (CUDA ordinals in rank order) and let its GPUs
    reach each other's memory; once per group, on the first trace that needs it."""
    lib = library()
    array = (ctypes.c_int * len(ordinals))(*ordinals)
    timeout = _int_setting("LLMJAX_ALLREDUCE_TIMEOUT_S", TIMEOUT_S, 1, MAX_TIMEOUT_S)
    if lib.llmjax_allreduce_setup(array, len(ordinals), slot_bytes(), float(timeout)):
        raise RuntimeError(f"{VARIABLE}: the NVLink all-reduce cannot run on GPUs {ordinals}: "
                           f"{lib.llmjax_allreduce_error().decode()}. Set {VARIABLE}=xla to use XLA's psum.")


@functools.cache
def _register() -> dict[str, str]:
    """Register both handlers with XLA once; the FFI target each mode calls."""
    lib = library()
    names = {"nvlink": "llmjax_allreduce_graph", "nvlink-eager": "llmjax_allreduce"}
    for name in names.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="CUDA")
    return names


def nvcc() -> str:
    """The CUDA compiler that builds the kernel: `LLMJAX_NVCC`, `nvcc` on `PATH`, or CUDA's default."""
    found = os.environ.get("LLMJAX_NVCC") or shutil.which("nvcc")
    if found is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        found = "/usr/local/cuda/bin/nvcc"
    if found is None:
        raise RuntimeError(f"{VARIABLE}: the NVLink all-reduce is compiled with nvcc, which was not found; "
                           f"install CUDA's compiler, point LLMJAX_NVCC at it, or set {VARIABLE}=xla")
    if not os.access(found, os.X_OK):
        raise RuntimeError(f"{VARIABLE}: the CUDA compiler {found!r} (LLMJAX_NVCC) is not an executable file; "
                           f"point LLMJAX_NVCC at nvcc, or unset it to use the one on PATH")
    return found


def build(cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile `allreduce.cu` into a shared library (once: the result is cached) and return its path."""
    compiler = nvcc()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, errors="replace").stdout
    flags = ["-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wno-return-type",
             "-diag-suppress=940,2473", *ARCHS, f"-I{jax.ffi.include_dir()}"]  # quiet on JAX's headers
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), version.encode(),
                                     jax.__version__.encode()])).hexdigest()[:16]
    cache = Path(cache_dir or os.environ.get("LLMJAX_CACHE_DIR") or Path.home() / ".cache" / "llmjax")
    target = cache / f"allreduce-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        try:
            done = subprocess.run([compiler, *flags, str(SOURCE), "-o", partial], capture_output=True, text=True,
                                  errors="replace", timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"{VARIABLE}: nvcc did not build {SOURCE.name} within {BUILD_TIMEOUT_S} s") from None
        if done.returncode or not os.path.getsize(partial):
            raise RuntimeError(f"{VARIABLE}: nvcc could not build {SOURCE.name} (exit {done.returncode}):\n"
                               f"{done.stderr[-4000:]}")
        os.replace(partial, target)  # atomic: a process that finds the file finds it whole
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return target


@functools.cache
def library() -> ctypes.CDLL:
    """The compiled kernel, built if needed and loaded once per process."""
    return load(build())


def load(path: str | os.PathLike) -> ctypes.CDLL:
    """The kernel library at `path`, its setup functions typed."""
    lib = ctypes.CDLL(str(path))
    lib.llmjax_allreduce_setup.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int64,
                                            ctypes.c_double]
    lib.llmjax_allreduce_setup.restype = ctypes.c_int
    lib.llmjax_allreduce_error.restype = ctypes.c_char_p
    lib.llmjax_allreduce_device_count.restype = ctypes.c_int
    return lib
