"""Trains tiny-stdlib, llmjax's bundled demo model: a small Llama on the Python standard library's source.

    python examples/train_tiny.py prepare WORK          # any machine, ~20 s: split, tokenizer, token ids
    python examples/train_tiny.py train WORK OUT        # a GPU, minutes: AdamW, then OUT in HF layout
    python examples/train_tiny.py card WORK OUT         # (re)score OUT on the held-out files, model card

`prepare` reads every `*.py` file of the running interpreter's standard library (not site-packages, not
pydoc_data, which is prose), holds out 5% of the files (those whose path hashes lowest), trains an
8000-piece sentencepiece tokenizer on the rest, and writes the token ids of both sets. The two steps are
separate so the corpus can come from one Python (the CPU machines' 3.11, which CI also has) and the
training run from another machine. `train` needs `optax` (`pip install -e ".[train]"`).

Training sees windows of the token stream that begin at the start of a random line, with BOS in front:
the model learns to continue code from any line after BOS, which is how `generate` prompts it. The model card in OUT records the data, the size, the steps and the held-out perplexity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import platform
import shutil
import sys
import sysconfig
import time

import numpy as np

HELD_OUT = 0.05
VOCAB = 8000
SKIP = ("site-packages/", "pydoc_data/")
CONFIG = dict(vocab_size=VOCAB, hidden_size=256, intermediate_size=672, num_layers=8, num_heads=8,
              num_kv_heads=4, head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,))


def stdlib_files() -> tuple[pathlib.Path, list[str]]:
    """The standard library folder and its UTF-8 `*.py` files (relative POSIX paths, sorted)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(SKIP):
            continue
        try:
            path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately in other encodings
        files.append(rel)
    return root, files


def split(files: list[str]) -> tuple[list[str], list[str]]:
    """(train, held out): the 5% of files whose path has the lowest SHA-256 are held out."""
    ranked = sorted(files, key=lambda f: hashlib.sha256(f.encode()).hexdigest())
    held = set(ranked[:round(HELD_OUT * len(files))])
    return [f for f in files if f not in held], [f for f in files if f in held]


def prepare(work: pathlib.Path) -> None:
    from llmjax.tokenizer import train_sentencepiece

    root, files = stdlib_files()
    train_files, held_files = split(files)
    text = {f: (root / f).read_text(encoding="utf-8") for f in files}
    t0 = time.time()
    tok = train_sentencepiece("".join(text[f] for f in train_files), work / "tokenizer", VOCAB,
                              add_prefix_space=False)
    print(f"tokenizer: {VOCAB} pieces in {time.time() - t0:.1f} s")
    for name, subset in (("train", train_files), ("heldout", held_files)):
        ids = [[tok.bos_id] + tok.encode(text[f], add_special_tokens=False) + [tok.eos_id] for f in subset]
        np.save(work / f"{name}.npy", np.concatenate(ids).astype(np.uint16))
        print(f"{name}: {len(subset)} files, {sum(map(len, ids))} tokens, "
              f"{sum(len(text[f]) for f in subset)} characters")
    meta = {"python": platform.python_version(), "stdlib": str(root), "train": train_files,
            "heldout": {f: hashlib.sha256(text[f].encode()).hexdigest() for f in held_files}}
    (work / "heldout.json").write_text(json.dumps({f: text[f] for f in held_files}))
    (work / "files.json").write_text(json.dumps(meta, indent=1))


