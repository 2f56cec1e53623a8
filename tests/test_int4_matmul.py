"""The int4 Pallas kernels against `int4_matmul_reference` on fresh random inputs of awkward sizes,
their refusals, and their lowering into a Triton call for rocm (gfx942) and cuda (H200).

The cases run interpreted on CPU (`TestInt4MatmulInterpret`); on a machine with a GPU the same cases
run compiled (`TestInt4MatmulGpu`, skipped elsewhere) when the tests are told to use it:
`JAX_PLATFORMS=cuda python -m pytest tests/test_int4_matmul.py -k Gpu` (`conftest.py` picks the CPU
otherwise, for its 8 fake devices).
"""

import re
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from llmjax.kernels import int4_matmul as K
from llmjax.kernels import linear
from llmjax.kernels.int4_matmul import Int4Config, default_config, int4_matmul, int4_matmul_reference
from llmjax.quant import QuantizedWeight, QuantScheme, quantize, quantize_int4
from llmjax.quant.weights import random_weight

FMA, HFMA2, HFMA4, DOT = "fma", "hfma2", "hfma4", "dot"
# (m, n, k, group, config or None for the default by m, symmetric, x dtype): M in {1, 3, 16, 77}, N and
# K mostly not multiples of the blocks, both kernels, one and several groups per step, with and
# without zero points, some shapes that need no masking at all.
CASES = [
    (1, 100, 384, 128, Int4Config(FMA, block_n=32, block_k=256, splits=2), True, jnp.bfloat16),
    (1, 64, 512, 128, None, True, jnp.float32),
    (3, 77, 320, 32, Int4Config(FMA, block_n=16, block_k=64, splits=3), False, jnp.float32),
    (3, 45, 256, 32, None, False, jnp.bfloat16),
    (16, 70, 512, 64, Int4Config(DOT, block_m=16, block_n=32, block_k=128, splits=2), True, jnp.bfloat16),
    (16, 64, 384, 128, None, True, jnp.float32),
    (77, 50, 256, 128, Int4Config(DOT, block_m=32, block_n=32, block_k=128, splits=1), False, jnp.float32),
    (77, 96, 640, 64, None, True, jnp.bfloat16),
    (16, 40, 256, 128, None, True, jnp.float16),  # float16 carries no 16**-pos prescale (its exponents)
    (1, 40, 256, 32, None, False, jnp.float16),
    # the packed float16 kernel (symmetric only): its products round to float16 whatever x's dtype
    (1, 100, 384, 128, Int4Config(HFMA2, block_n=32, block_k=256, splits=2), True, jnp.bfloat16),
    (2, 77, 320, 32, Int4Config(HFMA2, block_n=16, block_k=64, splits=3), True, jnp.float32),
    (1, 64, 512, 64, Int4Config(HFMA2, block_n=64, block_k=128), True, jnp.float16),
    # four words a float16 sum: every group size (runs of four words never cross a group), edges in N and K
    (1, 100, 384, 128, Int4Config(HFMA4, block_n=32, block_k=256, splits=2), True, jnp.bfloat16),
    (2, 77, 320, 32, Int4Config(HFMA4, block_n=32, block_k=128, splits=2), True, jnp.float32),  # 4 words a thread
    (1, 64, 512, 64, Int4Config(HFMA4, block_n=64, block_k=128), True, jnp.float16),
    (1, 100, 1280, 128, None, True, jnp.bfloat16),  # cuda's one-row default: hfma4, 32 outputs by 512 inputs
    # the tilings of the one-row table (`ONE_ROW_BY_SHAPE`) on awkward shapes, K long enough for two
    # steps a program (the last past K): 7B q/k/v, o, gate/up and down; 13B o and down; 4096x11008; the
    # 7B int4 LM head
    (1, 200, 3840, 128, Int4Config(HFMA4, block_n=128, block_k=512, splits=4, unroll=True), True, jnp.bfloat16),
    (1, 90, 8704, 128, Int4Config(HFMA4, block_n=64, block_k=512, splits=16, num_warps=8), True, jnp.bfloat16),
    (1, 70, 16640, 128, Int4Config(HFMA4, block_n=32, block_k=1024, splits=16), True, jnp.bfloat16),
    (1, 130, 8704, 128, Int4Config(HFMA4, block_n=64, block_k=512, splits=16), True, jnp.bfloat16),
    (1, 130, 4352, 128, Int4Config(HFMA4, block_n=64, block_k=512, splits=8, num_warps=8), True, jnp.bfloat16),
    (1, 50, 16640, 128, Int4Config(HFMA4, block_n=16, block_k=1024, splits=16, num_warps=2), True, jnp.bfloat16),
    (1, 200, 7424, 128, Int4Config(HFMA4, block_n=128, block_k=512, splits=4, unroll=True), True, jnp.bfloat16),
    (1, 260, 1920, 128, Int4Config(HFMA4, block_n=128, block_k=512, splits=2), True, jnp.bfloat16),
    # the steps written out (`unroll`): two and three steps a program, zero points, edges in N and K
    (3, 77, 320, 32, Int4Config(FMA, block_n=16, block_k=64, splits=2, unroll=True), False, jnp.float32),
    (1, 100, 1280, 128, Int4Config(HFMA4, block_n=32, block_k=256, splits=2, unroll=True), True, jnp.bfloat16),
]
TOLERANCE = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3, jnp.float32: 1e-5}  # of the largest output
PACKED_TOLERANCE = 4e-3  # float16 products and half sums


