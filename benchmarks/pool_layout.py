"""Would a head-major page pool read faster? The engine's pool keeps a page's tokens token-major
(`[num_pages, page_size, KV, D]`: one token's heads together), so a decode program, which reads one kv
head, reads `D` bytes per token (128 for float8 at head dim 128) at a stride of `KV * D`. Head-major
pages (`[num_pages, KV, page_size, D]`) would give it `page_size * D` contiguous bytes per page.

    PYTHONPATH=$PWD python benchmarks/pool_layout.py [--pages 16,64] [--smoke]

The kernel is unchanged: a head-major pool is the same kernel over one kv head, each (row, head) a row
of its own, its table pointing at `page * KV + head` in the pool viewed as `[num_pages * KV,
page_size, 1, D]`. Both layouts run the engine's decode rows (384 rows of 128-256 tokens, 7B heads)
with `paged_attention.TUNING`, bf16 and float8 pages, are checked against the reference, and are
timed as `attention.py` times its pool section (TB/s on the cache bytes the rows hold).
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np

import attention as bench
from llmjax.kernels import paged_attention as pa


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pages", default="16,64")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (a CPU dry run)")
    args = parser.parse_args()
    rows, heads, low, high = (384, 32, 128, 257) if not args.smoke else (3, 2, 5, 40)
    if args.smoke:
        bench.ROUNDS, bench.REPEATS, bench.MIN_READ = 1, 1, 0
    d = bench.HEAD_DIM
    rng = np.random.default_rng(0)
    lengths = jnp.asarray(rng.integers(low, high, rows), jnp.int32)
    q = bench.normal(16, (rows, heads, d))
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}: {rows} rows x {low}-{high - 1} tokens, "
          f"{heads} heads = kv heads, head dim {d}")
    for page in map(int, args.pages.split(",")):
        max_pages = -(-(high - 1) // page)
        tables = jnp.asarray(rng.permutation(rows * max_pages).reshape(rows, max_pages), jnp.int32)
        shape = (rows * max_pages, page, heads, d)
        for dtype in (jnp.bfloat16, jnp.float8_e4m3fn):
            k_pages, v_pages = bench.normal(17, shape).astype(dtype), bench.normal(18, shape).astype(dtype)
            tuning = pa.TUNING.get(jnp.dtype(dtype).name, {})
            call = functools.partial(pa.paged_attention, interpret=args.smoke, **tuning)
            want = pa.paged_attention_reference(q, k_pages, v_pages, tables, lengths)
            nbytes = int(jnp.sum(lengths)) * heads * d * 2 * jnp.dtype(dtype).itemsize
            # head-major: pages [N, KV, page, D] seen as N * KV pages of one head; row (b, h) reads page
            # table[b, i] * KV + h
            head_major = [x.transpose(0, 2, 1, 3).reshape(-1, page, 1, d) for x in (k_pages, v_pages)]
            tables_hm = (tables[:, None, :] * heads + jnp.arange(heads)[None, :, None]).reshape(rows * heads, -1)
            layouts = {
                "token-major (the engine's)": (q, (k_pages, v_pages, tables, lengths), lambda out: out),
                "head-major": (q.reshape(rows * heads, 1, d), (*head_major, tables_hm, jnp.repeat(lengths, heads)),
                               lambda out: out.reshape(rows, heads, d)),
            }
            for name, (q_in, operands, back) in layouts.items():
                err = bench.error(back(call(q_in, *operands)), want)
                seconds = bench.seconds_per_call(call, q_in, [operands])
                tb_s = nbytes / seconds / 1e12
                print(f"  page {page:3d} {jnp.dtype(dtype).name:14s} {name:28s} {seconds * 1e6:8.1f} us "
                      f"{tb_s:5.2f} TB/s  error {err:.1e}", flush=True)
                if not err < (2e-2 if not args.smoke else 1e-1):
                    raise SystemExit(f"{name}: error {err} against the reference")


if __name__ == "__main__":
    main()
