"""The NVLink all-reduce (`llmjax.kernels.allreduce`) on 8 fake CPU devices: with
`LLMJAX_ALLREDUCE=nvlink` every row-parallel product runs per device and sums through
`allreduce.psum` (XLA's psum on a CPU), and every mesh still gives the single-device logits and
tokens; the groups each device sums with; the settings' errors; and, where nvcc is installed, the
CUDA kernel builds into a library that exports XLA's handlers and reports a missing GPU clearly.
The kernel itself runs only on CUDA GPUs: `benchmarks/tp_allreduce.py` checks and times it there, and
`benchmarks/allreduce_selftest.cu` checks its protocol on one GPU."""

import importlib
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import llmjax
from llmjax.kernels import allreduce
from llmjax.sharding import make_mesh

from conftest import hf_config, needs_devices, save_hf_model

gen = importlib.import_module("llmjax.generate")

PROMPTS = [[1, 17, 300, 5, 9], [1, 800], [1, 4, 4, 4, 900, 12, 33]]  # padded to 4 rows: >= the stages


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A grouped-query model with biases, its single-device logits and greedy tokens."""
    folder = tmp_path_factory.mktemp("allreduce")
    save_hf_model(folder, hf_config(vocab_size=1024, num_attention_heads=8, num_key_value_heads=2,
                                    attention_bias=True, max_position_embeddings=64), seed=11)
    params = llmjax.load(folder)
    ids = jnp.asarray(gen._pad(PROMPTS, 8))
    return folder, np.asarray(llmjax.logits(params, ids)), llmjax.generate(params, PROMPTS, max_new_tokens=10)


@pytest.fixture(autouse=True)
def fresh_probe():
    """`auto`'s probe and its warning are cached per process: each test starts and ends without them."""
    allreduce._groups_set_up.cache_clear()
    allreduce._warn_once.cache_clear()
    yield
    allreduce._groups_set_up.cache_clear()
    allreduce._warn_once.cache_clear()


@pytest.fixture
def nvlink(monkeypatch):
    """`LLMJAX_ALLREDUCE=nvlink`, the shapes `allreduce.psum` was traced with, and fresh jit caches
    (the variable is read when a program is traced, so a cached program would not see it)."""
    monkeypatch.setenv("LLMJAX_ALLREDUCE", "nvlink")
    traced = []
    real = allreduce.psum

    def spy(y, axis, mesh):
        traced.append((y.shape, axis))
        return real(y, axis, mesh)

    monkeypatch.setattr(allreduce, "psum", spy)
    jax.clear_caches()
    yield traced
    jax.clear_caches()


def _meshes(*shapes):
    """(data, stage, tensor) parameters, each skipped where fewer devices are than it takes."""
    return [pytest.param(*shape, marks=needs_devices(math.prod(shape))) for shape in shapes]


@pytest.mark.parametrize("data,stage,tensor", _meshes((1, 1, 2), (2, 1, 4), (1, 2, 2)))
def test_nvlink_mode_gives_the_single_device_result(model, nvlink, data, stage, tensor):
    folder, logits, tokens = model
    p = llmjax.load(folder, mesh=make_mesh(tensor=tensor, stage=stage, data=data,
                                           devices=jax.devices()[:data * stage * tensor]))
    got = np.asarray(llmjax.logits(p, jnp.asarray(gen._pad(PROMPTS, 8))))
    # o and down of each of the 2 layers summed through allreduce.psum, over tensor, per device
    assert len(nvlink) >= 4 and {axis for _, axis in nvlink} == {"tensor"}, nvlink
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
    assert llmjax.generate(p, PROMPTS, max_new_tokens=10) == tokens


@needs_devices(2)
@pytest.mark.parametrize("tp_graph", ["off", "on"])
def test_engine_in_nvlink_mode_gives_generates_tokens(model, nvlink, monkeypatch, tp_graph):
    """The engine's paged steps on a tensor mesh sum through the same path (greedy, float32), with the
    embedding and logits too under LLMJAX_TP_GRAPH=on."""
    monkeypatch.setenv("LLMJAX_TP_GRAPH", tp_graph)
    from llmjax.engine import LLM

    folder, _, _ = model
    rng = np.random.default_rng(3)
    prompts = [rng.integers(3, 1024, int(n)).tolist() for n in rng.integers(1, 30, 6)]
    single = llmjax.load(folder)
    want = llmjax.generate(single, prompts, max_new_tokens=8)
    llm = LLM(single, mesh=make_mesh(tensor=2, devices=jax.devices()[:2]), max_slots=8, page_size=8,
              prefill_tokens=48, prefill_row=16, decode_steps=4)
    got = llm.generate(prompts, max_new_tokens=8, progress=False)
    assert nvlink and {axis for _, axis in nvlink} == {"tensor"}
    assert bool(_vocab_sums(nvlink, single.config)) == (tp_graph == "on")
    assert got == want


