"""Model configuration: one frozen dataclass, named presets, and a reader for Hugging Face `config.json`.

The config is hashable so it can be a static argument of `jax.jit`. It describes the architecture only;
the weights' dtype travels with the weights. Anything `from_hf` does not understand is refused with an
error that names the field, rather than guessed at: a model that loads but computes something else is
the worst outcome.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

from llmjax.files import hub_cache_hint, read_json

ROPE_TYPES = ("default", "llama3", "linear", "yarn")
# The fields of each type that `to_hf` writes (the others keep their defaults).
_ROPE_FIELDS = {"linear": ("factor",),
                "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                         "attention_factor", "truncate")}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Frequency scaling of rotary embeddings: Llama 3.1's `llama3` type, plain `linear`, or `yarn`
    (YaRN: frequencies between `beta_fast` and `beta_slow` rotations over the original context blend
    from kept to divided by `factor`, and the rotated q and k are multiplied by `attention_factor`)."""

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    # Rows of the embedding and LM head: vocab_size, or more when a tensor-parallel mesh needs the
    # vocabulary split evenly (llmjax.sharding.fit_config). Logits keep vocab_size columns.
    padded_vocab_size: int | None = None

    @property
    def embedding_rows(self) -> int:
        return self.padded_vocab_size or self.vocab_size

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.padded_vocab_size is not None and self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"LlamaConfig.padded_vocab_size={self.padded_vocab_size} is below "
                             f"vocab_size={self.vocab_size}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"LlamaConfig: num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}; grouped-query attention needs whole groups")
        object.__setattr__(self, "eos_token_ids", tuple(self.eos_token_ids))
        ids = [("eos_token_id", t) for t in self.eos_token_ids] + (
            [] if self.bos_token_id is None else [("bos_token_id", self.bos_token_id)])
        for name, value in ids:
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < self.vocab_size:
                raise ValueError(f"LlamaConfig: {name} {value!r} is not a token id of the vocabulary [0, "
                                 f"{self.vocab_size}); fix it in config.json (or generation_config.json)")

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def preset(cls, name: str) -> "LlamaConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    def to_hf(self) -> dict[str, Any]:
        """The Hugging Face `config.json` of this config (classic rope spelling); `from_hf` inverts it."""
        eos = self.eos_token_ids
        hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
              "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
              "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
              "head_dim": self.head_dim, "max_position_embeddings": self.max_position_embeddings,
              "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
              "tie_word_embeddings": self.tie_word_embeddings, "attention_bias": self.attention_bias,
              "mlp_bias": self.mlp_bias, "bos_token_id": self.bos_token_id,
              "eos_token_id": eos[0] if len(eos) == 1 else (list(eos) or None)}
        if self.rope_scaling is not None:
            scaling = self.rope_scaling
            hf["rope_scaling"] = {"rope_type": scaling.rope_type,
                                  **{k: getattr(scaling, k) for k in _ROPE_FIELDS[scaling.rope_type]}}
        return hf

    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | dict[str, Any]) -> "LlamaConfig":
        """Reads a Hugging Face Llama `config.json` (a file, the folder holding it, or its dict)."""
        hf = _read_json_config(path_or_dict)
        return _from_hf_dict(hf)


def _read_json_config(path_or_dict) -> dict[str, Any]:
    if isinstance(path_or_dict, dict):
        return path_or_dict
    path, hint = os.fspath(path_or_dict), ""
    if os.path.isdir(path):
        path, hint = os.path.join(path, "config.json"), hub_cache_hint(path)  # models--org--name: its snapshot
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json at {path}: point at a Hugging Face model folder{hint}")
    return read_json(path)


