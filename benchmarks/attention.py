"""The attention kernels on one GPU: checked against their references, tuned, then timed.

    PYTHONPATH=. python benchmarks/attention.py --out DIR [--only check,sweep,prefill,decode,model]
    PYTHONPATH=. python benchmarks/attention.py --out DIR --smoke      # tiny shapes, interpret mode, CPU

Sections, in order (`--only` picks some; each prints its figures as it goes):
1. check: every kernel (flash prefill, split-K decode, paged decode) against its jnp reference on
   awkward shapes (lengths off the block grid, length 1, empty rows, offsets, grouped-query groups of
   1, 4 and 8, head dims 32, 64, 128, bf16 and f32), and cuDNN's attention against the reference.
   A failed check is printed as FAILED and makes the script exit 1 at the end.
2. sweep: a few tuning configurations per kernel on one representative shape (flash: 8k context;
   decode and paged: batch 64 x 4k, and batch 1 x 32k for the key splits), each output compared with
   the default configuration's; prints the best, which the later sections use (a configuration whose
   output disagrees is reported and never chosen).
3. prefill: causal attention TFLOP/s (4 * B * H * T^2 * D / 2 FLOPs) at 2k, 8k and 32k context with
   Llama-3-8B's heads (32 query, 8 kv, head dim 128), B = 16k tokens / context: the flash kernel
   (Triton), on Hopper the Mosaic GPU kernel (`flash_attention_mgpu`, which the model runs there),
   XLA's einsum attention (the reference; skipped where its score matrix would not fit) and
   `jax.nn.dot_product_attention(implementation="cudnn")`. They take turns, `PREFILL_TURNS` each, in
   the order `turn_order` gives (timed one after another, the one that ran later ran on a hotter GPU;
   `benchmarks/prefill_mgpu.py` times the Mosaic kernel's tunings the same way, with more options).
4. decode: effective bandwidth on cache bytes (B * context * KV * D * 2 bytes * 2 for K and V) at
   batch 1 and 64, context 1k, 4k, 8k and 32k: the contiguous kernel, the reference, and the paged
   kernel (pages of 16 tokens, block tables shuffled so pages are scattered). Small caches are
   replicated (distinct arrays read in turn) until a call reads >= 128 MB, so L2 cannot serve them.
   XLA's reference runs at batch 64 only (at batch 1 it measures launches, not attention).
5. model: prefill tokens/s of the whole Llama-3-8B shape (random weights, bf16) on one 8k prompt,
   with the kernels (`LLMJAX_ATTENTION` unset: the default tuning; on Hopper the Mosaic GPU prefill
   kernel), with the Triton prefill kernel (`LLMJAX_ATTENTION_MOSAIC=off`) and without (`off`).
6. pool: the engine's decode rows over its page pool (`run_pool`).
7. chunk: the engine's prompt chunks over its page pool, `paged_prefill` against a gathered copy
   (`run_chunk`).

Timing: each call runs `ROUNDS` times inside one jit, every round's query depending on the previous
round's output so nothing is hoisted; the figure is the median of `REPEATS` such runs / rounds
(prefill: of its turns).
Writes DIR/attention.json (every row) and DIR/attention.txt (what was printed); with `--only`,
DIR/attention-<sections>.json and .txt, so that runs of different sections do not overwrite each
other. On the H200 the whole script should take about 4 minutes, most of it compiling; run it as
`--only check,sweep,prefill,decode` and `--only model` when a command has less time than that.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.kernels import decode_attention as da, flash_attention as fa, flash_attention_mgpu as fm
from llmjax.kernels import paged_attention as pa

ROUNDS, REPEATS = 10, 5
PREFILL_TURNS = 9  # prefill's implementations take turns (`turn_order`), 9 each
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B
HBM = 4.14e12  # bytes/s, the H200's read-only ceiling measured through torch (GPU.md)
PAGE = 16
MIN_READ = 128 << 20  # bytes one timed call reads at least (L2 is 60 MB)

FLASH_CONFIGS = [dict(block_q=128, block_k=128, num_warps=8, num_stages=3),  # the default (bf16)
                 dict(block_q=128, block_k=64, num_warps=8, num_stages=3),
                 dict(block_q=128, block_k=64, num_warps=8, num_stages=2),
                 dict(block_q=128, block_k=128, num_warps=8, num_stages=2),
                 dict(block_q=128, block_k=64, num_warps=4, num_stages=3),
                 dict(block_q=64, block_k=64, num_warps=4, num_stages=3)]
FLASH_GRID = [dict(block_q=64, block_k=128, num_warps=4, num_stages=3),  # --prefill-grid adds these
              dict(block_q=64, block_k=128, num_warps=4, num_stages=2),
              dict(block_q=128, block_k=64, num_warps=8, num_stages=4),
              dict(block_q=64, block_k=64, num_warps=4, num_stages=4),
              dict(block_q=128, block_k=128, num_warps=4, num_stages=2)]
DECODE_CONFIGS = [dict(block_k=128, splits=None, num_warps=4, num_stages=2),  # the H100/H200 default
                  dict(block_k=64, splits=None, num_warps=4, num_stages=3),  # the default elsewhere
                  dict(block_k=128, splits=None, num_warps=4, num_stages=3),
                  dict(block_k=32, splits=None, num_warps=4, num_stages=4),
                  dict(block_k=64, splits=None, num_warps=8, num_stages=3),
                  dict(block_k=128, splits=None, num_warps=8, num_stages=2),
                  dict(block_k=64, splits=2, num_warps=4, num_stages=3)]
SPLIT_CONFIGS = [dict(block_k=64, splits=None, num_warps=4, num_stages=3),  # batch 1: how many key splits
                 dict(block_k=64, splits=16, num_warps=4, num_stages=3),
                 dict(block_k=64, splits=64, num_warps=4, num_stages=3)]
PAGED_CONFIGS = [dict(block_k=64, splits=None, num_warps=4, num_stages=5),  # the default
                 dict(block_k=64, splits=None, num_warps=4, num_stages=3),
                 dict(block_k=16, splits=None, num_warps=4, num_stages=6),
                 dict(block_k=32, splits=None, num_warps=4, num_stages=5),
                 dict(block_k=128, splits=None, num_warps=8, num_stages=4),
                 dict(block_k=64, splits=None, num_warps=8, num_stages=5)]


class Report:
    """Prints lines as they come and keeps them, with every measured row, for the files in DIR."""

    def __init__(self, out: str, name: str):
        self.out, self.name, self.lines, self.rows, self.failed = out, name, [], [], []
        os.makedirs(out, exist_ok=True)

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def row(self, **row) -> None:
        self.rows.append(row)

    def finish(self) -> None:
        """Saves; with failed checks, names them and exits 1."""
        if self.failed:
            self.say(f"FAILED checks: {', '.join(self.failed)}")
        self.save()
        if self.failed:
            sys.exit(1)

    def save(self) -> None:
        with open(os.path.join(self.out, self.name + ".json"), "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "rows": self.rows,
                       "failed_checks": self.failed}, f, indent=1)
        with open(os.path.join(self.out, self.name + ".txt"), "w") as f:
            f.write("\n".join(self.lines) + "\n")


# ---------------------------------------------------------------- data and timing


def normal(seed: int, shape, dtype=jnp.bfloat16) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def scattered_tables(seed: int, batch: int, pages_per_row: int, junk: bool = False) -> jax.Array:
    """Block tables giving each row distinct pages of a pool of `batch * pages_per_row`, shuffled."""
    order = jax.random.permutation(jax.random.key(seed), batch * pages_per_row).astype(jnp.int32)
    tables = order.reshape(batch, pages_per_row)
    return jnp.concatenate([tables, jnp.zeros((batch, 2), jnp.int32)], axis=1) if junk else tables


def seconds_per_call(attend, q: jax.Array, operands: list[tuple]) -> float:
    """Seconds per `attend(q, *ops)`: median of `REPEATS` runs of `runner`'s."""
    run = runner(attend, q, operands)
    return statistics.median(run() for _ in range(REPEATS))


