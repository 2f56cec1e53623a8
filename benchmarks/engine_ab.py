"""Two settings of a kernel's environment variable on the engine's 1000 x 128/128, in one process and
in alternating rounds, so drift between runs (a few percent on these shared machines) falls on both.

    PYTHONPATH=. python benchmarks/engine_ab.py --variable LLMJAX_PAGE_WRITE --modes off,auto --rounds 3 \
        [--max-slots 512] [--prefill-tokens 8192] [--page-size 64] [--kv-dtype float8_e4m3fn] [--json F]

Or two tunings of the paged decode kernel for the pool's dtype (`paged_attention.TUNING`): `--variable
TUNING --modes "current,vector=1+block_k=64+num_warps=4"`, a mode being `current` or the tuning as
`key=value` pairs joined by `+` (integers, 0/1 for booleans, else strings). Or the engine's
`overlap` (the host scheduling a call while the device runs the one before): `--variable OVERLAP
--modes off,on`, with the same programs. The throughput bench's settings:

    PYTHONPATH=. python benchmarks/engine_ab.py --variable OVERLAP --modes off,on --rounds 3 \
        --prefill-tokens 32768 --prefill-row 32 --page-size 16

One engine (one pool) serves every round. Each mode's step programs are compiled once, with the
variable set, and kept apart; a round swaps them in and serves the same 1000 requests. Prints each
round's output tok/s and each mode's median, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from llmjax import engine as engine_module, throughput
from llmjax.engine import Engine
from llmjax.kernels import paged_attention as pa


def _tuning(mode: str) -> dict:
    """`vector=1+block_k=64+compute_dtype=float16` -> {"vector": 1, "block_k": 64, "compute_dtype": "float16"}."""
    return {key: int(text) if text.lstrip("-").isdigit() else text
            for key, text in (pair.split("=") for pair in mode.split("+"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variable", required=True, help="e.g. LLMJAX_PAGE_WRITE, LLMJAX_NORM, LLMJAX_ATTENTION, "
                        "TUNING, OVERLAP")
    parser.add_argument("--modes", default="off,auto", help="two or more values of the variable")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--max-slots", type=int, default=512)
    parser.add_argument("--prefill-tokens", type=int, default=8192)
    parser.add_argument("--page-size", type=int, default=64)
    parser.add_argument("--prefill-row", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--kv-dtype", default=None)
    parser.add_argument("--json", help="save the rounds as JSON")
    args = parser.parse_args()
    modes = args.modes.split(",")
    params = throughput.random_params(throughput._model_config(args.model, "bfloat16"), "bfloat16", 0, None)
    engine = Engine(params, max_slots=args.max_slots, page_size=args.page_size, max_seq_len=256,
                    prefill_tokens=args.prefill_tokens, prefill_row=args.prefill_row,
                    decode_steps=args.decode_steps, kv_dtype=args.kv_dtype)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, params.config.vocab_size, 128).tolist() for _ in range(args.requests)]
    rows = [r for r in engine.row_buckets if r >= args.max_slots // 4]
    programs = {}
    current = dict(pa.TUNING.get(args.kv_dtype or "bfloat16", {}))
    for mode in modes:  # each mode's programs, compiled with the variable set
        if args.variable == "OVERLAP":
            if mode not in ("off", "on"):
                raise SystemExit(f"OVERLAP's modes are off and on, got {mode!r}")
            if programs:  # the same programs for both
                programs[mode] = programs[modes[0]]
                continue
        elif args.variable == "TUNING":
            pa.TUNING[args.kv_dtype or "bfloat16"] = current if mode == "current" else _tuning(mode)
        else:
            os.environ[args.variable] = mode
        jax.clear_caches()
        engine_module._EXECUTABLES.clear()
        start = time.perf_counter()
        engine.warmup(256, rows=rows)
        programs[mode] = dict(engine_module._EXECUTABLES)
        print(f"{args.variable}={mode}: compiled in {time.perf_counter() - start:.0f} s", flush=True)
    figures = {mode: [] for mode in modes}
    for round_ in range(args.rounds + 1):  # round 0 warms each mode's buffers, untimed
        for mode in modes:
            engine_module._EXECUTABLES.clear()
            engine_module._EXECUTABLES.update(programs[mode])
            engine.overlap = mode != "off" if args.variable == "OVERLAP" else True
            batch = prompts if round_ else prompts[:args.max_slots]
            w = throughput._offline(engine, mode, batch, [128 if round_ else 16] * len(batch))
            if round_:
                figures[mode].append(w.output_tok_s)
                print(f"round {round_} {args.variable}={mode}: {w.output_tok_s:.1f} output tok/s "
                      f"({w.calls} calls, {w.seconds:.2f} s)", flush=True)
    medians = {mode: statistics.median(f) for mode, f in figures.items()}
    for mode in modes:
        print(f"{args.variable}={mode}: median {medians[mode]:.1f} output tok/s over {args.rounds} rounds "
              f"({min(figures[mode]):.1f}-{max(figures[mode]):.1f}); {medians[mode] / medians[modes[0]]:.3f}x "
              f"{modes[0]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "device": jax.devices()[0].device_kind, "rounds": figures,
                       "medians": medians}, f, indent=1)


if __name__ == "__main__":
    main()
