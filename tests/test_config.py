"""LlamaConfig: presets, both spellings of Hugging Face's rope fields, refusals, full-size shapes."""

import copy
import dataclasses
import json

import pytest

from llmjax.config import PRESETS, LlamaConfig, RopeScaling
from llmjax.models import llama

from conftest import hf_config

CLASSIC = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
           "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}


def test_classic_and_transformers5_spellings_agree(tmp_path):
    classic = LlamaConfig.from_hf(CLASSIC)
    v5 = dict(CLASSIC)
    v5.pop("rope_theta")
    v5["rope_parameters"] = dict(v5.pop("rope_scaling"), rope_theta=500000.0)
    assert LlamaConfig.from_hf(v5) == classic
    assert classic == PRESETS["llama3.1-8b"]
    (tmp_path / "config.json").write_text(json.dumps(CLASSIC))
    assert LlamaConfig.from_hf(tmp_path) == classic
    assert LlamaConfig.from_hf(tmp_path / "config.json") == classic


def test_reads_what_transformers_writes():
    written = hf_config(num_key_value_heads=1, head_dim=24, tie_word_embeddings=True, attention_bias=True,
                        rope_scaling={"rope_type": "linear", "factor": 2.0}).to_dict()
    c = LlamaConfig.from_hf(written)
    assert (c.num_kv_heads, c.head_dim, c.tie_word_embeddings, c.attention_bias) == (1, 24, True, True)
    assert c.rope_scaling == RopeScaling("linear", 2.0)
    assert c.vocab_size == 1003 and c.num_heads == 6 and c.hidden_size == 96


def test_early_llama_configs_spelling_their_class_llama_load():
    assert LlamaConfig.from_hf(dict(CLASSIC, architectures=["LLaMAForCausalLM"])).num_layers == 32


def test_head_dim_and_kv_heads_default_from_heads():
    c = LlamaConfig.from_hf({k: v for k, v in CLASSIC.items() if k != "num_key_value_heads"})
    assert c.num_kv_heads == 32 and c.head_dim == 128


@pytest.mark.parametrize("change, field", [
    ({"model_type": "mixtral"}, "model_type"),
    ({"architectures": ["Qwen2ForCausalLM"]}, "architectures"),  # under model_type llama
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),  # no LM head
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "rope_scaling.rope_type='longrope'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "truncate": "no"}}, "rope_scaling.truncate must be true"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}}, "rope_scaling.beta_fast must be a number"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling.rope_type='dynamic'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "low_freq_factor"),
    ({"num_key_value_heads": 5}, "num_kv_heads"),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "quant_method 'gptq'"),
    ({"quantization_config": {"quant_method": "awq"}}, "convert the model's float release"),
])
def test_refuses_what_it_does_not_implement(change, field):
    with pytest.raises(ValueError, match=field.replace("[", r"\[")):
        LlamaConfig.from_hf({**CLASSIC, **change})


def test_a_sliding_window_within_the_context_is_refused():
    """transformers' Llama attends to the whole prompt but keeps only the window in its generation cache
    when `sliding_window` is set; llmjax attends to everything, so a window it could reach is refused."""
    with pytest.raises(ValueError, match="sliding_window=4096 limits attention to the last 4096 tokens, which llmjax "
                                         r"does not implement.*\(max_position_embeddings=131072\).*Remove sliding_window"):
        LlamaConfig.from_hf({**CLASSIC, "sliding_window": 4096})
    with pytest.raises(ValueError, match="sliding_window must be an integer >= 1"):
        LlamaConfig.from_hf({**CLASSIC, "sliding_window": "4096"})
    for harmless in (None, 131072, 200000):  # never reached: llmjax runs no longer than the context
        assert LlamaConfig.from_hf({**CLASSIC, "sliding_window": harmless}) == LlamaConfig.from_hf(CLASSIC)


