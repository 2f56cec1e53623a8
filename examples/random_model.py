"""Writes a small random-weight Llama in Hugging Face layout, with a tokenizer trained on stdlib source.

    python examples/random_model.py OUT_DIR [--preset tiny] [--seed 0]

The folder holds what a published checkpoint holds (config.json, model.safetensors, tokenizer.model,
tokenizer_config.json, generation_config.json), so `llmjax convert` and `llmjax.load` take it like any
other. The weights are random: the text it generates is made of real tokens in no sensible order.
It needs only llmjax's own dependencies (no torch, no transformers).
"""

import argparse
import dataclasses
import pathlib
import sysconfig

import llmjax
from llmjax.convert.hf import save_hf
from llmjax.tokenizer import train_sentencepiece

STDLIB_FILES = ("json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "fractions.py")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    vocab = 1000
    try:  # before anything is written: a bad preset leaves no folder behind
        config = dataclasses.replace(llmjax.LlamaConfig.preset(args.preset), vocab_size=vocab,
                                     bos_token_id=1, eos_token_ids=(2,))
    except ValueError as e:
        parser.error(str(e))
    out = pathlib.Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    train_sentencepiece("".join((stdlib / f).read_text(encoding="utf-8") for f in STDLIB_FILES), out, vocab)
    params = llmjax.init_random(config, seed=args.seed, dtype="float32")
    save_hf(params.weights, config, out, dtype="float32")
    print(f"wrote a random {params.num_params / 1e6:.2f}M-parameter Llama to {out}")


if __name__ == "__main__":
    main()
