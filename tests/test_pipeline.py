"""Pipeline parallelism on 8 fake CPU devices: every (data, stage, tensor) mesh gives the single-device
logits and tokens (a batch that keeps the stages full, and a single prompt that runs them in turn),
weights and cache are split over `stage` as the rules say, and impossible meshes are refused."""

import dataclasses
import functools
import importlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import llmjax
from llmjax.models.llama import abstract_params
from llmjax.sharding import make_mesh, pipeline

from conftest import hf_config, needs_devices, save_hf_model

gen = importlib.import_module("llmjax.generate")

MESHES = [(1, 2, 1), (1, 4, 1), (1, 2, 2), (1, 2, 4), (2, 2, 2)]  # (data, stage, tensor)
PROMPTS = [[1, 17, 300, 5, 9], [1, 800], [1, 4, 4, 4, 900, 12, 33]]  # padded to 4 rows: >= the stages


def _mesh(data, stage, tensor):
    return make_mesh(tensor=tensor, stage=stage, data=data, devices=jax.devices()[:data * stage * tensor])


# Multi-head with its own LM head; grouped-query with biases and a tied LM head (the other head path).
CONFIGS = {"mha": dict(num_key_value_heads=8), "gqa": dict(num_key_value_heads=2, attention_bias=True,
                                                            tie_word_embeddings=True)}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """`models(config, layers)`: a model folder and its single-device results (logits, a batch's
    tokens, a lone prompt's tokens), made once per module."""
    made = {}

    def get(config, layers=2):
        if (config, layers) not in made:
            folder = tmp_path_factory.mktemp(f"{config}-{layers}")
            save_hf_model(folder, hf_config(vocab_size=1024, num_attention_heads=8, num_hidden_layers=layers,
                                            max_position_embeddings=64, **CONFIGS[config]), seed=5)
            params = llmjax.load(folder)
            ids = jnp.asarray(gen._pad(PROMPTS, 8))
            made[config, layers] = folder, (params, np.asarray(llmjax.logits(params, ids)),
                                            llmjax.generate(params, PROMPTS, max_new_tokens=10),
                                            llmjax.generate(params, PROMPTS[2], max_new_tokens=10))
        return made[config, layers]
    return get


# Grouped-query (kv heads repeated at tensor 4, biases, tied head) on every mesh; multi-head on the
# plainest and the fullest mesh. Each case compiles three programs, and CPU time is budgeted.
CASES = [("gqa", *mesh) for mesh in MESHES] + [("mha", 1, 2, 1), ("mha", 2, 2, 2)]


@needs_devices(8)
@pytest.mark.parametrize("config,data,stage,tensor", CASES)
def test_every_mesh_gives_the_single_device_result(models, config, data, stage, tensor):
    folder, (_, logits, tokens, alone) = models(config, layers=max(2, stage))
    p = llmjax.load(folder, mesh=_mesh(data, stage, tensor))
    assert pipeline.microbatch_count(p.mesh, 4) == stage  # the batch keeps every stage busy
    got = np.asarray(llmjax.logits(p, jnp.asarray(gen._pad(PROMPTS, 8))))
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
    assert llmjax.generate(p, PROMPTS, max_new_tokens=10) == tokens
    assert llmjax.generate(p, PROMPTS[2], max_new_tokens=10) == alone  # one row: stages in turn


@needs_devices(8)
def test_weights_and_cache_are_split_over_stages_as_the_rules_say(models):
    folder = models("gqa", layers=4)[0]
    mesh = _mesh(2, 2, 2)
    p = llmjax.load(folder, mesh=mesh)
    w = p.weights
    assert sorted(w) == ["embed", "final_norm", "stages"]  # a tied LM head
    assert sorted(w["stages"]) == ["layer_0", "layer_1"]  # 4 layers, 2 per stage
    layer = w["stages"]["layer_1"]
    specs = {
        "embed": (w["embed"]["embedding"], P("tensor", None)),
        "qkv": (layer["attn"]["qkv"]["kernel"], P("stage", "tensor", None, None, None)),
        "o": (layer["attn"]["o"]["kernel"], P("stage", None, "tensor", None)),
        "gate_up": (layer["mlp"]["gate_up"]["kernel"], P("stage", None, "tensor", None)),
        "down": (layer["mlp"]["down"]["kernel"], P("stage", None, "tensor")),
        "norm": (layer["attn_norm"]["scale"], P("stage", None)),
    }
    for name, (array, spec) in specs.items():
        assert array.sharding.mesh == mesh and array.sharding.spec == spec, name
    alone = llmjax.load(folder).weights  # stage 1 holds layers 2 and 3, in order
    np.testing.assert_array_equal(np.asarray(layer["mlp"]["down"]["kernel"][1]),
                                  np.asarray(alone["layer_3"]["mlp"]["down"]["kernel"]))
    tokens = jnp.asarray(gen._pad(PROMPTS + [[1, 2]], 8))
    _, cache = jax.jit(gen._first_tokens, static_argnames=("model", "cache_len", "greedy", "filters"))(
        p.weights, tokens, jnp.asarray([5, 2, 7, 2]), gen.Sampling().arrays(4), jax.random.key(0),
        jnp.arange(4), model=gen._model(p), cache_len=16, greedy=True, filters=())
    assert len(cache) == 2 and len(cache[0].k) == 2  # a cache per microbatch slot, per place in a stage
    for array in jax.tree.leaves(cache):
        assert array.shape == (2, 2, 16, p.config.num_kv_heads, p.config.head_dim)  # [stage, rows, ...]
        assert array.sharding.is_equivalent_to(NamedSharding(mesh, P("stage", "data", None, "tensor")), 5)


