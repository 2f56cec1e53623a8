"""Writes a small random-weight Llama in Hugging Face layout, with a tokenizer trained on stdlib source.

    python examples/random_model.py OUT_DIR [--preset tiny] [--seed 0]

The folder holds what a published checkpoint holds (config.json, model.safetensors, tokenizer.model,
tokenizer_config.json, generation_config.json), so `llmjax convert` and `llmjax.load` take it like any
other. The weights are random: the text it generates is made of real tokens in no sensible order.
It needs only llmjax's own dependencies (no torch, no transformers).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sysconfig
import tempfile

import numpy as np
import sentencepiece as spm
from safetensors.numpy import save_file

import llmjax
from llmjax.convert.hf import to_hf_tensors


def train_tokenizer(out: pathlib.Path, vocab_size: int) -> None:
    """A Llama-style sentencepiece model (BPE, byte fallback) trained on a few stdlib modules."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text(encoding="utf-8") for name in
                   ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "fractions.py"))
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(text)
    spm.SentencePieceTrainer.train(
        input=f.name, model_prefix=str(out / "tokenizer"), vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        minloglevel=2)
    os.unlink(f.name)
    (out / "tokenizer.vocab").unlink()
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}, indent=2))


def hf_config(c: llmjax.LlamaConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
            "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.rms_norm_eps,
            "rope_theta": c.rope_theta, "hidden_act": "silu", "tie_word_embeddings": c.tie_word_embeddings,
            "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = 1000
    train_tokenizer(out, vocab)
    config = dataclasses.replace(llmjax.LlamaConfig.preset(args.preset), vocab_size=vocab,
                                 bos_token_id=1, eos_token_ids=(2,))
    params = llmjax.init_random(config, seed=args.seed, dtype="float32")
    tensors = {k: np.asarray(v) for k, v in to_hf_tensors(params.weights, config).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(config), indent=2))
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    print(f"wrote a random {params.num_params / 1e6:.2f}M-parameter Llama to {out}")


if __name__ == "__main__":
    main()