@needs_devices(2)
def test_tp_graph_gathers_a_quantized_heads_logits(model, nvlink, monkeypatch):
    """A quantized LM head runs per device in any case; under LLMJAX_TP_GRAPH=on its logits gather through
    the sum, and the mesh gives the single device's quantized logits and tokens."""
    from llmjax.quant import QuantScheme, quantize_params

    folder, _, _ = model
    monkeypatch.setenv("LLMJAX_TP_GRAPH", "on")
    single = quantize_params(llmjax.load(folder), QuantScheme.parse("int8", lm_head=True))
    ids = jnp.asarray(gen._pad(PROMPTS, 8))
    want_logits, want = np.asarray(llmjax.logits(single, ids)), llmjax.generate(single, PROMPTS, max_new_tokens=6)
    p = llmjax.shard(single, make_mesh(tensor=2, devices=jax.devices()[:2]))
    np.testing.assert_allclose(np.asarray(llmjax.logits(p, ids)), want_logits, rtol=1e-5, atol=1e-5)
    assert "logits" in _vocab_sums(nvlink, p.config), nvlink
    assert llmjax.generate(p, PROMPTS, max_new_tokens=6) == want


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """A tied-embedding model whose vocabulary (1003) a tensor mesh pads, with its single-device logits
    and greedy tokens."""
    folder = tmp_path_factory.mktemp("tied")
    save_hf_model(folder, hf_config(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True,
                                    max_position_embeddings=64), seed=12)
    params = llmjax.load(folder)
    ids = jnp.asarray(gen._pad(PROMPTS, 8))
    return folder, np.asarray(llmjax.logits(params, ids)), llmjax.generate(params, PROMPTS, max_new_tokens=10)


def _vocab_sums(traced, config) -> set:
    """Which of the sums `allreduce.psum` was traced with are the embedding's (`[B, T, D]`: the products'
    sums are `[rows, D]`) and whole logits (`[rows, padded vocabulary]`)."""
    return ({"embedding" for shape, _ in traced if len(shape) == 3 and shape[-1] == config.hidden_size}
            | {"logits" for shape, _ in traced if shape[-1] == config.embedding_rows})


@pytest.mark.parametrize("which", ["model", "tied"])
@pytest.mark.parametrize("data,stage,tensor", _meshes((1, 1, 2), (2, 1, 4), (1, 2, 2), (1, 1, 8)))
def test_tp_graph_sends_the_embedding_and_logits_through_the_kernel(request, nvlink, monkeypatch, which, data,
                                                                    stage, tensor):
    """LLMJAX_TP_GRAPH=on: the embedding's lookup and the LM head's logits (untied, and tied to a padded
    vocabulary) are summed through `allreduce.psum` too, and every mesh still gives the single-device
    logits and greedy tokens."""
    folder, logits, tokens = request.getfixturevalue(which)
    monkeypatch.setenv("LLMJAX_TP_GRAPH", "on")
    p = llmjax.load(folder, mesh=make_mesh(tensor=tensor, stage=stage, data=data,
                                           devices=jax.devices()[:data * stage * tensor]))
    got = np.asarray(llmjax.logits(p, jnp.asarray(gen._pad(PROMPTS, 8))))
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
    assert _vocab_sums(nvlink, p.config) == {"embedding", "logits"}, nvlink
    assert llmjax.generate(p, PROMPTS, max_new_tokens=10) == tokens


@needs_devices(2)
def test_tp_graph_is_off_by_default(model, nvlink, monkeypatch):
    folder, _, tokens = model
    monkeypatch.delenv("LLMJAX_TP_GRAPH", raising=False)
    p = llmjax.load(folder, mesh=make_mesh(tensor=2, devices=jax.devices()[:2]))
    assert llmjax.generate(p, PROMPTS, max_new_tokens=10) == tokens
    assert nvlink and not _vocab_sums(nvlink, p.config), nvlink


