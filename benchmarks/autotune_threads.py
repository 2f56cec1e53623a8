"""Does compiling the engine's programs several at once change their speed? XLA picks each product's
GEMM algorithm by timing the candidates on the GPU while it compiles (autotuning); compilations
running side by side time their candidates at the same time, on the same GPU. (Measured on one H200:
one at a time ran the fixed set 6-10% slower than 8 at once, and not through the picks; BENCHMARKS.md,
fortieth session.)

One process per run (XLA keeps its picks for the process's life): build the throughput bench's
engine (`BENCH_ENGINE`, Llama-2-7B shape, random bf16 weights), compile the variants the fixed set
uses with `--threads` compilations at a time (`Engine.warmup(threads=...)`; 0: no warmup, each variant
compiled in the main thread when a step first needs it, as `LLM.generate` does), then serve the fixed
set (1000 x 128 in / 128 out) twice, timing the second, as `llmjax bench --throughput --no-mix` does
after its warm pass.

    for t in 8 1 8 1; do PYTHONPATH=. python -P benchmarks/autotune_threads.py --threads $t; done

`--kernels F`: then serve the set a third time under the profiler (`kernel_profile.traced`, which
prints the idle times between kernels) and save each GPU kernel's launches and total ns to F (JSON),
to compare two runs kernel by kernel (with `LLMJAX_LOOP_GRAPH=off`, as the decode loop's CUDA graph
hides its kernels from the trace).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from llmjax import throughput
from llmjax.engine import Engine
from llmjax.throughput import BENCH_ENGINE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rows", default="256,512", help="the row buckets to compile (the fixed set's)")
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--kernels", help="save the kernels of a third, profiled run to this JSON file")
    args = parser.parse_args()
    params = throughput.random_params(throughput._model_config(args.model, "bfloat16"), "bfloat16", 0, None)
    engine = Engine(params, max_seq_len=256, **BENCH_ENGINE)
    start = time.perf_counter()
    rows = [int(r) for r in args.rows.split(",")]
    if args.threads:
        engine.warmup(256, rows=rows, threads=args.threads)
    compile_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, params.config.vocab_size, 128).tolist() for _ in range(1000)]
    budgets = [128] * len(prompts)
    throughput._offline(engine, "warm", prompts, budgets)
    compiled = before = engine.stats.compiled  # by the warmup, then by the warm pass's steps
    w = throughput._offline(engine, "fixed", prompts, budgets)
    print(f"threads {args.threads}: {compiled} variants compiled ({compile_s:.1f} s in warmup); fixed set "
          f"{w.output_tok_s:.1f} output tok/s ({w.calls} calls, {w.seconds:.2f} s; "
          f"{engine.stats.compiled - before} variants compiled while serving)", flush=True)
    if args.kernels:
        from kernel_profile import traced

        kernels, span, busiest = traced(lambda: throughput._offline(engine, "traced", prompts, budgets))
        with open(args.kernels, "w") as f:
            json.dump({"threads": args.threads, "span_ns": span, "busiest_ns": busiest, "kernels": kernels}, f)


if __name__ == "__main__":
    main()
