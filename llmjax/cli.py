"""The `llmjax` command: `convert` a Hugging Face folder, `generate` text, score a text's `perplexity`,
`bench` decode speed (or, with `--throughput`, the engine's requests per second).

Errors a user can fix (a missing file, a bad argument, an unsupported model) print one line naming the
problem and the fix, and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys

import jinja2

from llmjax.files import DEFAULT_MODEL, remove_tree, resolve
from llmjax.quant.weights import SCHEMES
from llmjax.throughput import BENCH_ENGINE

# int4 schemes take -asym (zero points); int8 is symmetric only
QUANT_METAVAR = "{" + ",".join(s for s in SCHEMES if s.startswith("int4")) + "}[-asym]|" + \
    "|".join(s for s in SCHEMES if not s.startswith("int4"))


def _convert(args) -> None:
    from llmjax.convert.hf import convert

    # SIGTERM (a job killed) unwinds like Ctrl-C while converting, so the partial output folder is removed.
    # Python runs the handler wherever the main thread is; where that is a finalizer or a callback that
    # swallows exceptions (jax's garbage-collection callback swallows a Ctrl-C), the conversion goes on:
    # the flag then removes the finished output instead.
    stopped = []

    def stop(number, frame):
        stopped.append(number)
        if number == signal.SIGINT:
            raise KeyboardInterrupt
        sys.exit(128 + number)

    before = {number: signal.signal(number, stop) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        out = convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
                      progress=not args.quiet, quant=args.quant, quant_lm_head=args.quant_lm_head)
        if stopped:
            remove_tree(out)  # (a second Ctrl-C waits for it)
            if stopped[0] == signal.SIGINT:
                raise KeyboardInterrupt
            sys.exit(128 + stopped[0])
    finally:
        for number, handler in before.items():
            signal.signal(number, handler)
    print(f"wrote {out}", file=sys.stderr)


def _mesh(args):
    if args.tensor == args.stage == args.data == 1:
        return None
    import jax

    from llmjax.sharding import make_mesh

    degrees = (args.tensor, args.stage, args.data)
    if min(degrees) >= 1 and math.prod(degrees) != jax.device_count():  # make_mesh names the rest
        raise ValueError(f"--data {args.data} x --stage {args.stage} x --tensor {args.tensor} = "
                         f"{args.data * args.stage * args.tensor}, but there are {jax.device_count()} devices; "
                         f"choose degrees whose product is {jax.device_count()}")
    return make_mesh(tensor=args.tensor, stage=args.stage, data=args.data)


def _check_tokenizer(model: str) -> None:
    """The CLI reads and writes text: a model folder without a tokenizer is refused before loading
    (a folder that is no model at all is left to `load`'s message)."""
    from llmjax.tokenizer import Tokenizer

    folder = resolve(model)
    if os.path.isfile(os.path.join(folder, "config.json")) and Tokenizer.from_dir(folder) is None:
        raise ValueError(f"{model} has no tokenizer (tokenizer.model or tokenizer.json), and the command line "
                         "works on text; copy the model's tokenizer files into the folder")


def _add_mesh_flags(parser) -> None:
    parser.add_argument("--tensor", type=int, default=1, help="tensor-parallel degree")
    parser.add_argument("--stage", type=int, default=1, help="pipeline stages (at most the layers; stages that hold fewer are padded)")
    parser.add_argument("--data", type=int, default=1, help="data-parallel degree")


class _OutputGone(Exception):
    """Standard output's reader went away (`llmjax generate ... | head`)."""


def _out(text: str, end: str = "\n") -> None:
    """Prints `text` to standard output at once; a reader that went away raises `_OutputGone`, which
    `main` ends quietly (a BrokenPipeError from anything else stays an error)."""
    try:
        print(text, end=end, flush=True)
    except BrokenPipeError:
        raise _OutputGone from None


def _command_line_text(flag: str, text: str) -> str:
    """`text` as given to `flag`, refused if it is not UTF-8: Python keeps a command line's undecodable
    bytes as lone surrogates, which the tokenizer would report in Python's terms."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        try:
            what = f"byte {text[e.start].encode('utf-8', 'surrogateescape')!r}"
        except UnicodeEncodeError:  # a surrogate no command line decodes to: text from Python
            what = f"the lone surrogate {text[e.start]!r}"
        raise ValueError(f"{flag} is not valid UTF-8 ({what} at character {e.start}); give UTF-8 text") from None
    return text


def _need_stdout(what: str) -> None:
    """Refuses a run started with standard output closed (`>&-`), whose `what` would go nowhere (print
    to a closed stdout is silently nothing, and the command would exit 0)."""
    if sys.stdout is None:
        raise ValueError(f"standard output is closed, so {what} would be lost; run with stdout open "
                         "(redirect it to a file to keep it)")


def _check_sampling_flags(args) -> None:
    """Refuses a sampling flag out of range by its name, before the model loads (minutes, for a large
    one, before `stream` would refuse it), and one that greedy decoding would ignore."""
    from llmjax.sampling import Sampling, check_seed

    for dest in ("temperature", "top_k", "top_p", "min_p", "seed"):
        value = getattr(args, dest)
        try:
            check_seed(value) if dest == "seed" else Sampling(**{dest: value})
        except ValueError as e:
            raise ValueError(f"--{dest.replace('_', '-')} {value}: {e}") from None
    given = [f"--{d.replace('_', '-')}" for d in ("top_k", "top_p", "min_p", "seed")
             if getattr(args, d) != (0 if d == "seed" else None)]
    if args.temperature == 0 and given:  # greedy takes the likeliest token, which every filter keeps
        it = "it" if len(given) == 1 else "them"
        raise ValueError(f"{', '.join(given)} {'shapes' if len(given) == 1 else 'shape'} sampling, and --temperature 0 "
                         f"(the default) is greedy, which ignores {it}; add --temperature (such as 0.8), or leave {it} out")


def _check_least(flag: str, value: int | None, least: int) -> None:
    """Refuses a count below `least` by its flag, before the model loads (`stream` and `perplexity`
    check it only after, by their argument's name)."""
    if value is not None and value < least:
        raise ValueError(f"{flag} takes an integer >= {least}, got {value}")


def _generate(args) -> None:
    import llmjax
    from llmjax.kernels import dispatch

    _need_stdout("the generated text")  # started with standard output closed: the text would go nowhere
    dispatch.refuse_x64()  # before the prompt is echoed
    dispatch.check_settings()  # a bad LLMJAX_* value, which tracing would find after the prompt is echoed
    _command_line_text("--prompt", args.prompt)
    for stop in args.stop or ():
        _command_line_text("--stop", stop)
    _check_sampling_flags(args)
    _check_least("--max-new-tokens", args.max_new_tokens, 1)
    _check_tokenizer(args.model)
    params = llmjax.load(args.model, dtype=args.dtype, mesh=_mesh(args))
    prompt = args.prompt
    if args.chat:
        # The template's ids as transformers gives them: BOS only where the template writes it.
        prompt = params.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True)
    stream = llmjax.stream(params, prompt, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                           min_p=args.min_p, seed=args.seed, stop=args.stop or None)
    if not args.chat:
        _out(args.prompt, end="")
    for piece in stream:
        _out(piece, end="")
    _out("")
    s = stream.stats
    speed = "" if math.isnan(s.decode_tok_s) else f", {s.decode_tok_s:.1f} tok/s"  # one token: no decode step
    print(f"[prefill] {s.prompt_tokens} tokens in {s.prefill_s * 1e3:.1f} ms "
          f"({s.prompt_tokens / s.prefill_s:.1f} tok/s) | [decode] {s.new_tokens} tokens{speed} | "
          f"[compile] {s.compile_s:.1f} s", file=sys.stderr)


def _perplexity(args) -> None:
    import llmjax
    from llmjax.scoring import scored_text

    _need_stdout("the perplexity")
    _check_least("--window", args.window, 2)  # BOS and a token to score
    _check_least("--stride", args.stride, 1)
    texts = []
    for path in args.text:
        try:
            with open(path, encoding="utf-8", newline="") as f:  # the file's own line endings, \r\n included
                texts.append(f.read())
        except UnicodeDecodeError as e:
            raise ValueError(f"--text {path} is not UTF-8 text ({e.reason} at byte {e.start}); give a "
                             "UTF-8 text file") from None
        except OSError as e:
            raise ValueError(f"--text {path}: {e.strerror or e}; give a UTF-8 text file") from None
        if not texts[-1]:  # it would count as a file scored, with no token in the result
            raise ValueError(f"--text {path} is empty, so it has nothing to score; leave it out")
    _check_tokenizer(args.model)
    params = llmjax.load(args.model, dtype=args.dtype, mesh=_mesh(args))
    # A file that opens with the BOS token written out has it read as BOS, as perplexity reads it, not
    # scored: those bytes are not counted in bits/byte, and a file of nothing else has nothing to score.
    chars = 0
    for path, text in zip(args.text, texts):
        scored = scored_text(params.tokenizer, text)
        if not scored:
            raise ValueError(f"--text {path} holds only the BOS token {text}, so it has nothing to score; leave "
                             "it out")
        chars += len(scored.encode("utf-8"))
    result = llmjax.perplexity(params, texts, window=args.window, stride=args.stride)
    _out(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens of {len(texts)} file(s) "
          f"(nll {result.nll:.4f} nats/token, {result.nll * result.tokens / math.log(2) / chars:.4f} "
          "bits/byte)")


def _plot_path(args) -> str | None:
    """The file the run draws its plot into: --plot, or a default name in the working folder (None for
    a run that draws none)."""
    if args.throughput:
        drawn = not args.no_mix and args.serving_requests > 0
        return (args.plot or f"serving-{args.model}-{args.dtype}.png") if drawn else None
    if args.sweep:
        return args.plot or f"bench-{args.model}-{args.dtype}-{_sweep_key(args.sweep)}.png"
    return None


def _sweep_key(spec: str) -> str:
    from llmjax import bench

    return bench.parse_sweep(spec)[0]


# `bench` flags that only one of its two modes reads (dest, as argparse names it): given to the other,
# they would be accepted and silently ignored.
_DECODE_ONLY = ("batch", "repeats", "sweep")
_THROUGHPUT_ONLY = ("requests", "no_mix", "serving_requests", "rates", "hf_requests", "hf_batch", "max_slots",
                    "page_size", "decode_steps", "prefill_tokens", "prefill_row", "kv_memory", "kv_dtype",
                    "no_overlap")


def _check_modes(args) -> None:
    """Refuses a `bench` flag that the run would ignore: a decode-bench flag with --throughput, a
    --throughput flag without it, serving settings that --no-mix or --serving-requests 0 skip, and the
    setting --sweep sweeps."""
    defaults = vars(_parser().parse_args(["bench"]))
    flag = lambda dest: "--" + dest.replace("_", "-")  # noqa: E731
    given = [d for d in (_DECODE_ONLY if args.throughput else _THROUGHPUT_ONLY) if getattr(args, d) != defaults[d]]
    if given:
        flags = ", ".join(map(flag, given))
        if args.throughput:
            raise ValueError(f"{flags} {'is' if len(given) == 1 else 'are'} for the decode bench, which "
                             "--throughput replaces; leave it out, or drop --throughput")
        raise ValueError(f"{flags} {'is' if len(given) == 1 else 'are'} for --throughput; add --throughput, "
                         "or leave it out")
    if args.throughput and args.rates and (args.no_mix or not args.serving_requests):
        raise ValueError("--rates sets the serving curve's arrival rates, which --no-mix or --serving-requests 0 "
                         "leaves out; drop one of them, or leave --rates out")
    if args.throughput and args.no_mix and args.serving_requests != defaults["serving_requests"]:
        raise ValueError("--serving-requests is for the serving curve, which --no-mix leaves out; drop one of them")
    key = _sweep_key(args.sweep) if args.sweep and not args.throughput else None
    if key and getattr(args, key) != defaults[key]:
        raise ValueError(f"{flag(key)} {getattr(args, key)} and --sweep {args.sweep} both set {key}, and the sweep's "
                         f"values would win; leave {flag(key)} out, or drop --sweep")
    hf = [flag(d) for d in ("hf_requests", "hf_batch") if getattr(args, d) != defaults[d]]
    if hf and not args.compare_hf:
        raise ValueError(f"{', '.join(hf)} {'sets' if len(hf) == 1 else 'set'} what --compare-hf gives transformers; "
                         "add --compare-hf, or leave it out")


def _check_outputs(args) -> None:
    """`--json` and `--plot` (or the plot's default file, in the working folder) checked before the
    work, not after it: a file path in a folder this user may write, a plot format matplotlib draws,
    and a plot the run draws."""
    plot = _plot_path(args)
    outputs = [("--json", args.json), ("--plot", args.plot)]
    if args.plot is None and plot is not None:
        outputs.append(("the plot's default file (set another with --plot)", plot))
    for flag, path in outputs:
        if path is None:
            continue
        if not path.strip():
            raise ValueError(f"{flag} is empty; give a file path, or leave the flag out")
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ValueError(f"{flag} {path} is a folder; give a file path in it, such as {os.path.join(path, 'results' + ('.json' if flag == '--json' else '.png'))}")
        if not os.path.isdir(folder):
            raise ValueError(f"{flag} {path}: the folder {folder} does not exist; create it or choose another path")
        if not os.access(path if os.path.exists(path) else folder, os.W_OK):  # /dev/stdout is writable in /dev
            raise ValueError(f"{flag} {path}: this user may not write it; choose another path")
    if args.plot is None:
        return
    from matplotlib.figure import Figure

    formats = sorted(Figure().canvas.get_supported_filetypes())
    if os.path.splitext(args.plot)[1].lower().lstrip(".") not in formats:
        raise ValueError(f"--plot {args.plot}: matplotlib draws the plot as {', '.join(formats)}; give a file name "
                         "ending in one of them")
    if not args.sweep and not args.throughput:
        raise ValueError("--plot is where --sweep or --throughput draws its plot, and this run draws none; add "
                         "one of them, or leave --plot out")
    if args.throughput and (args.no_mix or not args.serving_requests):
        raise ValueError("--plot is where --throughput draws its serving curve, which --no-mix or "
                         "--serving-requests 0 leaves out; drop one of them, or leave --plot out")


def _bench(args) -> None:
    from llmjax import bench

    if args.json is None:
        _need_stdout("the results (and no --json keeps them)")
    if args.int4_kernel:
        from llmjax.kernels import int4_matmul
        int4_matmul.set_one_row_kind(args.int4_kernel)
    _check_modes(args)
    _check_outputs(args)
    if args.throughput:
        if args.quant_lm_head:
            raise ValueError("--quant-lm-head is for the decode bench; --throughput keeps the LM head in bfloat16")
        return _throughput(args)
    prompt_len = 8 if args.prompt_len is None else args.prompt_len
    gen_len = args.gen_len
    if gen_len is None:  # 256, or what the context leaves after the (longest swept) prompt: tiny's is 256
        key, values = bench.parse_sweep(args.sweep) if args.sweep else (None, None)
        longest = max(values) if key == "prompt_len" else prompt_len
        context = bench.model_context(args.model, args.dtype)
        if context - longest < 2:
            raise ValueError(f"a prompt of {longest} tokens leaves {max(context - longest, 0)} of the model's context "
                             f"of {context} tokens, and the bench generates at least 2; shorten the prompt")
        gen_len = min(256, context - longest)
    options = dict(model=args.model, dtype=args.dtype, batch=args.batch, prompt_len=prompt_len,
                   gen_len=gen_len, repeats=args.repeats, compare_hf=args.compare_hf, mesh=_mesh(args),
                   quant_lm_head=args.quant_lm_head)
    if args.sweep:
        key, values = bench.parse_sweep(args.sweep)
        gone = []

        def log(report: str) -> None:  # a reader gone part way: the sweep goes on for --json and the plot
            if not gone:
                try:
                    _out(report, end="\n\n")
                except _OutputGone:
                    gone.append(True)

        results = bench.sweep(key, values, **options, log=log)
    else:
        results = [bench.bench(**options)]
    if args.json:  # before the report and the plot: a reader gone from stdout, or a plot that fails, keeps it
        bench.save_json(results, args.json)
        print(f"results: {args.json}", file=sys.stderr)
    if args.sweep:
        path = _plot_path(args)
        bench.plot(results, key, path)
        print(f"plot: {path}", file=sys.stderr)
        if gone:
            raise _OutputGone
    else:
        _out(results[0].report())


def _throughput(args) -> None:
    from llmjax import throughput

    rates = None
    if args.rates:
        try:
            rates = [float(r) for r in args.rates.split(",")]
        except ValueError:
            raise ValueError(f"--rates takes requests per second, comma-separated, got {args.rates!r}") from None
    if args.kv_memory is not None and not 0 < args.kv_memory < math.inf:
        raise ValueError(f"--kv-memory takes GiB of device memory for the page pool, > 0; got {args.kv_memory}")
    kv_memory = None if args.kv_memory is None else int(args.kv_memory * 2**30)
    result = throughput.throughput_bench(
        args.model, dtype=args.dtype, requests=args.requests,
        prompt_len=128 if args.prompt_len is None else args.prompt_len,
        gen_len=128 if args.gen_len is None else args.gen_len,
        mix=not args.no_mix, serving_requests=args.serving_requests, rates=rates,
        compare_hf=args.compare_hf, hf_requests=args.hf_requests, hf_batch=args.hf_batch, mesh=_mesh(args),
        max_slots=args.max_slots, page_size=args.page_size, decode_steps=args.decode_steps,
        prefill_tokens=args.prefill_tokens, prefill_row=args.prefill_row, kv_memory=kv_memory,
        kv_dtype=args.kv_dtype, overlap=not args.no_overlap, log=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:  # before the report and the plot: a reader gone from stdout, or a plot that fails, keeps it
        throughput.save_json(result, args.json)
        print(f"results: {args.json}", file=sys.stderr)
    _out(result.report())
    if result.serving:
        path = _plot_path(args)
        throughput.plot_serving(result, path)
        print(f"serving curve: {path}", file=sys.stderr)


def _add_throughput_flags(b) -> None:
    t = b.add_argument_group("--throughput", "the engine (continuous batching) on many requests")
    t.add_argument("--throughput", action="store_true", help="serve --requests requests of --prompt-len "
                   "in / --gen-len out (default 128/128), a mix of lengths around them, and Poisson "
                   "arrivals (a serving curve, drawn to --plot) instead of timing one batch")
    t.add_argument("--requests", type=int, default=1000, help="requests in the fixed set and in the mix")
    t.add_argument("--no-mix", action="store_true", help="skip the mix and the serving curve")
    t.add_argument("--serving-requests", type=int, default=200, help="requests per arrival rate (0: none)")
    t.add_argument("--rates", metavar="R1,R2", help="arrival rates in requests/s (default: 25-125%% of the "
                   "rate the mix sustained offline)")
    t.add_argument("--hf-requests", type=int, default=128, help="requests of the fixed set that "
                   "--compare-hf gives transformers")
    t.add_argument("--hf-batch", type=int, default=64, help="transformers' batch size")
    # The defaults are `throughput.BENCH_ENGINE`, the settings that served 1000 x 128/128 fastest.
    d = BENCH_ENGINE
    t.add_argument("--max-slots", type=int, default=d["max_slots"], help="requests decoding at once")
    t.add_argument("--page-size", type=int, default=d["page_size"], help="tokens per KV page")
    t.add_argument("--decode-steps", type=int, default=d["decode_steps"], help="decode iterations per device call")
    t.add_argument("--prefill-tokens", type=int, default=d["prefill_tokens"],
                   help="prompt tokens per device call (at most)")
    t.add_argument("--prefill-row", type=int, default=d["prefill_row"],
                   help="prompt tokens per chunk row (a prompt pads its last row)")
    t.add_argument("--kv-memory", type=float, default=None, metavar="GIB", help="GiB per device for the "
                   "page pool (default: what the device has free after the weights, less a margin)")
    t.add_argument("--kv-dtype", default=None, choices=["bfloat16", "float16", "float32", "float8_e4m3fn"],
                   help="the page pool's dtype (default: the model's); float8_e4m3fn halves the bytes")
    t.add_argument("--no-overlap", action="store_true", help="read each call's tokens before sending the next "
                   "(Engine(overlap=False)); by default the host schedules the next call while the device works")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmjax", description="Llama inference with JAX.")
    sub = parser.add_subparsers(dest="command", required=True)

    conv = sub.add_parser("convert", help="convert a Hugging Face Llama folder into an llmjax checkpoint",
                          description="Streams the safetensors of HF_DIR through llmjax's name map into "
                                      "an orbax checkpoint at OUT_DIR, with config and tokenizer files.")
    conv.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json and *.safetensors, or a bundled "
                      "model's name (tiny-stdlib)")
    conv.add_argument("out_dir", metavar="OUT_DIR", help="where to write the llmjax checkpoint")
    conv.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                      help="weight dtype to store (default: the checkpoint's own)")
    conv.add_argument("--quant", metavar=QUANT_METAVAR, help="quantize the projections (q/k/v, o, gate/up, down) to "
                      "group-wise int4 (group 128, 64 or 32; -asym adds zero points) or per-channel int8")
    conv.add_argument("--quant-lm-head", action="store_true", help="with --quant, also quantize an "
                      "untied LM head (the embedding table always stays in --dtype)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it is an earlier conversion (or an empty folder); a folder of other files is never replaced")
    conv.add_argument("--quiet", action="store_true", help="no progress bar")
    conv.set_defaults(run=_convert)

    gen = sub.add_parser("generate", help="stream a continuation of a prompt",
                         description="Loads a model, streams the continuation of --prompt, then prints "
                                     "prefill and decode speed to stderr.")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="llmjax checkpoint, Hugging Face folder or "
                     f"bundled model name (default: {DEFAULT_MODEL}, the bundled demo model)")
    gen.add_argument("--prompt", required=True, help="the text to continue (with --chat, the user's message)")
    gen.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                     help="cast the weights (default: as stored on a GPU, float32 on a CPU)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128; "
                     "EOS or a --stop string ends sooner)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 (the default) is greedy")
    gen.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest tokens (needs "
                     "--temperature)")
    gen.add_argument("--top-p", type=float, default=None, help="sample among the fewest likeliest tokens whose "
                     "probabilities add up to P, in (0, 1] (needs --temperature)")
    gen.add_argument("--min-p", type=float, default=None, help="drop tokens less likely than MIN_P times the "
                     "likeliest, in [0, 1] (needs --temperature)")
    gen.add_argument("--seed", type=int, default=0, help="the sampling's random seed, a signed 64-bit integer "
                     "(default 0; needs --temperature)")
    gen.add_argument("--stop", action="append", help="stop before this text (repeatable; taken as given: "
                     "a shell passes '\\n' as a backslash and an n, and bash's $'\\n' as a newline)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _add_mesh_flags(gen)
    gen.set_defaults(run=_generate)

    ppl = sub.add_parser("perplexity", help="perplexity of a model on text files",
                         description="Scores every token of each --text file after the BOS it is given "
                                     "(each file on its own, in overlapping windows when longer than "
                                     "--window) and prints the pooled perplexity, nats per token and bits "
                                     "per byte.")
    ppl.add_argument("--model", default=DEFAULT_MODEL, help="llmjax checkpoint, Hugging Face folder or "
                     f"bundled model name (default: {DEFAULT_MODEL})")
    ppl.add_argument("--text", required=True, action="append", metavar="FILE",
                     help="UTF-8 text file to score (repeatable)")
    ppl.add_argument("--window", type=int, default=None, help="tokens the model sees at once, BOS included "
                     "(default: its context)")
    ppl.add_argument("--stride", type=int, default=None, help="new tokens scored per later window, at most "
                     "WINDOW - 1: each window begins with BOS (default: half the window)")
    ppl.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                     help="cast the weights (default: as stored on a GPU, float32 on a CPU)")
    _add_mesh_flags(ppl)
    ppl.set_defaults(run=_perplexity)

    b = sub.add_parser("bench", help="time decode on random weights against the bandwidth bound",
                       description="Times greedy generation on random weights of a preset: prefill, "
                                   "decode tok/s, bytes read per step, the HBM bandwidth measured in the "
                                   "same process and the fraction of the bound reached.")
    b.add_argument("--model", default="llama2-7b", help="a preset (llama2-7b, llama2-13b, llama3-8b, "
                   "tiny, ...; see llmjax.LlamaConfig.preset)")
    b.add_argument("--random-weights", action="store_true", default=True,
                   help="random weights of the preset (the only mode; accepted for clarity)")
    b.add_argument("--dtype", default="bfloat16", metavar="{bfloat16,float16,float32}|" + QUANT_METAVAR,
                   help="weight format: a float dtype, or quantized projections (random codes made "
                   "directly in int4/int8, the other weights bfloat16)")
    b.add_argument("--batch", type=int, default=1, help="prompts decoded together (default 1)")
    b.add_argument("--prompt-len", type=int, default=None, help="default 8 (128 with --throughput)")
    b.add_argument("--gen-len", type=int, default=None, help="default 256, or less where the model's context "
                   "ends sooner (128 with --throughput)")
    b.add_argument("--repeats", type=int, default=3, help="timed runs; medians are reported")
    b.add_argument("--int4-kernel", choices=["fma", "hfma2", "hfma4"], default=None, help="the int4 kernel "
                   "for one and two rows on cuda: hfma4 (the default: packed float16 math, four words a float16 sum, "
                   "symmetric weights), hfma2 (one word a float16 sum) or fma (float32 math)")
    b.add_argument("--quant-lm-head", action="store_true", help="with a quantized --dtype, quantize the "
                   "LM head too (as `convert --quant-lm-head`; the embedding table stays bfloat16)")
    _add_mesh_flags(b)
    b.add_argument("--compare-hf", action="store_true", help="also time Hugging Face transformers "
                   "(static cache; compiled on CUDA, eager on CPU) on the same shapes")
    b.add_argument("--json", metavar="FILE", help="save the results as JSON")
    b.add_argument("--sweep", metavar="NAME=V1,V2", help="run once per value, e.g. batch=1,8,32,64, and "
                   "draw a plot")
    b.add_argument("--plot", metavar="FILE.png", help="where --sweep or --throughput draws its plot")
    _add_throughput_flags(b)
    b.set_defaults(run=_bench)
    return parser


def _end_process(status: int) -> None:
    """Ends the process now, without Python's teardown: a Ctrl-C during an XLA compile interrupts only
    the wait for it, jaxlib's thread goes on compiling, and tearing the backend down under that thread
    crashes the process (a segmentation fault, exit status 139, in place of 130)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed, gone, or None
            pass
    os._exit(status)


def main(argv: list[str] | None = None) -> int:
    """Runs the command in `argv` (the process's own command line when None) and returns its exit status;
    the process's own run ends at once on a Ctrl-C (`_end_process`)."""
    if sys.stderr is None:  # started with stderr closed (`2>&-`): print(file=None) would write into stdout's text
        sys.stderr = open(os.devnull, "w")
    args = _parser().parse_args(argv)
    try:
        args.run(args)
    except _OutputGone:  # the reader of the output went away (`| head`): stop quietly, as SIGPIPE would
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail
        return 128 + signal.SIGPIPE
    except (ValueError, OSError, MemoryError, jinja2.TemplateError) as e:  # OSError: FileNotFound, FileExists
        print(f"llmjax {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if argv is None:  # the console script, or python -m llmjax.cli
            _end_process(130)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