def _collectives(p, **env) -> dict:
    """How many of each collective the compiled `generate` program for `p` holds, under `env`."""
    import re

    with pytest.MonkeyPatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        jax.clear_caches()
        model = gen._model(p)
        rows = len(PROMPTS) + 1
        text = gen.generate_ids_fn(model).lower(
            p.weights, jnp.asarray(gen._pad(PROMPTS + [[0]], 8)), jnp.full((rows,), 8, jnp.int32),
            jnp.ones((rows,), bool), jnp.int32(4), jnp.asarray([gen.PAD_ID], jnp.int32),
            gen.Sampling().arrays(rows), jax.random.key(0), jnp.arange(rows, dtype=jnp.int32),
            model=model, cache_len=16, out_len=4, greedy=True, filters=()).compile().as_text()
    names = re.findall(r"= \S+ (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(",
                       text)
    return {name: names.count(name) for name in set(names)}


@needs_devices(2)
def test_tp_graph_leaves_no_all_gather_in_the_decode_program(model, monkeypatch):
    """At tensor=2 XLA's partitioner samples from vocab-split logits with all-gathers (and the loop then
    cannot be one CUDA graph); with LLMJAX_TP_GRAPH=on every collective left is a sum the kernel does
    (an all-reduce on a CPU, where psum stands in for it)."""
    folder, _, _ = model
    p = llmjax.load(folder, mesh=make_mesh(tensor=2, devices=jax.devices()[:2]))
    before = _collectives(p, LLMJAX_ALLREDUCE="nvlink")
    after = _collectives(p, LLMJAX_ALLREDUCE="nvlink", LLMJAX_TP_GRAPH="on")
    assert before.get("all-gather", 0) > 0, before
    assert set(after) == {"all-reduce"}, after


@needs_devices(2)
@pytest.mark.parametrize("env,data,tensor,want", [
    ({"LLMJAX_ALLREDUCE": "nvlink", "LLMJAX_TP_GRAPH": "on"}, 1, 2, True),
    pytest.param({"LLMJAX_ALLREDUCE": "nvlink", "LLMJAX_TP_GRAPH": "on"}, 1, 8, True, marks=needs_devices(8)),
    ({"LLMJAX_TP_GRAPH": "on"}, 1, 2, True),  # auto, where the kernel runs
    ({"LLMJAX_ALLREDUCE": "nvlink"}, 1, 2, False),  # off by default
    pytest.param({"LLMJAX_ALLREDUCE": "nvlink", "LLMJAX_TP_GRAPH": "on"}, 2, 2, False,  # the loop's test sums over data
                 marks=needs_devices(4)),
    ({"LLMJAX_ALLREDUCE": "nvlink-eager", "LLMJAX_TP_GRAPH": "on"}, 1, 2, False),  # never captured
    ({"LLMJAX_ALLREDUCE": "xla", "LLMJAX_TP_GRAPH": "on"}, 1, 2, False),
])
def test_the_loop_is_one_graph_on_a_tensor_mesh_only_where_every_sum_is_the_kernels(monkeypatch, env, data,
                                                                                  tensor, want):
    monkeypatch.delenv("LLMJAX_ALLREDUCE", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(allreduce, "_why_not", lambda *a: None)  # a CUDA mesh, as the lowering test stubs it
    monkeypatch.setattr(allreduce, "_capable", lambda mesh: True)
    monkeypatch.setattr(allreduce, "setup", lambda ordinals: None)
    monkeypatch.setattr(allreduce, "_register", lambda: {"nvlink": "llmjax_allreduce_graph",
                                                         "nvlink-eager": "llmjax_allreduce"})
    monkeypatch.setattr(allreduce, "AUTO_GROUP", tensor)
    mesh = make_mesh(tensor=tensor, data=data, devices=jax.devices()[:data * tensor])
    assert allreduce.graph_loop(mesh, 64 << 10, jnp.bfloat16) is want  # batch 1's logits of a 32k vocabulary
    assert not allreduce.graph_loop(mesh, 4 << 20, jnp.bfloat16)  # batch 64's: an NCCL all-gather, not the kernel
    assert not allreduce.graph_loop(None)
    monkeypatch.setenv("LLMJAX_TP_GRAPH", "sometimes")
    with pytest.raises(ValueError, match="LLMJAX_TP_GRAPH must be one of off, on, got 'sometimes'"):
        allreduce.graph_loop(make_mesh(tensor=2, devices=jax.devices()[:2]))


@needs_devices(8)
def test_gather_is_a_tiled_all_gather(nvlink):
    mesh = make_mesh(tensor=4, data=2, devices=jax.devices()[:8])
    x = jnp.arange(2 * 3 * 20, dtype=jnp.float32).reshape(2, 3, 20) - 50.0
    f = jax.shard_map(lambda y: allreduce.gather(y, "tensor", mesh, along=-1), mesh=mesh,
                      in_specs=P("data", None, "tensor"), out_specs=P("data", None, None), check_vma=False)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x)), np.asarray(x))
    assert [shape for shape, _ in nvlink] == [(1, 3, 20)]  # through the sum, whole width


