"""A few rows times a bf16 weight matrix stored `[out, in]`: the product batch-1 decode is made of.

`gemv(x, w)` computes `x @ w.T` for x `[M, K]` (M <= 16) and w `[N, K]` with a Pallas kernel on the
Triton backend (so it lowers for cuda and rocm). The grid is (output blocks, K splits): each program
reads a `[block_n, k_per_split]` strip of w in `block_k` chunks and keeps a float32 partial sum; the
partial sums of the K splits are added afterwards. Splitting K gives a matrix with few outputs (Llama's
4096-wide o and down projections) enough programs to keep every SM reading. Any N and K work: loads
past the edges are masked to zero.

`gemv_reference` is the definition: the same product in jnp, float32 accumulation.

Measured on the H200 (BENCHMARKS.md, `benchmarks/gemv_kernel.py`): correct on every Llama-2 shape,
but not yet faster than XLA's product. The best of ten configurations (the defaults below: narrow
output blocks, long K chunks, few warps) ties XLA on 4096x11008 and trails it elsewhere, so
`linear` keeps XLA's product unless `LLMJAX_GEMV` asks for the kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from llmjax.kernels import dispatch

MAX_ROWS = 16


def gemv_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w.T` for x `[M, K]`, w `[N, K]`, accumulated in float32, returned in x's dtype."""
    return jnp.einsum("mk,nk->mn", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _kernel(x_ref, w_ref, o_ref, *, rows, n, k, block_n, block_k, k_per_split):
    i, j = pl.program_id(0), pl.program_id(1)
    n_idx = i * block_n + jnp.arange(block_n)
    n_mask = n_idx < n
    k_start = j * k_per_split

    def body(step, acc):
        k0 = k_start + step * block_k
        k_mask = (k0 + jnp.arange(block_k)) < k
        w = plgpu.load(w_ref.at[pl.ds(i * block_n, block_n), pl.ds(k0, block_k)],
                       mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        x = plgpu.load(x_ref.at[:, pl.ds(k0, block_k)], mask=k_mask[None, :], other=0.0)
        if rows == 1:  # one row: multiply and reduce, no tensor-core padding
            return acc + jnp.sum(w.astype(jnp.float32) * x.astype(jnp.float32), axis=1)[None, :]
        return acc + plgpu.dot(x, w.T, allow_tf32=False).astype(jnp.float32)

    acc = jax.lax.fori_loop(0, k_per_split // block_k, body,
                            jnp.zeros((x_ref.shape[0], block_n), jnp.float32))
    plgpu.store(o_ref.at[j, :, pl.ds(i * block_n, block_n)], acc, mask=n_mask[None, :])


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "splits", "num_warps", "num_stages",
                                             "interpret"))
def gemv(x: jax.Array, w: jax.Array, *, block_n: int = 16, block_k: int = 512, splits: int = 8,
         num_warps: int = 2, num_stages: int = 3, interpret: bool = False) -> jax.Array:
    """`x @ w.T` with the split-K Pallas kernel; x `[M, K]` with M <= 16, w `[N, K]`."""
    m, k = x.shape
    n, k_w = w.shape
    if k_w != k or m > MAX_ROWS:
        raise ValueError(f"gemv takes x [M<={MAX_ROWS}, K] and w [N, K]; got {x.shape} and {w.shape}")
    rows = 1 if m == 1 else MAX_ROWS  # tensor-core dots need 16 rows: pad
    xp = x if rows == m else jnp.zeros((rows, k), x.dtype).at[:m].set(x)
    splits = max(1, min(splits, pl.cdiv(k, block_k)))
    k_per_split = pl.cdiv(pl.cdiv(k, splits), block_k) * block_k
    splits = pl.cdiv(k, k_per_split)
    kernel = functools.partial(_kernel, rows=rows, n=n, k=k, block_n=block_n, block_k=block_k,
                               k_per_split=k_per_split)
    partial = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(n, block_n), splits),
        out_shape=jax.ShapeDtypeStruct((splits, rows, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
    )(xp, w)
    return partial.sum(axis=0)[:m].astype(x.dtype)


MODES = dispatch.SETTINGS["LLMJAX_GEMV"]  # auto, on, off, narrow


def use_kernel(rows: int, n: int, k: int, dtype) -> bool:
    """Whether `linear` lowers this product to the Pallas kernel on GPUs (other platforms always take
    XLA's product). `LLMJAX_GEMV` chooses, for measuring: `on` (every bf16 product of <= 16 rows),
    `narrow` (only those with no more outputs than inputs, such as o and down), `off`; `auto`, the
    default, keeps XLA's product until the kernel has been measured faster on a GPU."""
    if rows > MAX_ROWS or jnp.dtype(dtype) != jnp.bfloat16:
        return False
    mode = dispatch.mode("LLMJAX_GEMV", MODES)
    return mode == "on" or (mode == "narrow" and n <= k)


def linear(x: jax.Array, w: jax.Array, num_out_dims: int, one_device: bool = False) -> jax.Array:
    """The model's one projection entry point: x `[..., *in]` times a kernel `[*out, *in]` -> `[..., *out]`.

    The choice between the kernel and XLA's product is made when the program is lowered: the kernel
    for cuda and rocm, XLA's product for every other platform. On a CPU, a kernel on `one_device` is
    contracted as one `[out, in]` matrix: XLA's CPU product of a kernel with several output axes
    (gate/up `[2, mlp, embed]`, q/k/v `[kv, G + 2, head, embed]`) rounds some bfloat16 outputs
    differently with the number of rows, so a prompt's tokens changed with the batch it ran in; as a
    matrix, each row's outputs are the same for any number of rows (observed on XLA's CPU backend, not
    promised by it).
    """
    out_shape, in_shape = w.shape[:num_out_dims], w.shape[num_out_dims:]
    lead = x.shape[:x.ndim - len(in_shape)]
    n, k = math.prod(out_shape), math.prod(in_shape)
    if not use_kernel(math.prod(lead), n, k, w.dtype):
        if not one_device:
            return _dot(x, w, len(in_shape))

        def flat(x, w):
            return _dot(x.reshape(-1, k), w.reshape(n, k), 1).reshape(*lead, *out_shape)
        return jax.lax.platform_dependent(x, w, cpu=flat, default=functools.partial(_dot, in_dims=len(in_shape)))
    x2, w2 = x.reshape(-1, k), w.reshape(n, k)

    def xla(x2, w2):
        return _dot(x2, w2, 1)

    y = jax.lax.platform_dependent(x2, w2, cuda=gemv, rocm=gemv, default=xla)
    return y.reshape(*lead, *out_shape)


def _dot(x: jax.Array, w: jax.Array, in_dims: int) -> jax.Array:
    """XLA's product, contracting x's last `in_dims` axes with w's, the kernel never reshaped.

    Reshaping a sharded kernel to two dimensions is not free: `gate_up` `[2, mlp, embed]` split over
    `mlp` would become `[2 * mlp, embed]` with each device's rows in two pieces, a layout GSPMD cannot
    express, so it gathered the whole kernel on every device at every step (Llama-2-70B at tensor=4
    decoded at 4 tok/s on the H200s). Contracting in place keeps every weight where it lies.
    """
    contract = (tuple(range(x.ndim - in_dims, x.ndim)), tuple(range(w.ndim - in_dims, w.ndim)))
    return jax.lax.dot_general(x, w, (contract, ((), ())))