def test_the_cache_window_is_read_as_transformers_reads_it():
    """transformers' Llama windows its generation cache where `layer_types` says ("sliding_attention":
    sliding_window, "chunked_attention": attention_chunk_size); without it, by sliding_window and then
    attention_chunk_size. A window it ignores is no reason to refuse the model."""
    full = ["full_attention"] * CLASSIC["num_hidden_layers"]
    assert LlamaConfig.from_hf({**CLASSIC, "sliding_window": 4096, "layer_types": full}) == LlamaConfig.from_hf(CLASSIC)
    for change, field in (({"attention_chunk_size": 8192}, "attention_chunk_size=8192"),
                          ({"sliding_window": 4096, "layer_types": ["sliding_attention", *full[1:]]}, "sliding_window=4096"),
                          ({"attention_chunk_size": 8192, "layer_types": ["chunked_attention"] * len(full)},
                           "attention_chunk_size=8192")):
        remove = field.split("=")[0] + (" and layer_types" if "layer_types" in change else "")
        with pytest.raises(ValueError, match=f"{field} limits attention to the last.*Remove {remove} \\(or"):
            LlamaConfig.from_hf({**CLASSIC, **change})
    assert LlamaConfig.from_hf({**CLASSIC, "sliding_window": 200000, "attention_chunk_size": 8}) == \
        LlamaConfig.from_hf(CLASSIC)  # sliding_window first: the chunk size is not read
    with pytest.raises(ValueError, match="layer_types names windowed layers, but sliding_window is not set"):
        LlamaConfig.from_hf({**CLASSIC, "layer_types": ["sliding_attention"] * len(full)})
    with pytest.raises(ValueError, match="layer_types=.*'linear_attention'.* is not supported"):
        LlamaConfig.from_hf({**CLASSIC, "layer_types": ["linear_attention"] * len(full)})


def test_swish_is_silu():
    assert LlamaConfig.from_hf({**CLASSIC, "hidden_act": "swish"}) == LlamaConfig.from_hf(CLASSIC)


def test_refuses_unknown_rope_in_transformers5_spelling():
    bad = dict({k: v for k, v in CLASSIC.items() if k != "rope_scaling"},
               rope_parameters={"rope_type": "longrope", "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_parameters.rope_type='longrope'"):
        LlamaConfig.from_hf(bad)


def test_rope_scaling_beside_rope_parameters_wins_as_in_transformers():
    """A user stretching the context of a config that transformers 5 wrote adds `rope_scaling` next to
    its `rope_parameters`; transformers then reads `rope_scaling`, and so must llmjax."""
    import transformers

    written = hf_config().to_dict()
    assert written["rope_parameters"]["rope_type"] == "default"
    stretched = dict(written, rope_scaling={"rope_type": "linear", "factor": 4.0})
    theirs = transformers.LlamaConfig.from_dict(stretched).rope_parameters
    ours = LlamaConfig.from_hf(stretched)
    assert (theirs["rope_type"], theirs["factor"]) == ("linear", 4.0)
    assert ours.rope_scaling == RopeScaling("linear", 4.0) and ours.rope_theta == theirs["rope_theta"]
    with pytest.raises(ValueError, match="rope_scaling.rope_type='dynamic'"):
        LlamaConfig.from_hf(dict(written, rope_scaling={"rope_type": "dynamic", "factor": 4.0}))
    # transformers takes theta from rope_scaling or the top level, never from the block beside them
    llama3 = dict(written, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    linear = {"rope_type": "linear", "factor": 2.0}
    for agreed in (dict(llama3, rope_scaling=dict(linear, rope_theta=500000.0)),
                   dict(llama3, rope_scaling=linear, rope_theta=500000.0),
                   dict(written, rope_parameters={"rope_type": "default"}, rope_scaling=linear, rope_theta=5000.0),
                   dict(llama3, rope_scaling=dict(linear, rope_theta=7000.0))):  # rope_scaling's own theta
        theirs = transformers.LlamaConfig.from_dict(copy.deepcopy(agreed)).rope_parameters  # it edits the dicts
        assert LlamaConfig.from_hf(agreed).rope_theta == theirs["rope_theta"]
    for torn in (dict(llama3, rope_scaling=linear), dict(llama3, rope_scaling=linear, rope_theta=5000.0)):
        theirs = transformers.LlamaConfig.from_dict(copy.deepcopy(torn)).rope_parameters["rope_theta"]
        with pytest.raises(ValueError, match=f"rope_theta from rope_scaling or the top level \\({theirs:g} here\\), "
                                             "not rope_parameters' 500000.0; put the rope_theta meant"):
            LlamaConfig.from_hf(torn)


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": "4096"}, "hidden_size must be an integer >= 1, got '4096'"),
    ({"num_attention_heads": 0}, "num_attention_heads must be an integer >= 1, got 0"),
    ({"rms_norm_eps": "tiny"}, "rms_norm_eps must be a number > 0"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps must be a number > 0"),
    ({"rope_theta": "ten thousand"}, "rope_theta must be a number > 0"),
    ({"rope_scaling": "linear"}, "rope_scaling must be an object"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 0}}, "rope_scaling.factor must be a number > 0"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false, got 'false'"),
    ({"attention_bias": 1}, "attention_bias must be true or false"),
    ({"eos_token_id": "</s>"}, "eos_token_id '</s>' is not a token id"),
    ({"bos_token_id": 128256}, r"bos_token_id 128256 is not a token id of the vocabulary \[0, 128256\)"),
])
def test_fields_of_the_wrong_type_are_named(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        LlamaConfig.from_hf({**CLASSIC, **change})


def test_missing_field_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="'vocab_size' is missing"):
        LlamaConfig.from_hf({k: v for k, v in CLASSIC.items() if k != "vocab_size"})
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlamaConfig.from_hf(tmp_path)