@needs_devices(2)
@pytest.mark.parametrize("mode", ["xla", None])  # None: the default, auto, which a CPU mesh leaves to XLA
def test_xla_mode_leaves_float_products_to_the_partitioner(model, monkeypatch, mode):
    if mode is None:
        monkeypatch.delenv("LLMJAX_ALLREDUCE", raising=False)
    else:
        monkeypatch.setenv("LLMJAX_ALLREDUCE", mode)
    traced = []
    monkeypatch.setattr(allreduce, "psum", lambda *a: traced.append(a))
    jax.clear_caches()
    p = llmjax.load(model[0], mesh=make_mesh(tensor=2, devices=jax.devices()[:2]))
    assert llmjax.generate(p, PROMPTS, max_new_tokens=3) == [t[:3] for t in model[2]]
    assert traced == []


@needs_devices(8)
def test_groups_are_the_devices_along_the_axis_in_rank_order():
    mesh = make_mesh(tensor=4, data=2, devices=jax.devices()[:8])
    table = allreduce.groups(mesh, "tensor")
    assert table.shape == (2, 4)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    data, tensor = mesh.axis_names.index("data"), mesh.axis_names.index("tensor")
    for row in range(2):
        index = [0] * ids.ndim
        index[data] = row
        for rank in range(4):
            index[tensor] = rank
            assert table[row, rank] == ids[tuple(index)]
    assert sorted(table.ravel().tolist()) == sorted(ids.ravel().tolist())


@needs_devices(4)
@pytest.mark.parametrize("mode,target", [("nvlink", "llmjax_allreduce_graph"), ("nvlink-eager", "llmjax_allreduce"),
                                         ("auto", "llmjax_allreduce_graph")])
def test_on_cuda_the_sum_lowers_to_the_kernels_custom_call(monkeypatch, mode, target):
    """What XLA gets on a CUDA mesh (lowered here for cuda, the GPU-only steps stubbed): one custom
    call per sum with every group of the mesh in rank order, as the handler decodes them. `auto`
    (the default) takes the kernel where it can run."""
    monkeypatch.setenv("LLMJAX_ALLREDUCE", mode)
    monkeypatch.setattr(allreduce, "_why_not", lambda *a: None)
    monkeypatch.setattr(allreduce, "_capable", lambda mesh: True)
    set_up = []
    monkeypatch.setattr(allreduce, "setup", set_up.append)
    monkeypatch.setattr(allreduce, "_register", lambda: {"nvlink": "llmjax_allreduce_graph",
                                                         "nvlink-eager": "llmjax_allreduce"})
    mesh = make_mesh(tensor=2, data=2, devices=jax.devices()[:4])
    table = allreduce.groups(mesh, "tensor")
    f = jax.shard_map(lambda x: allreduce.psum(x[0], "tensor", mesh), mesh=mesh, in_specs=P("tensor"),
                      out_specs=P(), check_vma=False)
    text = jax.jit(f).trace(jax.ShapeDtypeStruct((2, 4, 64), jnp.bfloat16)).lower(
        lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "custom_call" in line]
    assert len(calls) == 1 and f"@{target}(" in calls[0], calls
    assert "group_size = 2 : i64" in calls[0] and "blocks = 0 : i64" in calls[0]
    assert f"groups = dense<[{', '.join(str(i) for i in table.ravel())}]> : tensor<4xi64>" in calls[0]
    assert set_up == table.tolist() * (2 if mode == "auto" else 1)  # set up when traced (auto: first to probe)


