"""Where the GPU's time goes, kernel by kernel: a jax profiler trace of a steady-state workload, read
back with `jax.profiler.ProfileData` and summed per kernel and per kind of kernel.

    PYTHONPATH=. python benchmarks/kernel_profile.py decode --model llama2-7b --dtype int4-g128 [--tensor 2] [--json F] [--timeline N]
    PYTHONPATH=. python benchmarks/kernel_profile.py engine --model llama2-7b [--max-slots 384] [--page-size P] [--kv-dtype D]
    PYTHONPATH=. python benchmarks/kernel_profile.py fixed --model llama2-7b [--kv-dtype D]

`decode`: greedy generation at batch 1 (prompt 8, `--gen-len` new tokens), the one-jit loop of
`llmjax.bench`; the table is per decode step. `engine`: the engine serving `--requests` requests of
128 in / 128 out, all queued at once; the trace covers the calls from the first in which every slot
is busy (or the 10th) to the end, and the table is per call. `fixed`: the fixed set as `llmjax bench
--throughput` serves it (its engine settings, `overlap` on, the requests queued inside the timed run),
the whole second run traced: where the GPU waits between the run's start, its calls and its end. On one
NVIDIA GPU a call's decode iterations after the first run as one CUDA graph, whose kernels the trace
may not show (their time then counts as gaps): compare with `LLMJAX_LOOP_GRAPH=off`. Kinds are read from kernel names
(Pallas kernels are named after their functions; cuBLAS and cuDNN kernels by their libraries);
"gaps" is the trace's span minus the kernels' busy time on the busiest stream. `--timeline N` also
prints N kernels in the order they ran from the middle of the trace, each with its duration and the
idle time before it: which kernels a layer runs, one after another.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import json
import re
import tempfile
import time

import jax
import numpy as np

KINDS = (  # first match wins
    ("int4 matmul (Pallas)", r"_fma_kernel|_dot_kernel"),
    ("attention (Pallas)", r"attention|_kernel.*(flash|decode|paged)|online_softmax"),
    ("gemv (Pallas)", r"gemv"),
    ("other Pallas", r"^_?[a-z_]*kernel"),
    ("GEMM (cuBLAS/cuBLASLt)", r"gemm|xmma|cutlass|sm90|sm100|nvjet|cublas"),
    ("attention (cuDNN)", r"cudnn|fmha|flash_fwd"),
    ("all-reduce / collectives", r"nccl|all_reduce|allreduce"),
    ("copies / memset", r"memcpy|memset|copy"),
    ("XLA fusions", r"fusion|reduce|convert|concatenate|transpose|dynamic|scatter|gather|select|iota"),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other"


def traced(fn, timeline: int = 0, idles: bool = True) -> tuple[dict, float]:
    """Runs `fn` under the profiler; returns {kernel name: [count, total ns]} on the first GPU, and the
    span in ns from the first kernel's start to the last kernel's end. `timeline`: print that many
    kernels of the busiest stream in order, from the middle of the trace; `idles`: print the idle
    times between kernels and the host's events in the longest."""
    folder = tempfile.mkdtemp()
    with jax.profiler.trace(folder):
        fn()
    path = glob.glob(f"{folder}/**/*.xplane.pb", recursive=True)[0]
    data = jax.profiler.ProfileData.from_file(path)
    plane = next((p for p in data.planes if p.name.startswith("/device:GPU:0")), None)
    if plane is None:
        raise SystemExit("the trace has no GPU: this profile reads GPU kernels")
    kernels = collections.defaultdict(lambda: [0, 0.0])
    busy, first, last = collections.Counter(), float("inf"), 0.0
    events = collections.defaultdict(list)
    for line in plane.lines:
        if not line.name.startswith("Stream"):
            continue
        for e in line.events:
            events[line.name].append((e.start_ns, e.duration_ns, e.name))
            kernels[e.name][0] += 1
            kernels[e.name][1] += e.duration_ns
            busy[line.name] += e.duration_ns
            first, last = min(first, e.start_ns), max(last, e.start_ns + e.duration_ns)
    if busy and idles:
        longest = idle_histogram(sorted(events[max(busy, key=busy.get)]))
        host_during(data, longest[:HOST_WINDOWS])
    if timeline and busy:
        ordered = sorted(events[max(busy, key=busy.get)])
        start = len(ordered) // 2
        print(f"timeline: {timeline} kernels from the middle of {len(ordered)} (us: idle before, duration)")
        for (s0, d0, _), (s1, d1, name) in zip(ordered[start - 1:], ordered[start:start + timeline]):
            print(f"  {(s1 - s0 - d0) / 1e3:7.2f} {d1 / 1e3:8.2f}  {kind_of(name):26s} {name[:100]}")
    return dict(kernels), last - first, max(busy.values(), default=0.0)


