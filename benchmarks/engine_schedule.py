"""The engine's own schedule for the fixed set or the mix, replayed on the CPU with a stand-in for the
device call, and each call priced with a cost model: which settings could serve them faster.

    python benchmarks/engine_schedule.py [--max-slots 384,512,640] [--prefill-tokens 4096,8192] [--decode-steps 8,16]
        [--prefill-row 64] [--mix] [--chunks 8,64] [--calls]
        [--layer-us 110 --row-us 0.51 --context-ns 4.2 --prompt-us 20.4 --host-ms 2.3]

The host side is `llmjax.Engine` itself (admission, pages, chunking, row buckets) over the tiny preset;
only `_executable` is replaced, by a function that gives every row the tokens its budget allows. A
call is then priced from what it holds: each decode iteration costs, per layer, `layer_us` plus
`row_us` per row it is compiled for (the products and small kernels) plus `context_ns` per token of
context of each row still decoding (attention); each prompt token the chunk holds, padding included,
`prompt_us`; each call `host_ms`. `--mix` serves the throughput bench's mix of lengths instead of
1000 x 128/128; `--chunks` replaces the engine's chunk sizes by the largest divided by each number.
The settings default to the throughput bench's (512 slots, 32768 prompt tokens in rows of 32, 8
iterations). The rates default to Llama-2-7B's bf16 pool on one H200 (BENCHMARKS.md, twentieth
session, `benchmarks/engine_calls.py`); they put 512 slots, 8192 prompt tokens in rows of 64 and 8
iterations at 39 calls of 410.3 rows under the engine of then, as measured, and within a few percent
of the measured seconds. A model: good for comparing schedules, not for figures.
"""

import argparse
import dataclasses
import itertools

import numpy as np

import llmjax
from llmjax import engine as engine_lib
from llmjax.throughput import BENCH_ENGINE, mix_lengths

LAYERS = 32  # Llama-2-7B's, which the default rates are for


def replay(max_slots: int, prefill_tokens: int, decode_steps: int, requests: int = 1000, prompt: int = 128,
           out: int = 128, mix: bool = False, chunks: tuple[int, ...] | None = None,
           prefill_row: int = BENCH_ENGINE["prefill_row"]) -> list[tuple]:
    """Serves the set (with `mix`, the throughput bench's mix of lengths around `prompt` and `out`)
    through the engine with a stand-in device call; returns one (rows compiled for, prompt tokens,
    budgets, positions, prompt tokens the chunk holds) per call. `chunks` replaces the engine's chunk
    sizes by `chunk_rows // n` rows for each n (None: the engine's own)."""
    rng = np.random.default_rng(0)
    prompts = mix_lengths(rng, requests, prompt) if mix else np.full(requests, prompt)
    outs = mix_lengths(rng, requests, out) if mix else np.full(requests, out)
    longest = int((prompts + outs).max())
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), max_position_embeddings=max(256, longest))
    params = llmjax.init_random(config, dtype="float32")  # the host side never looks at the weights
    c = params.config
    token_bytes = 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4  # keys and values, float32
    engine = engine_lib.Engine(params, max_slots=max_slots, page_size=BENCH_ENGINE["page_size"],
                               kv_memory=2 * max_slots * longest * token_bytes,  # room for every slot
                               max_seq_len=longest, prefill_tokens=prefill_tokens, prefill_row=prefill_row,
                               decode_steps=decode_steps)
    if chunks is not None:
        engine.chunk_buckets = tuple(sorted({max(1, engine.chunk_rows // n) for n in (1, *chunks)}))
    calls = []

    def stand_in(variant):
        def call(weights, pool, rows, chunk, eos):
            budget = np.asarray(rows.budget)
            tokens = np.full((decode_steps, max_slots), engine_lib.PAD_ID, np.int32)  # as the call pads them
            tokens[:, :variant[0]][np.arange(decode_steps)[:, None] < budget[None, :]] = 5
            valid = np.zeros((0,)) if chunk is None else np.asarray(chunk.valid)
            calls.append((variant[0], int(valid.sum()), budget, np.asarray(rows.positions), valid.size))
            return tokens, pool
        return call
    engine._executable = stand_in
    engine._place = lambda tree: tree
    for n, m in zip(prompts.tolist(), outs.tolist()):
        engine.add_request(rng.integers(3, c.vocab_size, n).tolist(), max_new_tokens=m)
    while engine.pending:
        engine.step()
    return calls


def call_seconds(call: tuple, steps: int, rates) -> float:
    """The call's modelled seconds: its chunk's products run over every token the chunk holds, padding
    included."""
    rows, _, budget, positions, held = call
    seconds = held * rates.prompt_us * 1e-6 + rates.host_ms * 1e-3
    for step in range(steps):
        alive = budget > step
        if alive.any():
            context = int((positions[alive] + 1 + step).sum())
            seconds += LAYERS * ((rates.layer_us + rates.row_us * rows) * 1e-6 + rates.context_ns * 1e-9 * context)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-slots", default=str(BENCH_ENGINE["max_slots"]))  # the bench's defaults
    parser.add_argument("--prefill-tokens", default=str(BENCH_ENGINE["prefill_tokens"]))
    parser.add_argument("--prefill-row", type=int, default=BENCH_ENGINE["prefill_row"],
                        help="prompt tokens per chunk row")
    parser.add_argument("--decode-steps", default=str(BENCH_ENGINE["decode_steps"]))
    parser.add_argument("--layer-us", type=float, default=110.0)
    parser.add_argument("--row-us", type=float, default=0.51)
    parser.add_argument("--context-ns", type=float, default=4.2)
    parser.add_argument("--prompt-us", type=float, default=20.4)
    parser.add_argument("--host-ms", type=float, default=2.3)
    parser.add_argument("--mix", action="store_true", help="the bench's mix of lengths instead of the fixed set")
    parser.add_argument("--chunks", default=None,
                        help="chunk sizes as divisors of the largest, e.g. 2,4,8 (default: the engine's)")
    parser.add_argument("--calls", action="store_true", help="print each call of the first setting")
    args = parser.parse_args()
    settings = itertools.product(*(map(int, v.split(",")) for v in (args.max_slots, args.prefill_tokens,
                                                                    args.decode_steps)))
    chunks = None if args.chunks is None else tuple(map(int, args.chunks.split(",")))
    for n, (slots, prefill, steps) in enumerate(settings):
        calls = replay(slots, prefill, steps, mix=args.mix, chunks=chunks, prefill_row=args.prefill_row)
        seconds = [call_seconds(c, steps, args) for c in calls]
        rows = np.mean([int((c[2] > 0).sum()) for c in calls])
        output = sum(int(np.minimum(c[2], steps).sum()) for c in calls)
        padding = 1 - sum(c[1] for c in calls) / max(1, sum(c[4] for c in calls))
        print(f"slots {slots:4d}, {prefill:5d} prompt tokens, {steps:2d} iterations a call: {len(calls)} calls of "
              f"{rows:.1f} rows, {padding:.0%} of chunk tokens padding, {sum(seconds):.2f} s, "
              f"{output / sum(seconds):,.0f} output tok/s (modelled)")
        if args.calls and n == 0:
            for i, (call, s) in enumerate(zip(calls, seconds), 1):
                print(f"  call {i:3d}: {call[0]:4d} rows, {int((call[2] > 0).sum()):4d} decoding, {call[1]:5d} prompt "
                      f"tokens in a chunk of {call[4]:5d}, {s * 1e3:6.1f} ms")


if __name__ == "__main__":
    main()
