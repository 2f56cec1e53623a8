"""Tensor and data parallelism on 8 fake CPU devices: every mesh gives the single-device logits and
greedy tokens, weights and cache are sharded as the rules say, and impossible meshes are refused.
Meshes with pipeline stages are tested in test_pipeline.py."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import llmjax
from llmjax.sharding import make_mesh
from llmjax.sharding.mesh import fit_config
from llmjax.sharding.rules import CACHE_SPEC

from conftest import hf_config, needs_devices, save_hf_model

pytestmark = needs_devices(8)  # every test here builds meshes of up to 8 devices

gen = importlib.import_module("llmjax.generate")

MESHES = [(1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (2, 2), (8, 1), (2, 1)]  # (data, tensor)
PROMPTS = [[1, 17, 300, 5, 9], [1, 800], [1, 4, 4, 4, 900, 12, 33]]


def _mesh(tensor, data):
    return make_mesh(tensor=tensor, data=data, devices=jax.devices()[:tensor * data])


@pytest.fixture(scope="module", params=[8, 2], ids=["mha", "gqa"])
def folder(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"kv{request.param}")
    save_hf_model(folder, hf_config(vocab_size=1024, num_attention_heads=8, num_key_value_heads=request.param,
                                    attention_bias=True, max_position_embeddings=64), seed=request.param)
    return folder


@pytest.fixture(scope="module")
def single(folder):
    params = llmjax.load(folder)
    ids = jnp.asarray(gen._pad(PROMPTS, 8))
    return params, np.asarray(llmjax.logits(params, ids)), llmjax.generate(params, PROMPTS, max_new_tokens=12)


@pytest.mark.parametrize("data,tensor", MESHES)
def test_every_mesh_gives_the_single_device_result(folder, single, data, tensor):
    params, logits, tokens = single
    sharded = llmjax.load(folder, mesh=_mesh(tensor, data))
    np.testing.assert_allclose(np.asarray(llmjax.logits(sharded, jnp.asarray(gen._pad(PROMPTS, 8)))), logits,
                               rtol=1e-5, atol=1e-5)
    assert llmjax.generate(sharded, PROMPTS, max_new_tokens=12) == tokens
    assert llmjax.generate(sharded, PROMPTS[1], max_new_tokens=12) == tokens[1]


@pytest.mark.parametrize("data,tensor", [(1, 4), (2, 2)])
def test_weights_and_cache_are_sharded_as_the_rules_say(folder, data, tensor):
    mesh = _mesh(tensor, data)
    p = llmjax.load(folder, mesh=mesh)
    w, layer = p.weights, p.weights["layer_1"]
    specs = {
        "embed": (w["embed"]["embedding"], P("tensor", None)),
        "lm_head": (w["lm_head"]["kernel"], P("tensor", None)),
        "qkv": (layer["attn"]["qkv"]["kernel"], P("tensor", None, None, None)),
        "qkv bias": (layer["attn"]["qkv"]["bias"], P("tensor", None, None)),
        "o": (layer["attn"]["o"]["kernel"], P(None, "tensor", None)),
        "gate_up": (layer["mlp"]["gate_up"]["kernel"], P(None, "tensor", None)),
        "down": (layer["mlp"]["down"]["kernel"], P(None, "tensor")),
        "norm": (layer["attn_norm"]["scale"], P(None)),
    }
    for name, (array, spec) in specs.items():
        assert array.sharding.mesh == mesh and array.sharding.spec == spec, name
    tokens = jnp.asarray(gen._pad(PROMPTS + [[1, 2]], 8))
    model = gen._model(p)
    _, cache = jax.jit(gen._first_tokens, static_argnames=("model", "cache_len", "greedy", "filters"))(
        p.weights, tokens, jnp.asarray([5, 2, 7, 2]), gen.Sampling().arrays(4), jax.random.key(0),
        jnp.arange(4), model=model, cache_len=16, greedy=True, filters=())
    want = NamedSharding(mesh, CACHE_SPEC)
    assert cache.k[0].sharding.is_equivalent_to(want, 4) and cache.v[1].sharding.is_equivalent_to(want, 4)
    assert not cache.k[0].sharding.is_fully_replicated


def test_kv_heads_are_repeated_when_tensor_exceeds_them(folder):
    config = llmjax.LlamaConfig.from_hf(folder)
    for tensor in (1, 2, 4, 8):
        fitted, repeat = fit_config(config, _mesh(tensor, 1))
        assert fitted.num_kv_heads == max(config.num_kv_heads, tensor)
        assert repeat == max(1, tensor // config.num_kv_heads)


def test_checkpoints_and_shard_give_the_same_result(folder, single, tmp_path):
    params, logits, tokens = single
    ckpt = llmjax.convert(folder, tmp_path / "ckpt", progress=False)
    ids = jnp.asarray(gen._pad(PROMPTS, 8))
    for tensor, data in ((2, 4), (8, 1)):  # kv heads kept, and (for gqa) repeated
        mesh = make_mesh(tensor=tensor, data=data)
        for p in (llmjax.load(ckpt, mesh=mesh), llmjax.shard(params, mesh)):
            np.testing.assert_allclose(np.asarray(llmjax.logits(p, ids)), logits, rtol=1e-5, atol=1e-5)
            assert p.weights["layer_0"]["mlp"]["down"]["kernel"].sharding.spec == P(None, "tensor")
    with pytest.raises(ValueError, match="already sharded"):
        llmjax.shard(llmjax.shard(params, make_mesh(tensor=2, data=4)), make_mesh(tensor=2, data=4))


def test_impossible_meshes_are_refused():
    with pytest.raises(ValueError, match="there are 8 devices"):
        make_mesh(tensor=3)
    with pytest.raises(ValueError, match="integer"):
        make_mesh(tensor=0, data=8)
    assert make_mesh(tensor=np.int64(2), data=4).shape["tensor"] == 2
    params = llmjax.init_random("tiny", dtype="float32")
    explicit = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    for mesh in (explicit, jax.sharding.Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "tensor"))):
        with pytest.raises(ValueError, match="make_mesh"):  # not after loading: at the first use
            llmjax.shard(params, mesh)
    with pytest.raises(ValueError, match="jax.sharding.Mesh"):
        llmjax.init_random("tiny", mesh="tensor=2")
    config = llmjax.LlamaConfig.preset("tiny")  # 6 query heads, 2 kv heads, MLP 200, vocab 515
    with pytest.raises(ValueError, match=r"query heads \(6\)"):
        fit_config(config, make_mesh(tensor=4, data=2))
    three_kv = dataclasses.replace(config, num_heads=12, num_kv_heads=3, vocab_size=516)
    with pytest.raises(ValueError, match="does not divide the 3 kv heads"):
        fit_config(three_kv, make_mesh(tensor=2, data=4))
    with pytest.raises(ValueError, match="not a multiple"):
        fit_config(dataclasses.replace(three_kv, intermediate_size=204), make_mesh(tensor=4, data=2))


def test_make_mesh_reads_device_arrays_and_refuses_bad_device_lists():
    devices = jax.devices()
    grid = np.asarray(devices, dtype=object).reshape(2, 4)  # another mesh's devices: every one, in order
    assert list(make_mesh(tensor=4, data=2, devices=grid).devices.flat) == devices
    assert list(make_mesh(tensor=2, data=4, devices=make_mesh(tensor=8).devices).devices.flat) == devices
    with pytest.raises(ValueError, match="more than once"):
        make_mesh(tensor=2, data=2, devices=devices[:2] * 2)
    with pytest.raises(ValueError, match="empty"):
        make_mesh(devices=[])
    with pytest.raises(ValueError, match=r"one device .*pass \[device\]"):
        make_mesh(devices=devices[0])


def test_params_moved_off_their_mesh_are_refused_by_name():
    """jax.device_put moves the weights but keeps the Params' mesh: every entry says so, not XLA."""
    params = llmjax.shard(llmjax.init_random("tiny", dtype="float32"), _mesh(tensor=2, data=1))
    for moved in (jax.device_put(params, jax.devices()[0]),
                  jax.device_put(params, NamedSharding(make_mesh(tensor=2, devices=jax.devices()[4:6]), P()))):
        for run in (lambda p: llmjax.generate(p, [1, 2, 3], max_new_tokens=2), lambda p: llmjax.logits(p, [1, 2]),
                    lambda p: llmjax.perplexity(p, [1, 2, 3]), lambda p: llmjax.Engine(p)):
            with pytest.raises(ValueError, match="moved by jax.device_put"):
                run(moved)
    assert llmjax.generate(jax.tree.map(lambda w: w, params), [1, 2, 3], max_new_tokens=2)  # in place: fine