def launch_seconds(fn) -> dict[str, float]:
    """Each GPU kernel's mean seconds a launch while `fn` runs under the profiler (`traced`)."""
    launches, _, _ = traced(fn, idles=False)
    return {name: ns / count / 1e9 for name, (count, ns) in launches.items()}


IDLE_EDGES_US = (2, 10, 100, 1000)
LONGEST_IDLES = 12
HOST_WINDOWS, HOST_EVENTS = 2, 25


def idle_histogram(ordered: list) -> list:
    """The idle time between consecutive kernels of one stream, by length: many short idles are launch
    latency between kernels; a few long ones are the host between device calls."""
    counts, sums = [0] * (len(IDLE_EDGES_US) + 1), [0.0] * (len(IDLE_EDGES_US) + 1)
    for (s0, d0, _), (s1, _, _) in zip(ordered, ordered[1:]):
        idle = max(0.0, (s1 - s0 - d0) / 1e3)
        i = sum(idle >= edge for edge in IDLE_EDGES_US)
        counts[i] += 1
        sums[i] += idle
    labels = [f"< {IDLE_EDGES_US[0]} us"] + [f"{a}-{b} us" for a, b in zip(IDLE_EDGES_US, IDLE_EDGES_US[1:])] + \
        [f">= {IDLE_EDGES_US[-1]} us"]
    print("idle between kernels on the busiest stream (count, total us):")
    for label, count, total in zip(labels, counts, sums):
        print(f"  {label:12s} {count:8d} {total:12.1f}")
    pairs = sorted(zip(ordered, ordered[1:]), key=lambda p: p[0][0] + p[0][1] - p[1][0])[:LONGEST_IDLES]
    print(f"the {len(pairs)} longest idles (us: idle, the kernel before it, the kernel after it):")
    for (s0, d0, before), (s1, _, after) in sorted(pairs):
        print(f"  {(s1 - s0 - d0) / 1e3:10.1f}  {before[:60]:60s} {after[:60]}")
    return [(s0 + d0, s1) for (s0, d0, _), (s1, _, _) in pairs]


def host_during(data, windows: list) -> None:
    """What the host threads did while the GPU idled: for each window, the longest host events that
    overlap it (the profiler's host planes carry the runtime's and Python's trace events)."""
    for begin, end in windows:
        found = []
        for plane in data.planes:
            if not plane.name.startswith("/host"):
                continue
            for line in plane.lines:
                for e in line.events:
                    overlap = min(end, e.start_ns + e.duration_ns) - max(begin, e.start_ns)
                    if overlap > 0.05 * (end - begin):
                        found.append((overlap, e.duration_ns, line.name, e.name))
        print(f"host events during the idle of {(end - begin) / 1e3:.1f} us (overlap us, duration us, thread, "
              "event):")
        for overlap, duration, thread, name in sorted(found, reverse=True)[:HOST_EVENTS]:
            print(f"  {overlap / 1e3:10.1f} {duration / 1e3:10.1f}  {thread[:28]:28s} {name[:90]}")


def table(kernels: dict, span_ns: float, busiest_ns: float, per: int, unit: str) -> dict:
    kinds = collections.defaultdict(float)
    for name, (_, ns) in kernels.items():
        kinds[kind_of(name)] += ns
    kinds["gaps (no kernel on the busiest stream)"] = max(0.0, span_ns - busiest_ns)
    print(f"{span_ns / per / 1e3:10.1f} us per {unit}, over {per} {unit}s")
    for kind, ns in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:42s} {ns / per / 1e3:10.1f} us  {100 * ns / span_ns:5.1f}%")
    print("top kernels:")
    top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:25]
    for name, (count, ns) in top:
        print(f"  {ns / per / 1e3:9.1f} us {count / per:7.1f}x  {kind_of(name):26s} {name[:90]}")
    return {"span_us_per_" + unit: span_ns / per / 1e3, "kinds_us": {k: v / per / 1e3 for k, v in kinds.items()},
            "kernels": {n: {"count": c / per, "us": ns / per / 1e3} for n, (c, ns) in top}}