@needs_devices(8)
def test_sampling_and_early_stops_match_one_device(models):
    folder, (params, *_) = models("gqa")
    knobs = dict(max_new_tokens=10, temperature=1.0, top_k=50, seed=3)
    sampled = llmjax.generate(params, PROMPTS, **knobs)
    eos = sampled[0][2]  # row 0 now stops at its third token; other rows stop where they draw it
    want = [row[:row.index(eos) + 1] if eos in row else row for row in sampled]
    p = llmjax.load(folder, mesh=_mesh(1, 2, 2))
    config = dataclasses.replace(p.config, eos_token_ids=p.config.eos_token_ids + (eos,))
    p = dataclasses.replace(p, config=config)
    assert llmjax.generate(p, PROMPTS, **knobs) == want


@needs_devices(8)
@pytest.mark.parametrize("data, stage, tensor", [(4, 2, 1), (2, 2, 2)])
def test_a_quantized_lm_head_stays_quantized_in_the_stages_decode(data, stage, tensor):
    """The decode over stages applies the LM head to each microbatch leaving the last stage: a head
    quantized with `quant_lm_head` must be read as its codes there too (8 rows: microbatches)."""
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), hidden_size=128, num_heads=4, head_dim=32,
                                 intermediate_size=256, eos_token_ids=())  # int4 groups of 32 split over tensor=2
    one = llmjax.init_random(config, dtype="int4-g32", quant_lm_head=True)
    prompts = [[1 + i, 7, 40 + 3 * i] for i in range(8)]
    want = llmjax.generate(one, prompts, max_new_tokens=5)
    assert llmjax.generate(llmjax.shard(one, _mesh(data, stage, tensor)), prompts, max_new_tokens=5) == want


# 3 layers: stage 1 holds one layer and a padding place; one kv head: tensor=2 repeats it
@needs_devices(8)
@pytest.mark.parametrize("layers, kv_heads", [(4, 2), (3, 2), (2, 1)])
def test_random_weights_on_stages_equal_the_single_device_ones(layers, kv_heads):
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_layers=layers, vocab_size=516,
                                 num_kv_heads=kv_heads, eos_token_ids=())
    mesh = _mesh(1, 2, 2)
    p = llmjax.init_random(config, dtype="float32", mesh=mesh)
    want = llmjax.shard(llmjax.init_random(config, dtype="float32"), mesh)
    assert jax.tree.structure(p.weights) == jax.tree.structure(want.weights)
    for got, expected in zip(jax.tree.leaves(p.weights), jax.tree.leaves(want.weights)):
        assert got.sharding == expected.sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("stage, layout", [(4, [[0, 1], [2, 3], [4, None], [5, None]]),
                                           (3, [[0, 1], [2, 3], [4, 5]]), (5, [[0, 1]] + [[i, None] for i in (2, 3, 4, 5)])])
def test_stage_layout_spreads_the_padding(stage, layout):
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_layers=6)
    assert pipeline.stage_layout(config, stage) == layout