def test_config_is_frozen_hashable_and_replaceable():
    tiny = LlamaConfig.preset("tiny")
    assert hash(tiny) == hash(dataclasses.replace(tiny))
    assert dataclasses.replace(PRESETS["llama2-7b"], num_layers=2).num_layers == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        tiny.num_layers = 3
    with pytest.raises(ValueError, match="unknown preset"):
        LlamaConfig.preset("llama9-1t")


@pytest.mark.parametrize("name, count", [
    ("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320), ("llama2-70b", 68_976_648_192),
    ("codellama-34b", 33_743_970_304), ("llama3-8b", 8_030_261_248), ("llama3-70b", 70_553_706_496),
    ("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496)])
def test_full_presets_have_their_published_parameter_counts(name, count):
    # jax.eval_shape: the full-size model is traced, no memory allocated.
    assert llama.count_params(llama.abstract_params(LlamaConfig.preset(name))) == count


def test_every_weight_declares_logical_axes_of_its_rank():
    import jax

    config = LlamaConfig.preset("tiny")
    shapes, axes = llama.abstract_params(config), llama.logical_axes(config)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=is_spec)
    leaves = zip(jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=is_spec))
    assert all(len(shape.shape) == len(spec) for shape, spec in leaves)
    assert axes["layer_0"]["attn"]["qkv"]["kernel"] == jax.sharding.PartitionSpec("kv_heads", "qkv", "head_dim", "embed")
    assert axes["layer_1"]["mlp"]["down"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")


@pytest.mark.parametrize("name", list(PRESETS))
def test_to_hf_round_trips_every_preset(name):
    config = PRESETS[name]
    assert LlamaConfig.from_hf(config.to_hf()) == config
    variant = dataclasses.replace(config, rope_scaling=RopeScaling("linear", 2.0), tie_word_embeddings=True,
                                  attention_bias=True, eos_token_ids=())
    assert LlamaConfig.from_hf(json.loads(json.dumps(variant.to_hf()))) == variant
