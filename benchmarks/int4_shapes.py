"""Batch-1 int4 decode end to end under per-shape configurations of the one-row kernel.

    PYTHONPATH=. python benchmarks/int4_shapes.py --model llama2-7b --out DIR [--variants a,b] [--rounds 2]

Each variant sets `int4_matmul.ONE_ROW_BY_SHAPE` (the packed kernel's configuration per weight shape
(K, N)) and the one-row kind (`hfma2` for the variants named so, else the default,
`int4_matmul.DEFAULT_ONE_ROW_KIND`), and times `llmjax.bench` on the same random int4-g128 weights,
in one process, with the bandwidth measured once. Variants run in turn for `--rounds` rounds, so drift shows as the spread of
one variant between rounds. Writes `int4_shapes.json` into DIR and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics

import jax

from llmjax import bench
from llmjax.kernels import int4_matmul as K


def packed(bn, bk, sp, nw=4, ns=3):
    return K.Int4Config(K.DEFAULT_ONE_ROW_KIND, block_n=bn, block_k=bk, splits=sp, num_warps=nw, num_stages=ns)


LIBRARY_TABLE = dict(K.ONE_ROW_BY_SHAPE)  # variant "default"; every other variant replaces the table


def variants(config) -> dict[str, dict]:
    """(K, N) of the four projections of a layer, and the variants over them."""
    d, f = config.hidden_size, config.intermediate_size
    qkv = (d, (config.num_heads + 2 * config.num_kv_heads) * config.head_dim)
    o, gate_up, down = (config.num_heads * config.head_dim, d), (d, 2 * f), (f, d)
    narrow = (o, down)  # few outputs: the shapes that read slowest in the model
    return {
        "default": LIBRARY_TABLE,
        "rule": {},  # no table: the blocks by program count alone (the default before the fifteenth session)
        "bn64 everywhere": {s: K.DECODE_PACKED for s in (qkv, o, gate_up, down)},
        "narrow bn32": {s: packed(32, 512, 16) for s in narrow},
        "narrow bk256": {s: packed(64, 256, 16) for s in narrow},
        "narrow bn32 bk256 sp32": {s: packed(32, 256, 32) for s in narrow},
        "narrow sp32": {s: packed(64, 512, 32) for s in narrow},
        "narrow bn32 warps2": {s: packed(32, 512, 16, 2) for s in narrow},
        "narrow bn16 warps2": {s: packed(16, 512, 16, 2) for s in narrow},
        "wide bn32": {s: packed(32, 512, 16) for s in (qkv, gate_up)},
        "wide bn128 warps8": {s: packed(128, 512, 16, 8) for s in (qkv, gate_up)},
        "all bn32": {s: packed(32, 512, 16) for s in (qkv, o, gate_up, down)},
        # from the fifteenth session's --grid --kernel-time sweep (BENCHMARKS.md): q/k/v and down the
        # fastest kernel alone, o and gate/up within 0.2 us of it and faster as whole products
        "sweep15": {qkv: packed(128, 512, 4), o: packed(64, 512, 16, 8), gate_up: packed(32, 1024, 16),
                    down: packed(64, 512, 16)},
        "sweep15 qkv down": {qkv: packed(128, 512, 4), down: packed(64, 512, 16)},
        # the rule's blocks, one word a float16 sum (kind hfma2, the default before the fourteenth session;
        # the table's entries are hfma4's and serve that kind only)
        "hfma2": {},
        "hfma2 bn64 everywhere": {s: dataclasses.replace(K.DECODE_PACKED, kind="hfma2")
                                  for s in (qkv, o, gate_up, down)},
    }


def fastest_alone(config, name: str) -> dict:
    """Variant `sweep:PATH`: for each projection of the model, the configuration whose kernel alone was
    fastest in PATH, an `int4_matmul.json` of `benchmarks/int4_matmul.py --kernel-time`."""
    rows = json.load(open(name.split(":", 1)[1]))["rows"]
    best = {}
    for row in rows:  # kernels alone at one row in the default one-row kind: what the variant runs
        if row.get("kernel_only") and row["m"] == 1 and row["config"]["kind"] == K.DEFAULT_ONE_ROW_KIND:
            k, n = map(int, row["shape"].split("x"))
            if (k, n) not in best or row["us"] < best[(k, n)][0]:
                best[(k, n)] = (row["us"], K.Int4Config(**row["config"]))
    table = {s: best[s][1] for s in variants(config)["all bn32"] if s in best}
    for s, c in table.items():
        print(f"{name}: {s[0]}x{s[1]} {c} ({best[s][0]:.2f} us alone)")
    return table


def kind_of(variant: str) -> str:
    """The one-row kind a variant runs with (a table entry of another kind then gives way to the rule)."""
    return "hfma2" if variant.startswith("hfma2") else K.DEFAULT_ONE_ROW_KIND


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--dtype", default="int4-g128")
    parser.add_argument("--variants", default=None, help="comma-separated names (default: all)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    config = bench._model_config(args.model, args.dtype)
    params = bench.random_params(config, args.dtype, 0)
    table = variants(params.config)
    names = args.variants.split(",") if args.variants else list(table)
    table.update({n: fastest_alone(params.config, n) for n in names if n.startswith("sweep:")})
    bandwidth = bench.measure_bandwidth()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.model} {args.dtype}, "
          f"bandwidth {bandwidth / 1e12:.2f} TB/s")
    results = {name: [] for name in names}
    for round_ in range(args.rounds):
        for name in names:
            K.ONE_ROW_BY_SHAPE.clear()
            K.ONE_ROW_BY_SHAPE.update(table[name])
            K.set_one_row_kind(kind_of(name))
            jax.clear_caches()  # the table is read when the loop is traced
            r = bench.bench(args.model, dtype=args.dtype, params=params, bandwidth=bandwidth, gen_len=args.gen_len)
            results[name].append(r.decode_tok_s)
            print(f"round {round_} {name:26s} {r.decode_tok_s:7.1f} tok/s ({r.decode_ms_per_step:.3f} ms/step, "
                  f"{100 * r.fraction_of_bound:.1f}% of bound)", flush=True)
    print("\nvariant                     median tok/s  runs")
    for name, runs in results.items():
        print(f"{name:26s} {statistics.median(runs):9.1f}    {', '.join(f'{x:.1f}' for x in runs)}")
    with open(os.path.join(args.out, "int4_shapes.json"), "w") as f:
        json.dump({"model": args.model, "dtype": args.dtype, "device": jax.devices()[0].device_kind,
                   "jax": jax.__version__, "tok_s": results,
                   "variants": {n: {f"{k}x{n_}": vars(c) for (k, n_), c in table[n].items()} for n in names},
                   "one_row_kind": {n: kind_of(n) for n in names}},
                  f, indent=1)


if __name__ == "__main__":
    main()