def decode(args) -> dict:
    from llmjax import bench
    from llmjax.params import init_random

    from llmjax.sharding import make_mesh

    params = init_random(args.model, dtype=args.dtype, mesh=make_mesh(tensor=args.tensor) if args.tensor > 1 else None)
    _, _, run = bench.greedy_runner(params, 1, 8, args.gen_len)
    run(args.gen_len)[0].block_until_ready()  # compiles
    kernels, span, busiest = traced(lambda: run(args.gen_len)[0].block_until_ready(), args.timeline)
    return table(kernels, span, busiest, args.gen_len, "step")


def engine(args) -> dict:
    from llmjax.engine import Engine
    from llmjax.params import init_random

    params = init_random(args.model, dtype=args.dtype)
    config = params.config
    e = Engine(params, max_slots=args.max_slots, prefill_tokens=args.prefill_tokens, max_seq_len=256,
               kv_dtype=args.kv_dtype, page_size=args.page_size, overlap=False)  # a step is the call it traces
    e.warmup()
    rng = np.random.default_rng(0)

    def queue():
        for _ in range(args.requests):
            e.add_request(rng.integers(3, config.vocab_size, 128).tolist(), max_new_tokens=128)

    queue()  # first without the profiler: the wall time a call takes, and where the host spends it
    stats, start = dataclasses.replace(e.stats), time.perf_counter()
    while e.pending:
        e.step()
    n, wall = e.stats.calls - stats.calls, time.perf_counter() - start
    print(f"unprofiled: {n} calls in {wall:.2f} s, {wall / n * 1e3:.1f} ms a call: "
          f"{(e.stats.device_s - stats.device_s) / n * 1e3:.1f} ms in the device call (sending it, "
          f"waiting for its tokens), {(e.stats.host_s - stats.host_s) / n * 1e3:.1f} ms on the host around it")
    queue()
    calls = 0
    while len(e._running) < args.max_slots and calls < 10:
        e.step()
        calls += 1
    before = e.stats.calls
    start = time.perf_counter()
    kernels, span, busiest = traced(lambda: [e.step() for _ in iter(lambda: e.pending, 0)], args.timeline)
    n = e.stats.calls - before
    print(f"{n} calls in {time.perf_counter() - start:.2f} s (profiled)")
    return table(kernels, span, busiest, n, "call")


def fixed(args) -> dict:
    from llmjax.engine import Engine
    from llmjax.params import init_random
    from llmjax.throughput import BENCH_ENGINE

    params = init_random(args.model, dtype=args.dtype)
    e = Engine(params, max_seq_len=256, kv_dtype=args.kv_dtype, **BENCH_ENGINE)
    e.warmup(256, rows=[r for r in e.row_buckets if r >= e.max_slots // 4])
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, params.config.vocab_size, 128).tolist() for _ in range(args.requests)]
    marks = {}

    def run():  # as the bench's `_offline`: requests queued, then steps to the end
        marks["start"] = time.perf_counter_ns()
        for p in prompts:
            e.add_request(p, max_new_tokens=128)
        marks["queued"] = time.perf_counter_ns()
        while e.pending:
            e.step()
        marks["end"] = time.perf_counter_ns()

    run()  # unprofiled, the first run after the warmup
    wall = (marks["end"] - marks["start"]) / 1e9
    print(f"first run, unprofiled: {128 * args.requests / wall:.1f} output tok/s, {wall:.3f} s, queueing "
          f"{(marks['queued'] - marks['start']) / 1e6:.1f} ms")
    before = e.stats.calls
    kernels, span, busiest = traced(run, args.timeline)
    wall = (marks["end"] - marks["start"]) / 1e9
    print(f"profiled: {e.stats.calls - before} calls, {wall:.3f} s ({128 * args.requests / wall:.1f} output tok/s); "
          f"kernels span {span / 1e9:.3f} s, busiest stream busy {busiest / 1e9:.3f} s; the run's wall less that "
          f"busy time: {wall - busiest / 1e9:.3f} s, of which outside the kernels' span {wall - span / 1e9:.3f} s")
    return table(kernels, span, busiest, e.stats.calls - before, "call")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["decode", "engine", "fixed"])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--tensor", type=int, default=1, help="decode: the tensor-parallel degree (GPU 0's kernels)")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-slots", type=int, default=384)
    parser.add_argument("--prefill-tokens", type=int, default=4096)
    parser.add_argument("--page-size", type=int, default=16, help="engine: tokens per KV page")
    parser.add_argument("--kv-dtype", default=None, help="engine: the page pool's dtype (default: the model's)")
    parser.add_argument("--json", help="save the table as JSON")
    parser.add_argument("--timeline", type=int, default=0, help="print this many kernels in order")
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.mode} {args.model} {args.dtype}")
    result = {"decode": decode, "engine": engine, "fixed": fixed}[args.mode](args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
