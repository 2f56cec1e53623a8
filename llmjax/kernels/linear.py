"""The model's one projection entry point: `linear(x, kernel, ...)`, x `[..., *in]` -> `[..., *out]`.

Every `Linear` of the model calls it with its kernel, whatever the kernel holds:
- a float array `[*out, *in]`: XLA's product, or the bf16 GEMV kernel for a few rows (`gemv.linear`);
- an int4 `QuantizedWeight`: `int4_matmul.matmul`, the Pallas kernels on cuda and rocm and their
  reference elsewhere;
- an int8 `QuantizedWeight`: XLA's dequant-dot. The int8 codes become x's dtype inside the product
  (exact: bf16 holds every integer up to 256) and the per-row scale multiplies the output, so XLA reads
  one byte per weight and needs no kernel of ours.

On a mesh, XLA cannot split a Pallas call over devices, so a quantized product runs under `shard_map`:
each device multiplies its own slice of the weights (Megatron's layout from the sharding rules), and a
row-parallel product (o, down: the input axis is split) adds the devices' partial sums with
`allreduce.psum`. A float row-parallel product runs so too when llmjax's NVLink all-reduce sums it
(`llmjax.kernels.allreduce`: by default on CUDA GPUs that reach each other's memory); otherwise XLA's
partitioner places it.

`linear(..., gather=True)` (the LM head) runs a product whose output axis the mesh splits per device and
gathers its columns through `allreduce.gather` where `allreduce.vocab_axis` says so (`LLMJAX_TP_GRAPH=on`
with the NVLink all-reduce), so that every device holds the whole logits; XLA's partitioner places it
otherwise.

`linear(..., partials=True)` returns `[S, ..., *out]` partial sums whose sum, rounded to x's dtype, is
the product: for an int4 kernel and up to `int4_matmul.FMA_MAX_ROWS` rows on one device (or a
pipeline stage with tensor=1), `int4_matmul.matmul(..., partials=True)`'s float32 slices (the
kernel's K slices on cuda), for a consumer that adds them in its own kernel (the decode step's
attention); every other product as one slice, `y[None]`.

`linear(Normed(x, squares, scale, eps), ...)` multiplies an RMSNorm's output that was never written:
x is the norm's input and `squares` the parts of each row's sum of squares (`rms_norm.residual_add`'s).
An int4 product of up to `int4_matmul.FMA_MAX_ROWS` rows on one device normalizes x inside its kernel
(symmetric weights; with zero points `int4_matmul` normalizes x just before it); every other product
first normalizes it (`rms_norm.normalized_reference`).

`linear_reference` is the definition every path must match: the float kernel (a quantized one
dequantized) contracted in float32.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from llmjax.kernels import allreduce, dispatch, gemv, int4_matmul, rms_norm
from llmjax.quant.weights import QuantizedWeight, dequantize


@dataclasses.dataclass(frozen=True)
class Normed:
    """An RMSNorm's output not yet computed: `rms_norm.normalized_reference(x, squares, scale, eps)`
    over x's last axis, x `[..., D]`, squares `[..., P]` (parts of each row's sum of squares), scale
    `[D]`; for `linear` to take whole (see the module doc)."""

    x: jax.Array
    squares: jax.Array
    scale: jax.Array
    eps: float

    def __post_init__(self):
        if self.squares.shape[:-1] != self.x.shape[:-1] or self.scale.shape != self.x.shape[-1:]:
            raise ValueError(f"Normed takes x [..., D], squares [..., P] with x's leading axes and scale [D]; got "
                             f"x {self.x.shape}, squares {self.squares.shape}, scale {self.scale.shape}")

    def apply(self) -> jax.Array:
        """The normalized rows, `[..., D]`."""
        d = self.x.shape[-1]
        y = rms_norm.normalized_reference(self.x.reshape(-1, d), self.squares.reshape(-1, self.squares.shape[-1]),
                                          self.scale, self.eps)
        return y.reshape(self.x.shape)

    def fuses_into(self, kernel, in_ndim: int, mesh) -> bool:
        """Whether `linear` with `kernel` normalizes inside its kernel (`_few_rows_int4`, over x's last
        axis, with the scale in x's dtype)."""
        return (in_ndim == 1 and self.scale.dtype == self.x.dtype
                and _few_rows_int4(kernel, self.x.size // self.x.shape[-1], mesh))


def few_rows_int4(bits: int | None, rows: int, mesh) -> bool:
    """Whether products of `bits`-bit weights (None: float) over `rows` rows on `mesh` run the int4
    one-row kernels whole (`int4_matmul.matmul`), which can hand back their K slices and normalize x
    themselves: int4, up to `int4_matmul.FMA_MAX_ROWS` rows, one device (or a pipeline stage with
    tensor=1). The model's blocks ask it too, to decide whether their norms go into the products."""
    return _one_device(mesh) and bits == 4 and rows <= int4_matmul.FMA_MAX_ROWS


def _one_device(mesh) -> bool:
    """No mesh, or none of its axes left to split a product over (a pipeline stage with tensor=1)."""
    return mesh is None or not dispatch.free_axes(mesh)


def _few_rows_int4(kernel, rows: int, mesh) -> bool:
    """`few_rows_int4` for `kernel` (a quantized one, or a float array)."""
    return isinstance(kernel, QuantizedWeight) and few_rows_int4(kernel.bits, rows, mesh)


def int8_matmul(x: jax.Array, qw: QuantizedWeight) -> jax.Array:
    """x `[M, K]` times the int8 weights of `qw` (any output shape), returns `[M, N]` in x's dtype."""
    n = math.prod(qw.out_shape)
    y = jnp.einsum("mk,nk->mn", x, qw.values.reshape(n, -1).astype(x.dtype),
                   preferred_element_type=jnp.float32)
    return (y * qw.scales.reshape(1, n).astype(jnp.float32)).astype(x.dtype)


def _product(x2: jax.Array, kernel, num_out_dims: int) -> jax.Array:
    """`[M, K]` times a kernel (float `[*out, *in]` or quantized) -> `[M, *out]`."""
    if not isinstance(kernel, QuantizedWeight):
        out_shape = kernel.shape[:num_out_dims]
        return gemv.linear(x2, kernel.reshape(*out_shape, x2.shape[1]), num_out_dims, one_device=True)
    y = int8_matmul(x2, kernel) if kernel.bits == 8 else int4_matmul.matmul(x2, kernel)
    return y.reshape(x2.shape[0], *kernel.out_shape)


def _mesh_spec(axes: tuple) -> tuple:
    """The mesh axes the sharding rules give a kernel with logical `axes`."""
    from flax import linen as nn

    from llmjax.sharding.rules import RULES  # the rules import the model, which imports this module

    return tuple(nn.logical_to_mesh_axes(axes, RULES))


def _row_parallel(mesh, axes: tuple | None, num_out_dims: int) -> bool:
    """Whether the kernel's input axis is split over a free axis of `mesh` (o, down), so that its
    product ends in an all-reduce."""
    if mesh is None or axes is None:
        return False
    in_axis = _mesh_spec(axes)[num_out_dims]
    return in_axis is not None and in_axis in dispatch.free_axes(mesh)


def _gathers(x, kernel, mesh, axes: tuple | None, num_out_dims: int, in_ndim: int) -> bool:
    """Whether a product asked to `gather` (the LM head) gathers its columns through the NVLink all-reduce:
    its one output axis is the axis `allreduce.vocab_axis` gives for the whole output's bytes."""
    if mesh is None or axes is None or num_out_dims != 1:
        return False
    out_shape = kernel.out_shape if isinstance(kernel, QuantizedWeight) else kernel.shape[:num_out_dims]
    nbytes = math.prod(x.shape[:x.ndim - in_ndim]) * math.prod(out_shape) * x.dtype.itemsize
    axis = allreduce.vocab_axis(mesh, nbytes, x.dtype)
    return axis is not None and _mesh_spec(axes)[0] == axis


def _sum_bytes(x: jax.Array, kernel: jax.Array, num_out_dims: int, in_ndim: int) -> int:
    """The bytes of a row-parallel float product's output: the sum its devices add (at most; a data
    axis gives each device fewer rows)."""
    return math.prod(x.shape[:x.ndim - in_ndim]) * math.prod(kernel.shape[:num_out_dims]) * x.dtype.itemsize


def _leaf_specs(kernel, out_axes: tuple, in_axis) -> QuantizedWeight | P:
    """The mesh PartitionSpec of the kernel (of each leaf of a `QuantizedWeight`, as
    `llmjax.quant.leaf_axes` lays them out)."""
    if not isinstance(kernel, QuantizedWeight):
        return P(*out_axes, in_axis, *(None,) * (kernel.ndim - len(out_axes) - 1))
    qw = kernel
    values = P(*out_axes, in_axis)
    scales = P(*out_axes) if qw.bits == 8 else values
    return QuantizedWeight(values, scales, None if qw.zeros is None else scales, qw.bits, qw.group_size)


def _sharded_product(x2, kernel, mesh, axes: tuple, num_out_dims: int, gather: bool = False):
    """`_product` on each device's slice of `kernel`, the partial sums added over the input axis (and
    with `gather`, the output's one axis gathered whole on every device: `allreduce.gather`)."""
    spec = _mesh_spec(axes)
    out_axes, in_axis = spec[:num_out_dims], spec[num_out_dims]
    if gather and (num_out_dims != 1 or out_axes[0] is None):
        raise ValueError(f"gather takes a kernel with one output axis the mesh splits, got logical axes {axes}")
    if any(a is not None for a in spec[num_out_dims + 1:]):
        raise ValueError(f"a kernel with logical axes {axes} splits a minor input axis ({spec}) in a "
                         f"per-device product; only its major input axis may be split")
    free = dispatch.free_axes(mesh)
    rows = dispatch.data_axis(mesh, free, x2.shape[0])

    def local(x2, kernel):
        y = _product(x2, kernel, num_out_dims)
        y = y if in_axis is None else allreduce.psum(y, in_axis, mesh)
        return allreduce.gather(y, out_axes[0], mesh, along=1) if gather else y

    return dispatch.per_device(local, mesh, (P(rows, in_axis), _leaf_specs(kernel, out_axes, in_axis)),
                               P(rows, *((None,) if gather else out_axes)))(x2, kernel)


def linear_reference(x: jax.Array, kernel, num_out_dims: int, in_ndim: int) -> jax.Array:
    """The definition of `linear`: the float kernel (a quantized one dequantized) contracted with x's
    last `in_ndim` axes in float32, returned in x's dtype."""
    if isinstance(kernel, QuantizedWeight):
        kernel = dequantize(kernel, jnp.float32, x.shape[x.ndim - in_ndim:])
    x32 = x.astype(jnp.float32)
    contract = (tuple(range(x.ndim - in_ndim, x.ndim)), tuple(range(num_out_dims, kernel.ndim)))
    y = jax.lax.dot_general(x32, kernel.astype(jnp.float32), (contract, ((), ())),
                            precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def linear(x: jax.Array, kernel, num_out_dims: int, in_ndim: int, *, mesh=None, axes: tuple | None = None,
           partials: bool = False, gather: bool = False):
    """x `[..., *in]` (its last `in_ndim` axes) times `kernel` `[*out, *in]` -> `[..., *out]`
    (`[S, ..., *out]` partial sums with `partials`, see the module doc).

    `kernel` is a float array or a `QuantizedWeight`. On a `mesh` of more than one device, `axes` (the
    float kernel's logical axes) say how the sharding rules split it, for the products that run per
    device: a quantized kernel's, and a row-parallel float kernel's when the NVLink all-reduce sums it
    (`allreduce.kernel_mode`), and with `gather` a vocab-split kernel's when the kernel gathers its
    columns (`allreduce.vocab_axis`).
    """
    quantized = isinstance(kernel, QuantizedWeight)
    one_device = _one_device(mesh)
    norm = None
    if isinstance(x, Normed):
        x, norm = (x.x, x) if x.fuses_into(kernel, in_ndim, mesh) else (x.apply(), None)
    gather = gather and _gathers(x, kernel, mesh, axes, num_out_dims, in_ndim)
    if not quantized and not gather and not (_row_parallel(mesh, axes, num_out_dims) and allreduce.kernel_mode(
            mesh, _mesh_spec(axes)[num_out_dims], _sum_bytes(x, kernel, num_out_dims, in_ndim), x.dtype)):
        y = gemv.linear(x, kernel, num_out_dims, one_device)  # one device, or XLA's partitioner places it
        return y[None] if partials else y
    lead = x.shape[:x.ndim - in_ndim]
    x2 = x.reshape(-1, math.prod(x.shape[x.ndim - in_ndim:]))
    out_shape = kernel.out_shape if quantized else kernel.shape[:num_out_dims]
    in_size = kernel.in_size if quantized else math.prod(kernel.shape[num_out_dims:])
    if x2.shape[1] != in_size:
        raise ValueError(f"x's input width {x2.shape[1]} does not match the kernel's {in_size}")
    if norm is not None or (partials and _few_rows_int4(kernel, x2.shape[0], mesh)):
        fused = None if norm is None else (norm.squares.reshape(x2.shape[0], -1), norm.scale, norm.eps)
        y = int4_matmul.matmul(x2, kernel, partials=partials, norm=fused)
        return y.reshape(*y.shape[:-2], *lead, *out_shape)  # [S, ...] with partials
    y = _product(x2, kernel, num_out_dims) if one_device else _sharded_product(x2, kernel, mesh, axes, num_out_dims,
                                                                                gather)
    y = y.reshape(*lead, *out_shape)
    return y[None] if partials else y
