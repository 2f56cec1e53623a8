"""How fast `llmjax.load` reads a model, and what the checkpoint's layout and checksums cost it: a random
model of `--model`'s shape written as a Hugging Face folder (`save_hf`), converted (`llmjax.convert`) once
for each of `--chunks` (each tensor in chunks of that many MiB; default `checkpoint.CHUNK_BYTES`) and once
with each tensor in one chunk (as before the forty-first session), then loaded in turns from: each
chunked checkpoint; the one-chunk checkpoint; a copy of that whose manifest has no checksums (as a
checkpoint from before them; its `weights` folder is a link to the other's, so both read the same
files); and the Hugging Face folder itself, with each of `--readers` threads reading a tensor. Every
turn after the first reads from the page cache. `--hf-only` converts nothing and loads only the folder;
`--keep` keeps `--dir` and reads a folder already there (so trees of llmjax can take turns on it:
`PYTHONPATH=old` runs an older library, whose reader ignores `--readers`).

    PYTHONPATH=. python -P benchmarks/load_speed.py --model llama2-7b --dir /tmp/load_speed [--turns 2]
        [--chunks 16,64] [--readers 8,1] [--hf-only] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import jax

import llmjax
from llmjax import checkpoint
from llmjax.convert import hf


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    jax.block_until_ready(out)
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--dir", required=True, help="a scratch folder (removed first, and at the end)")
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--chunks", default=str(checkpoint.CHUNK_BYTES >> 20),
                        help="chunk sizes to convert with, MiB, comma-separated (default: the library's)")
    parser.add_argument("--readers", default=str(getattr(hf, "READERS", 1)),  # (1: llmjax before the readers)
                        help="threads reading a Hugging Face tensor (`convert.hf.READERS`), comma-separated: the "
                             "folder is loaded with each (default: the library's)")
    parser.add_argument("--hf-only", action="store_true", help="no conversions: load only the Hugging Face folder")
    parser.add_argument("--keep", action="store_true",
                        help="keep --dir at the end, and read a Hugging Face folder already there as it is")
    args = parser.parse_args()
    hf_dir, one, unsummed = (os.path.join(args.dir, n) for n in ("hf", "one-chunk", "no-checksums"))
    chunked = {int(mib): os.path.join(args.dir, f"chunks-{mib}") for mib in args.chunks.split(",")}
    if args.keep and os.path.isdir(hf_dir):
        print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: reading {hf_dir} as it is", flush=True)
    else:
        shutil.rmtree(args.dir, ignore_errors=True)
        model = llmjax.init_random(args.model, dtype=args.dtype)
        _, seconds = timed(hf.save_hf, model.weights, model.config, hf_dir, dtype=args.dtype)
        print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {args.model} {args.dtype} written as a "
              f"Hugging Face folder in {seconds:.1f} s", flush=True)
        del model
    readers = [int(n) for n in args.readers.split(",")]
    folders = {f"Hugging Face, {n} readers": (hf_dir, n) for n in readers}
    if not args.hf_only:
        folders = {**{f"chunks of {mib} MiB": (f, None) for mib, f in chunked.items()}, "one chunk": (one, None),
                   "one chunk, no checksums": (unsummed, None), **folders}
        _convert(hf_dir, chunked, one, unsummed)
    times = {kind: [] for kind in folders}
    for turn in range(args.turns + 1):  # the first turn reads the files into the page cache: not counted
        for kind, (folder, n) in folders.items():
            hf.READERS = n or hf.READERS
            loaded, seconds = timed(llmjax.load, folder)
            del loaded
            print(f"turn {turn}: {kind:24s} {seconds:6.2f} s{'  (page cache warming)' if not turn else ''}",
                  flush=True)
            if turn:
                times[kind].append(seconds)
    gb = sum(os.path.getsize(os.path.join(hf_dir, f)) for f in os.listdir(hf_dir) if f.endswith(".safetensors"))
    gb /= 1e9
    print(f"best of {args.turns} turns ({gb:.2f} GB of weights):")
    for kind, seconds in times.items() if args.turns else ():
        print(f"  {kind:24s} {min(seconds):6.2f} s  {gb / min(seconds):5.2f} GB/s")
    if not args.keep:
        shutil.rmtree(args.dir)


def _convert(hf_dir: str, chunked: dict, one: str, unsummed: str) -> None:
    """The checkpoints: `hf_dir` converted with each chunk size of `chunked` (MiB: folder) and with one
    chunk a tensor (`one`); `unsummed`, `one` without its checksums."""
    chunk_bytes = checkpoint.CHUNK_BYTES
    for folder in [*chunked.values(), one, unsummed]:  # (left by a run with --keep)
        shutil.rmtree(folder, ignore_errors=True)
    for folder, chunks in [(f, mib << 20) for mib, f in chunked.items()] + [(one, None)]:
        checkpoint.CHUNK_BYTES = chunks
        _, seconds = timed(hf.convert, hf_dir, folder, progress=False)
        print(f"converted in {seconds:.1f} s, {'one chunk' if chunks is None else f'chunks of {chunks >> 20} MiB'} "
              "a tensor", flush=True)
    checkpoint.CHUNK_BYTES = chunk_bytes
    os.makedirs(unsummed)
    for name in os.listdir(one):
        if name == checkpoint.WEIGHTS_DIR:
            os.symlink(os.path.join(one, name), os.path.join(unsummed, name))
        elif name != checkpoint.MANIFEST:
            shutil.copy(os.path.join(one, name), unsummed)
    with open(os.path.join(one, checkpoint.MANIFEST)) as f:
        manifest = json.load(f)
    print(f"{sum(len(g) for g in manifest[checkpoint.CHECKSUMS].values())} tensors with checksums", flush=True)
    del manifest[checkpoint.CHECKSUMS]
    with open(os.path.join(unsummed, checkpoint.MANIFEST), "w") as f:
        json.dump(manifest, f)


if __name__ == "__main__":
    main()