def test_cli_generate_on_a_mesh_prints_the_single_device_text(capsys):
    from llmjax import cli

    argv = ["generate", "--prompt", "def mean(values):", "--max-new-tokens", "12"]
    assert cli.main(argv) == 0
    alone = capsys.readouterr().out
    assert cli.main(argv + ["--tensor", "8"]) == 0  # tiny-stdlib's 4 kv heads, each repeated twice
    assert capsys.readouterr().out == alone
    assert cli.main(argv + ["--stage", "2", "--tensor", "4"]) == 0  # 4 layers per stage
    assert capsys.readouterr().out == alone
    assert cli.main(argv + ["--tensor", "3"]) == 2
    assert "devices" in capsys.readouterr().err


def test_cli_perplexity_on_a_mesh_gives_the_single_device_figure(capsys, tmp_path):
    from llmjax import cli

    text = tmp_path / "sample.py"
    text.write_text("def mean(values):\n    return sum(values) / len(values)\n" * 4)
    argv = ["perplexity", "--text", str(text), "--dtype", "float32"]

    def figure(extra):
        assert cli.main(argv + extra) == 0
        return float(capsys.readouterr().out.split()[1])

    alone = figure([])
    assert alone > 1
    for extra in (["--tensor", "8"], ["--stage", "2", "--tensor", "2", "--data", "2"]):
        assert figure(extra) == pytest.approx(alone, rel=1e-4)
    assert cli.main(argv + ["--tensor", "3"]) == 2
    assert "devices" in capsys.readouterr().err


