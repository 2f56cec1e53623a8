"""Engine settings on the throughput bench's fixed set (1000 x 128/128), in turns, in one process.

    PYTHONPATH=. python benchmarks/engine_settings.py --settings "bench;max_slots=500;decode_steps=16" \
        --cycles 2 [--rounds 1] [--model llama2-7b] [--json F]

A setting is `bench` (the bench's engine, `throughput.BENCH_ENGINE`) or that engine with `key=value`
pairs joined by `+`: max_slots, page_size, decode_steps, prefill_tokens, prefill_row, kv_memory,
kv_dtype. Each turn builds the setting's engine on the same random weights (its own pool; the last
engine's is freed first), serves one untimed warm pass and then the fixed set `--rounds` times. A
cycle takes every setting once, in the order given; a setting's programs compile in the first cycle
only, so later cycles cost only the runs. Prints each run's output tok/s, calls and device seconds,
then each setting's median and its ratio to the first setting's.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import jax
import numpy as np

from llmjax import throughput
from llmjax.engine import Engine

KEYS = {"max_slots": int, "page_size": int, "decode_steps": int, "prefill_tokens": int, "prefill_row": int,
        "kv_memory": int, "kv_dtype": str}


def parse_setting(text: str) -> dict:
    """`bench` -> {}; `max_slots=500+decode_steps=16` -> {"max_slots": 500, "decode_steps": 16}."""
    if text == "bench":
        return {}
    out = {}
    for pair in text.split("+"):
        key, _, value = pair.partition("=")
        if key not in KEYS or not value:
            raise SystemExit(f"bad setting {pair!r}: write key=value with a key of {sorted(KEYS)}")
        out[key] = KEYS[key](value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", required=True, help="settings separated by ';' (see the docstring)")
    parser.add_argument("--cycles", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1, help="timed runs of the fixed set per turn")
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--json", help="save every run as JSON")
    args = parser.parse_args()
    names = args.settings.split(";")
    settings = {name: {**throughput.BENCH_ENGINE, **parse_setting(name)} for name in names}
    params = throughput.random_params(throughput._model_config(args.model, "bfloat16"), "bfloat16", 0, None)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, params.config.vocab_size, 128).tolist() for _ in range(args.requests)]
    runs = {name: [] for name in names}
    for cycle in range(args.cycles):
        for name in names:
            options = settings[name]
            gc.collect()  # the last engine's pool
            engine = Engine(params, max_seq_len=256, **options)
            start = time.perf_counter()
            slots = options["max_slots"]
            engine.warmup(256, rows=[r for r in engine.row_buckets if r >= slots // 4])
            compile_s = time.perf_counter() - start
            throughput._offline(engine, "warm", prompts[:slots], [16] * min(slots, len(prompts)))
            for _ in range(args.rounds):
                w = throughput._offline(engine, name, prompts, [128] * len(prompts))
                runs[name].append({"cycle": cycle, "output_tok_s": w.output_tok_s, "calls": w.calls,
                                   "device_s": w.device_s, "host_s": w.host_s, "seconds": w.seconds,
                                   "preemptions": w.preemptions, "mean_rows": w.mean_rows, "step_compile_s": w.compile_s,
                                   "num_pages": engine.num_pages, "compile_s": compile_s})
                print(f"cycle {cycle} {name}: {w.output_tok_s:.1f} output tok/s ({w.calls} calls of "
                      f"{w.mean_rows:.1f} rows, {w.device_s:.2f} s in device calls, {w.host_s:.2f} s on the host, "
                      f"{w.compile_s:.2f} s compiling, {w.preemptions} preemptions; {engine.num_pages} pages; compiled in {compile_s:.0f} s)", flush=True)
            engine = None
    medians = {name: statistics.median(r["output_tok_s"] for r in runs[name]) for name in names}
    for name in names:
        figures = [r["output_tok_s"] for r in runs[name]]
        print(f"{name}: median {medians[name]:.1f} output tok/s over {len(figures)} runs "
              f"({min(figures):.1f}-{max(figures):.1f}); {medians[name] / medians[names[0]]:.3f}x {names[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "settings": settings, "device": jax.devices()[0].device_kind,
                       "runs": runs, "medians": medians}, f, indent=1)


if __name__ == "__main__":
    main()
