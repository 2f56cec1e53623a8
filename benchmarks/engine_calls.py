"""What each device call of the engine costs on the fixed set (1000 x 128 in / 128 out, random weights):
its rows, prompt tokens and seconds, and, for the calls named, the kernels it ran.

    PYTHONPATH=. python benchmarks/engine_calls.py [--model llama2-7b] [--max-slots 512] [--prefill-tokens 32768]
        [--page-size 16] [--kv-dtype float8_e4m3fn] [--runs 2] [--profile 9,17] [--timeline 40]

The set is served `--runs` times (the first warms up); the last run prints one line a call: the
rows it was compiled for, the rows that decode in it, its prompt tokens, the tokens it produced and
its seconds from the call to its tokens on the host (the engine runs without `overlap`, so that each
call is read before the next is sent). The output tok/s of a run counts the host's time between
calls too, as `llmjax bench --throughput` does. `--profile`
traces those calls (1-based, of the last run) under the profiler and prints their kernels by kind
and the longest ones (`kernel_profile.traced` and `table`); `--timeline` prints that many of their kernels
in order from the middle of each, with the idle time before each. On one NVIDIA GPU the decode
iterations run as one CUDA graph, whose kernels after the first iteration the trace does not show:
profile with `LLMJAX_LOOP_GRAPH=off`.
"""

import argparse
import time

import numpy as np

import llmjax
from kernel_profile import table, traced
from llmjax import engine as engine_lib
from llmjax.throughput import BENCH_ENGINE


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-slots", type=int, default=BENCH_ENGINE["max_slots"])  # the bench's defaults
    parser.add_argument("--prefill-tokens", type=int, default=BENCH_ENGINE["prefill_tokens"])
    parser.add_argument("--prefill-row", type=int, default=BENCH_ENGINE["prefill_row"])
    parser.add_argument("--decode-steps", type=int, default=BENCH_ENGINE["decode_steps"])
    parser.add_argument("--page-size", type=int, default=BENCH_ENGINE["page_size"])
    parser.add_argument("--kv-dtype", default=None)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--profile", default="", help="calls of the last run to trace, e.g. 9,17")
    parser.add_argument("--timeline", type=int, default=0, help="kernels of each traced call to print in order, "
                        "with the idle time before each")
    args = parser.parse_args()
    profile = {int(c) for c in args.profile.split(",") if c}
    params = llmjax.init_random(args.model, dtype=args.dtype)
    config = params.config
    engine = engine_lib.Engine(params, max_slots=args.max_slots,
                               page_size=args.page_size, max_seq_len=256, prefill_tokens=args.prefill_tokens,
                               prefill_row=args.prefill_row,
                               decode_steps=args.decode_steps, kv_dtype=args.kv_dtype,
                               overlap=False)  # each call timed to its tokens (its own seconds)
    engine.warmup(256, rows=[r for r in engine.row_buckets if r >= args.max_slots // 4])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, 128).tolist() for _ in range(args.requests)]

    calls = []
    compiled = engine._executable

    def timed_executable(variant):  # each call's rows, prompt tokens, output tokens and seconds
        run = compiled(variant)

        def call(weights, pool, rows, chunk, eos):
            start = time.perf_counter()
            out, pool = run(weights, pool, rows, chunk, eos)
            out = np.asarray(out)
            calls.append((variant[0], int((np.asarray(rows.budget) > 0).sum()),
                          0 if chunk is None else int(np.asarray(chunk.valid).sum()),
                          int((out != engine_lib.PAD_ID).sum()), time.perf_counter() - start))
            return out, pool
        return call
    engine._executable = timed_executable

    for run in range(args.runs):
        calls.clear()
        last = run == args.runs - 1
        start = time.perf_counter()
        handles = [engine.add_request(p, max_new_tokens=128) for p in prompts]
        while engine.pending:
            if last and len(calls) + 1 in profile:
                print(f"call {len(calls) + 1} (traced):")
                table(*traced(engine.step, timeline=args.timeline, idles=False), 1, "call")
            else:
                engine.step()
        seconds = time.perf_counter() - start
        out = sum(len(h.token_ids) for h in handles)
        device = sum(c[-1] for c in calls)
        print(f"run {run + 1}: {out / seconds:.1f} output tok/s, {len(calls)} calls, {seconds:.2f} s, of which "
              f"{device:.2f} s in device calls")
    print("call  rows  decoding  prompt tokens  tokens out  ms")
    for n, (rows, live, prompt, produced, seconds) in enumerate(calls, 1):
        print(f"{n:4d} {rows:5d} {live:9d} {prompt:14d} {produced:11d} {seconds * 1e3:7.1f}")


if __name__ == "__main__":
    main()
