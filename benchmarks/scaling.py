"""Multi-GPU scaling: batch-1 latency and batch throughput over mesh shapes, the tables and the plot.

    PYTHONPATH=. python benchmarks/scaling.py --out DIR \
        [--models llama2-70b,codellama-34b] [--dtypes bfloat16,int4-g128] \
        [--meshes tensor=1,tensor=2,tensor=4,tensor=8,stage=2,stage=4,tensor=2+stage=2] \
        [--budget-s 540]
    PYTHONPATH=. python benchmarks/scaling.py --out DIR --plot-only [--bandwidth-tb-s 4.28]
        # the table and plot again from DIR/scaling.json; a run writes only its own rows there, and
        # rows of several runs put together in one file (benchmarks/results/scaling.json) are
        # compared against one bandwidth with --bandwidth-tb-s

For every (model, dtype, mesh) that the machine's GPUs and memory allow, the random weights are made
once, in place on the mesh's devices (the first `tensor * stage` GPUs), and two `llmjax bench` runs
share them: latency (batch 1, prompt 8, 256 new tokens) and throughput (batch `--batch`, 128 in /
128 out). Each configuration is wrapped so that a failure is recorded and the rest still run; the
results are written after every configuration, so a run cut short by `--budget-s` (no new
configuration starts after it) or by the device's time limit still returns what it measured. The
bound is per GPU: the bytes one GPU reads per step over the bandwidth measured once at the start.
"""

import argparse
import gc
import json
import os
import time
import traceback

import jax

from llmjax import bench
from llmjax.config import PRESETS
from llmjax.models.llama import abstract_params, count_params
from llmjax.sharding import make_mesh

GIB = 2**30


def parse_mesh(spec: str) -> dict:
    """`"tensor=2+stage=2"` -> {"tensor": 2, "stage": 2}."""
    degrees = {}
    for part in spec.split("+"):
        key, _, value = part.partition("=")
        if key not in ("tensor", "stage") or not value.isdigit():
            raise ValueError(f"a mesh is tensor=N, stage=M or tensor=N+stage=M; got {spec!r}")
        degrees[key] = int(value)
    return degrees


def weight_gib(model: str, dtype: str) -> float:
    """The weights' size: bf16 at 2 bytes a weight, int4 with group-128 bf16 scales at ~0.52."""
    count = count_params(abstract_params(PRESETS[model]))
    return count * (2 if dtype == "bfloat16" else 0.5 + 2 / 128) / GIB


def run_config(model, dtype, degrees, args, bandwidth) -> list[dict]:
    gpus = degrees.get("tensor", 1) * degrees.get("stage", 1)
    mesh = make_mesh(**degrees, devices=jax.devices()[:gpus])
    config = bench._model_config(model, dtype)
    t = time.perf_counter()
    params = bench.random_params(config, dtype, seed=0, mesh=mesh)
    jax.block_until_ready(params.weights)
    init_s = time.perf_counter() - t
    print(f"[{model} {dtype} {label(degrees)}] random weights made in {init_s:.0f} s", flush=True)
    rows = []
    runs = (("latency", dict(batch=1, prompt_len=8, gen_len=args.gen_len)),
            ("throughput", dict(batch=args.batch, prompt_len=args.io, gen_len=args.io)))
    for kind, shape in (run for run in runs if run[0] in args.kinds.split(",")):
        t = time.perf_counter()
        r = bench.bench(model, dtype=dtype, repeats=args.repeats, mesh=mesh, params=params,
                        bandwidth=bandwidth, **shape)
        print(r.report(), f"(compile and runs: {time.perf_counter() - t:.0f} s)", sep="\n", end="\n\n",
              flush=True)
        rows.append(dict(model=model, dtype=dtype, mesh=degrees, gpus=gpus, kind=kind, batch=r.batch,
                         prompt_len=r.prompt_len, gen_len=r.gen_len, tok_s=r.decode_tok_s,
                         throughput_tok_s=r.throughput_tok_s, per_gpu_tok_s=r.throughput_tok_s / gpus,
                         ms_per_step=r.decode_ms_per_step, end_to_end_tok_s=r.end_to_end_tok_s,
                         bound_tok_s=r.bound_tok_s, fraction_of_bound=r.fraction_of_bound,
                         prefill_ms=r.prefill_ms, peak_memory_gib=r.peak_memory_gib,
                         bandwidth_tb_s=bandwidth / 1e12, gb_per_step=r.bytes_per_step / 1e9,
                         xla_flags=os.environ.get("XLA_FLAGS", ""), init_s=init_s,
                         seconds=time.perf_counter() - t))
    return rows


def label(degrees: dict) -> str:
    return " x ".join(f"{k}={v}" for k, v in degrees.items())


