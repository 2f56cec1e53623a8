"""The `llmjax` command: `convert` a Hugging Face folder, `generate` text, score a text's `perplexity`,
`bench` decode speed.

Errors a user can fix (a missing file, a bad argument, an unsupported model) print one line naming the
problem and the fix, and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import sys

import jinja2

from llmjax.params import DEFAULT_MODEL


def _convert(args) -> None:
    from llmjax.convert.hf import convert

    out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                  progress=not args.quiet)
    print(f"wrote {out}", file=sys.stderr)


def _mesh(args):
    if args.tensor == args.stage == args.data == 1:
        return None
    from llmjax.sharding import make_mesh

    return make_mesh(tensor=args.tensor, stage=args.stage, data=args.data)


def _add_mesh_flags(parser) -> None:
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--stage", type=int, default=1, help="pipeline stages (must divide the layers)")
    parser.add_argument("--data", type=int, default=1, help="data-parallel degree")


def _generate(args) -> None:
    import llmjax

    params = llmjax.load(args.model, mesh=_mesh(args))
    prompt = args.prompt
    if args.chat:
        if params.tokenizer is None:
            raise ValueError(f"--chat needs a tokenizer with a chat template; {args.model} has no tokenizer")
        prompt = params.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    stream = llmjax.stream(params, prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           min_p=args.min_p, seed=args.seed, stop=args.stop or None)
    if not args.chat:
        print(args.prompt, end="", flush=True)
    for piece in stream:
        print(piece, end="", flush=True)
    print()
    s = stream.stats
    print(f"[prefill] {s.prompt_tokens} tokens in {s.prefill_s * 1e3:.1f} ms "
          f"({s.prompt_tokens / s.prefill_s:.1f} tok/s) | [decode] {s.new_tokens} tokens, "
          f"{s.decode_tok_s:.1f} tok/s | [compile] {s.compile_s:.1f} s", file=sys.stderr)


def _perplexity(args) -> None:
    import llmjax

    texts = []
    for path in args.text:
        with open(path, encoding="utf-8") as f:
            texts.append(f.read())
    params = llmjax.load(args.model, dtype=args.dtype)
    result = llmjax.perplexity(params, texts, window=args.window, stride=args.stride)
    chars = sum(len(t.encode("utf-8")) for t in texts)
    print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens of {len(texts)} file(s) "
          f"(nll {result.nll:.4f} nats/token, {result.nll * result.tokens / math.log(2) / chars:.4f} "
          "bits/byte)")


def _bench(args) -> None:
    from llmjax import bench

    options = dict(model=args.model, dtype=args.dtype, batch=args.batch, prompt_len=args.prompt_len,
                   gen_len=args.gen_len, repeats=args.repeats, compare_hf=args.compare_hf, mesh=_mesh(args))
    if args.sweep:
        key, values = bench.parse_sweep(args.sweep)
        results = bench.sweep(key, values, **options)
        path = args.plot or f"bench-{args.model}-{args.dtype}-{key}.png"
        bench.plot(results, key, path)
        print(f"plot: {path}", file=sys.stderr)
    else:
        results = [bench.bench(**options)]
        print(results[0].report())
    if args.json:
        bench.save_json(results, args.json)
        print(f"results: {args.json}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmjax", description="Llama inference with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert a Hugging Face Llama folder into an llmjax checkpoint",
                          description="Streams the safetensors of HF_DIR through llmjax's name map into "
                                      "an orbax checkpoint at OUT_DIR, with config and tokenizer files.")
    conv.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json and *.safetensors")
    conv.add_argument("out_dir", metavar="OUT_DIR", help="where to write the llmjax checkpoint")
    conv.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                      help="weight dtype to store (default: the checkpoint's own)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(run=_convert)

    gen = sub.add_parser("generate", help="stream a continuation of a prompt",
                         description="Loads a model, streams the continuation of --prompt, then prints "
                                     "prefill and decode speed to stderr.")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="llmjax checkpoint, Hugging Face folder or "
                     f"bundled model name (default: {DEFAULT_MODEL}, the bundled demo model)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--min-p", type=float, default=None)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_mesh_flags(gen)
    gen.set_defaults(run=_generate)

    ppl = sub.add_parser("perplexity", help="perplexity of a model on text files",
                         description="Scores every token of each --text file (each file on its own, in "
                                     "overlapping windows when longer than --window) and prints the "
                                     "pooled perplexity.")
    ppl.add_argument("--model", default=DEFAULT_MODEL, help="llmjax checkpoint, Hugging Face folder or "
                     f"bundled model name (default: {DEFAULT_MODEL})")
    ppl.add_argument("--text", required=True, action="append", metavar="FILE",
                     help="UTF-8 text file to score (repeatable)")
    ppl.add_argument("--window", type=int, default=None, help="tokens the model sees at once (default: "
                     "its context)")
    ppl.add_argument("--stride", type=int, default=None, help="new tokens scored per later window "
                     "(default: half the window)")
    ppl.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                     help="cast the weights (default: as stored)")
    ppl.set_defaults(run=_perplexity)

    b = sub.add_parser("bench", help="time decode on random weights against the bandwidth bound",
                       description="Times greedy generation on random weights of a preset: prefill, "
                                   "decode tok/s, bytes read per step, the HBM bandwidth measured in the "
                                   "same process and the fraction of the bound reached.")
    b.add_argument("--model", default="llama2-7b", help="a preset (llama2-7b, llama2-13b, llama3-8b, "
                   "tiny, ...; see llmjax.LlamaConfig.preset)")
    b.add_argument("--random-weights", action="store_true", default=True,
                   help="random weights of the preset (the only mode; accepted for clarity)")
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32", "int4-g128"])
    b.add_argument("--batch", type=int, default=1)
    b.add_argument("--prompt-len", type=int, default=8)
    b.add_argument("--gen-len", type=int, default=256)
    b.add_argument("--repeats", type=int, default=3, help="timed runs; medians are reported")
    _add_mesh_flags(b)
    b.add_argument("--compare-hf", action="store_true", help="also time Hugging Face transformers "
                   "(static cache, compiled) on the same shapes")
    b.add_argument("--json", metavar="FILE", help="save the results as JSON")
    b.add_argument("--sweep", metavar="NAME=V1,V2", help="run once per value, e.g. batch=1,8,32,64, and "
                   "draw a plot")
    b.add_argument("--plot", metavar="FILE.png", help="where --sweep draws its plot")
    b.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, jinja2.TemplateError) as e:  # OSError: FileNotFound, FileExists
        print(f"llmjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