@needs_devices(2)
@pytest.mark.parametrize("failure", [RuntimeError("LLMJAX_ALLREDUCE: the NVLink all-reduce is compiled with nvcc, "
                                                  "which was not found"),
                                     OSError("libllmjax_allreduce.so: cannot open shared object file")])
def test_auto_falls_back_to_psum_with_one_warning_where_the_kernel_cannot_run(monkeypatch, failure):
    """A CUDA mesh (stubbed as above) whose kernel cannot be built or loaded, or whose GPUs cannot reach
    each other's memory: `auto` keeps XLA's psum and says why, once; `nvlink` raises."""
    monkeypatch.delenv("LLMJAX_ALLREDUCE", raising=False)
    monkeypatch.setattr(allreduce, "_why_not", lambda *a: None)
    monkeypatch.setattr(allreduce, "_capable", lambda mesh: True)

    def fail(ordinals):
        raise failure
    monkeypatch.setattr(allreduce, "setup", fail)
    mesh = make_mesh(tensor=2, devices=jax.devices()[:2])
    f = jax.shard_map(lambda x: allreduce.psum(x[0], "tensor", mesh), mesh=mesh, in_specs=P("tensor"),
                      out_specs=P(), check_vma=False)
    with pytest.warns(UserWarning, match=f"auto: XLA's psum .* cannot run: {str(failure)[:20]}") as caught:
        assert allreduce.kernel_mode(mesh, "tensor") is None
        assert allreduce.kernel_mode(mesh, "tensor") is None
        text = jax.jit(f).trace(jax.ShapeDtypeStruct((2, 4, 64), jnp.bfloat16)).lower(
            lowering_platforms=("cuda",)).as_text()
    assert len([w for w in caught if "auto" in str(w.message)]) == 1
    assert "custom_call" not in text and "all_reduce" in text
    monkeypatch.setenv("LLMJAX_ALLREDUCE", "nvlink")
    jax.clear_caches()  # the mode is read when a program is traced
    with pytest.raises(type(failure)):
        jax.jit(f).trace(jax.ShapeDtypeStruct((2, 4, 64), jnp.bfloat16))


@needs_devices(2)
@pytest.mark.parametrize("case", [pytest.param("four GPUs", marks=needs_devices(4)), "older GPUs",
                                  "a prefill-sized sum", "a CPU mesh"])
def test_auto_keeps_psum_silently_where_the_kernel_was_not_measured_or_cannot_run(monkeypatch, recwarn, case):
    """`auto` takes the kernel only for groups of two GPUs of compute capability 8 or more and sums that
    fit its slots; elsewhere it leaves the sums to XLA without a word (and never builds the kernel)."""
    monkeypatch.delenv("LLMJAX_ALLREDUCE", raising=False)
    if case != "a CPU mesh":
        monkeypatch.setattr(allreduce, "_why_not", lambda mesh, axis, nbytes, dtype=None: (
            "size" if nbytes > allreduce.slot_bytes() else None))
        monkeypatch.setattr(allreduce, "_capable", lambda mesh: case != "older GPUs")
    monkeypatch.setattr(allreduce, "setup", lambda ordinals: pytest.fail("the kernel was set up"))
    mesh = make_mesh(tensor=4 if case == "four GPUs" else 2, devices=jax.devices()[:4 if case == "four GPUs" else 2])
    nbytes = 4 << 20 if case == "a prefill-sized sum" else 16 << 10
    assert allreduce.kernel_mode(mesh, "tensor", nbytes, jnp.bfloat16) is None
    assert not [w for w in recwarn if "LLMJAX_ALLREDUCE" in str(w.message)]
    monkeypatch.setenv("LLMJAX_ALLREDUCE", "nvlink")  # asked for, it is taken wherever it can run
    assert allreduce.kernel_mode(mesh, "tensor", nbytes, jnp.bfloat16) == "nvlink"


def test_older_gpus_and_other_platforms_are_not_capable():
    class Device:
        platform = "gpu"

        def __init__(self, capability):
            self.compute_capability = capability

    class Mesh:
        def __init__(self, *capabilities):
            self.devices = np.array([Device(c) for c in capabilities])

    assert allreduce._capable(Mesh("9.0", "9.0")) and allreduce._capable(Mesh("8.0", "8.6"))
    assert not allreduce._capable(Mesh("9.0", "7.0")) and not allreduce._capable(Mesh("gfx942", "gfx942"))
    assert not allreduce._capable(Mesh(None, "9.0"))