def _from_hf_dict(hf: dict[str, Any]) -> LlamaConfig:
    model_type = hf.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(
            f"config.json: model_type={model_type!r} is not supported; llmjax runs model_type 'llama' "
            "(Llama 2, Code Llama, Llama 3, Llama 3.1 and models of the same architecture)")
    architectures = hf.get("architectures") or ["LlamaForCausalLM"]
    if "llamaforcausallm" not in {str(name).lower() for name in architectures}:  # early ones: LLaMAForCausalLM
        raise ValueError(
            f"config.json: architectures={architectures!r} is not supported; llmjax runs LlamaForCausalLM "
            "(a Llama language model with its LM head)")
    quantized = hf.get("quantization_config")
    if quantized:  # GPTQ, AWQ, bitsandbytes, fp8...: weights stored in another tool's format
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else quantized
        raise ValueError(
            f"config.json: quantization_config (quant_method {method!r}) marks weights another tool quantized, "
            "which llmjax does not read; convert the model's float release (bfloat16, float16 or float32) "
            "instead, with `llmjax convert --quant int4-g128` (or int8) to quantize it")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):  # (transformers' name for the same function)
        raise ValueError(f"config.json: hidden_act={act!r} is not supported; Llama uses 'silu'")
    context = _int(hf, "max_position_embeddings", 2048)
    for field, window in _cache_windows(hf):
        if window < context:  # (a Mistral model relabelled Llama, say)
            raise ValueError(
                f"config.json: {field}={window} limits attention to the last {window} tokens, which llmjax does "
                f"not implement: its Llama attends to the whole context (max_position_embeddings={context}), as "
                "transformers' LlamaForCausalLM does in a forward pass, though it windows its cache when it "
                f"generates. Remove {field}{' and layer_types' if 'layer_types' in hf else ''} (or set it to null) to "
                "attend to the whole context")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads"):
        if field not in hf:
            raise ValueError(f"config.json: required field {field!r} is missing")
        _int(hf, field)
    num_heads = hf["num_attention_heads"]
    head_dim = _int(hf, "head_dim") or hf["hidden_size"] // num_heads
    theta, scaling = _rope_from_hf(hf)
    eos = hf.get("eos_token_id", 2)
    return LlamaConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=_int(hf, "num_key_value_heads") or num_heads,
        head_dim=head_dim,
        max_position_embeddings=_int(hf, "max_position_embeddings", 2048),
        rms_norm_eps=_positive_float(hf, "rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=_bool(hf, "tie_word_embeddings"),
        attention_bias=_bool(hf, "attention_bias"),
        mlp_bias=_bool(hf, "mlp_bias"),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
    )


def _cache_windows(hf: dict[str, Any]) -> list[tuple[str, int]]:
    """The windows transformers' Llama keeps in its generation cache, as (field, tokens): `layer_types`
    chooses the layers' kinds where given (all "full_attention": no window, whatever sliding_window
    says), else sliding_window, then attention_chunk_size."""
    fields = {"sliding_attention": "sliding_window", "chunked_attention": "attention_chunk_size"}
    types = hf.get("layer_types")
    if types is None:
        names = [name for name in fields.values() if hf.get(name) is not None][:1]
    else:
        if not isinstance(types, list) or any(t not in ("full_attention", *fields) for t in types):
            raise ValueError(f"config.json: layer_types={types!r} is not supported; llmjax's Llama runs "
                             "'full_attention' layers")
        names = sorted({fields[t] for t in types if t in fields})
    windows = [(name, _int(hf, name)) for name in names]
    missing = [name for name, window in windows if window is None]
    if missing:
        raise ValueError(f"config.json: layer_types names windowed layers, but {missing[0]} is not set; restore "
                         "it from the model's release")
    return windows


def _int(block: dict, key: str, default=None, where: str = "") -> int | None:
    """`block[key]`, which must be an integer >= 1 when present (else `default`)."""
    value = block.get(key)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"config.json: {where}{key} must be an integer >= 1, got {value!r}; restore it from "
                         "the model's release")
    return value


def _positive_float(block: dict, key: str, default: float, where: str = "") -> float:
    value = block.get(key)
    value = default if value is None else value
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"config.json: {where}{key} must be a number > 0, got {value!r}; restore it from the "
                         "model's release")
    return float(value)