@needs_devices(8)
@pytest.mark.parametrize("layers, data, stage, tensor", [(3, 1, 2, 2), (5, 2, 4, 1)])
def test_stages_that_do_not_divide_the_layers_give_the_single_device_result(models, layers, data, stage, tensor):
    """Stages of unequal size (padded with zero layers) give one device's logits and tokens; a stage's
    padding place holds zeros and its layers are the model's, in order."""
    folder, (_, logits, tokens, alone) = models("gqa", layers=layers)
    p = llmjax.load(folder, mesh=_mesh(data, stage, tensor))
    got = np.asarray(llmjax.logits(p, jnp.asarray(gen._pad(PROMPTS, 8))))
    np.testing.assert_allclose(got, logits, rtol=1e-5, atol=1e-5)
    assert llmjax.generate(p, PROMPTS, max_new_tokens=10) == tokens
    assert llmjax.generate(p, PROMPTS[2], max_new_tokens=10) == alone
    one = llmjax.load(folder).weights
    layout = pipeline.stage_layout(p.config, stage)
    for s, places in enumerate(layout):
        for j, i in enumerate(places):
            got = np.asarray(p.weights["stages"][f"layer_{j}"]["mlp"]["down"]["kernel"][s])
            want = np.zeros_like(got) if i is None else np.asarray(one[f"layer_{i}"]["mlp"]["down"]["kernel"])
            np.testing.assert_array_equal(got, want)
    assert sum(i is None for places in layout for i in places) == stage * -(-layers // stage) - layers


@needs_devices(8)
def test_checkpoints_shard_and_perplexity_give_the_same_result(models, tmp_path):
    folder, (params, logits, _, _) = models("mha")
    ckpt = llmjax.convert(folder, tmp_path / "ckpt", progress=False)
    ids = jnp.asarray(gen._pad(PROMPTS, 8))
    mesh = _mesh(2, 2, 2)
    for p in (llmjax.load(ckpt, mesh=mesh), llmjax.shard(params, mesh)):
        np.testing.assert_allclose(np.asarray(llmjax.logits(p, ids)), logits, rtol=1e-5, atol=1e-5)
    want = llmjax.perplexity(params, PROMPTS[2])
    got = llmjax.perplexity(p, PROMPTS[2])
    assert got.tokens == want.tokens and got.nll == pytest.approx(want.nll, abs=1e-5)


def test_a_model_of_one_layer_is_refused_stages_in_its_own_words():
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_layers=1)
    with pytest.raises(ValueError, match=r"^stage=2 exceeds the model's 1 layer; choose stage=1 \(a model of one "
                       r"layer has no pipeline\)$"):
        pipeline.layers_per_stage(config, 2)


@needs_devices(8)
def test_impossible_meshes_are_refused(models):
    folder = models("mha")[0]
    with pytest.raises(ValueError, match="there are 8 devices"):
        make_mesh(stage=3)
    with pytest.raises(ValueError, match="stage=8 exceeds the model's 2 layers; choose at most 2 stages"):
        llmjax.load(folder, mesh=make_mesh(stage=8))
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_layers=6)
    with pytest.raises(ValueError, match=r"query heads \(6\)"):  # tensor checks hold inside a stage
        llmjax.init_random(config, mesh=make_mesh(stage=2, tensor=4))


@needs_devices(8)
@pytest.mark.parametrize("stage", [1, 2])
def test_tensor_parallel_layers_gather_no_weight(models, stage):
    """Inside a stage as without stages, Megatron's layout keeps every layer weight where it is:
    XLA's program moves activations (all-reduces, the stage hand-over), never a whole weight."""
    folder = models("gqa")[0]
    p = llmjax.load(folder, mesh=_mesh(1, stage, 2))
    compiled = gen._forward.lower(p.weights, jnp.asarray(gen._pad(PROMPTS, 8)), model=gen._model(p)).compile()
    gathered = set(re.findall(r"= \w+\[([\d,]+)\][^=]* all-gather(?:-start)?\(", compiled.as_text()))
    layers = p.weights["stages"] if stage > 1 else {k: p.weights[k] for k in p.weights if k.startswith("layer_")}
    weights = {",".join(map(str, w.shape[stage > 1:])) for w in jax.tree.leaves(layers)}
    assert "all-reduce" in compiled.as_text() and not gathered & weights


@needs_devices(8)
def test_stage_and_tensor_collectives_never_wait_on_each_other(models):
    """A permute of the positions alone depends on no stage's work, and XLA's CPU runtime ran it
    alongside a stage's `cond`, whose tensor all-reduces it does not order with the rest: at stage=4
    x tensor=2 (a mesh of every device), generate deadlocked within 2-29 calls. Every permute now
    carries activations, and many calls of random shapes give the single-device tokens."""
    folder = models("gqa", layers=4)[0]
    one, p = llmjax.load(folder), llmjax.load(folder, mesh=_mesh(1, 4, 2))
    compiled = gen._forward.lower(p.weights, jnp.asarray(gen._pad(PROMPTS, 8)), model=gen._model(p)).compile()
    permutes = re.findall(r"= (\w+)\[[\d,]*\][^=]* collective-permute(?:-start)?\(", compiled.as_text())
    assert "u32" in permutes and "s32" not in permutes  # the positions go among the activations' bits
    rng = np.random.default_rng(7)
    for _ in range(30):
        prompts = [rng.integers(3, 1024, rng.integers(1, 12)).tolist() for _ in range(rng.integers(1, 7))]
        assert llmjax.generate(p, prompts, max_new_tokens=6) == llmjax.generate(one, prompts, max_new_tokens=6)