def table(rows: list[dict], bandwidth: float | None = None) -> str:
    """The markdown table. "of bound" is each row's own (its run's measured bandwidth), or, with
    `bandwidth` (bytes/s), against that one figure for every row, so that rows from different runs
    compare."""
    def of_bound(r):
        if bandwidth is None:
            return r["fraction_of_bound"]
        return r["tok_s"] * r["gb_per_step"] * 1e9 / bandwidth

    lines = ["| model | dtype | mesh | GPUs | batch-1 tok/s | of bound | ms/token | "
             "throughput tok/s (batch) | per GPU |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["model"], r["dtype"], label(r["mesh"])), {})[r.get("kind", "error")] = r
    for (model, dtype, mesh), parts in keyed.items():
        lat, thr, err = parts.get("latency"), parts.get("throughput"), parts.get("error")
        gpus = (lat or thr or err)["gpus"]
        if lat is None and err is not None:
            lines.append(f"| {model} | {dtype} | {mesh} | {gpus} | failed: {err['error'][:80]} | | | | |")
            continue
        cells = [f"{lat['tok_s']:.1f}", f"{of_bound(lat):.1%}", f"{lat['ms_per_step']:.2f}"] if lat \
            else ["–"] * 3
        cells += [f"{thr['throughput_tok_s']:,.0f} (b{thr['batch']})", f"{thr['per_gpu_tok_s']:,.0f}"] if thr \
            else ["–"] * 2
        lines.append(f"| {model} | {dtype} | {mesh} | {gpus} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    """Batch-1 tok/s against GPUs: a colour per model and dtype, a line style per kind of mesh (the
    one-GPU point, where there is one, starts the tensor and pipeline lines of its model and dtype;
    a mixed mesh starts at 4 GPUs, so its points stand alone)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"tensor": ("-", "o"), "pipeline": ("--", "s"), "tensor x pipeline": (":", "^")}
    series, single = {}, {}
    for r in rows:
        if r.get("kind") != "latency":
            continue
        if r["gpus"] == 1:
            single[(r["model"], r["dtype"])] = (1, r["tok_s"])
            continue
        kind = "tensor" if "stage" not in r["mesh"] else (
            "pipeline" if r["mesh"].get("tensor", 1) == 1 else "tensor x pipeline")
        series.setdefault((r["model"], r["dtype"]), {}).setdefault(kind, []).append((r["gpus"], r["tok_s"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    for colour, key in enumerate(sorted(set(series) | set(single))):
        for kind, points in sorted(series.get(key, {"tensor": []}).items()):
            points = sorted(points + ([single[key]] if key in single and kind != "tensor x pipeline" else []))
            line, marker = styles[kind]
            ax.plot(*zip(*points), color=f"C{colour}", linestyle=line, marker=marker,
                    label=f"{key[0]} {key[1]}, {kind}")
    ax.set_xlabel("GPUs (H200)")
    ax.set_ylabel("batch-1 decode tok/s")
    ax.set_xscale("log", base=2)
    gpus = sorted({r["gpus"] for r in rows})
    ax.set_xticks(gpus, [str(g) for g in gpus])
    ax.set_title("llmjax decode scaling, random weights, prompt 8, 256 new tokens")
    ax.grid(alpha=0.3)
    if series or single:
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="llama2-70b,codellama-34b")
    p.add_argument("--dtypes", default="bfloat16,int4-g128")
    p.add_argument("--meshes", default="tensor=1,tensor=2,tensor=4,tensor=8,stage=2,stage=4,tensor=2+stage=2")
    p.add_argument("--batch", type=int, default=64, help="batch of the throughput run")
    p.add_argument("--gen-len", type=int, default=256, help="new tokens of the latency run")
    p.add_argument("--io", type=int, default=128, help="prompt and new tokens of the throughput run")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--kinds", default="latency,throughput", help="which runs: latency, throughput or both")
    p.add_argument("--budget-s", type=float, default=540, help="start no configuration after this")
    p.add_argument("--out", required=True)
    p.add_argument("--plot-only", action="store_true")
    p.add_argument("--bandwidth-tb-s", type=float, help="the table's bound: this bandwidth for every row "
                   "(rows from several runs), not each run's own measurement")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "scaling.json")
    if args.plot_only:
        rows = json.load(open(path))
    else:
        start, rows = time.time(), []
        gpus, memory = len(jax.devices()), (jax.devices()[0].memory_stats() or {}).get("bytes_limit", 0) / GIB
        bandwidth = bench.measure_bandwidth()
        print(f"{gpus} x {jax.devices()[0].device_kind}, {memory:.0f} GiB each, "
              f"{bandwidth / 1e12:.2f} TB/s measured", flush=True)
        for model in args.models.split(","):
            for dtype in args.dtypes.split(","):
                for spec in args.meshes.split(","):
                    degrees = parse_mesh(spec)
                    n = degrees.get("tensor", 1) * degrees.get("stage", 1)
                    # 16 GiB for the cache, activations and XLA's scratch beside each GPU's weights
                    if n > gpus or (memory and weight_gib(model, dtype) / n + 16 > memory):
                        continue
                    if time.time() - start > args.budget_s:
                        print(f"budget spent: {model} {dtype} {spec} not run", flush=True)
                        continue
                    try:
                        rows += run_config(model, dtype, degrees, args, bandwidth)
                    except Exception as e:  # one configuration's failure must not lose the others
                        traceback.print_exc()
                        rows.append(dict(model=model, dtype=dtype, mesh=degrees, gpus=n,
                                         error=f"{type(e).__name__}: {e}"))
                    gc.collect()
                    with open(path, "w") as f:
                        json.dump(rows, f, indent=1)
    print(table(rows, args.bandwidth_tb_s and args.bandwidth_tb_s * 1e12))
    plot(rows, os.path.join(args.out, "scaling.png"))


if __name__ == "__main__":
    main()
