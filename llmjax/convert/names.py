"""The explicit map between Hugging Face Llama tensor names and llmjax weight paths.

One `Entry` per tensor: its Hugging Face name and shape (as `config.json` implies), its path in the
llmjax weights dict, and the two reshapes between the layouts. Hugging Face stores a projection as
`[out, in]`; llmjax stores `[in..., out...]` with heads as their own axis (`q`: `[D, H, head_dim]`,
`o`: `[H, head_dim, D]`), so einsums and sharding rules can name them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import numpy as np

from llmjax.config import LlamaConfig

# Present in some older checkpoints, recomputed by every implementation: skipped, never an error.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    to_llmjax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(hf_name, path, shape) -> Entry:
    return Entry(hf_name, path, tuple(shape), lambda a: a, lambda a: a)


def _kernel(hf_name, path, in_shape, out_shape) -> Entry:
    """A projection: HF `[prod(out), prod(in)]` <-> llmjax `[*in_shape, *out_shape]`."""
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    shape = tuple(in_shape) + tuple(out_shape)
    return Entry(hf_name, path + ("kernel",), (n_out, n_in),
                 lambda a: a.T.reshape(shape), lambda a: a.reshape(n_in, n_out).T)


def _bias(hf_name, path, out_shape) -> Entry:
    out_shape = tuple(out_shape)
    return Entry(hf_name, path + ("bias",), (math.prod(out_shape),),
                 lambda a: a.reshape(out_shape), lambda a: a.reshape(-1))


def _projection(hf_prefix, path, in_shape, out_shape, bias) -> list[Entry]:
    entries = [_kernel(f"{hf_prefix}.weight", path, in_shape, out_shape)]
    if bias:
        entries.append(_bias(f"{hf_prefix}.bias", path, out_shape))
    return entries


def _layer(c: LlamaConfig, i: int) -> list[Entry]:
    d, f, hd = c.hidden_size, c.intermediate_size, c.head_dim
    p, key = f"model.layers.{i}", f"layer_{i}"
    ab, mb = c.attention_bias, c.mlp_bias
    return [
        _same(f"{p}.input_layernorm.weight", (key, "attn_norm", "scale"), (d,)),
        *_projection(f"{p}.self_attn.q_proj", (key, "attn", "q"), (d,), (c.num_heads, hd), ab),
        *_projection(f"{p}.self_attn.k_proj", (key, "attn", "k"), (d,), (c.num_kv_heads, hd), ab),
        *_projection(f"{p}.self_attn.v_proj", (key, "attn", "v"), (d,), (c.num_kv_heads, hd), ab),
        *_projection(f"{p}.self_attn.o_proj", (key, "attn", "o"), (c.num_heads, hd), (d,), ab),
        _same(f"{p}.post_attention_layernorm.weight", (key, "mlp_norm", "scale"), (d,)),
        *_projection(f"{p}.mlp.gate_proj", (key, "mlp", "gate"), (d,), (f,), mb),
        *_projection(f"{p}.mlp.up_proj", (key, "mlp", "up"), (d,), (f,), mb),
        *_projection(f"{p}.mlp.down_proj", (key, "mlp", "down"), (f,), (d,), mb),
    ]


def name_map(config: LlamaConfig) -> list[Entry]:
    """Every tensor a Hugging Face `LlamaForCausalLM` checkpoint of this config must hold, in order."""
    c = config
    entries = [_same("model.embed_tokens.weight", ("embed", "embedding"), (c.vocab_size, c.hidden_size))]
    for i in range(c.num_layers):
        entries += _layer(c, i)
    entries.append(_same("model.norm.weight", ("final_norm", "scale"), (c.hidden_size,)))
    if not c.tie_word_embeddings:
        entries += _projection("lm_head", ("lm_head",), (c.hidden_size,), (c.vocab_size,), False)
    return entries


def is_ignorable(hf_name: str, config: LlamaConfig) -> bool:
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding); the model reads the
    # embedding, so the copy is skipped.
    return bool(IGNORED.fullmatch(hf_name)) or (config.tie_word_embeddings and hf_name == "lm_head.weight")