def _inputs(m, n, k, group, symmetric, dtype, seed):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k), dtype)
    w = jax.random.normal(kw, (n, k), jnp.float32)
    return x, quantize_int4(w, num_out_dims=1, group_size=group, symmetric=symmetric)


class Int4MatmulCases:
    INTERPRET = True

    @pytest.mark.parametrize("m,n,k,group,config,symmetric,dtype", CASES)
    def test_kernel_matches_reference(self, m, n, k, group, config, symmetric, dtype):
        x, q = _inputs(m, n, k, group, symmetric, dtype, seed=m * 1000 + n + k)
        got = int4_matmul(x, q.values, q.scales, q.zeros, group_size=group, config=config,
                          interpret=self.INTERPRET)
        want = int4_matmul_reference(x, q.values, q.scales, q.zeros, group_size=group)
        assert got.shape == (m, n) and got.dtype == dtype
        got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
        kind = (config or default_config(m, asymmetric=not symmetric, dtype=dtype)).kind
        tolerance = max(TOLERANCE[dtype], PACKED_TOLERANCE) if kind in (HFMA2, HFMA4) else TOLERANCE[dtype]
        np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * np.abs(want).max())


class TestInt4MatmulInterpret(Int4MatmulCases):
    INTERPRET = True


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a GPU")
class TestInt4MatmulGpu(Int4MatmulCases):
    INTERPRET = False


def test_bad_inputs_are_refused_with_the_reason():
    x, q = _inputs(1, 8, 256, 64, True, jnp.float32, seed=0)
    call = dict(group_size=64, interpret=True)
    with pytest.raises(ValueError, match="divides K"):
        int4_matmul(x[:, :250], q.values, q.scales, **call)
    with pytest.raises(ValueError, match="uint32"):
        int4_matmul(x, q.values.astype(jnp.int32), q.scales, **call)
    with pytest.raises(ValueError, match=r"scales and zeros \[N, K/group\]"):
        int4_matmul(x, q.values, q.scales[:, :2], **call)
    with pytest.raises(ValueError, match="group size in"):
        int4_matmul(x, q.values, q.scales, group_size=48, interpret=True)
    with pytest.raises(ValueError, match="runs of 4 words of one group"):
        Int4Config(HFMA4).check(16)  # no int4 group this small today; the kernel would need one
    for config, match in ((Int4Config("fast"), "kind"), (Int4Config(FMA, block_k=32), "multiple of the group"),
                          (Int4Config(FMA, block_n=48), "power of two"), (Int4Config(FMA, splits=0), "positive"),
                          (Int4Config(DOT, block_m=8), "at least 16"), (Int4Config(DOT, unroll=True), "CUDA-core"),
                          (Int4Config(HFMA4, block_n=16, block_k=64), "at least 4 words a thread")):
        with pytest.raises(ValueError, match=match):
            int4_matmul(x, q.values, q.scales, config=config, **call)


