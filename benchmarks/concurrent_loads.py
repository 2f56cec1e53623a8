"""Loads one converted checkpoint from two threads at once, `REPS` times, then the same number of
times one load after another, and counts the loads refused (a checksum that did not match, say):
whether `llmjax.load` may be called from several threads. `FOLDER` is a Hugging Face folder, converted
into `CHECKPOINT` first unless that exists (`load_speed.py --hf-only --keep --turns 0` leaves one).

    PYTHONPATH=. python -P benchmarks/concurrent_loads.py FOLDER CHECKPOINT REPS
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import jax

import llmjax
from llmjax.convert import hf


def main() -> None:
    source, out, reps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if not os.path.isdir(out):
        hf.convert(source, out, progress=False)

    def load(_) -> str | None:
        try:
            jax.block_until_ready(llmjax.load(out).weights)
        except ValueError as e:
            return str(e)[:160]
        return None

    for mode in ("two threads", "one after another"):
        start, refused = time.perf_counter(), []
        for _ in range(reps):
            if mode == "two threads":
                with ThreadPoolExecutor(2) as pool:
                    refused += [e for e in pool.map(load, range(2)) if e]
            else:
                refused += [e for e in map(load, range(2)) if e]
        print(f"{mode}: {2 * reps} loads, {len(refused)} refused, {time.perf_counter() - start:.1f} s",
              refused[:3], flush=True)


if __name__ == "__main__":
    main()