def _bool(block: dict, key: str) -> bool:
    value = block.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):  # a string "false" would read as true
        raise ValueError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Both spellings: transformers 5's `rope_parameters` block, or classic `rope_theta`/`rope_scaling`.
    With both, `rope_scaling` wins where it is set, as transformers reads them (a user stretching the
    context of a model saved by transformers 5 adds it next to the block). transformers then takes
    rope_theta from `rope_scaling` or the top level (10000 if neither has it), never from the block; a
    block whose theta differs from that is refused rather than read one way or the other."""
    for field in ("rope_parameters", "rope_scaling"):
        if hf.get(field) is not None and not isinstance(hf[field], dict):
            raise ValueError(f"config.json: {field} must be an object (or null), got {hf[field]!r}")
    block = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling"):
        params, field = dict(hf["rope_scaling"]), "rope_scaling"
    else:
        params, field = dict(block), "rope_parameters" if block else "rope_scaling"
    theta_block = params if "rope_theta" in params else hf
    theta = _positive_float(theta_block, "rope_theta", 10000.0, "" if theta_block is hf else f"{field}.")
    if hf.get("rope_scaling") and "rope_theta" not in params and block.get("rope_theta", theta) != theta:
        raise ValueError(
            f"config.json: rope_scaling beside rope_parameters makes transformers read rope_theta from "
            f"rope_scaling or the top level ({theta:g} here), not rope_parameters' {block['rope_theta']!r}; put "
            "the rope_theta meant into rope_scaling, or keep one of the two blocks")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"config.json: {field}.rope_type={rope_type!r} is not supported; llmjax implements "
            f"{', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    if "factor" not in params:
        raise ValueError(f"config.json: {field} of type {rope_type!r} needs a 'factor'")
    where = f"{field}."
    if rope_type == "linear":
        return theta, RopeScaling("linear", _positive_float(params, "factor", 1.0, where))
    # transformers takes the pretraining length from the top level where it is set there, else from
    # the block, else max_position_embeddings
    max_positions = _int(hf, "max_position_embeddings", 2048)
    original = (_int(hf, "original_max_position_embeddings")
                or _int(params, "original_max_position_embeddings", where=where) or max_positions)
    if rope_type == "yarn":
        return theta, _yarn_from_hf(params, where, original, max_positions)
    missing = [k for k in ("low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        raise ValueError(f"config.json: {field} of type 'llama3' lacks {', '.join(missing)}")
    return theta, RopeScaling(
        "llama3", _positive_float(params, "factor", 1.0, where), _positive_float(params, "low_freq_factor", 1.0, where),
        _positive_float(params, "high_freq_factor", 1.0, where), original)


def _yarn_from_hf(params: dict[str, Any], where: str, original: int, max_positions: int) -> RopeScaling:
    """YaRN's block as transformers reads it: a null `factor` is the ratio of the context lengths, and
    an absent `attention_factor` follows from the factor (and `mscale`/`mscale_all_dim` where both are set)."""
    factor = (max_positions / original if params["factor"] is None
              else _positive_float(params, "factor", 1.0, where))

    def mscale(scale: float) -> float:
        return 1.0 if factor <= 1 else 0.1 * scale * math.log(factor) + 1.0

    if params.get("attention_factor") is not None:
        attention = _positive_float(params, "attention_factor", 1.0, where)
    elif params.get("mscale") and params.get("mscale_all_dim"):
        attention = (mscale(_positive_float(params, "mscale", 1.0, where))
                     / mscale(_positive_float(params, "mscale_all_dim", 1.0, where)))
    else:
        attention = mscale(1.0)
    truncate = params.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ValueError(f"config.json: {where}truncate must be true or false, got {truncate!r}")
    return RopeScaling("yarn", factor, original_max_position_embeddings=original,
                       beta_fast=_positive_float(params, "beta_fast", 32.0, where),
                       beta_slow=_positive_float(params, "beta_slow", 1.0, where),
                       attention_factor=attention, truncate=truncate)


_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)
_LLAMA3 = dict(vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
               bos_token_id=128000, eos_token_ids=(128001,))
_LLAMA31 = dict(_LLAMA3, max_position_embeddings=131072, eos_token_ids=(128001, 128008, 128009),
                rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
_SHAPE_7B = dict(hidden_size=4096, num_layers=32, num_heads=32, head_dim=128)
_SHAPE_70B = dict(hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
                  num_kv_heads=8, head_dim=128)

PRESETS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(**_LLAMA2, **_SHAPE_7B, intermediate_size=11008, num_kv_heads=32),
    "llama2-13b": LlamaConfig(**_LLAMA2, hidden_size=5120, intermediate_size=13824, num_layers=40,
                              num_heads=40, num_kv_heads=40, head_dim=128),
    "llama2-70b": LlamaConfig(**_LLAMA2, **_SHAPE_70B),
    "codellama-34b": LlamaConfig(**dict(_LLAMA2, vocab_size=32000, max_position_embeddings=16384),
                                 rope_theta=1e6, hidden_size=8192, intermediate_size=22016,
                                 num_layers=48, num_heads=64, num_kv_heads=8, head_dim=128),
    "llama3-8b": LlamaConfig(**_LLAMA3, **_SHAPE_7B, intermediate_size=14336, num_kv_heads=8),
    "llama3-70b": LlamaConfig(**_LLAMA3, **_SHAPE_70B),
    "llama3.1-8b": LlamaConfig(**_LLAMA31, **_SHAPE_7B, intermediate_size=14336, num_kv_heads=8),
    "llama3.1-70b": LlamaConfig(**_LLAMA31, **_SHAPE_70B),
    # Odd, distinct sizes so that a transposed or mixed-up axis fails loudly in tests.
    "tiny": LlamaConfig(vocab_size=515, hidden_size=96, intermediate_size=200, num_layers=2,
                        num_heads=6, num_kv_heads=2, head_dim=16, max_position_embeddings=256),
}