def runner(attend, q: jax.Array, operands: list[tuple]):
    """A function that times one run, compiled here, of `ROUNDS` rounds in one jit of `attend(q, *ops)`
    over every `ops` in `operands` (distinct arrays), each round's q nudged by the last round's outputs,
    and returns seconds per call. (Alternating several runners' turns lets drift hit them alike.)"""
    @jax.jit
    def run(q, operands):
        def round_(_, q):
            total = jnp.zeros((), jnp.float32)
            for ops in operands:
                total += jnp.sum(attend(q, *ops).astype(jnp.float32))
            return q.at[(0,) * q.ndim].add((total * 1e-30).astype(q.dtype))
        return jax.lax.fori_loop(0, ROUNDS, round_, q)

    jax.block_until_ready(run(q, operands))

    def timed():
        start = time.perf_counter()
        jax.block_until_ready(run(q, operands))
        return (time.perf_counter() - start) / (ROUNDS * len(operands))
    return timed


def turn_order(names: list, turn: int) -> list:
    """The implementations' order in timed turn `turn`: rotated by one place each turn (each takes
    each place equally often), and reversed every `len(names)` turns (so each also runs right after
    each other one, not always after the same)."""
    k = turn % len(names)
    order = names[k:] + names[:k]
    return order[::-1] if turn // len(names) % 2 else order


@contextlib.contextmanager
def environment(variables: dict):
    """Sets `variables` (read by llmjax when a function is traced) for the block, then puts back what
    was there before."""
    before = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value


