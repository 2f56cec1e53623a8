"""The explicit map between Hugging Face Llama tensor names and llmjax weight paths.

One `Entry` per Hugging Face tensor: its name and shape (as `config.json` implies), its path in the
llmjax weights dict, its shape there, and, for a tensor that is one slot of a fused llmjax weight,
that slot. Both sides store projections output first (`[out, in]`), so every conversion is a reshape:
llmjax gives heads their own axes (`o`: `[D, H, head_dim]`) so einsums and sharding rules can name
them, and fuses q/k/v into `qkv` `[KV, H/KV + 2, head_dim, D]` (per kv head: its query heads, its
key, its value) and gate/up into `gate_up` `[2, F, D]`.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from llmjax.config import LlamaConfig

# Present in some older checkpoints, recomputed by every implementation: skipped, never an error.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


@dataclasses.dataclass(frozen=True)
class Entry:
    hf_name: str
    path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]  # this tensor's shape in llmjax
    fused_shape: tuple[int, ...] | None = None  # the whole fused weight this tensor is a slot of
    slot: tuple[int, int] | None = None  # [start, stop) along the fused weight's slot axis
    slot_axis: int = 0

    def to_llmjax(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(self.shape)

    def to_hf(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(self.hf_shape)

    @property
    def index(self) -> tuple:
        """Where this tensor sits in its fused weight (numpy indexing); `()` for a whole weight."""
        if self.slot is None:
            return ()
        return (slice(None),) * self.slot_axis + (slice(*self.slot),)


def _same(hf_name, path, shape) -> Entry:
    return Entry(hf_name, path, tuple(shape), tuple(shape))


def _projection(hf_prefix, path, out_shape, in_shape, bias, fused_out=None, slot=None,
                slot_axis=0) -> list[Entry]:
    """A projection: HF `[prod(out), prod(in)]` (and bias `[prod(out)]`) <-> llmjax `[*out, *in]`;
    with `fused_out`, the slot `slot` (along `slot_axis`) of a fused weight `[*fused_out, *in]`."""
    out_shape, in_shape = tuple(out_shape), tuple(in_shape)
    fused_kernel = None if fused_out is None else tuple(fused_out) + in_shape
    entries = [Entry(f"{hf_prefix}.weight", path + ("kernel",), (math.prod(out_shape), math.prod(in_shape)),
                     out_shape + in_shape, fused_kernel, slot, slot_axis)]
    if bias:
        entries.append(Entry(f"{hf_prefix}.bias", path + ("bias",), (math.prod(out_shape),), out_shape,
                             fused_out, slot, slot_axis))
    return entries


def _layer(c: LlamaConfig, i: int) -> list[Entry]:
    d, f, hd, n_kv = c.hidden_size, c.intermediate_size, c.head_dim, c.num_kv_heads
    g = c.num_heads // n_kv
    p, key = f"model.layers.{i}", f"layer_{i}"
    ab, mb = c.attention_bias, c.mlp_bias
    qkv, attn = (n_kv, g + 2, hd), (key, "attn", "qkv")
    gate_up, mlp = (2, f), (key, "mlp", "gate_up")
    return [
        _same(f"{p}.input_layernorm.weight", (key, "attn_norm", "scale"), (d,)),
        *_projection(f"{p}.self_attn.q_proj", attn, (n_kv, g, hd), (d,), ab, fused_out=qkv, slot=(0, g),
                     slot_axis=1),
        *_projection(f"{p}.self_attn.k_proj", attn, (n_kv, 1, hd), (d,), ab, fused_out=qkv,
                     slot=(g, g + 1), slot_axis=1),
        *_projection(f"{p}.self_attn.v_proj", attn, (n_kv, 1, hd), (d,), ab, fused_out=qkv,
                     slot=(g + 1, g + 2), slot_axis=1),
        *_projection(f"{p}.self_attn.o_proj", (key, "attn", "o"), (d,), (c.num_heads, hd), ab),
        _same(f"{p}.post_attention_layernorm.weight", (key, "mlp_norm", "scale"), (d,)),
        *_projection(f"{p}.mlp.gate_proj", mlp, (1, f), (d,), mb, fused_out=gate_up, slot=(0, 1)),
        *_projection(f"{p}.mlp.up_proj", mlp, (1, f), (d,), mb, fused_out=gate_up, slot=(1, 2)),
        *_projection(f"{p}.mlp.down_proj", (key, "mlp", "down"), (d,), (f,), mb),
    ]


def name_map(config: LlamaConfig) -> list[Entry]:
    """Every tensor a Hugging Face `LlamaForCausalLM` checkpoint of this config must hold, in order."""
    c = config
    entries = [_same("model.embed_tokens.weight", ("embed", "embedding"), (c.vocab_size, c.hidden_size))]
    for i in range(c.num_layers):
        entries += _layer(c, i)
    entries.append(_same("model.norm.weight", ("final_norm", "scale"), (c.hidden_size,)))
    if not c.tie_word_embeddings:
        entries += _projection("lm_head", ("lm_head",), (c.vocab_size,), (c.hidden_size,), False)
    return entries


def is_ignorable(hf_name: str, config: LlamaConfig) -> bool:
    # A tied checkpoint may still carry lm_head.weight (a copy of the embedding); the model reads the
    # embedding, so the copy is skipped.
    return bool(IGNORED.fullmatch(hf_name)) or (config.tie_word_embeddings and hf_name == "lm_head.weight")
