"""`llmjax.load`: a model folder in, a `Params` out (weights + config + tokenizer), ready for `generate`.

`load` reads an llmjax checkpoint (from `llmjax convert`) or a Hugging Face folder directly (converted
in memory through the same name map). `Params` is a pytree whose only leaves are the weights; the
config and tokenizer ride along as static metadata, so `jax.tree.map` and `jax.device_put` see weights.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import jax
import jax.numpy as jnp

from llmjax import checkpoint
from llmjax.config import LlamaConfig
from llmjax.convert.hf import DTYPES, read_hf_weights
from llmjax.files import read_json
from llmjax.models import llama
from llmjax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, eq=False)
class Params:
    weights: dict
    config: LlamaConfig
    tokenizer: Tokenizer | None = None

    @property
    def dtype(self):
        return self.weights["embed"]["embedding"].dtype

    @property
    def num_params(self) -> int:
        return llama.count_params(self.weights)

    def __repr__(self):
        tok = "no tokenizer" if self.tokenizer is None else f"tokenizer vocab {self.tokenizer.vocab_size}"
        return (f"Params({self.num_params / 1e6:.1f}M weights, {jnp.dtype(self.dtype).name}, "
                f"{self.config.num_layers} layers, {tok})")


jax.tree_util.register_dataclass(Params, data_fields=["weights"], meta_fields=["config", "tokenizer"])


ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
# Models that ship inside the package, by name; `load(name)` finds them wherever llmjax is installed.
BUNDLED = ("tiny-stdlib",)
DEFAULT_MODEL = "tiny-stdlib"


def resolve(path: str | os.PathLike) -> str:
    """The folder `load` reads: `path` itself, or a bundled model's folder when `path` is its name
    and no such file or folder exists (a folder of that name in the working directory wins)."""
    path = os.fspath(path)
    if path in BUNDLED and not os.path.exists(path):
        return os.path.join(ASSETS, path)
    return path


def load(path: str | os.PathLike, *, dtype: str | None = None) -> Params:
    """Loads an llmjax checkpoint, a Hugging Face Llama folder or a bundled model onto the first device.

    `path` is a folder, or the name of a model bundled with llmjax (`"tiny-stdlib"`, a 7.8M-parameter
    demo Llama trained on Python's standard library). `dtype` (`bfloat16`, `float16`, `float32`)
    casts the weights; by default they keep the stored dtype.
    """
    path = resolve(path)
    if dtype is not None:
        dtype = _dtype_name(dtype)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such model folder; give an llmjax checkpoint (made by "
                                "`llmjax convert`), a Hugging Face Llama folder, or a bundled model's "
                                f"name ({', '.join(BUNDLED)})")
    config = _with_generation_eos(LlamaConfig.from_hf(path), path)
    if checkpoint.is_checkpoint(path):
        stored = checkpoint.read_manifest(path)["dtype"]
        target = checkpoint.default_target(llama.abstract_params(config, jnp.dtype(stored)))
        weights = checkpoint.restore_weights(path, target)
    elif glob.glob(os.path.join(path, "*.safetensors")) or os.path.isfile(
            os.path.join(path, "model.safetensors.index.json")):
        weights = jax.device_put(read_hf_weights(path, config)[0], jax.local_devices()[0])
    else:
        raise FileNotFoundError(f"{path} holds config.json but no weights: neither an llmjax checkpoint "
                                "(llmjax.json) nor *.safetensors")
    if dtype is not None:
        weights = jax.tree.map(lambda w: w.astype(jnp.dtype(dtype)), weights)
    return Params(weights, config, Tokenizer.from_dir(path))


def _dtype_name(dtype) -> str:
    """`"bfloat16"`, `jnp.bfloat16` and `np.dtype("bfloat16")` alike, or a ValueError."""
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)} (or None "
                         "to keep the stored dtype)")
    return name


def _with_generation_eos(config: LlamaConfig, folder: str) -> LlamaConfig:
    """`generation_config.json`'s eos_token_id (often several ids) governs when generation stops."""
    eos = read_json(os.path.join(folder, "generation_config.json"), optional=True).get("eos_token_id")
    if eos is None:
        return config
    return dataclasses.replace(config, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))


def init_random(config: LlamaConfig | str, *, seed: int = 0, dtype: str = "bfloat16",
                tokenizer: Tokenizer | None = None) -> Params:
    """Random weights for a config or preset name: for benchmarks and tests."""
    if isinstance(config, str):
        config = LlamaConfig.preset(config)
    weights = llama.init_params(config, jax.random.key(seed), jnp.dtype(dtype))
    return Params(weights, config, tokenizer)