def train(work: pathlib.Path, out: pathlib.Path, steps: int, batch: int, seq: int, lr: float,
          seed: int, eval_files: int | None = None) -> None:
    import jax
    import jax.numpy as jnp
    import optax

    import llmjax
    from llmjax.convert.hf import save_hf
    from llmjax.models import llama

    config = llmjax.LlamaConfig(**CONFIG)
    model = llama.Llama(config)
    stream = jnp.asarray(np.load(work / "train.npy").astype(np.int32))
    held = np.load(work / "heldout.npy").astype(np.int32)
    weights = llama.init_params(config, jax.random.key(seed), jnp.float32)
    n_params = llama.count_params(weights)
    print(f"{n_params / 1e6:.2f}M parameters; {stream.size} training tokens; "
          f"{steps * batch * seq / stream.size:.1f} epochs", flush=True)

    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(500, steps // 10), steps, lr / 10)
    decay = jax.tree.map(lambda w: w.ndim >= 2, weights)
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay))
    state = opt.init(weights)
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))

    def loss_fn(weights, windows):
        bf16 = jax.tree.map(lambda w: w.astype(jnp.bfloat16), weights)  # bf16 compute, fp32 master
        logits, _ = model.apply({"params": bf16}, windows[:, :-1], positions)
        return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:]).mean()

    # Windows start where a line starts: the token cut to make room for BOS is a newline (or a BOS).
    newline = llmjax.Tokenizer.from_dir(work / "tokenizer").encode("\n", add_special_tokens=False)
    host = np.asarray(stream)
    cuts = np.flatnonzero(np.isin(host, newline[-1:] + [config.bos_token_id]))
    cuts = jnp.asarray(cuts[cuts < stream.size - seq - 1])

    @jax.jit
    def step(weights, state, key):
        starts = cuts[jax.random.randint(key, (batch,), 0, cuts.size)]
        windows = stream[starts[:, None] + jnp.arange(seq + 1)].at[:, 0].set(config.bos_token_id)
        loss, grads = jax.value_and_grad(loss_fn)(weights, windows)
        updates, state = opt.update(grads, state, weights)
        return optax.apply_updates(weights, updates), state, loss

    @jax.jit
    def eval_loss(weights, windows):
        return loss_fn(weights, windows)

    # A fixed held-out probe for the log: non-overlapping windows, BOS first.
    n_probe = min(held.size // (seq + 1), 64) // batch * batch
    probe = held[:n_probe * (seq + 1)].reshape(n_probe, seq + 1).copy()
    probe[:, 0] = config.bos_token_id
    log = []
    key = jax.random.key(seed + 1)
    t0 = time.time()
    for i in range(1, steps + 1):
        weights, state, loss = step(weights, state, jax.random.fold_in(key, i))
        if i % 250 == 0 or i == steps:
            held_loss = float(np.mean([eval_loss(weights, probe[j:j + batch])
                                       for j in range(0, n_probe, batch)]))
            log.append({"step": i, "train_loss": float(loss), "heldout_loss": held_loss,
                        "seconds": round(time.time() - t0, 1)})
            print(json.dumps(log[-1]), flush=True)
    train_s = time.time() - t0

    out.mkdir(parents=True, exist_ok=True)
    save_hf(weights, config, out, dtype="bfloat16")
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy2(work / "tokenizer" / name, out / name)
    summary = {"parameters": n_params, "steps": steps, "batch": batch, "seq": seq, "lr": lr, "seed": seed,
               "train_tokens": int(stream.size), "train_seconds": round(train_s, 1),
               "device": jax.devices()[0].device_kind, "log": log}
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    card(work, out, eval_files)


def card(work: pathlib.Path, out: pathlib.Path, eval_files: int | None = None) -> None:
    """Scores the saved model on the held-out files and writes its model card (README.md) into OUT."""
    import llmjax

    params = llmjax.load(out)  # what users get: the bf16 checkpoint through the public load path
    held_texts = list(json.loads((work / "heldout.json").read_text()).values())[:eval_files]
    ppl = llmjax.perplexity(params, held_texts)
    print(f"held-out perplexity of the saved bf16 model: {ppl}", flush=True)
    sample = llmjax.generate(params, "def fibonacci(n):", max_new_tokens=64)
    summary = json.loads((out / "training.json").read_text())
    meta = json.loads((work / "files.json").read_text())
    summary.update(heldout_tokens=ppl.tokens, heldout_perplexity=round(ppl.perplexity, 3),
                   python=meta["python"], heldout_files=meta["heldout"])
    (out / "training.json").write_text(json.dumps(summary, indent=1))
    (out / "README.md").write_text(model_card(summary, meta, params.config, sample))
    print(f"wrote {out}")


def model_card(s: dict, meta: dict, config, sample: str) -> str:
    held = "\n".join(f"- `{f}` {digest}" for f, digest in meta["heldout"].items())
    c = config
    return f"""# tiny-stdlib

llmjax's demo model: a {s['parameters'] / 1e6:.2f}M-parameter Llama trained on the source code of Python {meta['python']}'s standard library.
It writes Python-looking code and knows nothing else.
Load it with `llmjax.load("tiny-stdlib")`; `llmjax generate` and `llmjax perplexity` use it when no `--model` is given.

## Model
- Architecture: llmjax's Llama: {c.num_layers} layers, hidden size {c.hidden_size}, MLP {c.intermediate_size}, {c.num_heads} query heads and {c.num_kv_heads} key/value heads of {c.head_dim}, tied embeddings, RoPE theta {c.rope_theta:g}, context {c.max_position_embeddings}.
  Stored in bfloat16 in Hugging Face layout (`transformers` loads it too).
- Tokenizer: sentencepiece BPE with {c.vocab_size} pieces, byte fallback, digits split, whitespace kept and no prefix space (a line encodes the same at the start of a text as after a newline) (`llmjax.tokenizer.train_sentencepiece`), trained on the training files only.

## Data
Every `*.py` file of the standard library that reads as UTF-8, except `site-packages/` and `pydoc_data/`: {len(meta['train'])} training files ({s['train_tokens']} tokens) and {len(meta['heldout'])} held-out files ({s['heldout_tokens']} tokens).
The held-out files are the 5% whose relative path has the lowest SHA-256; they are listed below with the SHA-256 of their text.

## Training
{s['steps']} steps of AdamW (betas 0.9/0.95, weight decay 0.1, peak learning rate {s['lr']:g}, warmup then cosine decay to a tenth, gradient clip 1.0).
Batch {s['batch']} x {s['seq']} tokens, each window BOS then the text from the start of a random line; bfloat16 compute with float32 weights; seed {s['seed']}.
That is {s['steps'] * s['batch'] * s['seq'] / 1e6:.0f}M tokens ({s['steps'] * s['batch'] * s['seq'] / s['train_tokens']:.1f} epochs) in {s['train_seconds']:.0f} s on one {s['device']}.
The loss curve is in `training.json`.

## Evaluation
Held-out perplexity of this bfloat16 checkpoint (`llmjax.perplexity`, window 1024, stride 512): **{s['heldout_perplexity']:.3f}** over {s['heldout_tokens']} tokens.

Greedy continuation of `def fibonacci(n):`:

```python
def fibonacci(n):{sample}
```

## Reproduce
```bash
pip install -e ".[train]"
python examples/train_tiny.py prepare /tmp/tiny-work            # on Python {meta['python']}
python examples/train_tiny.py train /tmp/tiny-work llmjax/assets/tiny-stdlib --steps {s['steps']} --lr {s['lr']:g}
```
The corpus depends on the Python version that runs `prepare`.
The training run is not bitwise reproducible across GPUs.

## Held-out files
{held}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="corpus split, tokenizer and token ids into WORK")
    p.add_argument("work", type=pathlib.Path)
    t = sub.add_parser("train", help="train on WORK's tokens and write the model to OUT")
    t.add_argument("work", type=pathlib.Path)
    t.add_argument("out", type=pathlib.Path)
    t.add_argument("--steps", type=int, default=4000)
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--seq", type=int, default=1024)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-files", type=int, default=None, help="score only the first N held-out files "
                   "(quick trial runs; the model card's figure scores all)")
    c = sub.add_parser("card", help="score OUT's model on WORK's held-out files and write its model card")
    c.add_argument("work", type=pathlib.Path)
    c.add_argument("out", type=pathlib.Path)
    args = parser.parse_args()
    if args.command == "prepare":
        args.work.mkdir(parents=True, exist_ok=True)
        prepare(args.work)
    elif args.command == "card":
        card(args.work, args.out)
    else:
        train(args.work, args.out, args.steps, args.batch, args.seq, args.lr, args.seed, args.eval_files)


if __name__ == "__main__":
    sys.exit(main())
