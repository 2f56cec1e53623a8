"""The int4 Pallas kernels on the GPU: first correct against their reference, then how fast they read.

    PYTHONPATH=. python benchmarks/int4_matmul.py --out DIR [--shapes 8192x28672,...] [--rows 1,8,16,64]
    PYTHONPATH=. python benchmarks/int4_matmul.py --out DIR --grid --shapes 4096x12288,...  (one row)
    PYTHONPATH=. python benchmarks/int4_matmul.py --out DIR --kinds hfma2 --kernel-time  (one row: the
        default's blocks in other kinds)
    PYTHONPATH=. python benchmarks/int4_matmul.py --out DIR --configs 128:512:4:4,64:512:16:8 --shapes ...
        (one row, or --rows: the default, then these block_n:block_k:splits:num_warps[:num_stages] tilings;
        dot:block_m:block_n:... entries take the tensor-core kernel)

For each weight shape K x N (inputs x outputs: 4096x11008 is Llama-2-7B's up projection) and each row
count M, it
1. checks every kernel configuration it will time against `int4_matmul_reference` on random inputs
   (made on the device): a wrong one is reported and not timed, and a wrong default stops the run;
2. times, as microseconds per product and effective TB/s of packed int4 bytes (N * K / 2; the bf16
   scales add 1/32 of that at group 128 and are not counted): the kernel in several configurations
   (block sizes, K splits, warps, stages; the first, "default", is what the model runs for that shape
   and M, and `--kernel-time` also reads each configuration's kernel time from a profiler trace,
   without the XLA sum of its K slices after it), XLA's bf16 product and torch's bf16 product (cuBLAS) on the
   same shape; at M = 1 also our int8 path (XLA's dequant-dot) and the int4 reference (XLA:
   dequantize, then dot).

Timing: jax products run inside one jit, `copies` distinct weights (enough that they do not fit in
L2) each multiplied `ROUNDS` times with the rounds chained; the figure is the median of 5 calls divided
by the products per call. torch's products are captured in one CUDA graph and timed with CUDA events.
It prints one line per measurement, then the best configuration per shape and M (what the defaults in
`llmjax/kernels/int4_matmul.py` should become), and writes `int4_matmul.json` and `int4_matmul.txt`
into DIR. Configurations past `--budget-s` seconds are skipped (the defaults are always timed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.bench import _median_time
from llmjax.kernels import int4_matmul as K
from llmjax.kernels.linear import int8_matmul
from llmjax.quant import QuantizedWeight

GROUP = 128
ROUNDS = 8
SHAPES = ("8192x28672", "4096x11008", "28672x8192", "11008x4096", "4096x4096")  # K x N; the goals' first
ROWS = (1, 8, 16, 64)
GOALS = {("8192x28672", 1): 3.0, ("4096x11008", 1): 2.5}  # TB/s of packed bytes, issue 5
L2_BYTES = 50 * 2**20


def _fma(bn, bk, sp, nw, ns=3):
    return K.Int4Config("fma", block_n=bn, block_k=bk, splits=sp, num_warps=nw, num_stages=ns)


def _hfma2(bn, bk, sp, nw, ns=3):
    return K.Int4Config("hfma2", block_n=bn, block_k=bk, splits=sp, num_warps=nw, num_stages=ns)


def _dot(bm, bn, bk, sp, nw, ns=3):
    return K.Int4Config("dot", block_m=bm, block_n=bn, block_k=bk, splits=sp, num_warps=nw, num_stages=ns)


# Alternatives to the default per row count (the default for M is always timed first).
CANDIDATES = {
    # one row: the packed float16 kernel first (experimental, never measured before), then along the
    # first sweep's trend (narrower outputs, longer K steps, more K slices)
    1: [_hfma2(64, 256, 16, 4), _hfma2(32, 256, 16, 4), _hfma2(64, 512, 16, 4), _hfma2(32, 512, 16, 4),
        _hfma2(16, 512, 16, 2), _hfma2(128, 256, 16, 8),
        _fma(32, 256, 16, 4), _fma(32, 512, 16, 4), _fma(64, 512, 16, 4), _fma(64, 256, 32, 4),
        _fma(32, 256, 32, 2), _fma(64, 512, 8, 4), _fma(16, 512, 16, 2), _fma(64, 256, 16, 2),
        _fma(64, 256, 16, 8), _fma(64, 256, 16, 4, 1), _fma(128, 512, 16, 8), _fma(32, 1024, 8, 4)],
    8: [_fma(128, 128, 8, 4), _fma(64, 128, 8, 2), _dot(16, 128, 128, 4, 4), _dot(16, 64, 128, 8, 4)],
    16: [_dot(16, 64, 128, 8, 4), _dot(16, 128, 256, 4, 8), _dot(16, 256, 128, 4, 8)],
    64: [_dot(64, 64, 128, 2, 4), _dot(64, 128, 128, 2, 8), _dot(32, 128, 128, 2, 4)],
}


def grid(kind: str = K.DEFAULT_ONE_ROW_KIND) -> list[K.Int4Config]:
    """`--grid`: every one-row configuration of output block, K step, K slices and warps. Longer K steps
    (1024) give each program more bytes in flight; the small Llama shapes' kernels run 1.5-2.6 waves of
    one-step programs at 38-45% of DRAM bandwidth (Nsight Compute, fourteenth session)."""
    configs = [K.Int4Config(kind, block_n=bn, block_k=bk, splits=sp, num_warps=nw)
               for bn in (16, 32, 64, 128) for bk in (256, 512, 1024, 2048) for sp in (2, 4, 8, 16) for nw in (2, 4, 8)]
    return [c for c in configs if _valid(c)]


def _valid(config: K.Int4Config) -> bool:
    """Whether `config` is a tiling the kernel takes at GROUP (`Int4Config.check`: e.g. hfma4's four words a thread)."""
    try:
        config.check(GROUP)
    except ValueError:
        return False
    return True


def listed_config(spec: str) -> K.Int4Config:
    """`--configs` entry `block_n:block_k:splits:num_warps[:num_stages]` in the default one-row kind, or
    `dot:block_m:block_n:block_k:splits:num_warps[:num_stages]` (the tensor-core kernel at one row); a
    trailing `:u` unrolls the K steps (`Int4Config.unroll`)."""
    unroll = spec.endswith(":u")
    spec = spec[:-2] if unroll else spec
    kind, *fields = spec.split(":") if spec.startswith("dot:") else [K.DEFAULT_ONE_ROW_KIND, *spec.split(":")]
    names = (("block_m",) if kind == "dot" else ()) + ("block_n", "block_k", "splits", "num_warps", "num_stages")
    if len(fields) not in (len(names) - 1, len(names)) or not all(f.isdigit() for f in fields):
        raise SystemExit(f"--configs takes block_n:block_k:splits:num_warps[:num_stages] or "
                         f"dot:block_m:block_n:block_k:splits:num_warps[:num_stages] entries; got {spec!r}")
    return K.Int4Config(kind, **dict(zip(names, map(int, fields))), unroll=unroll)


def _label(c: K.Int4Config) -> str:
    m = f"bm{c.block_m} " if c.kind == "dot" else ""
    return (f"{c.kind} {m}bn{c.block_n} bk{c.block_k} splits{c.splits} warps{c.num_warps} stages{c.num_stages}"
            + (" unrolled" if c.unroll else ""))


def _int4_weights(n, k, copies, seed):
    keys = jax.random.split(jax.random.key(seed), copies)
    return [(jax.random.bits(key, (n, k // 8), jnp.uint32),
             (jax.random.uniform(key, (n, k // GROUP), jnp.float32, 0.002, 0.006)).astype(jnp.bfloat16))
            for key in keys]


def _copies(nbytes: int) -> int:
    """Distinct weights per timed call: together at least 8x L2, at most 16."""
    return int(min(16, max(2, math.ceil(8 * L2_BYTES / nbytes))))


def _time(product, x, weights, kernels: dict | None = None) -> tuple[float, jax.Array]:
    """Seconds per `product(x, w)` over `weights`, ROUNDS chained rounds in one jit; also the first
    product, computed in the same program (so checking it costs no extra compilation). With a
    `kernels` dict, one more call runs under the profiler and fills it with each GPU kernel's mean
    seconds a launch (`kernel_profile.traced`): the int4 kernel's own time, apart from the sum of its K
    slices and the loop's own sums that run after it."""
    @jax.jit
    def run(x, ws):
        first = product(x, ws[0])

        def body(_, x):
            acc = jnp.zeros((), jnp.float32)
            for w in ws:
                acc += product(x, w).astype(jnp.float32).sum()
            return x + (acc * 1e-12).astype(x.dtype)
        return jax.lax.fori_loop(0, ROUNDS, body, x), first

    _, first = run(x, weights)
    jax.block_until_ready(first)
    seconds = _median_time(lambda: run(x, weights), 5) / (ROUNDS * len(weights))
    if kernels is not None:
        from kernel_profile import launch_seconds  # benchmarks/, this script's folder

        kernels.update(launch_seconds(lambda: jax.block_until_ready(run(x, weights))))
    return seconds, first


def _torch_bf16(m, n, k) -> float | None:
    """Seconds per torch bf16 `x @ w.T` (cuBLAS), from one CUDA graph of distinct weights."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    copies = _copies(n * k * 2)
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for w in ws:  # warm up cuBLAS outside the capture
            torch.matmul(x, w.T)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(ROUNDS):
            for w in ws:
                torch.matmul(x, w.T)
    times = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph, ws
    torch.cuda.empty_cache()
    return statistics.median(times[1:]) / (ROUNDS * copies)


class Report:
    def __init__(self, out: str):
        self.rows, self.lines, self.out = [], [], out

    def say(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def add(self, shape, m, impl, seconds, packed_bytes, **extra) -> None:
        tb_s = packed_bytes / seconds / 1e12
        self.rows.append({"shape": shape, "m": m, "impl": impl, "us": seconds * 1e6, "tb_s_packed": tb_s, **extra})
        self.say(f"{shape:>11s} M={m:<3d} {impl:58s} {seconds * 1e6:8.1f} us  {tb_s:5.2f} TB/s of packed int4 bytes")

    def save(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        with open(os.path.join(self.out, "int4_matmul.json"), "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "jax": jax.__version__, "group": GROUP,
                       "rows": self.rows}, f, indent=1)
        with open(os.path.join(self.out, "int4_matmul.txt"), "w") as f:
            f.write("\n".join(self.lines) + "\n")


def _error(got, want) -> float:
    """The largest error over the largest output; a correct kernel stays below 2e-2 with bf16 outputs
    (a wrong one is off by far more)."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


def bench_shape(report: Report, shape: str, rows, deadline: float, candidates=None, baselines=True,
                kernel_time=False) -> None:
    k, n = map(int, shape.split("x"))
    packed = n * k // 2
    weights = _int4_weights(n, k, _copies(packed), seed=k + n)
    for m in rows:
        x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
        want = K.int4_matmul_reference(x, *weights[0], None, group_size=GROUP)
        default = K.default_config(m, shape=(k, n))  # as the model takes it for this shape
        configs = [default] + [c for c in (candidates or CANDIDATES).get(m, []) if c != default]
        for i, config in enumerate(configs):
            if i and time.monotonic() > deadline:
                report.say(f"{shape:>11s} M={m:<3d} (time budget spent: {len(configs) - i} configurations skipped)")
                break
            def product(x, w, config=config):
                return K.int4_matmul(x, *w, group_size=GROUP, config=config)
            kernels = {} if kernel_time else None
            try:
                seconds, first = _time(product, x, weights, kernels)
            except Exception as e:  # a configuration the compiler refuses (shared memory, registers): go on
                report.say(f"{shape:>11s} M={m:<3d} {_label(config)}: {type(e).__name__}: {str(e)[:100]}")
                continue
            err = _error(first, want)
            if not err < 2e-2:  # a wrong candidate is reported and left out; a wrong default stops the run
                report.say(f"WRONG: {shape} M={m} {_label(config)}: max error {err:.3g} of the largest output")
                if i == 0:
                    raise SystemExit("the default configuration is wrong; nothing more is timed")
                continue
            report.add(shape, m, ("default " if i == 0 else "") + _label(config), seconds, packed,
                       config=vars(config), max_rel_error=err)
            if kernels:
                own = next((s for name, s in kernels.items() if name in ("_fma_kernel", "_dot_kernel")), None)
                if own is not None:
                    report.add(shape, m, f"  {_label(config)}: its kernel alone (profiler)", own, packed,
                               kernel_only=True, config=vars(config))
        if not baselines:
            continue
        bf16 = [jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16) for i in range(_copies(n * k * 2))]
        seconds, _ = _time(lambda x, w: jnp.einsum("mk,nk->mn", x, w), x, bf16)
        report.add(shape, m, "xla bf16 (reads 4x the bytes)", seconds, packed)
        del bf16
        torch_s = _torch_bf16(m, n, k)
        if torch_s is not None:
            report.add(shape, m, "torch bf16, cuBLAS (reads 4x the bytes)", torch_s, packed)
        if m != 1:
            continue
        int8 = [QuantizedWeight(jax.random.randint(jax.random.key(i), (n, k), -127, 128, jnp.int32).astype(jnp.int8),
                                jnp.full((n,), 0.01, jnp.bfloat16), None, 8, None) for i in range(_copies(n * k))]
        seconds, _ = _time(int8_matmul, x, int8)
        report.add(shape, m, "xla int8 dequant-dot, llmjax's int8 path (2x)", seconds, packed)
        del int8
        seconds, _ = _time(lambda x, w: K.int4_matmul_reference(x, *w, None, group_size=GROUP), x, weights)
        report.add(shape, m, "xla int4 dequantize-then-dot (the reference)", seconds, packed)


def summary(report: Report) -> None:
    report.say("\nBest int4 kernel configuration per shape and M (TB/s of packed bytes):")
    best = {}
    for r in report.rows:
        if "config" in r and r["tb_s_packed"] > best.get((r["shape"], r["m"]), {}).get("tb_s_packed", 0):
            best[(r["shape"], r["m"])] = r
    for (shape, m), r in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = [x for x in report.rows if x["shape"] == shape and x["m"] == m and x["impl"].startswith("xla bf16")]
        vs = f" ({base[0]['us'] / r['us']:.2f}x XLA bf16)" if base else ""
        report.say(f"  {shape:>11s} M={m:<3d} {r['tb_s_packed']:5.2f} TB/s {r['us']:8.1f} us  {r['impl']}{vs}"
                   f"{_goal(r)}")
    for r in (r for r in report.rows if r.get("kernel_only")):
        report.say(f"  {r['shape']:>11s} M={r['m']:<3d} {r['tb_s_packed']:5.2f} TB/s {r['us']:8.1f} us {r['impl']}, "
                   f"without the sum of its K slices{_goal(r)}")


def _goal(row: dict) -> str:
    goal = GOALS.get((row["shape"], row["m"]))
    return "" if goal is None else f"  goal {goal} TB/s: {'met' if row['tb_s_packed'] >= goal else 'NOT met'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for int4_matmul.json and int4_matmul.txt")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="K x N shapes, comma-separated")
    parser.add_argument("--rows", default=None, help="row counts M, comma-separated (default "
                        f"{','.join(map(str, ROWS))}; with --configs, 1)")
    parser.add_argument("--budget-s", type=float, default=200.0,
                        help="after this many seconds only default configurations and baselines are timed")
    parser.add_argument("--grid", action="store_true", help="one row only, the packed float16 kernel in "
                        "every configuration of `grid()`, no baselines; --budget-s is then per shape")
    parser.add_argument("--kinds", default=None, help="one row only: the default configuration of each shape, "
                        "then the same blocks in each of these kinds (comma-separated, e.g. hfma2), no baselines")
    parser.add_argument("--configs", default=None, help="one row only: the default configuration of each shape, "
                        "then these (comma-separated block_n:block_k:splits:num_warps[:num_stages], the default kind, "
                        "or dot:block_m:block_n:block_k:splits:num_warps[:num_stages]), no baselines")
    parser.add_argument("--kernel-time", action="store_true",
                        help="also each timed configuration's kernel alone, from a profiler trace")
    args = parser.parse_args()
    if sum(map(bool, (args.grid, args.kinds, args.configs))) > 1:
        parser.error("--grid, --kinds and --configs each pick the configurations to time: give one")
    if jax.devices()[0].platform != "gpu":
        sys.exit("this benchmark times GPU kernels; no GPU is visible to jax")
    rows = [int(m) for m in args.rows.split(",")] if args.rows else None
    report = Report(args.out)
    start = time.monotonic()
    report.say(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, int4 group {GROUP}")
    for shape in args.shapes.split(","):
        if args.grid:
            bench_shape(report, shape, [1], time.monotonic() + args.budget_s, {1: grid()}, baselines=False,
                        kernel_time=args.kernel_time)
        elif args.configs:
            listed = [listed_config(c) for c in args.configs.split(",")]
            bench_shape(report, shape, rows or [1], time.monotonic() + args.budget_s,
                        {m: listed for m in rows or [1]}, baselines=False, kernel_time=args.kernel_time)
        elif args.kinds:
            default = K.default_config(1, shape=tuple(map(int, shape.split("x"))))
            same_blocks = [dataclasses.replace(default, kind=kind) for kind in args.kinds.split(",")]
            bench_shape(report, shape, [1], time.monotonic() + args.budget_s, {1: same_blocks}, baselines=False,
                        kernel_time=args.kernel_time)
        else:
            bench_shape(report, shape, rows or list(ROWS), start + args.budget_s, kernel_time=args.kernel_time)
        report.save()
    summary(report)
    report.say(f"\n{time.monotonic() - start:.0f} s in all")
    report.save()


if __name__ == "__main__":
    main()
