"""What one decode all-reduce costs under tensor parallelism, and which XLA or NCCL setting makes it cheaper.

    PYTHONPATH=. python benchmarks/allreduce.py --out DIR [--tensor 2,4] [--hidden 8192] [--rows 1]

A tensor-parallel Llama layer makes two all-reduces per token (after o and after down), 160 for the
70B shape; at ~20 us each they are a third of a 70B int4 step on 4 GPUs. This script measures the
cost of one (a `psum` over `tensor` of a bf16 `[rows, hidden]` activation in `shard_map`, 160 chained
in one jit, the median of 20 calls) under each setting in VARIANTS, every setting in its own process
(XLA reads its flags once per process). A setting whose flags this XLA does not know fails alone.

Prints one line per setting and mesh, writes DIR/allreduce.json, and DIR/allreduce_best.env: the
`XLA_FLAGS` and environment of the fastest setting, for a later command in the same call to use.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ASYNC_OFF = "--xla_gpu_disable_async_collectives=ALLREDUCE"
GRAPH_COLLECTIVES = "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,COLLECTIVES"
ONE_SHOT = "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"
# name: (extra XLA_FLAGS, extra environment)
VARIANTS = {
    "default": ("", {}),
    "sync": (ASYNC_OFF, {}),
    "graph": (GRAPH_COLLECTIVES, {}),
    "sync+graph": (f"{ASYNC_OFF} {GRAPH_COLLECTIVES}", {}),
    "one-shot": (ONE_SHOT, {}),
    "one-shot+sync": (f"{ONE_SHOT} {ASYNC_OFF}", {}),
    "sync+LL": (ASYNC_OFF, {"NCCL_PROTO": "LL"}),
    "nccl-symmetric": ("--xla_gpu_experimental_enable_nccl_symmetric_buffers=true", {}),
    "nccl-user-buffers": ("--xla_gpu_enable_nccl_user_buffers=true", {}),
    # XLA's own all-reduce kernels (Triton one-shot / two-shot) in place of NCCL: the flag that
    # replaced the one-shot flag above, alone and with XLA's persistent symmetric memory
    "collective-kernels": ("--xla_gpu_experimental_use_collective_kernels=ALL_REDUCE", {}),
    "collective-kernels+symmetric": ("--xla_gpu_experimental_use_collective_kernels=ALL_REDUCE "
                                     "--xla_gpu_enable_persistent_symmetric_memory=true", {}),
}


def child(tensors: list[int], hidden: int, rows: int) -> list[dict]:
    import jax
    from benchmarks.parallel import allreduce_us

    out = []
    for tensor in tensors:
        if tensor > len(jax.devices()):
            continue
        us, dtype = allreduce_us(tensor, hidden, rows)
        out.append(dict(tensor=tensor, hidden=hidden, rows=rows, dtype=dtype, us=us))
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--tensor", default="2,4")
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--only", default=",".join(VARIANTS))
    p.add_argument("--timeout-s", type=int, default=90)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    tensors = [int(t) for t in args.tensor.split(",")]
    if args.child:
        print(json.dumps(child(tensors, args.hidden, args.rows)))
        return
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.only.split(","):
        flags, extra = VARIANTS[name]
        env = dict(os.environ, **extra)
        env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        cmd = [sys.executable, "-m", "benchmarks.allreduce", "--child", "--out", args.out,
               "--tensor", args.tensor, "--hidden", str(args.hidden), "--rows", str(args.rows)]
        row = dict(variant=name, xla_flags=flags, env=extra)
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout_s)
            if done.returncode:
                row["error"] = done.stderr.strip().splitlines()[-3:]
            else:
                row["meshes"] = json.loads(done.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            row["error"] = [f"timed out after {args.timeout_s} s"]
        results.append(row)
        for m in row.get("meshes", []):
            print(f"{name:18s} tensor={m['tensor']} [{m['rows']}, {m['hidden']}] {m['dtype']}: "
                  f"{m['us']:.1f} us per all-reduce, {160 * m['us'] / 1e3:.2f} ms per 70B token", flush=True)
        if "error" in row:
            print(f"{name:18s} failed: {row['error']}", flush=True)
        with open(os.path.join(args.out, "allreduce.json"), "w") as f:
            json.dump(results, f, indent=1)
    timed = [(m["us"], r) for r in results for m in r.get("meshes", []) if m["tensor"] == max(tensors)]
    if timed:
        _, best = min(timed, key=lambda t: t[0])
        with open(os.path.join(args.out, "allreduce_best.env"), "w") as f:
            f.write(f"export XLA_FLAGS='{best['xla_flags']}'\n")
            for k, v in best["env"].items():
                f.write(f"export {k}={v}\n")
        print(f"fastest at tensor={max(tensors)}: {best['variant']}")


if __name__ == "__main__":
    main()
