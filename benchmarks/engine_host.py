"""Where the engine's host time goes on the fixed set (1000 x 128 in / 128 out, random weights), with
`overlap` off and on in alternating runs of one engine.

    PYTHONPATH=. python benchmarks/engine_host.py [--model llama2-7b] [--runs 4]

Each run prints its output tok/s (the host's time included, as `llmjax bench --throughput` counts
it), the seconds `Engine.step` spent in device calls (sending them, waiting for their tokens) and
on the host (`EngineStats.device_s` and `host_s`), and the seconds inside each of the engine's host methods: scheduling, the rows' and
the chunk's arrays, placing them on the device, gathering the last tokens from the call in flight
(`_fed_tokens`, with overlap), sending a call (`_launch`, which holds the others) and reading its
tokens (`_land`). The settings are the throughput bench's (`throughput.BENCH_ENGINE`).
"""

import argparse
import collections
import time

import numpy as np

import llmjax
from llmjax import engine as engine_lib
from llmjax.throughput import BENCH_ENGINE

METHODS = ("_schedule", "_rows", "_chunk", "_place", "_fed_tokens", "_launch", "_land")


def _timed(spent: collections.Counter, name: str) -> None:
    method = getattr(engine_lib.Engine, name)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            spent[name] += time.perf_counter() - start
    setattr(engine_lib.Engine, name, wrapper)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--runs", type=int, default=4, help="alternating: overlap off, on, off, on, ...")
    args = parser.parse_args()
    spent = collections.Counter()
    for name in METHODS:
        _timed(spent, name)
    params = llmjax.init_random(args.model, dtype="bfloat16")
    b = BENCH_ENGINE
    engine = engine_lib.Engine(params, max_slots=b["max_slots"], page_size=b["page_size"], max_seq_len=256,
                               prefill_tokens=b["prefill_tokens"], prefill_row=b["prefill_row"],
                               decode_steps=b["decode_steps"])
    engine.warmup(256, rows=[r for r in engine.row_buckets if r >= b["max_slots"] // 4])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, params.config.vocab_size, 128).tolist() for _ in range(1000)]
    for run in range(args.runs):
        engine.overlap = run % 2 == 1
        spent.clear()
        before, start = engine.stats.__dict__.copy(), time.perf_counter()
        for prompt in prompts:
            engine.add_request(prompt, max_new_tokens=128)
        while engine.pending:
            engine.step()
        wall = time.perf_counter() - start
        s = {k: v - before[k] for k, v in engine.stats.__dict__.items()}
        print(f"run {run + 1}, overlap {'on' if engine.overlap else 'off'}: {128_000 / wall:.1f} output tok/s, "
              f"{wall:.3f} s: in device calls {s['device_s']:.3f} s, host {s['host_s']:.3f} s, "
              f"compiling {s['compile_s']:.3f} s, {s['calls']} calls")
        print("  " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in spent.most_common()))


if __name__ == "__main__":
    main()