def error(got: jax.Array, want: jax.Array) -> float:
    """Largest absolute difference, relative to the largest |want| (NaN anywhere counts as inf)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if not np.isfinite(got).all():
        return math.inf
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-6))


def tolerance(dtype) -> float:
    return 2e-2 if dtype == jnp.bfloat16 else 1e-4


# ---------------------------------------------------------------- 1. checks


def check(report: Report, name: str, got, want, dtype) -> None:
    err = error(got, want)
    ok = err <= tolerance(dtype)
    report.say(f"  {'ok    ' if ok else 'FAILED'} {name:60s} max error {err:.1e} of the largest output")
    report.row(section="check", name=name, error=err, ok=ok)
    if not ok:
        report.failed.append(name)


def run_checks(report: Report, interpret: bool, smoke: bool) -> None:
    """The references' float32 products at full precision (a GPU's default for float32 matmuls is
    TF32, ~1e-3 relative: the kernels' exact products would be checked against a rounder answer)."""
    with jax.default_matmul_precision("highest"):
        _run_checks(report, interpret, smoke)


def _run_checks(report: Report, interpret: bool, smoke: bool) -> None:
    report.say("1. kernels against their references")
    scale = 1 if not smoke else 0
    for name, (b, t, s, h, kv, d, offsets, lengths, dtype) in {
        "flash gqa4 hd128 padded rows": (2, 1000 * scale + 37, 1000 * scale + 37, 32, 8, 128, [0, 0],
                                         [1000 * scale + 37, 600 * scale + 20], jnp.bfloat16),
        "flash gqa4 hd128 chunk at offsets": (2, 300 * scale + 20, 1300 * scale + 50, 32, 8, 128,
                                              [1000 * scale + 30, 500 * scale + 2],
                                              [1300 * scale + 50, 800 * scale + 22], jnp.bfloat16),
        "flash gqa1 hd64 empty and length-1 rows": (3, 77, 77, 16, 16, 64, [0, 0, 0], [0, 1, 77], jnp.bfloat16),
        "flash gqa8 hd32 (demo model's head dim)": (2, 77, 77, 8, 1, 32, [0, 0], [77, 50], jnp.bfloat16),
        "flash gqa4 hd64 float32": (1, 100, 100, 8, 2, 64, [0], [100], jnp.float32),
    }.items():
        q, k, v = normal(1, (b, t, h, d), dtype), normal(2, (b, s, kv, d), dtype), normal(3, (b, s, kv, d), dtype)
        offsets, lengths = jnp.array(offsets, jnp.int32), jnp.array(lengths, jnp.int32)
        tuning = dict(block_q=32, block_k=16, num_warps=4) if smoke else {}
        check(report, name, fa.flash_attention(q, k, v, offsets, lengths, interpret=interpret, **tuning),
              fa.flash_attention_reference(q, k, v, offsets, lengths), dtype)
        if name.startswith("flash gqa4 hd128 padded") and not interpret:
            got = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
            want = fa.flash_attention_reference(q, k, v, offsets, jnp.full_like(lengths, s))
            check(report, "cudnn dot_product_attention (same shape, no padding)", got, want, dtype)
    s = 4100 if not smoke else 70
    for name, (h, kv, d, splits, dtype) in {
        "decode gqa4 hd128 auto splits": (32, 8, 128, None, jnp.bfloat16),
        "decode gqa1 hd128 one split": (32, 32, 128, 1, jnp.bfloat16),
        "decode gqa8 hd64 7 splits": (64, 8, 64, 7, jnp.bfloat16),
        "decode gqa4 hd32 float32": (8, 2, 32, 3, jnp.float32),
    }.items():
        q, k, v = normal(4, (3, h, d), dtype), normal(5, (3, s, kv, d), dtype), normal(6, (3, s, kv, d), dtype)
        lengths = jnp.array([s, 1, 0], jnp.int32)
        tuning = dict(block_k=16) if smoke else {}
        check(report, name + f", lengths {s}/1/0",
              da.decode_attention(q, k, v, lengths, splits=splits, interpret=interpret, **tuning),
              da.decode_attention_reference(q, k, v, lengths), dtype)
    for page, block_k in ((16, 64), (64, 64), (128, 64), (5, 32)):
        b, h, kv, d, dtype = 3, 32, 8, 128, jnp.bfloat16
        max_pages = -(-s // page)
        tables = scattered_tables(7, b, max_pages, junk=True)
        q = normal(8, (b, h, d), dtype)
        pool = (b * max_pages, page, kv, d)
        k_pages, v_pages = normal(9, pool, dtype), normal(10, pool, dtype)
        lengths = jnp.array([s, 1, 0], jnp.int32)
        block_k = block_k if not smoke else 16
        check(report, f"paged gqa4 hd128 page {page} block_k {block_k}, lengths {s}/1/0",
              pa.paged_attention(q, k_pages, v_pages, tables, lengths, block_k=block_k, interpret=interpret),
              pa.paged_attention_reference(q, k_pages, v_pages, tables, lengths), dtype)


# ---------------------------------------------------------------- 2. sweeps


def flash_flops(b: int, t: int) -> float:
    return 4 * b * HEADS * t * t * HEAD_DIM / 2


def cache_bytes(b: int, context: int) -> int:
    return b * context * KV_HEADS * HEAD_DIM * 2 * 2


def sweep(report: Report, label: str, configs: list[dict], make_call, measure: str, figure) -> dict:
    """Times `make_call(config)` (a function of q) for each config; checks each output against the
    first config's that compiled (the default's, normally); returns the fastest config that agreed."""
    want, best, best_s = None, configs[0], math.inf
    for config in configs:
        call, q, operands = make_call(config)
        try:
            out = call(q, *operands[0])
            want = out if want is None else want
            err = error(out, want)
            seconds = seconds_per_call(call, q, operands)
        except Exception as e:  # a configuration the compiler refuses (shared memory, ...): say so
            report.say(f"  {label} {_short(config)}: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
            continue
        agrees = err <= 2e-2
        report.say(f"  {label} {_short(config)}: {seconds * 1e6:9.1f} us  {figure(seconds)}"
                   f"{'' if agrees else f'  DISAGREES with the first configuration ({err:.1e})'}")
        report.row(section="sweep", kernel=label, config=config, us=seconds * 1e6, measure=measure,
                   value=figure(seconds), agrees=agrees)
        if agrees and seconds < best_s:
            best, best_s = config, seconds
    report.say(f"  best {label}: {_short(best)}")
    return best


def _short(config: dict) -> str:
    return " ".join(f"{k.replace('num_', '')}={v}" for k, v in config.items())


def run_sweeps(report: Report, smoke: bool) -> dict:
    report.say("2. tuning sweeps (each output compared with the default configuration's)")
    t = 8192 if not smoke else 64
    b = 2 if not smoke else 1
    q = normal(11, (b, t, HEADS, HEAD_DIM))
    k, v = normal(12, (b, t, KV_HEADS, HEAD_DIM)), normal(13, (b, t, KV_HEADS, HEAD_DIM))
    zeros, full = jnp.zeros((b,), jnp.int32), jnp.full((b,), t, jnp.int32)
    if not smoke:
        check(report, f"flash (default config) at the sweep shape {b}x{t}",
              fa.flash_attention(q, k, v, zeros, full), fa.flash_attention_reference(q, k, v, zeros, full),
              jnp.bfloat16)
    best = {}
    best["flash"] = sweep(
        report, f"flash {b}x{t}", FLASH_CONFIGS if not smoke else FLASH_CONFIGS[5:],
        lambda c: (lambda q, k, v: fa.flash_attention(q, k, v, zeros, full, interpret=smoke, **c), q, [(k, v)]),
        "TFLOP/s", lambda s: f"{flash_flops(b, t) / s / 1e12:6.1f} TFLOP/s")
    for batch, context, configs in ((64, 4096, DECODE_CONFIGS), (1, 32768, SPLIT_CONFIGS)) if not smoke else \
            ((2, 64, DECODE_CONFIGS[2:3]),):
        operands = decode_operands(batch, context)
        q = normal(14, (batch, HEADS, HEAD_DIM))
        best[f"decode {batch}x{context}"] = sweep(
            report, f"decode {batch}x{context}", configs,
            lambda c: (lambda q, k, v, n: da.decode_attention(q, k, v, n, interpret=smoke, **c), q, operands),
            "TB/s", lambda s: f"{cache_bytes(batch, context) / s / 1e12:5.2f} TB/s")
    batch, context = (64, 4096) if not smoke else (2, 64)
    operands = paged_operands(batch, context)
    q = normal(15, (batch, HEADS, HEAD_DIM))
    best["paged"] = sweep(
        report, f"paged {batch}x{context} page {PAGE}", PAGED_CONFIGS if not smoke else PAGED_CONFIGS[1:2],
        lambda c: (lambda q, *ops: pa.paged_attention(q, *ops, interpret=smoke, **c), q, operands),
        "TB/s", lambda s: f"{cache_bytes(batch, context) / s / 1e12:5.2f} TB/s")
    return best


def copies(nbytes: int) -> int:
    """Distinct caches to read in turn so that one timed call reads at least `MIN_READ` bytes."""
    return max(1, -(-MIN_READ // nbytes))


def decode_operands(batch: int, context: int) -> list[tuple]:
    n = copies(cache_bytes(batch, context))
    lengths = jnp.full((batch,), context, jnp.int32)
    shape = (batch, context, KV_HEADS, HEAD_DIM)
    return [(normal(100 + 2 * i, shape), normal(101 + 2 * i, shape), lengths) for i in range(n)]


def paged_operands(batch: int, context: int) -> list[tuple]:
    n = copies(cache_bytes(batch, context))
    pages = -(-context // PAGE)
    lengths = jnp.full((batch,), context, jnp.int32)
    shape = (batch * pages, PAGE, KV_HEADS, HEAD_DIM)
    return [(normal(200 + 2 * i, shape), normal(201 + 2 * i, shape), scattered_tables(i, batch, pages), lengths)
            for i in range(n)]


# ---------------------------------------------------------------- the engine's pool


POOL_VARIANTS = [dict(), dict(compute_dtype="float16")]  # the second for float8 pages only
# (block_k, warps, stages): the engine's rows hold a few blocks each, so how many programs an SM
# keeps in flight (shared memory: stages x 2 blocks; registers) matters more than a deep pipeline.
# The fifth session's first grid (51acb7d) also had (64, 4, 5), (32, 4, 5), (32, 4, 3), (64, 4, 3),
# (16, 2, 2), (64, 8, 2), all slower than (32, 2, 2) here.
POOL_TUNINGS = [dict(block_k=k, num_warps=w, num_stages=n) for k, w, n in (
    (32, 2, 2), (32, 2, 3), (32, 4, 2), (64, 2, 3), (64, 4, 2), (128, 4, 2),
    (16, 1, 2), (32, 1, 2), (32, 1, 3), (64, 1, 2), (64, 2, 2), (128, 2, 2), (128, 2, 3))]
# `vector=True`: one query head per kv head multiplied on the CUDA cores (decode_attention.vector_block)
POOL_VECTOR_TUNINGS = [dict(vector=True, block_k=k, num_warps=w, num_stages=n) for k, w, n in (
    (32, 1, 2), (32, 1, 3), (32, 1, 4), (16, 1, 2), (16, 1, 3), (16, 1, 4), (64, 1, 2), (64, 1, 3),
    (8, 1, 3), (32, 2, 2), (64, 2, 2), (64, 4, 2))]


def run_pool(report: Report, bandwidth: float, smoke: bool, sweep: str | None) -> None:
    """The engine's decode attention on Llama-2-7B (32 query = 32 kv heads, head dim 128):
    - 384 rows of 128-256 tokens (the decode half of 1000 x 128/128), pages of 16 and 64 tokens
      scattered over the pool, bf16 pages and float8 pages (widened to q's dtype or, with q, to
      float16), the kernel's defaults and the engine's tuning (`paged_attention.TUNING`), or with
      `--pool-sweep` every tuning of `POOL_TUNINGS` (the first is the kernel's defaults), with
      `--pool-sweep vector` the engine's tuning on the tensor cores and every one of `POOL_VECTOR_TUNINGS`;
    - 64 rows of 2048-4096 tokens, pages of 16, the kernel's defaults against the engine's tuning
      (`paged_attention.TUNING`), which must not lose on long rows what it wins on short ones.
    TB/s on the cache bytes the rows hold (K and V in the page dtype); each output compared with the
    reference."""
    def engine(dtype):  # the kernel's defaults, then the engine's tuning
        return [({}, {}), ({}, pa.TUNING.get(jnp.dtype(dtype).name, {}))]

    def grid(dtype):  # float8 pages widened to bf16 were slower than to float16 in every tuning (51acb7d)
        return [(POOL_VARIANTS[dtype != jnp.bfloat16], t) for t in (POOL_TUNINGS if not smoke else POOL_TUNINGS[6:7])]

    def vector(dtype):  # the engine's tuning on the tensor cores, then the CUDA-core tunings
        tensor_cores = {**pa.TUNING.get(jnp.dtype(dtype).name, {}), "vector": False}
        return [({}, tensor_cores)] + [({}, t) for t in (POOL_VECTOR_TUNINGS if not smoke else POOL_VECTOR_TUNINGS[:1])]

    pool_shape(report, bandwidth, smoke, *((384, 32, 128, 257) if not smoke else (3, 2, 5, 40)), (16, 64),
               {None: engine, "all": grid, "vector": vector}[sweep])
    pool_shape(report, bandwidth, smoke, *((64, 32, 2048, 4097) if not smoke else (2, 2, 40, 90)), (16,), engine)


def pool_shape(report: Report, bandwidth: float, smoke: bool, rows: int, heads: int, low: int, high: int,
               pages: tuple, configs) -> None:
    """`run_pool` on one shape: rows of `low` to `high - 1` tokens, each `configs(dtype)` = [(variant,
    tuning)] timed for each page size in `pages` and page dtype."""
    report.say(f"pool: {rows} rows x {low}-{high - 1} tokens, {heads} heads = kv heads, head dim {HEAD_DIM}")
    rng = np.random.default_rng(0)
    lengths = jnp.asarray(rng.integers(low, high, rows), jnp.int32)
    q = normal(16, (rows, heads, HEAD_DIM))
    for page in pages:
        max_pages = -(-(high - 1) // page)
        order = rng.permutation(rows * max_pages)
        tables = jnp.asarray(order.reshape(rows, max_pages), jnp.int32)
        shape = (rows * max_pages, page, heads, HEAD_DIM)
        for dtype in (jnp.bfloat16, jnp.float8_e4m3fn):
            k_pages, v_pages = normal(17, shape).astype(dtype), normal(18, shape).astype(dtype)
            nbytes = int(jnp.sum(lengths)) * heads * HEAD_DIM * 2 * jnp.dtype(dtype).itemsize
            want = pa.paged_attention_reference(q, k_pages, v_pages, tables, lengths)
            for variant, tuning in configs(dtype):
                name = f"page {page} {jnp.dtype(dtype).name} {_short({**variant, **tuning}) or 'defaults'}"
                call = functools.partial(pa.paged_attention, interpret=smoke, **variant, **tuning)
                try:
                    got = call(q, k_pages, v_pages, tables, lengths)
                    err = error(got, want)
                    seconds = seconds_per_call(call, q, [(k_pages, v_pages, tables, lengths)])
                except Exception as e:  # a configuration Triton refuses is reported, not fatal
                    report.say(f"  {name}: failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
                    continue
                tb_s = nbytes / seconds / 1e12
                report.say(f"  {name:70s} {seconds * 1e6:8.1f} us {tb_s:5.2f} TB/s "
                           f"({tb_s * 1e12 / bandwidth:4.0%} of bound) error {err:.1e}")
                report.row(section="pool", rows=rows, low=low, high=high, page=page, dtype=jnp.dtype(dtype).name,
                           **variant, **tuning, us=seconds * 1e6, tb_s=tb_s, error=err)


# ---------------------------------------------------------------- the engine's prompt chunks


CHUNK_TUNINGS = [dict(), dict(block_k=32), dict(num_stages=2), dict(num_warps=8),
                 dict(block_k=128, num_warps=8, num_stages=2)]  # the first: paged_prefill's defaults


def run_chunk(report: Report, smoke: bool) -> None:
    """The engine's prompt chunks on Llama-2-7B heads (32 query = kv heads of 128): 128 rows of 64
    tokens (8192 prefill tokens a call), each the first or the second half of a 128-token prompt
    (offsets 0 and 64), over block tables 256 tokens wide with the pages scattered; bf16 pages of 16
    and float8 pages of 64 (the engine's two pools). `paged_prefill` (with `PREFILL_TUNING` under each
    of `CHUNK_TUNINGS`) against what the engine ran before it: each row's pages gathered into a
    contiguous copy in q's dtype, then the flash kernel. Each output compared with the reference."""
    rows, t, heads, width = (128, 64, 32, 256) if not smoke else (4, 16, 2, 64)
    report.say(f"chunk: {rows} rows x {t} prompt tokens, {heads} heads = kv heads, tables {width} tokens wide")
    offsets = jnp.asarray(np.arange(rows) % 2 * t, jnp.int32)
    q = normal(21, (rows, t, heads, HEAD_DIM))
    for page, dtype in ((16, jnp.bfloat16), (64, jnp.float8_e4m3fn)):
        name = jnp.dtype(dtype).name
        max_pages = width // page
        tables = scattered_tables(22, rows, max_pages)
        shape = (rows * max_pages, page, heads, HEAD_DIM)
        k_pages, v_pages = normal(23, shape).astype(dtype), normal(24, shape).astype(dtype)
        want = pa.paged_prefill_reference(q, k_pages, v_pages, tables, offsets)

        def gathered(q, k_pages, v_pages, tables, offsets):  # the engine's chunks before paged_prefill
            keys = k_pages[tables].reshape(rows, width, heads, HEAD_DIM).astype(q.dtype)
            values = v_pages[tables].reshape(rows, width, heads, HEAD_DIM).astype(q.dtype)
            return fa.flash_attention(q, keys, values, offsets, jnp.full((rows,), width, jnp.int32),
                                      interpret=smoke)

        variants = [("gather + flash kernel", gathered)] + [
            (f"paged_prefill {_short(tuning) or 'defaults'}",
             functools.partial(pa.paged_prefill, interpret=smoke, **{**pa.PREFILL_TUNING.get(name, {}), **tuning}))
            for tuning in (CHUNK_TUNINGS if not smoke else CHUNK_TUNINGS[:2])]
        for label, call in variants:
            try:
                got = call(q, k_pages, v_pages, tables, offsets)
                err = error(got, want)
                seconds = seconds_per_call(call, q, [(k_pages, v_pages, tables, offsets)])
            except Exception as e:  # a configuration Triton refuses is reported, not fatal
                first = str(e).splitlines()[0][:160]
                report.say(f"  page {page} {name}: {label}: failed ({type(e).__name__}: {first})")
                continue
            report.say(f"  page {page} {name:14s} {label:60s} {seconds * 1e6:8.1f} us  error {err:.1e}")
            report.row(section="chunk", page=page, dtype=name, variant=label, us=seconds * 1e6, error=err)


# ---------------------------------------------------------------- 3. prefill, 4. decode


def upstream_mosaic(grid: bool) -> dict:
    """JAX's own Hopper example kernel (`jax.experimental.pallas.ops.gpu.attention_mgpu`, Mosaic GPU,
    FlashAttention-3's scheme), as a peer: what TMA, wgmma and warp specialization reach on these
    shapes. Empty where it does not import."""
    try:
        from jax.experimental.pallas.ops.gpu import attention_mgpu as upstream
    except Exception:  # not every jax has it
        return {}
    blocks = ((64, 128), (64, 64)) if grid else ((64, 128),)
    return {f"jax attention_mgpu q{bq} kv{bkv} (float16)": functools.partial(  # it takes float16 only
        lambda q, k, v, c: upstream.attention(*(x.astype(jnp.float16) for x in (q, k, v)), c),
        c=upstream.TuningConfig(block_q=bq, block_kv=bkv, max_concurrent_steps=2, causal=True))
        for bq, bkv in blocks}


def run_prefill(report: Report, best: dict, smoke: bool, grid: bool = False) -> None:
    report.say("3. prefill attention, causal, 32 q / 8 kv heads, head dim 128, bf16 "
               "(batch = 16k tokens / context)")
    for t in (2048, 8192, 32768) if not smoke else (64,):
        b = max(1, 16384 // t) if not smoke else 1
        q = normal(20, (b, t, HEADS, HEAD_DIM))
        k, v = normal(21, (b, t, KV_HEADS, HEAD_DIM)), normal(22, (b, t, KV_HEADS, HEAD_DIM))
        zeros, full = jnp.zeros((b,), jnp.int32), jnp.full((b,), t, jnp.int32)
        scores_gb = b * HEADS * t * t * 4 / 1e9
        impls = {"flash kernel": lambda q, k, v: fa.flash_attention(q, k, v, zeros, full, interpret=smoke,
                                                                     **best.get("flash", {}))}
        if not smoke and fm.on_hopper():  # what the model runs on this GPU (`flash_attention.attend`)
            impls["flash kernel, Mosaic GPU"] = lambda q, k, v: fm.flash_attention(q, k, v, zeros, full)
        if scores_gb < 40:
            impls["xla einsum (reference)"] = lambda q, k, v: fa.flash_attention_reference(q, k, v, zeros, full)
        if not smoke:
            impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                          implementation="cudnn")
            impls.update(upstream_mosaic(grid))
            if grid:
                for config in FLASH_CONFIGS[1:] + FLASH_GRID:
                    impls[f"flash {_short(config)}"] = functools.partial(
                        lambda q, k, v, c: fa.flash_attention(q, k, v, zeros, full, **c), c=config)
        want, runners, errors = None, {}, {}
        for name, fn in impls.items():
            try:
                out = jax.jit(fn)(q, k, v)
                want = out if want is None else want
                errors[name] = error(out, want)
                runners[name] = runner(fn, q, [(k, v)])
            except Exception as e:
                report.say(f"  {t:6d} x{b} {name:24s} {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        times = {name: [] for name in runners}
        for turn in range(REPEATS if smoke else PREFILL_TURNS) if runners else ():  # each once a turn:
            for name in turn_order(list(runners), turn):  # drift hits them alike
                if name not in times:  # failed in an earlier turn
                    continue
                try:
                    times[name].append(runners[name]())
                except Exception as e:
                    report.say(f"  {t:6d} x{b} {name:24s} {type(e).__name__}: {str(e).splitlines()[0][:150]}")
                    del times[name]
        for name, seconds in times.items():
            s = statistics.median(seconds)
            tflops = flash_flops(b, t) / s / 1e12
            report.say(f"  {t:6d} x{b} {name:24s} {s * 1e3:8.2f} ms  {tflops:6.1f} TFLOP/s  "
                       f"(differs from the kernel's output by {errors[name]:.1e})")
            report.row(section="prefill", context=t, batch=b, impl=name, ms=s * 1e3, tflops=tflops,
                       error=errors[name], turns_ms=[x * 1e3 for x in seconds])
        if scores_gb >= 40:
            report.say(f"  {t:6d} x{b} xla einsum (reference)  skipped: its f32 scores would take "
                       f"{scores_gb:.0f} GB")


def run_decode(report: Report, best: dict, bandwidth: float, smoke: bool) -> None:
    report.say(f"4. decode attention, effective bandwidth on cache bytes (32 q / 8 kv heads, hd 128, bf16; "
               f"pages of {PAGE})")
    for batch in (1, 64) if not smoke else (2,):
        for context in (1024, 4096, 8192, 32768) if not smoke else (64,):
            tuned = best.get(f"decode {batch}x{4096 if batch > 1 else 32768}", {})
            q = normal(30, (batch, HEADS, HEAD_DIM))
            contiguous = decode_operands(batch, context)
            impls = {
                "contiguous kernel": (lambda q, k, v, n: da.decode_attention(q, k, v, n, interpret=smoke, **tuned),
                                      contiguous),
                "contiguous reference": (da.decode_attention_reference, contiguous),  # batch 64 only, below
                "paged kernel": (lambda q, *ops: pa.paged_attention(q, *ops, interpret=smoke,
                                                                    **best.get("paged", {})),
                                 paged_operands(batch, context)),
            }
            if batch == 1:  # one row: XLA's reference is bound by launches, not worth the compile time
                del impls["contiguous reference"]
            for name, (fn, operands) in impls.items():
                try:
                    s = seconds_per_call(fn, q, operands)
                except Exception as e:
                    report.say(f"  b{batch:<3d} {context:6d} {name:21s} {type(e).__name__}: "
                               f"{str(e).splitlines()[0][:150]}")
                    continue
                tb_s = cache_bytes(batch, context) / s / 1e12
                report.say(f"  b{batch:<3d} {context:6d} {name:21s} {s * 1e6:9.1f} us  {tb_s:5.2f} TB/s  "
                           f"{tb_s * 1e12 / HBM:5.1%} of 4.14 TB/s  {tb_s * 1e12 / bandwidth:5.1%} of measured")
                report.row(section="decode", batch=batch, context=context, impl=name, us=s * 1e6, tb_s=tb_s,
                           of_hbm=tb_s * 1e12 / HBM)
            del contiguous, impls


# ---------------------------------------------------------------- 5. model prefill


def run_model(report: Report, smoke: bool) -> None:
    import importlib

    import llmjax

    gen = importlib.import_module("llmjax.generate")
    preset, t = ("llama3-8b", 8192) if not smoke else ("tiny", 64)
    report.say(f"5. model prefill, {preset} shape, random bf16 weights, one prompt of {t} tokens")
    params = llmjax.init_random(preset, dtype="bfloat16")
    tokens = jax.random.randint(jax.random.key(40), (1, t), 0, params.config.vocab_size, jnp.int32)
    lengths = jnp.full((1,), t, jnp.int32)
    model = gen._model(params)
    runs = {"kernels": dict(LLMJAX_ATTENTION="auto", LLMJAX_ATTENTION_MOSAIC="auto"),
            "kernels, Triton prefill": dict(LLMJAX_ATTENTION="auto", LLMJAX_ATTENTION_MOSAIC="off"),
            "reference attention": dict(LLMJAX_ATTENTION="off")}
    if smoke:
        runs = {"kernels (interpret)": dict(LLMJAX_ATTENTION="interpret"),
                "reference attention": dict(LLMJAX_ATTENTION="off")}
    for name, env in runs.items():
        with environment(env):  # read when the prefill below is traced
            prefill = jax.jit(lambda w, ids, n, cache: gen._prefill(model, w, ids, n, cache), donate_argnums=3)
            cache = llmjax.cache.KVCache.zeros(params.config, 1, t, params.dtype)
            logits, cache = prefill(params.weights, tokens, lengths, cache)
            jax.block_until_ready(logits)
        times = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            logits, cache = prefill(params.weights, tokens, lengths, cache)
            jax.block_until_ready(logits)
            times.append(time.perf_counter() - start)
        s = statistics.median(times)
        report.say(f"  {name:24s} {s * 1e3:8.1f} ms  {t / s:9.0f} tok/s")
        report.row(section="model", preset=preset, tokens=t, attention=name, ms=s * 1e3, tok_s=t / s)
        del cache


SECTIONS = ("check", "sweep", "prefill", "decode", "model", "pool", "chunk")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated: " + ", ".join(SECTIONS))
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (a CPU dry run)")
    parser.add_argument("--prefill-grid", action="store_true",
                        help="prefill: more flash tunings, and JAX's Mosaic GPU example at two block sizes")
    parser.add_argument("--pool-sweep", nargs="?", const="all", choices=("all", "vector"),
                        help="pool: every tuning on the engine's rows (vector: the CUDA-core tunings)")
    args = parser.parse_args()
    only = args.only.split(",")
    if not set(only) <= set(SECTIONS):
        parser.error(f"--only takes {', '.join(SECTIONS)}; got {args.only}")
    if args.smoke:
        global ROUNDS, REPEATS, MIN_READ
        ROUNDS, REPEATS, MIN_READ = 1, 1, 0
    report = Report(args.out, "attention" if set(only) == set(SECTIONS) else "attention-" + "-".join(only))
    from llmjax.bench import measure_bandwidth

    bandwidth = measure_bandwidth()
    report.say(f"{jax.devices()[0].device_kind}, jax {jax.__version__}; XLA read bandwidth measured "
               f"{bandwidth / 1e12:.2f} TB/s")
    report.row(section="bandwidth", tb_s=bandwidth / 1e12)
    start, best = time.perf_counter(), {}
    for section in SECTIONS:
        if section not in only:
            continue
        if section == "check":
            run_checks(report, interpret=args.smoke, smoke=args.smoke)
        elif section == "sweep":
            best = run_sweeps(report, args.smoke)
        elif section == "prefill":
            run_prefill(report, best, args.smoke, args.prefill_grid)
        elif section == "decode":
            run_decode(report, best, bandwidth, args.smoke)
        elif section == "pool":
            run_pool(report, bandwidth, args.smoke, args.pool_sweep)
        elif section == "chunk":
            run_chunk(report, args.smoke)
        else:
            run_model(report, args.smoke)
        report.say(f"  ({section} done at {time.perf_counter() - start:.0f} s)")
        report.save()
    report.finish()


if __name__ == "__main__":
    main()