@needs_devices(4)
def test_off_cuda_the_sum_is_xlas_psum(monkeypatch):
    monkeypatch.setenv("LLMJAX_ALLREDUCE", "nvlink")
    mesh = make_mesh(tensor=4, devices=jax.devices()[:4])
    assert allreduce._why_not(mesh, "tensor", 1024) == "platform"
    x = np.random.default_rng(0).standard_normal((4, 8, 16)).astype(np.float32)
    f = jax.shard_map(lambda x: allreduce.psum(x[0], "tensor", mesh), mesh=mesh, in_specs=P("tensor"),
                      out_specs=P(), check_vma=False)
    np.testing.assert_allclose(np.asarray(jax.jit(f)(x)), x.sum(0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, jnp.float16])
def test_the_reference_adds_in_rank_order_in_float32_rounding_once(dtype):
    parts = jnp.asarray(np.random.default_rng(1).standard_normal((3, 5, 24)) * 100, dtype)
    wide = np.asarray(parts.astype(jnp.float32))
    want = ((wide[0] + wide[1]) + wide[2]).astype(np.float32)  # float32 additions, in rank order
    got = allreduce.allreduce_reference(parts)
    assert got.dtype == parts.dtype
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jnp.asarray(want).astype(dtype)))


@pytest.mark.parametrize("variable,value,needle", [
    ("LLMJAX_ALLREDUCE", "nccl", "must be one of auto, xla, nvlink, nvlink-eager"),
    ("LLMJAX_ALLREDUCE_BYTES", "lots", "integer >= 16"),
    ("LLMJAX_ALLREDUCE_BYTES", "1000", "multiple of 16"),
    ("LLMJAX_ALLREDUCE_BLOCKS", "65", "integer from 0 to 64"),
    ("LLMJAX_ALLREDUCE_TIMEOUT_S", "0", "integer >= 1"),
])
def test_bad_settings_are_refused(monkeypatch, variable, value, needle):
    monkeypatch.setenv("LLMJAX_ALLREDUCE", "nvlink")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValueError, match=needle):
        allreduce.mode()
        allreduce.slot_bytes()
        allreduce._int_setting("LLMJAX_ALLREDUCE_BLOCKS", 0, 0, allreduce.MAX_BLOCKS)
        allreduce._int_setting("LLMJAX_ALLREDUCE_TIMEOUT_S", 120, 1)


def test_a_hung_compiler_is_stopped(monkeypatch, tmp_path):
    def hang(command, **options):
        raise allreduce.subprocess.TimeoutExpired(command, options["timeout"])
    monkeypatch.setattr(allreduce, "nvcc", lambda: "nvcc")
    monkeypatch.setattr(allreduce.subprocess, "run", lambda command, **options: (
        hang(command, **options) if "timeout" in options else type("Done", (), {"stdout": "nvcc 13"})()))
    with pytest.raises(RuntimeError, match=f"nvcc did not build allreduce.cu within {allreduce.BUILD_TIMEOUT_S} s"):
        allreduce.build(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


def test_a_missing_compiler_is_named(monkeypatch):
    monkeypatch.setenv("LLMJAX_NVCC", "")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(allreduce.os.path, "exists", lambda path: False)
    with pytest.raises(RuntimeError, match="compiled with nvcc, which was not found.*LLMJAX_NVCC"):
        allreduce.nvcc()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="CUDA's compiler is not installed here")
def test_the_kernel_builds_and_exports_the_handlers(tmp_path, monkeypatch):
    path = allreduce.build(tmp_path)
    assert allreduce.build(tmp_path) == path  # cached: the same file, not built again
    lib = allreduce.load(path)
    capsules = [jax.ffi.pycapsule(getattr(lib, name)) for name in ("llmjax_allreduce", "llmjax_allreduce_graph")]
    assert all(type(c).__name__ == "PyCapsule" for c in capsules)
    if lib.llmjax_allreduce_device_count() <= 0:  # no CUDA GPU here: setting a group up says why it cannot
        monkeypatch.setattr(allreduce, "library", lambda: lib)
        with pytest.raises(RuntimeError,
                           match=r"cannot run on GPUs \[0, 1\]: allocating .* GPU 0: .*Set LLMJAX_ALLREDUCE=xla"):
            allreduce.setup([0, 1])