@needs_devices(4)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_positions_travel_with_the_activations_bit_for_bit(dtype):
    mesh = _mesh(1, 4, 1)
    y = jax.random.normal(jax.random.key(1), (4, 3, 5, 7), dtype).at[0, 0, 0, :3].set(jnp.array([jnp.nan, jnp.inf, 1e-40]))
    # every bit pattern matters: halves that read as NaN, infinity or subnormals in `dtype`
    positions = jnp.array([0, 1, 65535, 65536, 0x7F800001, 0x7FC0FFFF, 2**31 - 1, 0xFFFF] * 15, jnp.int32)
    positions = positions.reshape(4, 3, 10)[..., :5]
    shift = [(s, (s + 1) % 4) for s in range(4)]
    moved = jax.jit(jax.shard_map(lambda y, p: [a[None] for a in pipeline._ppermute_with_positions(y[0], p[0], shift)],
                                  mesh=mesh, in_specs=P("stage"), out_specs=P("stage"), axis_names={"stage"}))
    got_y, got_p = moved(y, positions)
    np.testing.assert_array_equal(np.asarray(got_y).view(np.uint8), np.asarray(jnp.roll(y, 1, 0)).view(np.uint8))
    np.testing.assert_array_equal(np.asarray(got_p), np.asarray(jnp.roll(positions, 1, 0)))


def _pipelined_generate(device_kind):
    """`generate`'s program (prefill, then the decode that keeps 2 stages of 2 tensor-parallel GPUs
    full) on an abstract GPU mesh: the function, its abstract arguments, the mesh and the config."""
    device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu")
    mesh = jax.sharding.AbstractMesh((1, 2, 2), ("data", "stage", "tensor"), abstract_device=device,
                                     axis_types=(jax.sharding.AxisType.Auto,) * 3)
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), vocab_size=516)
    def stacked(layers):  # shapes of the stacked layout, a leading axis for the 2 stages
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct((2, *a.shape), a.dtype), layers[0])
    weights = pipeline.group_layers(abstract_params(config, jnp.bfloat16), config, 2, stacked)
    rows, scalar = jax.ShapeDtypeStruct((4,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
    args = (weights, jax.ShapeDtypeStruct((4, 16), jnp.int32), rows, jax.ShapeDtypeStruct((4,), jnp.bool_),
            scalar, jax.ShapeDtypeStruct((1,), jnp.int32), jax.eval_shape(lambda: gen.Sampling().arrays(4)),
            jax.eval_shape(lambda: jax.random.key(0)), rows)
    fn = functools.partial(gen._generate_ids.__wrapped__, model=gen.Llama(config, jnp.bfloat16, mesh),
                           cache_len=64, out_len=32, greedy=True, filters=())
    return fn, args, mesh, config


@pytest.mark.parametrize("platform, device_kind", [("rocm", "gfx942"), ("cuda", "NVIDIA H200")])
def test_pipelined_generate_lowers_for_gpu(platform, device_kind):
    """The pipelined generate lowers for AMD and NVIDIA GPUs on this CPU-only machine: lowering, not
    execution (see test_lowering.py)."""
    fn, args, mesh, _ = _pipelined_generate(device_kind)
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    assert "stablehlo.while" in text and "collective_permute" in text and "bf16" in text


def _pallas_calls(jaxpr, found=None) -> list:
    """Every `pallas_call` in `jaxpr` and the jaxprs inside it: (kernel name, operand shapes)."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            name = eqn.params.get("name_and_src_info", eqn.params.get("name"))  # jax versions differ
            found.append((str(name), [v.aval.shape for v in eqn.invars]))
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    _pallas_calls(sub.jaxpr, found)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    _pallas_calls(sub, found)
    return found


def test_attention_kernels_inside_stages_see_each_devices_heads():
    """Inside a stage, `tensor` is left to GSPMD, which cannot split a Pallas call: given the whole
    heads, XLA would gather q and the cache onto every GPU at every layer. The kernels run per device
    instead (a shard_map over `tensor` nested in the stage's), on half the heads at tensor=2."""
    fn, args, mesh, config = _pipelined_generate("NVIDIA H200")
    with jax.sharding.use_abstract_mesh(mesh):
        calls = _pallas_calls(jax.make_jaxpr(fn)(*args).jaxpr)
    attention = [(name, shapes) for name, shapes in calls if "attention" in name]
    assert {name.split(" ")[0] for name, _ in attention} >= {"flash_attention", "decode_attention_write"}
    for name, shapes in attention:
        q = next(shape for shape in shapes if len(shape) >= 3)  # q [B, T, H, D] (flash), qkv [B, KV, G + 2, D]
        if name.startswith("decode_attention_write"):  # (decode)
            assert q[1] == config.num_kv_heads // 2, (name, shapes)
        else:
            assert q[-2] == config.num_heads // 2, (name, shapes)
