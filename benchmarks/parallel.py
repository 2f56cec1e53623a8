"""Tensor against pipeline parallelism on several GPUs: same tokens, time per token, throughput, and
what an all-reduce costs.

    PYTHONPATH=. python benchmarks/parallel.py --out DIR [--only tp2,pp2] [--budget-s 480]

On 2 GPUs (and more layouts when 4 are present), with random bf16 weights made on the GPUs
(`llmjax.init_random(mesh=...)`):
1. all-reduce: a psum over `tensor` of one decode activation (`[1, hidden]`, and `[64, hidden]`),
   chained N times inside one jit: microseconds per all-reduce, and per token (two per layer).
2. Llama-2-13B shape, for each layout (tp1 on one GPU, tp2, pp2; tp4, pp4, tp2pp2 with 4 GPUs):
   - first, greedy tokens of one prompt (8 tokens, 32 new) compared with tp1's. Random weights give
     near-ties between logits, so a different summation order may change a token; the table says
     how many of the 32 agree and where the first difference is;
   - then batch 1, prompt 8, 256 new tokens: ms per output token against the bandwidth bound
     (`llmjax.bench.bench`; under pipeline parallelism the bound adds up the stages, which a token
     passes one after another);
   - batch 64, 128 in and 128 out: decode throughput (all sequences) and end to end.
3. Llama-2-70B shape at tensor=2: batch-1 tok/s against its bound (the weights per GPU over the
   measured bandwidth).
The tensor layouts sum with the default all-reduce (`LLMJAX_ALLREDUCE=auto`: llmjax's NVLink kernel on
two CUDA GPUs since 66843b5, while part 1 times XLA's psum); `LLMJAX_ALLREDUCE=xla` gives the
layouts of the earlier sessions' tables. Each layout runs in its own try block, so one failure is
printed and the rest still run. Layouts whose estimated time would pass `--budget-s` are skipped and
listed. Writes DIR/parallel.json and
DIR/parallel.txt (the table) and prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from llmjax import bench
from llmjax.config import LlamaConfig
from llmjax.sharding import make_mesh

gen = bench.gen
# name: (preset, mesh degrees, GPUs needed, rough seconds it takes: init, 3 compilations, runs)
LAYOUTS = {
    "tp1": ("llama2-13b", {}, 1, 80),
    "tp2": ("llama2-13b", dict(tensor=2), 2, 80),
    "pp2": ("llama2-13b", dict(stage=2), 2, 110),
    "70b-tp2": ("llama2-70b", dict(tensor=2), 2, 150),
    "tp4": ("llama2-13b", dict(tensor=4), 4, 80),
    "pp4": ("llama2-13b", dict(stage=4), 4, 150),
    "tp2pp2": ("llama2-13b", dict(tensor=2, stage=2), 4, 110),
}
CHECK_TOKENS = 32
# --smoke: every preset replaced by a small model, to check the script on CPU with fake devices
SMOKE = dataclasses.replace(LlamaConfig.preset("tiny"), num_layers=4, num_heads=8, num_kv_heads=4,
                            intermediate_size=192, vocab_size=512, max_position_embeddings=512)


def _mesh(degrees: dict):
    if not degrees:
        return None
    count = degrees.get("tensor", 1) * degrees.get("stage", 1)
    return make_mesh(**degrees, devices=jax.devices()[:count])


def allreduce_us(tensor: int, hidden: int, rows: int, chain: int = 160,
                 repeats: int = 20) -> tuple[float, str]:
    """Microseconds per all-reduce of a bf16 `[rows, hidden]` activation over `tensor` GPUs, and the
    dtype: `chain` dependent psums inside one jit (each followed by the scaling a residual add would
    be), timed as the median of `repeats` calls."""
    mesh = make_mesh(tensor=tensor, devices=jax.devices()[:tensor])

    def body(x):
        for _ in range(chain):
            x = jax.lax.psum(x, "tensor") * (1.0 / tensor)
        return x

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), axis_names={"tensor"},
                              check_vma=False))
    # float32 on CPU (--smoke): XLA's CPU backend aborts on a bfloat16 psum inside shard_map
    x = jnp.ones((rows, hidden), jnp.float32 if jax.devices()[0].platform == "cpu" else jnp.bfloat16)
    f(x).block_until_ready()
    return bench._median_time(lambda: f(x), repeats) / chain * 1e6, x.dtype.name


def greedy_tokens(params, count: int, gen_len: int, seed: int = 0) -> list[int]:
    """The first `count` greedy tokens for the prompt `bench.bench(batch=1, prompt_len=8,
    gen_len=gen_len, seed=seed)` uses, through the very program it compiles (so it compiles once)."""
    config = params.config
    prompt = np.random.default_rng(seed).integers(3, config.vocab_size, (1, 8)).tolist()
    bucket = gen._bucket(8, config.max_position_embeddings)
    model = gen._model(params)
    out, _ = gen.generate_ids_fn(model)(
        params.weights, jnp.asarray(gen._pad(prompt, bucket)), jnp.full((1,), 8, jnp.int32),
        jnp.ones((1,), bool), jnp.int32(count), jnp.asarray([gen.PAD_ID], jnp.int32),
        gen.Sampling().arrays(1), jax.random.key(seed), jnp.arange(1, dtype=jnp.int32),
        model=model, cache_len=gen._cache_len(params, bucket, gen_len),
        out_len=gen._bucket(gen_len), greedy=True, filters=())
    return np.asarray(out)[0, :count].tolist()


def _config(preset: str, smoke: bool) -> LlamaConfig:
    return SMOKE if smoke else LlamaConfig.preset(preset)


def run_layout(name: str, bandwidth: float, reference: list[int] | None, smoke: bool,
               check_dtype: str = "bfloat16", check_only: bool = False) -> dict:
    preset, degrees, _, _ = LAYOUTS[name]
    mesh, config = _mesh(degrees), _config(preset, smoke)
    row = {"layout": name, "preset": preset, "check_dtype": check_dtype,
           **{k: degrees.get(k, 1) for k in ("tensor", "stage")}}
    # The token check, on the timed bf16 weights or on float32 weights of its own (full-precision
    # products, so that a summation order cannot flip a near-tie); the bf16 weights are made only
    # when something is timed.
    t = time.perf_counter()
    with jax.default_matmul_precision("highest" if check_dtype == "float32" else None):
        check = bench.random_params(config, check_dtype, 0, mesh)
        jax.block_until_ready(check.weights)
        row["init_s"] = time.perf_counter() - t
        tokens = greedy_tokens(check, CHECK_TOKENS, gen_len=256)
    row["check_s"] = time.perf_counter() - t - row["init_s"]
    row["tokens"] = tokens
    if reference is not None:
        same = [a == b for a, b in zip(tokens, reference)]
        row["tokens_agree"] = sum(same)
        row["first_difference"] = same.index(False) if not all(same) else None
    print(f"[{name}] {check_dtype} weights made in {row['init_s']:.0f} s, compile + {CHECK_TOKENS} tokens {row['check_s']:.0f} s, "
          f"tokens agree with tp1: {row.get('tokens_agree', '-')}/{CHECK_TOKENS}: {tokens}", flush=True)
    if check_only:
        row["check_only"] = True
        return row
    if check_dtype == "bfloat16":
        params = check
    else:
        del check
        gc.collect()
        params = bench.random_params(config, "bfloat16", 0, mesh)
    row["weights_per_gpu_gb"] = sum(bench._per_device(w) for w in jax.tree.leaves(params.weights)) / 1e9
    one = bench.bench(config, batch=1, prompt_len=8, gen_len=256, repeats=3, mesh=mesh, params=params,
                      bandwidth=bandwidth)
    print(one.report(), flush=True)
    row.update(ms_per_token=one.decode_ms_per_step, tok_s=one.decode_tok_s, bound_tok_s=one.bound_tok_s,
               fraction_of_bound=one.fraction_of_bound, prefill_ms=one.prefill_ms,
               peak_memory_gib=one.peak_memory_gib)
    if not preset.endswith("70b"):
        t = time.perf_counter()
        many = bench.bench(config, batch=64, prompt_len=128, gen_len=128, repeats=2, mesh=mesh, params=params,
                           bandwidth=bandwidth)
        print(many.report(), flush=True)
        row.update(batch64_decode_tok_s=many.throughput_tok_s,
                   batch64_end_to_end_tok_s=many.end_to_end_tok_s * 64, batch64_prefill_ms=many.prefill_ms,
                   batch64_s=time.perf_counter() - t)
    return row


def table(rows: list[dict], allreduce: list[dict]) -> str:
    lines = [f"device {jax.devices()[0].device_kind} x {len(jax.devices())}, jax {jax.__version__}", "",
             "all-reduce of one decode activation, chained inside one jit:"]
    for a in allreduce:
        lines.append(f"  tensor={a['tensor']} [{a['rows']}, {a['hidden']}] {a['dtype']}: {a['us']:.1f} us "
                     f"each; {a['per_step']} per decode step ({a['preset']}) -> "
                     f"{a['us'] * a['per_step'] / 1e3:.2f} ms")
    head = (f"{'layout':8} {'model':11} {'GB/GPU':>7} {'tokens=tp1':>10} {'ms/tok':>7} {'tok/s':>7} "
            f"{'bound':>7} {'of bound':>8} {'b64 dec tok/s':>13} {'b64 e2e tok/s':>13}")
    lines += ["", head, "-" * len(head)]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"{r['layout']:8} {r.get('error') or r['skipped']}")
            continue
        if r.get("check_only"):
            agree = f"{r['tokens_agree']}/{CHECK_TOKENS}" if "tokens_agree" in r else "ref"
            lines.append(f"{r['layout']:8} {r['preset']:11} {'':7} {agree:>10} (token check only)")
            continue
        agree = "ref" if r["layout"] == "tp1" else "-"
        if "tokens_agree" in r:
            agree = f"{r['tokens_agree']}/{CHECK_TOKENS}"
        lines.append(f"{r['layout']:8} {r['preset']:11} {r['weights_per_gpu_gb']:7.1f} {agree:>10} "
                     f"{r['ms_per_token']:7.2f} {r['tok_s']:7.1f} {r['bound_tok_s']:7.1f} "
                     f"{r['fraction_of_bound']:8.1%} {r.get('batch64_decode_tok_s', float('nan')):13.0f} "
                     f"{r.get('batch64_end_to_end_tok_s', float('nan')):13.0f}")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for parallel.json and parallel.txt")
    parser.add_argument("--only", help=f"comma-separated layouts among {', '.join(LAYOUTS)}")
    parser.add_argument("--budget-s", type=float, default=480, help="skip layouts that would end later")
    parser.add_argument("--check-dtype", default="bfloat16", choices=("bfloat16", "float32"),
                        help="weights of the greedy-token check (float32: its own weights, products at "
                             "full precision, so that a summation order cannot flip a near-tie)")
    parser.add_argument("--check-only", metavar="L1,L2", help="layouts that run only the token check "
                        "(no timing), e.g. tp1 when only its tokens are needed as the reference")
    parser.add_argument("--no-allreduce", action="store_true", help="skip the all-reduce timing")
    parser.add_argument("--smoke", action="store_true",
                        help="a tiny model instead of every preset: checks the script on CPU "
                             "(XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    gpus = len(jax.devices())
    fitting = [n for n, (_, _, need, _) in LAYOUTS.items() if need <= gpus]
    names = args.only.split(",") if args.only else fitting
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        parser.error(f"unknown layouts {unknown}; choose among {', '.join(LAYOUTS)}")

    check_only = set(args.check_only.split(",")) if args.check_only else set()
    allreduce = []
    for tensor in sorted({LAYOUTS[n][1].get("tensor", 1) for n in names} - {1}) if not args.no_allreduce else ():
        for preset, rows in (("llama2-13b", 1), ("llama2-70b", 1), ("llama2-13b", 64)):
            c = _config(preset, args.smoke)
            try:
                us, dtype = allreduce_us(tensor, c.hidden_size, rows)
            except Exception as e:  # one failure must not stop the rest
                print(f"all-reduce tensor={tensor} [{rows}, {c.hidden_size}] failed: {e!r}", flush=True)
                continue
            allreduce.append(dict(tensor=tensor, rows=rows, hidden=c.hidden_size, dtype=dtype, us=us,
                                  per_step=2 * c.num_layers, preset=preset))
            print(f"all-reduce tensor={tensor} [{rows}, {c.hidden_size}] {dtype}: {us:.1f} us", flush=True)
    bandwidth = bench.measure_bandwidth()
    print(f"bandwidth (XLA reads, one GPU): {bandwidth / 1e12:.2f} TB/s", flush=True)

    rows, reference = [], None
    for name in names:
        estimate = LAYOUTS[name][3]
        if name in check_only:
            estimate = 40
        if time.perf_counter() - start + estimate > args.budget_s:
            why = f"skipped: ~{estimate} s more would pass --budget-s {args.budget_s:.0f}"
            rows.append({"layout": name, "skipped": why})
            print(rows[-1]["skipped"], flush=True)
            continue
        try:
            same_model = LAYOUTS[name][0] == "llama2-13b"
            row = run_layout(name, bandwidth, reference if same_model else None, args.smoke, args.check_dtype,
                             name in check_only)
            if name == "tp1":
                reference = row["tokens"]
        except Exception as e:  # one failure must not stop the rest
            traceback.print_exc()
            row = {"layout": name, "error": f"failed: {type(e).__name__}: {str(e)[:300]}"}
        row["elapsed_s"] = time.perf_counter() - start
        rows.append(row)
        gc.collect()  # the layout's weights go before the next one's are made
        write(args.out, rows, allreduce, bandwidth, start)  # a run cut short keeps what it measured

    write(args.out, rows, allreduce, bandwidth, start)  # with the layouts skipped at the end
    print("\n" + table(rows, allreduce))
    print(f"total {time.perf_counter() - start:.0f} s; wrote {args.out}/parallel.json and parallel.txt")


def write(out: str, rows: list[dict], allreduce: list[dict], bandwidth: float, start: float) -> None:
    with open(os.path.join(out, "parallel.txt"), "w", encoding="utf-8") as f:
        f.write(table(rows, allreduce) + "\n")
    with open(os.path.join(out, "parallel.json"), "w", encoding="utf-8") as f:
        json.dump({"device": jax.devices()[0].device_kind, "gpus": len(jax.devices()), "jax": jax.__version__,
                   "bandwidth_tb_s": bandwidth / 1e12, "allreduce": allreduce, "layouts": rows,
                   "total_s": time.perf_counter() - start}, f, indent=2)


if __name__ == "__main__":
    main()