def _abstract_mesh(device_kind):
    return AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu"))


@pytest.mark.parametrize("platform,device_kind", [("rocm", "gfx942"), ("cuda", "NVIDIA H200")])
@pytest.mark.parametrize("rows", [1, 16, 64])  # the fma kernel, the dot kernel split-K, the dot kernel tiled
def test_the_projection_lowers_to_a_triton_call(platform, device_kind, rows):
    n, k = 512, 1024
    qw = QuantizedWeight(jax.ShapeDtypeStruct((n, k // 8), jnp.uint32),
                         jax.ShapeDtypeStruct((n, k // 128), jnp.bfloat16), None, 4, 128)
    x = jax.ShapeDtypeStruct((rows, 1, k), jnp.bfloat16)
    with jax.sharding.use_abstract_mesh(_abstract_mesh(device_kind)):
        text = jax.jit(lambda x, w: linear.linear(x, w, 1, 1)).trace(x, qw).lower(
            lowering_platforms=(platform,)).as_text()
    assert "__gpu$xla.gpu.triton" in text
    assert "stablehlo.dot_general" not in text  # no dequantize-then-dot left beside the kernel


def test_the_packed_kernel_refuses_zero_points_and_lowers_for_cuda():
    x, q = _inputs(1, 8, 256, 64, False, jnp.bfloat16, seed=0)
    with pytest.raises(ValueError, match="symmetric weights only"):
        int4_matmul(x, q.values, q.scales, q.zeros, group_size=64, config=Int4Config(HFMA2), interpret=True)
    with pytest.raises(ValueError, match="symmetric weights only"):
        int4_matmul(x, q.values, q.scales, q.zeros, group_size=64, config=Int4Config(HFMA4), interpret=True)
    n, k = 512, 1024
    args = (jax.ShapeDtypeStruct((1, k), jnp.bfloat16), jax.ShapeDtypeStruct((n, k // 8), jnp.uint32),
            jax.ShapeDtypeStruct((n, k // 128), jnp.bfloat16))
    for kind in (HFMA2, HFMA4):
        kernel = jax.jit(lambda x, v, s: int4_matmul(x, v, s, group_size=128, config=Int4Config(kind, block_k=256)))
        with jax.sharding.use_abstract_mesh(_abstract_mesh("NVIDIA H200")):
            text = kernel.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "__gpu$xla.gpu.triton" in text


def test_one_row_blocks_narrow_for_matrices_with_few_programs_and_shapes_can_be_tuned():
    from llmjax.kernels import int4_matmul as module

    # shapes outside the table (Llama-3-8B's q/k/v, down, gate/up; Llama-2-13B's q/k/v; 8192x28672):
    # few programs narrow to 32-wide blocks, many keep 64
    for shape, width in (((4096, 6144), 32), ((14336, 4096), 32), ((4096, 28672), 64), ((5120, 15360), 64),
                         ((8192, 28672), 64)):
        assert module.default_config(1, shape=shape).block_n == width
    assert module.default_config(1).block_n == 64  # no shape given
    assert module.default_config(1, dtype=jnp.float32, shape=(4096, 4096)) == module.DECODE_FMA
    # Llama-2-7B's and 13B's tuned shapes take the sweeps' configurations, each a valid tiling at group 128
    for shape, config in module.ONE_ROW_BY_SHAPE.items():
        assert module.default_config(1, shape=shape) == config and config.kind == HFMA4
        config.check(128)
    assert module.default_config(1, shape=(4096, 12288)).block_n == 128
    assert module.default_config(2, shape=(4096, 12288)).block_n == 32  # tuned at one row; two keep the rule
    own = Int4Config(HFMA4, block_n=16, block_k=512, splits=8, num_warps=2)
    library = module.ONE_ROW_BY_SHAPE[(4096, 4096)]
    module.ONE_ROW_BY_SHAPE[(4096, 4096)] = own
    try:
        assert module.default_config(1, shape=(4096, 4096)) == own
    finally:
        module.ONE_ROW_BY_SHAPE[(4096, 4096)] = library


def test_one_row_defaults_to_the_packed_kernel_where_it_applies_and_can_be_switched():
    from llmjax.kernels import int4_matmul as module

    assert module.default_config(1).kind == HFMA4 and module.default_config(2, dtype=jnp.float16).kind == HFMA4
    assert module.default_config(1, asymmetric=True).kind == "fma"  # zero points
    assert module.default_config(1, dtype=jnp.float32).kind == "fma"  # float32 products asked for
    assert module.default_config(1, platform="rocm").kind == "fma"  # PTX is cuda's
    assert module.default_config(16).kind == "dot"
    try:
        module.set_one_row_kind("fma")
        assert module.default_config(1).kind == "fma"
        with pytest.raises(ValueError, match="one-row int4 kernel is one of"):
            module.set_one_row_kind("dot")
        module.set_one_row_kind(HFMA2)  # the packed kernel's blocks, one word a float16 sum
        assert module.default_config(1, shape=(14336, 4096)) == Int4Config(HFMA2, block_n=32, block_k=512, splits=16)
        # a tuned shape's entry serves its own kind only (its blocks were timed in it): hfma2 takes the rule
        assert module.default_config(1, shape=(4096, 12288)) == Int4Config(HFMA2, block_n=32, block_k=512, splits=16)
    finally:
        module.set_one_row_kind(module.DEFAULT_ONE_ROW_KIND)


def test_a_quantized_decode_step_lowers_for_rocm_and_cuda_with_their_kernels():
    import functools
    import importlib

    from llmjax.cache import KVCache
    from llmjax.config import LlamaConfig
    from llmjax.models.llama import Llama, abstract_params
    from llmjax.quant import QuantScheme

    gen = importlib.import_module("llmjax.generate")
    config, scheme = LlamaConfig.preset("tiny"), QuantScheme.parse("int4-g32")
    weights = abstract_params(config, jnp.bfloat16, scheme)
    cache = jax.eval_shape(lambda: KVCache.zeros(config, 2, 64, jnp.bfloat16))
    rows = jax.ShapeDtypeStruct((2,), jnp.int32)
    decode = functools.partial(gen._decode, Llama(config, jnp.bfloat16, quant=scheme))
    with jax.sharding.use_abstract_mesh(_abstract_mesh("gfx942")):
        text = jax.jit(decode).trace(weights, rows, rows, cache).lower(lowering_platforms=("rocm",)).as_text()
    # q/k/v, o and gate/up of each of the 2 layers are int4 (down's width 200 takes no group)
    assert text.count("__gpu$xla.gpu.triton") >= 3
    assert "lop3" not in text  # rocm's two rows take the float32 kernel, not cuda's PTX
    with jax.sharding.use_abstract_mesh(_abstract_mesh("NVIDIA H200")):
        cuda = jax.jit(decode).trace(weights, rows, rows, cache).lower(lowering_platforms=("cuda",)).as_text()
    assert "lop3" in cuda  # and cuda's, the packed float16 kernel


def test_partial_sums_add_up_to_the_product():
    """`int4_matmul(reduce=False)` (the kernel's K slices, interpret mode) sums to the reduced product;
    `matmul(partials=True)` elsewhere is the float32 product and zeros, as many slices as cuda's plan;
    `linear(partials=True)` gives those slices for an int4 kernel and one slice for any other."""
    qw = random_weight(jax.random.key(3), (40, 2, 256), 1, QuantScheme.parse("int4-g32"))
    x = jax.random.normal(jax.random.key(4), (1, 2, 256), jnp.bfloat16)
    x2 = x.reshape(1, 512)
    config = K.Int4Config("hfma4", block_n=16, block_k=64, splits=4, num_warps=1)
    sums = K.int4_matmul(x2, qw.values.reshape(40, -1), qw.scales.reshape(40, -1), group_size=32, config=config,
                         reduce=False, interpret=True)
    whole = K.int4_matmul(x2, qw.values.reshape(40, -1), qw.scales.reshape(40, -1), group_size=32, config=config,
                          interpret=True)
    assert sums.shape == (4, 1, 40) and sums.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(sums.sum(0).astype(jnp.bfloat16), np.float32), np.asarray(whole, np.float32))
    parts = K.matmul(x2, qw, partials=True)  # CPU: the reference, padded to cuda's count
    count = K.split_plan(K.default_config(1, shape=(512, 40)), 1, 40, 16, 32)[0]
    assert parts.shape == (count, 1, 40) and not np.any(np.asarray(parts[1:]))
    np.testing.assert_array_equal(np.asarray(parts[0].astype(jnp.bfloat16), np.float32),
                                  np.asarray(K.matmul(x2, qw), np.float32))
    got = linear.linear(x, qw, 1, 2, partials=True)
    assert got.shape == (count, 1, 40)
    w = jax.random.normal(jax.random.key(5), (40, 2, 256), jnp.bfloat16)
    assert linear.linear(x, w, 1, 2, partials=True).shape == (1, 1, 40)


NORM_CASES = [  # (m, n, k, group, config, symmetric, dtype): each kernel body, edges in N and K
    (1, 100, 1280, 128, Int4Config(HFMA4, block_n=32, block_k=256, splits=2, unroll=True), True, jnp.bfloat16),
    (1, 70, 640, 64, Int4Config(HFMA2, block_n=16, block_k=128, splits=3), True, jnp.bfloat16),
    (2, 77, 320, 32, Int4Config(FMA, block_n=16, block_k=64, splits=3), True, jnp.float32),
    (2, 60, 1024, 128, Int4Config(HFMA4, block_n=32, block_k=256, splits=2), True, jnp.bfloat16),  # batch-2 decode
    (3, 45, 256, 32, Int4Config(DOT, block_m=16, block_n=32, block_k=64, splits=2), True, jnp.bfloat16),  # x normalized first
    (1, 45, 256, 32, Int4Config(FMA, block_n=16, block_k=64, splits=2), False, jnp.float32),  # zero points: so too
]


@pytest.mark.parametrize("m,n,k,group,config,symmetric,dtype", NORM_CASES)
def test_the_kernel_normalizes_x_as_an_rms_norm_given_its_sums_of_squares(m, n, k, group, config, symmetric, dtype):
    """`int4_matmul(..., norm_squares, norm_scale)` (interpret mode; compiled under JAX_PLATFORMS=cuda) is the product of
    `rms_norm.normalized_reference` of x, the squares as `rms_norm.residual_add` leaves them."""
    from llmjax.kernels import rms_norm

    x, q = _inputs(m, n, k, group, symmetric, dtype, seed=k + n)
    x = (4.0 * x.astype(jnp.float32)).astype(dtype)
    _, squares = rms_norm.residual_add_reference(x, jnp.zeros((1, m, k), jnp.float32))
    scale = jax.random.uniform(jax.random.key(n), (k,), jnp.float32, 0.5, 1.5).astype(dtype)
    got = int4_matmul(x, q.values, q.scales, q.zeros, group_size=group, config=config, norm_squares=squares,
                      norm_scale=scale, norm_eps=1e-5, interpret=jax.devices()[0].platform != "gpu")
    normed = rms_norm.normalized_reference(x, squares, scale, 1e-5)
    want = int4_matmul_reference(normed, q.values, q.scales, q.zeros, group_size=group)
    tolerance = max(TOLERANCE[dtype], PACKED_TOLERANCE) if config.kind in (HFMA2, HFMA4) else TOLERANCE[dtype]
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=tolerance * np.abs(want).max())
    # not the product of x itself: the norm was applied
    plain = np.asarray(int4_matmul_reference(x, q.values, q.scales, q.zeros, group_size=group), np.float32)
    assert np.abs(plain - want).max() > 10 * tolerance * np.abs(want).max()
    with pytest.raises(ValueError, match="together"):
        int4_matmul(x, q.values, q.scales, q.zeros, group_size=group, norm_squares=squares)
    with pytest.raises(ValueError, match="norm_scale \\[K\\]"):
        int4_matmul(x, q.values, q.scales, q.zeros, group_size=group, norm_squares=squares, norm_scale=scale[1:])
    with pytest.raises(ValueError, match="matmul's norm takes squares"):  # not broadcast on any platform
        K.matmul(x, q, norm=(jnp.ones((m + 1, 2)), scale, 1e-5))


@pytest.mark.parametrize("scheme", [None, "int4-g32", "int8"])
def test_the_projection_entry_point_matches_linear_reference(scheme):
    """`linear` (XLA's product, or the quantized products through their kernels' references on CPU)
    against `linear_reference` on a fused kernel with two output axes and an input of two axes, as
    the o projection's `[embed, heads, head_dim]` reads `[B, T, heads, head_dim]`."""
    key_x, key_w = jax.random.split(jax.random.key(7))
    x = jax.random.normal(key_x, (3, 5, 4, 24), jnp.float32)
    w = jax.random.normal(key_w, (2, 40, 4, 24), jnp.float32) * 0.05  # [2, 40] out, [4, 24] in
    kernel = w if scheme is None else quantize(w, QuantScheme.parse(scheme), num_out_dims=2)
    got = linear.linear(x, kernel, 2, 2)
    want = linear.linear_reference(x, kernel, 2, 2)
    assert got.shape == (3, 5, 2, 40)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)
    if scheme is not None:  # the reference really is the dequantized product, not the float one
        assert not np.allclose(np.asarray(want), np.asarray(linear.linear_reference(x, w, 2, 2)), atol=1e-5)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA's compiler is not installed here")
@pytest.mark.parametrize("pack", [1, 4])
def test_the_packed_kernels_assembly_assembles_for_hopper(pack, tmp_path):
    """The inline PTX of `hfma2` (one word a block) and `hfma4` (four) through ptxas for sm_90, in a
    CUDA kernel that binds the operands as Triton does (outputs, then each input's `pack` registers):
    a typo or a wrong operand count fails here, not on the first GPU run."""
    from llmjax.kernels import int4_matmul as module

    asm = module._PACKED_ASM[HFMA2 if pack == 1 else HFMA4]
    asm = re.sub(r"\$(\d+)", r"%\1", asm).replace("\n", "\\n")  # LLVM's $n is CUDA's %n
    inputs = [("r", pack)] * 5 + ([("f", pack)] * 2 if pack == 4 else [])  # words, 4 pairs; scales, accs
    operands, bound = [], 0
    for constraint, count in inputs:
        operands += [f'"{constraint}"(i{bound + j})' for j in range(count)]
        bound += count
    declare = "".join(f"{'unsigned' if c == 'r' else 'float'} i{n} = {'0u' if c == 'r' else '0.f'}; "
                      for n, c in enumerate(c for c, count in inputs for _ in range(count)))
    outputs = ", ".join(f'"=f"(o[{j}])' for j in range(pack))
    source = (f"__global__ void k(float* out) {{ {declare} float o[{pack}];\n"
              f'  asm volatile("{asm}" : {outputs} : {", ".join(operands)});\n'
              f"  for (int j = 0; j < {pack}; j++) out[j] = o[j]; }}\n")
    (tmp_path / "k.cu").write_text(source)
    done = subprocess.run(["nvcc", "-arch=sm_90", "-c", str(tmp_path / "k.cu"), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