def test_a_vocabulary_the_tensor_degree_does_not_divide_is_padded(tmp_path):
    folder = tmp_path / "odd"
    save_hf_model(folder, hf_config(num_attention_heads=8, num_key_value_heads=4, intermediate_size=144,
                                    max_position_embeddings=64), seed=9)  # vocab 1003
    alone = llmjax.load(folder)
    ids = jnp.asarray(gen._pad(PROMPTS, 8))
    want, tokens = np.asarray(llmjax.logits(alone, ids)), llmjax.generate(alone, PROMPTS, max_new_tokens=8)
    ckpt = llmjax.convert(folder, tmp_path / "ckpt", progress=False)
    for tensor, stage, source in ((2, 1, folder), (8, 1, folder), (4, 1, ckpt), (2, 2, folder)):
        p = llmjax.load(source, mesh=make_mesh(tensor=tensor, stage=stage, data=8 // tensor // stage))
        assert p.config.vocab_size == 1003 and p.config.embedding_rows % tensor == 0
        assert p.weights["embed"]["embedding"].shape[0] == p.config.embedding_rows
        got = np.asarray(llmjax.logits(p, ids))
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        assert llmjax.generate(p, PROMPTS, max_new_tokens=8) == tokens


def test_random_weights_are_made_in_their_shardings():
    """Made in place on the mesh, they are the one-device model's weights as `shard` places them: each
    kv head repeated where the tensor degree exceeds the kv heads (its copies equal), the vocab padded."""
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_heads=8, num_kv_heads=2,
                                 intermediate_size=192, eos_token_ids=())
    mesh = _mesh(4, 2)
    p = llmjax.init_random(config, seed=3, dtype="float32", mesh=mesh)
    assert p.config.num_kv_heads == 4 and p.config.embedding_rows == 516  # kv repeated, vocab padded
    qkv = p.weights["layer_0"]["attn"]["qkv"]["kernel"]
    assert qkv.shape[0] == 4 and qkv.sharding.spec == P("tensor", None, None, None)
    assert p.weights["embed"]["embedding"].sharding.spec == P("tensor", None)
    one = llmjax.init_random(config, seed=3, dtype="float32")
    want = llmjax.shard(one, mesh)
    assert jax.tree.structure(p.weights) == jax.tree.structure(want.weights)
    for got, expected in zip(jax.tree.leaves(p.weights), jax.tree.leaves(want.weights)):
        assert got.sharding == expected.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    np.testing.assert_allclose(np.asarray(llmjax.logits(p, [[1, 5, 9]])), np.asarray(llmjax.logits(one, [[1, 5, 9]])),
                               rtol=1e-5, atol=1e-5)


def _collectives(compiled_text: str, op: str) -> list[int]:
    """The element count of every `op` (e.g. all-gather) result in compiled HLO text."""
    sizes = []
    for line in compiled_text.splitlines():
        if f" {op}(" in line or f" {op}-start(" in line:
            dims = line.split("=", 1)[1].split("[", 1)[1].split("]", 1)[0]
            sizes.append(int(np.prod([int(d) for d in dims.split(",") if d])))
    return sizes


@pytest.mark.parametrize("data,tensor", [(1, 4), (2, 2)])
def test_no_weight_moves_between_devices_in_generate(folder, data, tensor):
    """Correct results alone do not show that each device reads only its own weights: a kernel
    gathered to every device at every step gives the same tokens, many times slower. The compiled
    generate loop may gather only activations (the sampled token, the LM head's best logit, and with
    `data` > 1 the new keys and values of the cache write), each smaller than any weight's shard."""
    params = llmjax.load(folder, mesh=_mesh(tensor, data))
    rows = [PROMPTS[0]] * 2
    bucket, new = gen._bucket(len(rows[0])), 16
    args = (params.weights, jnp.asarray(gen._pad(rows, bucket)), jnp.full((2,), len(rows[0]), jnp.int32),
            jnp.ones((2,), bool), jnp.int32(new), jnp.asarray([gen.PAD_ID], jnp.int32),
            gen.Sampling().arrays(2), jax.random.key(0), jnp.arange(2, dtype=jnp.int32))
    static = dict(model=gen._model(params), cache_len=gen._cache_len(params, bucket, new), out_len=new,
                  greedy=True, filters=())
    text = gen._generate_ids.lower(*args, **static).compile().as_text()
    kernels = [w for path, w in jax.tree_util.tree_leaves_with_path(params.weights)
               if path[-1].key in ("kernel", "embedding")]
    smallest_shard = min(w.size // tensor for w in kernels)
    gathered = _collectives(text, "all-gather") + _collectives(text, "all-to-all")
    assert max(gathered, default=0) < smallest_shard, gathered
    assert _collectives(text, "all-reduce"), "row-parallel products must be all-reduced"


def test_a_context_mesh_other_than_the_params_is_refused_by_name(tmp_path):
    """A mesh set with jax.set_mesh is every jit's context: with another mesh than the params' (or none
    for params on one device), JAX failed deep inside (incompatible devices, a shard_map's mesh, an
    Explicit axis's assert). Every entry point names it; under the params' own mesh they run as before."""
    one = llmjax.init_random("tiny", dtype="float32")
    mesh = _mesh(tensor=2, data=1)
    sharded = llmjax.shard(one, mesh)
    out = tmp_path / "int8"  # convert quantizes on one device (without --quant it runs no device program)
    explicit = jax.make_mesh((1, 1, 2), ("data", "stage", "tensor"), devices=jax.devices()[:2],
                             axis_types=(jax.sharding.AxisType.Explicit,) * 3)
    for context in (explicit, make_mesh(tensor=2, data=4)):
        with jax.set_mesh(context):
            for params in (one, sharded):
                for run in (lambda p: llmjax.generate(p, [1, 2, 3], max_new_tokens=2), lambda p: llmjax.logits(p, [1, 2]),
                            lambda p: llmjax.stream(p, [1, 2, 3]), lambda p: llmjax.perplexity(p, [1, 2, 3]),
                            lambda p: llmjax.Engine(p)):
                    with pytest.raises(ValueError, match=r"jax.set_mesh.*call llmjax outside"):
                        run(params)
            for run in (lambda: llmjax.init_random("tiny"), lambda: llmjax.load("tiny-stdlib"),
                        lambda: llmjax.shard(one, mesh), lambda: llmjax.convert("tiny-stdlib", out, quant="int8")):
                with pytest.raises(ValueError, match="jax.set_mesh"):
                    run()
            assert not out.exists()
    engine = llmjax.Engine(sharded, max_slots=2, prefill_tokens=16, prefill_row=16, max_seq_len=32)
    engine.add_request([1, 2, 3], max_new_tokens=2)
    with jax.set_mesh(explicit), pytest.raises(ValueError, match="jax.set_mesh"):
        engine.step()  # set after the engine was made
    want = np.asarray(llmjax.logits(one, [[1, 5, 9]]))
    with jax.set_mesh(mesh):  # the params' own mesh
        assert llmjax.shard(one, mesh).mesh == mesh
        np.testing.assert_allclose(np.asarray(llmjax.logits(sharded, [[1, 5, 9]])), want, rtol=1e-5, atol=1e-5)
