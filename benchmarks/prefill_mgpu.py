"""The Hopper prefill kernel (`llmjax.kernels.flash_attention_mgpu`) on one H100/H200: checked, then
timed against the Triton kernel and cuDNN in the same run.

    PYTHONPATH=. python benchmarks/prefill_mgpu.py --out DIR [--only check,time] [--variants ...]

1. check: the kernel against `flash_attention_reference` on awkward shapes (query and key counts off
   the block grid, an empty row, length-1 rows, chunk offsets, grouped-query groups of 1, 4 and 8,
   head dims 64 and 128, bf16 and float16, queries before position 0), in each variant. A failure
   prints FAILED and makes the script exit 1.
2. time: causal prefill TFLOP/s (4 * B * H * T^2 * D / 2 FLOPs) at 2k x 8, 8k x 2 and 32k x 1 (or
   `--shapes`) with Llama-3-8B's heads (32 query, 8 kv, head dim 128), bf16: the Triton kernel (its defaults),
   `jax.nn.dot_product_attention(implementation="cudnn")`, and each variant of this kernel; each
   output is compared with the Triton kernel's. Each timed turn is 10 calls in one jit, each call's
   query depending on the last one's output; the implementations take turns, 9 each, in an order
   rotated by one each turn and reversed every few turns (`turn_order`: each takes each place equally
   often, and runs after each of the others, not always after the same one), and the figure
   is the median turn (the same configuration drifted by up to 6% when timed one after another).
   Back to back, the GPU heats and its clock falls over the run; `--rest 1` idles it a second before
   every turn, so that each turn starts cool (faster, and a narrower spread).
3. model: the Llama-3-8B shape (random bf16 weights) through `flash_attention.attend` as the model
   calls it, with this kernel (the default on Hopper), the Triton kernel (`LLMJAX_ATTENTION_MOSAIC=off`)
   and the reference attention (`LLMJAX_ATTENTION=off`): logits of two 1000-token rows, and 32 greedy
   tokens after prompts of 700 and 1000 tokens.
4. mesh (`--only mesh`, 2 GPUs): the same at tensor=2 and at stage=2, where each GPU runs the kernel
   on its own heads or layers.

Variants are `block_kv:stages[:programs][:cN]` (programs 0: one per work item; left out: one per SM, each
taking items in turn), the first being the kernel's defaults.
Writes DIR/prefill_mgpu.json and DIR/prefill_mgpu.txt.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp

from attention import (HEAD_DIM, HEADS, KV_HEADS, Report, environment, error, flash_flops, normal, runner,
                       turn_order)
from llmjax.kernels import flash_attention as fa, flash_attention_mgpu as fm

VARIANTS = "128:2,128:2:132,128:2:0"
INTERLEAVED = 9  # timed turns per implementation


def parse(variant: str) -> dict:
    """`block_kv:stages[:programs][:cN]`: N query blocks per chunk of the kv-head item order."""
    block_kv, stages, *rest = variant.split(":")
    tuning = dict(block_kv=int(block_kv), stages=int(stages))
    for part in rest:
        tuning.update({"chunk": int(part[1:])} if part.startswith("c") else {"programs": int(part)})
    return tuning


def run_checks(report: Report, variants: dict) -> None:
    report.say("1. the Mosaic GPU kernel against the reference")
    cases = {
        "gqa4 hd128 padded rows": (2, 1037, 1037, 32, 8, 128, [0, 0], [1037, 620], jnp.bfloat16),
        "gqa4 hd128 chunk at offsets": (2, 320, 1350, 32, 8, 128, [1030, 502], [1350, 822], jnp.bfloat16),
        "gqa1 hd64 empty and length-1 rows": (3, 77, 77, 16, 16, 64, [0, 0, 0], [0, 1, 77], jnp.bfloat16),
        "gqa8 hd128 float16": (2, 300, 300, 16, 2, 128, [0, 0], [300, 129], jnp.float16),
        "gqa4 hd128 negative offset": (1, 300, 300, 8, 2, 128, [-100], [300], jnp.bfloat16),
        "gqa4 hd128 8k": (1, 8192, 8192, 32, 8, 128, [0], [8192], jnp.bfloat16),
    }
    for name, (b, t, s, h, kv, d, offsets, lengths, dtype) in cases.items():
        q, k, v = normal(1, (b, t, h, d), dtype), normal(2, (b, s, kv, d), dtype), normal(3, (b, s, kv, d), dtype)
        offsets, lengths = jnp.array(offsets, jnp.int32), jnp.array(lengths, jnp.int32)
        with jax.default_matmul_precision("highest"):
            want = fa.flash_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                v.astype(jnp.float32), offsets, lengths)
        for label, tuning in variants.items():
            try:
                got = fm.flash_attention(q, k, v, offsets, lengths, **tuning)
                err = error(got, want)
            except Exception as e:  # noqa: BLE001 - reported, and counted as a failure
                report.say(f"  FAILED {name} [{label}]: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                report.failed.append(f"{name} [{label}]")
                continue
            ok = err <= 2e-2
            report.say(f"  {'ok    ' if ok else 'FAILED'} {name:36s} [{label}] max error {err:.1e} of the largest output")
            report.row(section="check", name=name, variant=label, error=err, ok=ok)
            if not ok:
                report.failed.append(f"{name} [{label}]")


SHAPES = "2048x8,8192x2,32768x1"


def parse_shape(shape: str) -> tuple[int, int, int]:
    """`TxB` or `TxBxD` (D: head dim, 128 when left out) -> (context, batch, head dim)."""
    t, b, *d = (int(x) for x in shape.split("x"))
    return t, b, d[0] if d else HEAD_DIM


def run_timing(report: Report, variants: dict, shapes: str = SHAPES, rest: float = 0.0) -> None:
    report.say(f"2. causal prefill, {HEADS} q / {KV_HEADS} kv heads, bf16 (context x batch [x head dim])")
    for t, b, d in map(parse_shape, shapes.split(",")):
        q = normal(20, (b, t, HEADS, d))
        k, v = normal(21, (b, t, KV_HEADS, d)), normal(22, (b, t, KV_HEADS, d))
        zeros, full = jnp.zeros((b,), jnp.int32), jnp.full((b,), t, jnp.int32)
        impls = {"triton flash kernel": lambda q, k, v: fa.flash_attention(q, k, v, zeros, full),
                 "cudnn": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                                       implementation="cudnn")}
        for label, tuning in variants.items():
            impls[f"mosaic {label}"] = functools.partial(
                lambda q, k, v, c: fm.flash_attention(q, k, v, zeros, full, **c), c=tuning)
        want, runners, errors = None, {}, {}
        for name, fn in impls.items():
            try:
                out = jax.jit(fn)(q, k, v)
                want = out if want is None else want
                errors[name] = error(out, want)
                runners[name] = runner(fn, q, [(k, v)])
            except Exception as e:  # noqa: BLE001 - a variant that does not compile is reported
                report.say(f"  {t:6d} x{b} d{d} {name:22s} {type(e).__name__}: {str(e).splitlines()[0][:150]}")
        times = {name: [] for name in runners}
        for turn in range(INTERLEAVED):  # every implementation once a turn: drift hits them alike
            for name in turn_order(list(runners), turn):
                time.sleep(rest)
                times[name].append(runners[name]())
        for name, seconds in times.items():
            s = statistics.median(seconds)
            tflops = flash_flops(b, t) * d / HEAD_DIM / s / 1e12
            report.say(f"  {t:6d} x{b} d{d} {name:22s} {s * 1e3:8.3f} ms  {tflops:6.1f} TFLOP/s  (turns "
                       f"{min(seconds) * 1e3:.3f}-{max(seconds) * 1e3:.3f} ms; differs from the Triton kernel's "
                       f"output by {errors[name]:.1e})")
            report.row(section="time", context=t, batch=b, head_dim=d, impl=name, ms=s * 1e3, tflops=tflops,
                       error=errors[name], turns_ms=[x * 1e3 for x in seconds])
        report.save()


def run_model(report: Report, layout: dict | None = None) -> None:
    """The model through `attend` (the Mosaic kernel on Hopper) against the Triton prefill kernel and the
    reference attention: logits of two ragged prompts, and greedy continuations. `layout`: a mesh
    (`make_mesh` keywords) the weights are placed on; None: one device."""
    import numpy as np

    import llmjax
    from llmjax.sharding import make_mesh

    mesh = make_mesh(**layout) if layout else None
    report.say(f"3. the llama3-8b shape (random bf16 weights) through each prefill attention"
               f"{f', mesh {layout}' if layout else ''}")
    params = llmjax.init_random("llama3-8b", dtype="bfloat16", mesh=mesh)
    rng = np.random.default_rng(0)
    rows = rng.integers(3, params.config.vocab_size, (2, 1000)).tolist()
    prompts = [rows[0][:700], rows[1][:1000]]
    runs = {"mosaic": dict(LLMJAX_ATTENTION_MOSAIC="auto"), "triton": dict(LLMJAX_ATTENTION_MOSAIC="off"),
            "reference": dict(LLMJAX_ATTENTION="off")}
    logits, tokens = {}, {}
    for name, env in runs.items():
        with environment(env):  # read when a function is traced
            jax.clear_caches()  # so llmjax.logits and generate trace again
            logits[name] = np.asarray(llmjax.logits(params, rows), np.float32)
            tokens[name] = llmjax.generate(params, prompts, max_new_tokens=32)
    want = logits["reference"]
    for name in ("mosaic", "triton"):
        err = float(np.abs(logits[name] - want).max() / np.abs(want).max())
        top = float((logits[name].argmax(-1) == want.argmax(-1)).mean())
        same = [a == b for a, b in zip(tokens[name], tokens["reference"])]
        report.say(f"  {name:8s} logits differ from the reference's by {err:.1e} of the largest; top-1 agrees "
                   f"at {top:.1%} of positions; greedy continuations identical: {same}")
        report.row(section="model", layout=layout, attention=name, error=err, top1=top, same_tokens=same)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="check,time,model")
    parser.add_argument("--shapes", default=SHAPES, help="comma-separated TxB or TxBxD (context, batch, "
                        "head dim 128 unless given)")
    parser.add_argument("--rest", type=float, default=0.0, help="seconds the GPU idles before each timed "
                        "turn (0: back to back, as a long prefill runs; 1: each turn from a cool GPU)")
    parser.add_argument("--variants", default=VARIANTS, help="comma-separated block_kv:stages[:programs][:cN]")
    args = parser.parse_args()
    variants = {label: parse(label) for label in args.variants.split(",")}
    report = Report(args.out, "prefill_mgpu")
    report.say(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, Hopper: {fm.on_hopper()}")
    start = time.perf_counter()
    if "check" in args.only:
        run_checks(report, variants)
        report.say(f"  (checks done at {time.perf_counter() - start:.0f} s)")
        report.save()
    if "time" in args.only:
        run_timing(report, variants, args.shapes, args.rest)
        report.say(f"  (timing done at {time.perf_counter() - start:.0f} s)")
    if "model" in args.only:
        run_model(report)
        report.say(f"  (model done at {time.perf_counter() - start:.0f} s)")
    if "mesh" in args.only:
        for layout in (dict(tensor=2), dict(stage=2)):
            run_model(report, layout)
            report.say(f"  (mesh {layout} done at {time.perf_counter() - start:.0f} s)")
    report.finish()


if __name__ == "__main__":
    main()
