"""llmjax's NVLink all-reduce against XLA's psum: one all-reduce, then a tensor-parallel model.

    PYTHONPATH=. python benchmarks/tp_allreduce.py --out DIR [--model llama2-13b] [--dtype bfloat16]
        [--tensor 2] [--modes xla,nvlink,nvlink-eager,auto,auto+tpgraph,auto+tpgraph+nograph] [--turns 2]
        [--skip-model] [--no-single]
        [--skip-allreduce] [--smoke]

On `--tensor` GPUs of one process (`LLMJAX_ALLREDUCE`, see `llmjax/kernels/allreduce.py`):
1. One all-reduce of a bf16 decode activation `[rows, hidden]`, for each mode: its result against
   `jax.lax.psum`'s and `allreduce.allreduce_reference`'s on random values (max abs difference; the
   kernel must equal the reference exactly), whether the compiled program holds the kernel's custom
   call (so a silent fallback to psum shows), and microseconds each, `CHAIN` dependent sums inside
   one jit, median of 20 calls. Then the kernel's grid (`LLMJAX_ALLREDUCE_BLOCKS`) at the largest
   shape.
2. The model (random weights of `--dtype`, made once on the GPUs): one GPU alone (unless
   `--no-single`, for a model one GPU cannot hold), then the tensor mesh under each
   mode in turn, `--turns` times (the machine drifts; each turn times every mode once): batch 1,
   prompt 8, 256 new tokens (`llmjax.bench.bench`), tok/s against the per-GPU bandwidth bound, the
   speedup over one GPU, whether `generate` compiled its decode loop for one CUDA graph (XLA captures
   it only where every instruction of the loop can be), and the first 32 greedy tokens against the
   xla mode's.
Each mode's programs are traced afresh (`jax.clear_caches`): the mode is read when a program is
traced. Writes DIR/tp_allreduce.json after every measurement and prints a line per figure.
`--smoke` runs the whole script on 8 fake CPU devices with a small model (every mode is psum there).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from benchmarks import parallel  # noqa: E402
from llmjax import bench  # noqa: E402
from llmjax.config import LlamaConfig  # noqa: E402
from llmjax.kernels import allreduce  # noqa: E402
from llmjax.sharding import make_mesh  # noqa: E402

gen = importlib.import_module("llmjax.generate")  # the module; `llmjax.generate` is also a function
CHAIN = 160  # a 70B decode step's all-reduces
SHAPES = ((1, 5120), (1, 8192), (16, 8192), (64, 8192))
BLOCKS = (1, 2, 4, 8, 16, 32)
CHECK_TOKENS = 32


def parse_mode(mode: str) -> list[str]:
    """`mode` split at `+` (see `use`), or SystemExit naming what is wrong with it."""
    base, *extras = mode.split("+")
    if base not in allreduce.MODES or set(extras) - {"tpgraph", "nograph"}:
        raise SystemExit(f"unknown mode {mode!r}: one of {', '.join(allreduce.MODES)}, then +tpgraph and/or +nograph")
    return [base, *extras]


def use(mode: str, blocks: int | None = None) -> None:
    """Select an all-reduce mode (and grid) for the programs traced from now on. A mode is an
    `LLMJAX_ALLREDUCE` value, then optionally `+tpgraph` (`LLMJAX_TP_GRAPH=on`: the embedding and
    logits through the kernel too, and the decode loop one CUDA graph) and `+nograph`
    (`LLMJAX_LOOP_GRAPH=off`: the same without the graph, to tell the two gains apart)."""
    base, *extras = parse_mode(mode)
    os.environ[allreduce.VARIABLE] = base
    os.environ[allreduce.GRAPH_VARIABLE] = "on" if "tpgraph" in extras else "off"
    os.environ["LLMJAX_LOOP_GRAPH"] = "off" if "nograph" in extras else "auto"
    if blocks is None:
        os.environ.pop("LLMJAX_ALLREDUCE_BLOCKS", None)
    else:
        os.environ["LLMJAX_ALLREDUCE_BLOCKS"] = str(blocks)
    jax.clear_caches()


def one_allreduce(mesh, rows: int, hidden: int, dtype) -> dict:
    """The current mode's sum against psum's, whether its kernel is in the program, and us per sum."""
    tensor = mesh.shape["tensor"]
    x = jax.random.normal(jax.random.key(rows * hidden), (tensor, rows, hidden), jnp.float32).astype(dtype)

    def sharded(body):
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("tensor"), out_specs=P(), check_vma=False))

    got = sharded(lambda x: allreduce.psum(x[0], "tensor", mesh))(x)
    want = sharded(lambda x: jax.lax.psum(x[0], "tensor"))(x)
    reference = allreduce.allreduce_reference(x)

    def differs(a, b):
        return float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))

    # The kernel must give the reference's bits (vs_reference 0); psum may round in another order.
    row = dict(rows=rows, hidden=hidden, dtype=jnp.dtype(dtype).name, vs_psum=differs(got, want),
               vs_reference=differs(got, reference), psum_vs_reference=differs(want, reference))

    def chained(x):
        y = x[0]
        for _ in range(CHAIN):
            y = allreduce.psum(y, "tensor", mesh) * (1.0 / tensor)
        return y

    f = sharded(chained)
    row["kernel_in_program"] = "llmjax_allreduce" in f.lower(x).compile().as_text()
    f(x).block_until_ready()
    row["us"] = bench._median_time(lambda: f(x), 20) / CHAIN * 1e6
    return row


def model_turn(params, tp1_tok_s: float | None, bandwidth: float) -> dict:
    result = bench.bench(params.config, batch=1, prompt_len=8, gen_len=256, repeats=3, mesh=params.mesh,
                         params=params, bandwidth=bandwidth)
    tokens = parallel.greedy_tokens(params, CHECK_TOKENS, gen_len=256)
    graph = gen.generate_ids_fn(gen._model(params), 1) is gen._generate_ids_graph
    return dict(loop_graph=graph, tok_s=result.decode_tok_s, ms_per_token=result.decode_ms_per_step, bound_tok_s=result.bound_tok_s,
                fraction_of_bound=result.fraction_of_bound,
                speedup=None if tp1_tok_s is None else result.decode_tok_s / tp1_tok_s, tokens=tokens)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="llama2-13b")
    p.add_argument("--tensor", type=int, default=2)
    p.add_argument("--modes", default="xla,nvlink,nvlink-eager", help="LLMJAX_ALLREDUCE modes; auto (the default "
                   "outside this script) is nvlink where the kernel runs, xla elsewhere")
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--dtype", default="bfloat16", help="bfloat16, int4-g128, ... (as llmjax bench)")
    p.add_argument("--skip-model", action="store_true")
    p.add_argument("--skip-allreduce", action="store_true")
    p.add_argument("--no-single", action="store_true", help="no one-GPU run (a model it cannot hold)")
    p.add_argument("--smoke", action="store_true", help="8 fake CPU devices, a small model")
    args = p.parse_args()
    modes = args.modes.split(",")
    for mode in modes:
        parse_mode(mode)  # every mode checked before the first is measured
    os.makedirs(args.out, exist_ok=True)
    out = dict(device=jax.devices()[0].device_kind, devices=len(jax.devices()), jax=jax.__version__,
               platform_version=jax.devices()[0].client.platform_version, allreduce=[], blocks=[], model=[])

    def save():
        with open(os.path.join(args.out, "tp_allreduce.json"), "w") as f:
            json.dump(out, f, indent=1)

    mesh = make_mesh(tensor=args.tensor, devices=jax.devices()[:args.tensor])
    dtype = jnp.float32 if SMOKE else jnp.bfloat16  # float32 on CPU, as benchmarks/parallel.py's all-reduce
    print(f"{out['device']} x{out['devices']}, jax {out['jax']}, {out['platform_version']}", flush=True)
    for mode in [] if args.skip_allreduce else modes:
        use(mode)
        for rows, hidden in SHAPES:
            try:
                row = dict(mode=mode, tensor=args.tensor, **one_allreduce(mesh, rows, hidden, dtype))
            except Exception as e:  # one failing mode or shape must not lose the others
                traceback.print_exc()
                row = dict(mode=mode, tensor=args.tensor, rows=rows, hidden=hidden, error=repr(e)[:400])
            out["allreduce"].append(row)
            save()
            print(json.dumps(row), flush=True)
    if "nvlink" in modes and not args.skip_allreduce:
        rows, hidden = SHAPES[-1]
        for blocks in BLOCKS:
            use("nvlink", blocks)
            try:
                row = dict(blocks=blocks, **one_allreduce(mesh, rows, hidden, dtype))
            except Exception as e:
                row = dict(blocks=blocks, error=repr(e)[:400])
            out["blocks"].append(row)
            save()
            print(json.dumps(row), flush=True)
    if args.skip_model:
        return

    config = parallel.SMOKE if SMOKE else LlamaConfig.preset(args.model)
    bandwidth = bench.measure_bandwidth()
    use("xla")
    tp1 = None
    if not args.no_single:
        t = time.perf_counter()
        one = bench.random_params(config, args.dtype, 0)  # on the first GPU
        tp1 = model_turn(one, None, bandwidth)
        del one
        out["model"].append(dict(mode="one GPU", dtype=args.dtype, **tp1))
        save()
        print(f"one GPU: {tp1['tok_s']:.1f} tok/s ({tp1['fraction_of_bound']:.0%} of bound), "
              f"{time.perf_counter() - t:.0f} s", flush=True)
    params = bench.random_params(config, args.dtype, 0, mesh)
    reference = None
    for turn in range(args.turns):
        for mode in modes:
            use(mode)
            t = time.perf_counter()
            try:
                row = dict(mode=mode, turn=turn, dtype=args.dtype,
                           **model_turn(params, tp1 and tp1["tok_s"], bandwidth))
                if mode == "xla" and reference is None:
                    reference = row["tokens"]
                if reference is not None:
                    row["tokens_agree_with_xla"] = sum(a == b for a, b in zip(row["tokens"], reference))
            except Exception as e:
                traceback.print_exc()
                row = dict(mode=mode, turn=turn, error=repr(e)[:400])
            row["seconds"] = time.perf_counter() - t
            out["model"].append(row)
            save()
            print(f"turn {turn} {mode:13s} " + (row.get("error") or
                  f"{row['tok_s']:.1f} tok/s, {row['ms_per_token']:.3f} ms/token, "
                  f"{'-' if row['speedup'] is None else format(row['speedup'], '.2f')}x one "
                  f"GPU, {row['fraction_of_bound']:.0%} of bound, graph program {row['loop_graph']}, tokens = xla: "
                  f"{row.get('tokens_agree_with_xla', '-')}/{CHECK_TOKENS}, {row['seconds']:.0f} s"), flush=True)


if __name__ == "__main__":
    main()
