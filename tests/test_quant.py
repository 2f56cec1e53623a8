"""Weight-only quantization end to end: quantize/dequantize error bounds, the quantized model against
the model it dequantizes to, `convert --quant` round trips, the sharding rules on 8 CPU devices,
`bench --dtype int4-g128`, and the demo model's perplexity at int4-g128."""

import dataclasses
import importlib
import json
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import llmjax
from llmjax import bench, cli
from llmjax.models import llama
from llmjax.quant import (QuantizedWeight, QuantScheme, dequantize_int4, dequantize_int8, dequantize_params,
                          quantize, quantize_int4, quantize_int8, quantize_params)
from llmjax.quant.weights import pack_int4, unpack_int4
from llmjax.sharding import make_mesh, rules

from conftest import hf_config, needs_devices, save_hf_model

gen = importlib.import_module("llmjax.generate")
PROMPTS = [[1, 17, 300, 5, 9], [1, 800], [1, 4, 4, 4, 900, 12, 33]]
SLACK = 1 + 2**-8  # scales are rounded to bf16 (half an ulp: 2**-8 relative) before the codes are chosen


def _groups(w, group):
    return np.asarray(w, np.float32).reshape(*w.shape[:-1], -1, group)


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_error_is_bounded_and_no_worse_than_plain_rounding(group):
    w = np.array(jax.random.normal(jax.random.key(group), (6, 3, 256)))  # out dims (6, 3), K 256
    w[0, 0, :group] = 0.0  # an all-zero group
    w[1, 2, 5] = 40.0  # an outlier
    q = quantize_int4(w, num_out_dims=2, group_size=group)
    assert q.values.shape == (6, 3, 32) and q.values.dtype == jnp.uint32 and q.scales.shape == (6, 3, 256 // group)
    back = np.asarray(dequantize_int4(q)).reshape(w.shape)
    err, amax = _groups(back - w, group), np.abs(_groups(w, group)).max(-1, keepdims=True)
    # the worst case is clipping the extreme to 7 s with s = max|w| / 8, rounded down: 7 s * 2**-8 more
    assert np.all(np.abs(err) <= amax / 8 * (1 + 7 * 2**-8))
    assert np.all(back[0, 0, :group] == 0)
    # the scale search never does worse, per group, than the plain grid max|w| / 7
    plain_s = np.asarray(jnp.asarray(amax / 7, jnp.bfloat16), np.float32)
    plain = np.clip(np.round(_groups(w, group) / np.where(plain_s == 0, 1, plain_s)), -8, 7) * plain_s
    assert np.all((err ** 2).sum(-1) <= ((plain - _groups(w, group)) ** 2).sum(-1) * (1 + 1e-6) + 1e-12)


def test_int4_asymmetric_and_int8_errors_are_bounded():
    w = np.asarray(jax.random.normal(jax.random.key(7), (10, 384))) + 0.7  # skewed: zero points help
    q = quantize_int4(w, num_out_dims=1, group_size=64, symmetric=False)
    codes = np.asarray(unpack_int4(q.values, 64))
    assert codes.min() >= 0 and codes.max() <= 15 and q.zeros.shape == q.scales.shape
    zeros = np.asarray(q.zeros, np.float32)
    assert np.all((zeros == np.round(zeros)) & (zeros >= 0) & (zeros <= 15))
    lo, hi = np.minimum(_groups(w, 64).min(-1), 0), np.maximum(_groups(w, 64).max(-1), 0)
    err = np.abs(_groups(np.asarray(dequantize_int4(q)) - w, 64)).max(-1)
    assert np.all(err <= (hi - lo) / 15 * SLACK)  # half a step, plus half a step where the zero rounds
    q8 = quantize_int8(w, num_out_dims=1)
    assert q8.values.dtype == jnp.int8 and q8.scales.shape == (10,)
    err8 = np.abs(np.asarray(dequantize_int8(q8)) - w).max(-1)
    assert np.all(err8 <= np.abs(w).max(-1) / 254 * SLACK)


def test_quantize_refuses_axis_counts_outside_the_kernel_and_non_bool_flags():
    w = np.asarray(jax.random.normal(jax.random.key(1), (8, 64)))
    for n in (0, 2, 3, 1.0):  # 0: one row for the whole kernel; 2 and more: each weight its own scale
        for call in (lambda: quantize(w, "int8", num_out_dims=n), lambda: quantize_int8(w, num_out_dims=n),
                     lambda: quantize_int4(w, num_out_dims=n, group_size=32)):
            with pytest.raises(ValueError, match=rf"num_out_dims must count the output axes of a kernel.*\(8, 64\).*"
                                                 rf"from 1 to 1.*got {n}"):
                call()
    with pytest.raises(ValueError, match="symmetric must be True or False, got 'no'"):
        quantize_int4(w, num_out_dims=1, group_size=32, symmetric="no")
    assert quantize_int4(w, num_out_dims=1, group_size=32, symmetric=np.bool_(False)).zeros is not None


def test_packing_round_trips_and_interleaves_within_groups():
    codes = jax.random.randint(jax.random.key(3), (5, 2, 256), 0, 16).astype(jnp.uint32)
    for group in (32, 64, 128):
        words = pack_int4(codes, group)
        assert words.shape == (5, 2, 32)
        np.testing.assert_array_equal(np.asarray(unpack_int4(words, group)), np.asarray(codes))
    # input j*W + i of a group is nibble j of the group's word i (W = group / 8)
    w = np.asarray(pack_int4(codes, 128))[0, 0]
    c = np.asarray(codes)[0, 0]
    assert (w[128 // 8 + 3] >> 8) & 0xF == c[128 + 2 * 16 + 3]


def test_schemes_and_group_fallback():
    for name in ("int4-g128", "int4-g64", "int4-g32", "int4-g128-asym", "int8"):
        assert QuantScheme.parse(name).name == name
    with pytest.raises(ValueError, match="int4-g128, int4-g64"):
        QuantScheme.parse("int4-g100")
    s = QuantScheme.parse("int4-g128")
    assert s.group_for(4096) == 128 and s.group_for(672) == 32 and s.group_for(192) == 64
    assert not s.quantizes(200) and QuantScheme.parse("int8").quantizes(200)
    # a float, a bool for a number or a string for a flag is refused, not read as the nearest scheme
    for kwargs, match in ((dict(bits=4.0, group_size=128), "bits must be an int, got 4.0"),
                          (dict(bits=4, group_size=128.0), "group_size must be an int, got 128.0"),
                          (dict(bits=4, group_size=128, symmetric="no"), "symmetric must be True or False"),
                          (dict(bits=8, lm_head=1), "lm_head must be True or False, got 1")):
        with pytest.raises(ValueError, match=match):
            QuantScheme(**kwargs)
    # numpy's integers and bools are Python's, so the scheme equals the parsed one and its manifest writes
    numpy_scheme = QuantScheme(np.int64(4), np.int32(128), symmetric=np.bool_(True))
    assert numpy_scheme == s and json.loads(json.dumps(numpy_scheme.to_json())) == s.to_json()
    # quantize takes a scheme's name as quantize_params does, and refuses anything else by name
    w = jax.random.normal(jax.random.key(0), (4, 64))
    assert np.array_equal(quantize(w, "int4-g128").values, quantize(w, s).values)
    assert quantize(w, "int8").bits == 8
    with pytest.raises(ValueError, match="scheme must be a QuantScheme or one of its names.*got 8"):
        quantize(w, 8)
    # the demo model's down projection (width 672) gets group 32; its other projections group 128
    demo = llmjax.LlamaConfig.from_hf(llmjax.files.resolve("tiny-stdlib"))  # wherever pytest runs from
    layer = llama.abstract_params(demo, quant=s)["layer_0"]
    assert layer["mlp"]["down"]["kernel"].group_size == 32 and layer["attn"]["o"]["kernel"].group_size == 128


@pytest.fixture(scope="module")
def folder(tmp_path_factory, sp_dir):
    """A float32 model whose widths (hidden 128, MLP 256, 4 heads of 32) tensor 2 and 4 split into whole groups."""
    folder = tmp_path_factory.mktemp("qhf")
    save_hf_model(folder, hf_config(vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                    num_key_value_heads=2, attention_bias=True, max_position_embeddings=64),
                  seed=11, tokenizer_dir=sp_dir)
    return folder


@pytest.fixture(scope="module")
def float_params(folder):
    return llmjax.load(folder)


def _logits(params):
    return np.asarray(llmjax.logits(params, jnp.asarray(gen._pad(PROMPTS, 8))))


@pytest.mark.parametrize("scheme", ["int4-g32", "int4-g128-asym", "int8"])
def test_quantized_model_matches_the_model_it_dequantizes_to(float_params, scheme):
    q = quantize_params(float_params, scheme)
    kernel = q.weights["layer_1"]["mlp"]["gate_up"]["kernel"]
    assert isinstance(kernel, QuantizedWeight) and q.quant.name == scheme and scheme in repr(q)
    assert q.num_params == float_params.num_params
    d = dequantize_params(q)
    assert d.quant is None and d.weights["layer_1"]["mlp"]["gate_up"]["kernel"].shape == (2, 256, 128)
    want = _logits(d)
    np.testing.assert_allclose(_logits(q), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(_logits(float_params) - want).max() > 1e-3  # quantization did change the model
    if scheme == "int4-g32":
        assert llmjax.generate(q, PROMPTS, max_new_tokens=8) == llmjax.generate(d, PROMPTS, max_new_tokens=8)
    # In another dtype, every weight is in it (the embedding, norms and biases were left as stored).
    half = dequantize_params(q, "bfloat16")
    assert {x.dtype for x in jax.tree.leaves(half.weights)} == {jnp.dtype("bfloat16")} and half.dtype == "bfloat16"


@needs_devices(8)
def test_quantized_model_on_every_mesh_gives_the_single_device_result(float_params):
    q = quantize_params(float_params, "int4-g32")
    want, tokens = _logits(q), llmjax.generate(q, PROMPTS, max_new_tokens=8)
    for data, tensor in ((8, 1), (2, 4)):  # rows split over data; tensor 4 repeats each of the 2 kv heads
        p = llmjax.shard(q, make_mesh(tensor=tensor, data=data))
        np.testing.assert_allclose(_logits(p), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert llmjax.generate(p, PROMPTS, max_new_tokens=8) == tokens
    layer = p.weights["layer_0"]
    specs = {"qkv": P("tensor", None, None, None), "o": P(None, "tensor"), "gate_up": P(None, "tensor", None),
             "down": P(None, "tensor")}
    for name, kernel in (("qkv", layer["attn"]["qkv"]["kernel"]), ("o", layer["attn"]["o"]["kernel"]),
                         ("gate_up", layer["mlp"]["gate_up"]["kernel"]), ("down", layer["mlp"]["down"]["kernel"])):
        assert kernel.values.sharding.spec == specs[name] and kernel.scales.sharding.spec == specs[name], name
    with pytest.raises(ValueError, match=r"would cut int4 groups of 128.*one of \[1\].*int4-g64 or int4-g32"):
        llmjax.shard(quantize_params(float_params, "int4-g128"), make_mesh(tensor=2, data=4))
    with pytest.raises(ValueError, match=r"quantize with int4-g64-asym or int4-g32-asym"):  # zero points kept
        llmjax.shard(quantize_params(float_params, "int4-g128-asym"), make_mesh(tensor=2, data=4))


@pytest.mark.parametrize("call, match", [
    (lambda p: quantize_params(p, None), "scheme must be a QuantScheme or one of its names"),
    (lambda p: quantize_params(p, 4), r"\(int4-g128, int4-g64, int4-g32, int8; int4 also takes -asym\), got 4"),
    (lambda p: quantize_params("tiny-stdlib", "int8"), "params must be llmjax Params"),
    (lambda p: dequantize_params(quantize_params(p, "int8"), "int8"), "dtype 'int8' is not supported; choose one"),
    (lambda p: dequantize_params(quantize_params(p, "int8"), "foo"), "dtype 'foo' is not supported; choose one"),
    (lambda p: quantize_params(llmjax.init_random(dataclasses.replace(p.config, tie_word_embeddings=True),
                                                  dtype="float32"), QuantScheme(4, 32, lm_head=True)),
     "lm_head=True: this model ties its LM head to the embedding table.*leave lm_head off"),
    (lambda p: llmjax.load("tiny-stdlib", dtype="int4-g128"), "loading never quantizes.*llmjax convert --quant"),
    (lambda p: quantize_params(quantize_params(p, "int4-g32"), "int8"),
     r"already quantized \(int4-g32\); quantize the float model \(llmjax.load of its unquantized checkpoint\)"),
    (lambda p: dequantize_params(p), "not quantized; dequantize_params takes quantized params"),
])
def test_quantize_params_names_bad_input(float_params, call, match):
    with pytest.raises(ValueError, match=match):
        call(float_params)


@needs_devices(8)
@pytest.mark.parametrize("scheme, tensor", [("int4-g128", 4), ("int4-g32", 8), ("int4-g128", 2), ("int4-g64", 8)])
def test_a_refused_tensor_degree_names_degrees_and_group_sizes_that_run(scheme, tensor):
    """Every degree and group size the message offers is one the model then runs with (the demo
    model: 8 query heads, 4 kv heads, MLP width 672, which int4-g128 already takes in groups of 32)."""
    from llmjax.files import resolve
    from llmjax.quant.tree import check_mesh
    from llmjax.sharding.mesh import fit_config

    config = llmjax.LlamaConfig.from_hf(resolve("tiny-stdlib"))
    mesh = lambda t: make_mesh(tensor=t, data=8 // t)  # noqa: E731
    with pytest.raises(ValueError, match="would cut int4 groups") as error:
        check_mesh(config, QuantScheme.parse(scheme), mesh(tensor))
    message = str(error.value)
    degrees = [int(t) for t in re.search(r"one of \[([\d, ]*)\]", message).group(1).split(",")]
    assert 1 in degrees
    for t in degrees:
        fit_config(config, mesh(t))
        check_mesh(config, QuantScheme.parse(scheme), mesh(t))
    for group in re.findall(r"int4-g\d+", message.split("quantize with")[1]):
        check_mesh(config, QuantScheme.parse(group), mesh(tensor))


@needs_devices(8)
def test_quantized_model_under_pipeline_stages_gives_the_single_device_result(float_params):
    """Each stage's quantized products run per device: whole with data parallelism, split over
    `tensor` (a shard_map nested in the stage's) with tensor parallelism inside the stages."""
    q = quantize_params(float_params, "int4-g32")
    want, tokens = _logits(q), llmjax.generate(q, PROMPTS, max_new_tokens=8)
    reference = _logits(dequantize_params(q))
    for data, tensor in ((4, 1), (2, 2)):
        p = llmjax.shard(q, make_mesh(stage=2, tensor=tensor, data=data))
        down = p.weights["stages"]["layer_0"]["mlp"]["down"]["kernel"]
        assert isinstance(down, QuantizedWeight) and down.values.sharding.spec == P("stage", None, "tensor")
        np.testing.assert_allclose(_logits(p), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        assert llmjax.generate(p, PROMPTS, max_new_tokens=8) == tokens  # microbatched decode
        assert llmjax.generate(p, PROMPTS[1], max_new_tokens=8) == tokens[1]  # batch 1: the stages in turn
        # the float reference dequantizes in the pipeline's layout, each weight where the rules put it
        d = dequantize_params(p)
        assert d.quant is None and d.mesh is p.mesh
        for w, s in zip(jax.tree.leaves(d.weights), jax.tree.leaves(rules.weight_shardings(d.config, d.mesh))):
            assert w.sharding == s
        np.testing.assert_allclose(_logits(d), reference, rtol=1e-5, atol=1e-5 * np.abs(reference).max())


@needs_devices(8)
@pytest.mark.parametrize("layers", [5, 6])
def test_quantized_stages_of_three_layers_with_tensor_parallelism_generate(layers):
    """Three layers a stage (six, or five and a padding layer), tensor parallel inside: XLA's
    partitioner refused generate's loop when the stage index came from `axis_index`."""
    config = llmjax.LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_layers=layers,
                                num_heads=4, num_kv_heads=2, head_dim=32, max_position_embeddings=64,
                                eos_token_ids=())
    q = quantize_params(llmjax.init_random(config, seed=3, dtype="float32"), "int8")
    prompts = [[1, 5, 9], [1, 6], [1, 7, 9, 11]]
    tokens = llmjax.generate(q, prompts, max_new_tokens=4)
    p = llmjax.shard(q, make_mesh(stage=2, tensor=2, data=2))
    assert llmjax.generate(p, prompts, max_new_tokens=4) == tokens
    assert llmjax.generate(p, prompts[0], max_new_tokens=4) == tokens[0]


@needs_devices(8)
def test_random_quantized_weights_under_stages_equal_the_single_device_ones():
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_heads=8, num_kv_heads=2, hidden_size=128,
                                 head_dim=16, intermediate_size=256, num_layers=4, eos_token_ids=())
    staged = llmjax.init_random(config, dtype="int4-g32", mesh=make_mesh(stage=2, data=4))
    whole = llmjax.init_random(config, dtype="int4-g32")
    assert staged.quant == whole.quant
    for j in range(2):
        for stage in range(2):
            mine = jax.tree.leaves(jax.tree.map(lambda w: np.asarray(w)[stage], staged.weights["stages"][f"layer_{j}"]))
            assert all(np.array_equal(a, np.asarray(b)) for a, b in
                       zip(mine, jax.tree.leaves(whole.weights[f"layer_{2 * stage + j}"])))


@needs_devices(8)
def test_random_quantized_weights_are_made_in_their_shardings():
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_heads=8, num_kv_heads=2, hidden_size=128,
                                 head_dim=16, intermediate_size=256, eos_token_ids=())
    p = llmjax.init_random(config, dtype="int4-g32", mesh=make_mesh(tensor=4, data=2))
    down = p.weights["layer_0"]["mlp"]["down"]["kernel"]
    assert p.quant.name == "int4-g32" and down.values.dtype == jnp.uint32
    assert down.values.sharding.spec == P(None, "tensor") and down.values.addressable_shards[0].data.shape == (128, 8)
    assert np.isfinite(np.asarray(llmjax.logits(p, [1, 5, 9]))).all()


@pytest.mark.parametrize("seed", range(6))
def test_departures_name_each_projection_whose_group_is_not_the_schemes(seed, tmp_path, capsys):
    """`departures` says what the model does: random widths, against the groups `abstract_params` gives
    each projection; `convert --quant` prints them (the demo model's down projection takes groups of 32)."""
    from llmjax.quant.tree import departures

    rng = np.random.default_rng(seed)
    heads = int(rng.choice([2, 3, 4]))
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_heads=heads, num_kv_heads=1,
                                 head_dim=int(rng.choice([16, 24, 32, 48, 64])), hidden_size=int(rng.choice([64, 96, 128, 160])),
                                 intermediate_size=int(rng.choice([100, 192, 256, 288, 384])))
    for name in ("int4-g128", "int4-g64", "int4-g32", "int8"):
        scheme = QuantScheme.parse(name, lm_head=True)
        abstract = llama.abstract_params(config, quant=scheme)
        kernels = {"q/k/v": abstract["layer_0"]["attn"]["qkv"], "o": abstract["layer_0"]["attn"]["o"],
                   "gate/up": abstract["layer_0"]["mlp"]["gate_up"], "down": abstract["layer_0"]["mlp"]["down"],
                   "lm_head": abstract["lm_head"]}
        want = []
        for part, kernel in ((k, v["kernel"]) for k, v in kernels.items()):
            if not isinstance(kernel, QuantizedWeight):
                want.append((part, "stays in floating point"))
            elif kernel.bits == 4 and kernel.group_size != scheme.group_size:
                want.append((part, f"takes int4 groups of {kernel.group_size},"))
        got = departures(config, scheme)
        assert len(got) == len(want), (name, got, want)
        assert all(line.startswith(f"{part} (input width ") and text in line for line, (part, text) in zip(got, want))
    if seed == 0:
        capsys.readouterr()
        assert cli.main(["convert", "tiny-stdlib", str(tmp_path / "q"), "--quant", "int4-g128"]) == 0
        assert ("int4-g128: down (input width 672) takes int4 groups of 32, the largest that divides it"
                in capsys.readouterr().err)


def test_departures_takes_a_schemes_name_as_quantize_params_does():
    """The README's `llmjax.quant.tree.departures(config, scheme)` with a name, as `quantize_params` takes."""
    from llmjax.quant.tree import departures

    config = llmjax.load("tiny-stdlib").config
    for name in ("int4-g128", "int4-g64-asym", "int8"):
        assert departures(config, name) == departures(config, QuantScheme.parse(name))
    assert departures(config, "int4-g128") == ["down (input width 672) takes int4 groups of 32, the largest "
                                               "that divides it"]
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        departures(config, "int4")
    with pytest.raises(ValueError, match="scheme must be a QuantScheme or one of its names"):
        departures(config, 4)


@pytest.fixture(scope="module")
def int4_checkpoint(folder, tmp_path_factory):
    """`folder` converted with `--quant int4-g32`."""
    ckpt = tmp_path_factory.mktemp("converted") / "int4"
    assert cli.main(["convert", str(folder), str(ckpt), "--quant", "int4-g32", "--quiet"]) == 0
    return ckpt


def test_convert_quant_round_trips(int4_checkpoint, folder, float_params, tmp_path, capsys):
    manifest = json.loads((int4_checkpoint / "llmjax.json").read_text())
    assert manifest["quant"] == {"bits": 4, "group_size": 32, "symmetric": True, "lm_head": False}
    p = llmjax.load(int4_checkpoint)
    assert p.quant.name == "int4-g32" and isinstance(p.weights["layer_0"]["attn"]["o"]["kernel"], QuantizedWeight)
    assert not isinstance(p.weights["lm_head"]["kernel"], QuantizedWeight)
    want = _logits(quantize_params(float_params, "int4-g32"))  # the same quantization, done in memory
    np.testing.assert_array_equal(_logits(p), want)
    head = tmp_path / "int8"
    assert cli.main(["convert", str(folder), str(head), "--quant", "int8", "--quant-lm-head", "--quiet"]) == 0
    p8 = llmjax.load(head, dtype="bfloat16")
    assert p8.weights["lm_head"]["kernel"].values.dtype == jnp.int8 and p8.dtype == jnp.bfloat16
    assert p8.weights["lm_head"]["kernel"].scales.dtype == jnp.bfloat16 and p8.quant.lm_head
    for argv, match in ((["--quant", "int5"], "unknown quantization 'int5'"),
                        (["--quant-lm-head"], "needs a quantization")):
        assert cli.main(["convert", str(folder), str(tmp_path / "bad"), *argv, "--quiet"]) == 2
        assert match in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_manifest_quantizing_the_lm_head_of_a_tied_model_is_refused(tmp_path):
    """`convert` will not quantize a tied head (it is the embedding, kept in floating point); a manifest
    edited to say it did would load params claiming a quantized head they do not have."""
    out = tmp_path / "int8"
    assert cli.main(["convert", "tiny-stdlib", str(out), "--quant", "int8", "--quiet"]) == 0
    manifest = json.loads((out / "llmjax.json").read_text())
    (out / "llmjax.json").write_text(json.dumps({**manifest, "quant": {**manifest["quant"], "lm_head": True}}))
    with pytest.raises(ValueError, match=r"llmjax.json quantizes the LM head \(lm_head true\), but its config.json "
                                         r"ties the LM head.*convert the model again"):
        llmjax.load(out)


@needs_devices(8)
def test_a_converted_int4_checkpoint_loads_on_a_mesh(int4_checkpoint, float_params):
    quant = llmjax.load(int4_checkpoint).quant
    want = _logits(quantize_params(float_params, "int4-g32"))
    for data, tensor in ((4, 2), (2, 4)):  # straight into the shardings; through the host (kv repeated)
        sharded = llmjax.load(int4_checkpoint, mesh=make_mesh(tensor=tensor, data=data))
        assert sharded.quant == quant
        np.testing.assert_allclose(_logits(sharded), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_bench_int4_counts_packed_bytes_and_scales():
    r = bench.bench("tiny", dtype="int4-g128", gen_len=16, repeats=1, bandwidth=1e11)
    assert "int4-g128" in r.report() and r.decode_tok_s > 0
    # tiny: hidden 96, 6 heads and 2 kv heads of 16, MLP 200, vocab 515, 2 layers. Width 96 takes group 32
    # (128 and 64 do not divide it); down's width 200 no group divides, so down stays bf16.
    qkv = 160 * 96 // 2 + 160 * 3 * 2  # [2 kv heads, 3 + 2, 16] outputs: codes, then scales
    o, gate_up = 96 * 96 // 2 + 96 * 3 * 2, 400 * 96 // 2 + 400 * 3 * 2
    layer = qkv + o + gate_up + 96 * 200 * 2 + 2 * 96 * 2
    head, final_norm, embedding_row = 515 * 96 * 2, 96 * 2, 96 * 2
    assert r.weight_bytes_per_step == 2 * layer + final_norm + head + embedding_row


@pytest.mark.slow
def test_demo_model_at_int4_g128_stays_within_5_percent_of_bf16_perplexity():
    from test_demo_model import RECORDED_PERPLEXITY, _heldout_texts

    texts = _heldout_texts()  # the held-out files the bf16 perplexity was recorded on
    q = quantize_params(llmjax.load("tiny-stdlib"), "int4-g128")
    ratio = llmjax.perplexity(q, texts).perplexity / RECORDED_PERPLEXITY
    assert 1.0 < ratio < 1.05, ratio


def test_quantize_params_warns_of_projections_left_in_floating_point():
    """`convert` prints which projections no int4 group divides; `quantize_params` warns of them, as its
    scheme's name says nothing of it (hidden 48: q/k/v, o and gate/up stay in floating point)."""
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), hidden_size=48, num_heads=3, num_kv_heads=1,
                                 head_dim=16, intermediate_size=128)
    params = llmjax.init_random(config, dtype="float32")
    with pytest.warns(UserWarning, match=r"quantize_params\('int4-g128'\): q/k/v \(input width 48\) stays in "
                                         r"floating point.*gate/up"):
        quantized = quantize_params(params, "int4-g128")
    assert isinstance(quantized.weights["layer_0"]["mlp"]["down"]["kernel"], QuantizedWeight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quantize_params(params, "int8")  # every width takes int8
