"""A decode all-reduce written as a Mosaic GPU Pallas kernel over NVLink peer memory, against XLA's
`psum` (NCCL), on the GPUs of one process.

    PYTHONPATH=$PWD python benchmarks/nvlink_allreduce.py [--hidden 5120] [--rows 1] [--chain 80] [--profile]
        [--variants psum,copy,read,stage,no-done]

Issue 6 asks for tensor=2 decode of the 13B at 1.6x one GPU; each of the 80 NCCL all-reduces of a step
costs ~16 us of GPU time (BENCHMARKS.md), and 1.6x needs ~4.6 us. jax 0.11 can run a Mosaic GPU
kernel that reads a peer GPU's buffer (`plgpu.remote_ref`) and signals its semaphores, in one process
with several GPUs (XLA passes the peers' addresses to the kernel). The kernel here: each GPU signals
the others that its input is ready, waits for theirs, sums every GPU's input (its own and the peers',
read over NVLink) in float32, then signals and waits again so that no GPU leaves (and lets XLA reuse
its input) while a peer still reads it. Variants: `copy` (the kernel with no communication: what a
Mosaic call costs by itself), `read` (the all-reduce, reading the peers' inputs), `stage` (the same
reading a copy each GPU makes into an output of the kernel), `no-done` (without the second barrier:
not safe, only a bound). `--processes 2` runs one process per GPU (`jax.distributed` on loopback);
`--nvshmem` adds XLA's NVSHMEM flag, which jax 0.11.2's XLA no longer knows.

For each variant, after a check against the exact sum: microseconds per reduce in a chain of `--chain`
dependent reduces, and the time a reduce adds to a step of two bf16 products (`[rows, hidden] @
[hidden, 2 hidden] @ [2 hidden, hidden]`, enough work that the host's launches run ahead of the GPU).
`--profile` traces the `copy` and `read` chains (the kernels XLA runs around each Mosaic call).
"""

from __future__ import annotations

import argparse
import functools
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P


def _mosaic():
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return pl, plgpu


def allreduce_kernel(x, axis: str, n: int, variant: str):
    """The sum of `x` over the `n` devices of mesh axis `axis` (inside shard_map), one warpgroup."""
    pl, plgpu = _mosaic()
    f32 = jnp.float32

    def peer(me, k):
        return {axis: lax.rem(me + k, n)}

    def body(x_ref, y_ref, *rest):
        me = lax.axis_index(axis)
        if variant == "copy":  # no communication: what a Mosaic call costs by itself
            y_ref[...] = x_ref[...]
            return
        if variant == "stage":  # each GPU's input copied to an output of the kernel, which peers read
            stage_ref, ready, done = rest
            stage_ref[...] = x_ref[...]
        else:
            stage_ref, (ready, done) = x_ref, rest
        for k in range(1, n):
            pl.semaphore_signal(ready, device_id=peer(me, k))
        pl.semaphore_wait(ready, n - 1)
        acc = x_ref[...].astype(f32)
        for k in range(1, n):
            acc = acc + plgpu.remote_ref(stage_ref, peer(me, k))[...].astype(f32)
        y_ref[...] = acc.astype(y_ref.dtype)
        if variant != "no-done":
            for k in range(1, n):
                pl.semaphore_signal(done, device_id=peer(me, k))
            pl.semaphore_wait(done, n - 1)

    scratch = [] if variant == "copy" else [plgpu.SemaphoreType.REGULAR, plgpu.SemaphoreType.REGULAR]
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    if variant == "stage":
        return plgpu.kernel(body, out_type=(out, out), scratch_types=scratch)(x)[0]
    return plgpu.kernel(body, out_type=out, scratch_types=scratch)(x)


def chained(reduce, mesh, chain: int, w=None):
    """`chain` dependent reduces; with `w`, each after a product with `w` (work that keeps the GPU
    busy, so that the host's launches run ahead and the time is the GPU's)."""
    def body(x, w):
        for _ in range(chain):
            if w is not None:
                x = ((x @ w[0]) @ w[1]) * 1e-4
            x = reduce(x) * 0.5
        return x
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("tensor"), P()), out_specs=P("tensor"),
                              check_vma=False))
    return lambda x: f(x, w)


def median_us(f, x, repeats=20):
    from llmjax import bench
    f(x).block_until_ready()
    return bench._median_time(lambda: f(x), repeats) * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--rows", type=int, default=1)
    p.add_argument("--chain", type=int, default=80)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--variants", default="psum,copy,read,stage,no-done")
    p.add_argument("--processes", type=int, default=1,
                   help="run as this many processes of one GPU each (jax.distributed on loopback)")
    p.add_argument("--nvshmem", action="store_true",
                   help="with --processes: XLA's NVSHMEM mode (--xla_gpu_experimental_enable_nvshmem)")
    p.add_argument("--rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.processes > 1 and a.rank is None:
        return launch(a)
    if a.rank is not None:
        import llmjax.distributed
        llmjax.distributed.initialize(f"127.0.0.1:{PORT}", a.processes, a.rank, local_device_ids=[a.rank])
    import jax.experimental.mosaic.gpu as mgpu
    print("jax", jax.__version__, "devices", jax.devices(), "process", jax.process_index(), "of",
          jax.process_count())
    for name in ("is_nvshmem_available", "is_single_process_multi_device_topology"):
        fn = getattr(mgpu, name, None) or getattr(getattr(mgpu, "core", None), name, None)
        print(name, fn() if fn else "absent")
    n = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()), ("tensor",))
    rng = np.random.default_rng(0)
    host = np.asarray(jnp.asarray(rng.standard_normal((n * a.rows, a.hidden)), jnp.bfloat16))
    x = jax.make_array_from_callback(host.shape, jax.sharding.NamedSharding(mesh, P("tensor")),
                                     lambda index: host[index])
    want = host.astype(np.float32).reshape(n, a.rows, a.hidden).sum(0)
    ps = lambda v: lax.psum(v, "tensor")
    w = jax.device_put((jnp.asarray(rng.standard_normal((a.hidden, 2 * a.hidden)), jnp.bfloat16),
                        jnp.asarray(rng.standard_normal((2 * a.hidden, a.hidden)), jnp.bfloat16)),
                       jax.sharding.NamedSharding(mesh, P()))
    base = median_us(chained(lambda v: v, mesh, a.chain, w), x) / a.chain
    print(f"product alone {base:8.2f} us per step")
    for variant in a.variants.split(","):
        red = ps if variant == "psum" else functools.partial(allreduce_kernel, axis="tensor", n=n,
                                                              variant=variant)
        try:
            one = chained(red, mesh, 1)
            shards = [np.asarray(shard.data, np.float32) for shard in one(x).addressable_shards]
            err = float("nan") if variant == "copy" else max(float(np.abs(g - 0.5 * want).max()) for g in shards)
            us = median_us(chained(red, mesh, a.chain), x) / a.chain
            busy = median_us(chained(red, mesh, a.chain, w), x) / a.chain - base
            if a.profile and a.processes == 1 and variant in ("copy", "read"):
                from benchmarks.kernel_profile import traced
                f = chained(red, mesh, a.chain, w)
                f(x).block_until_ready()
                kernels, span, busiest = traced(lambda: f(x).block_until_ready(), timeline=8)
                print(f"   span {span / 1e3:.1f} us, busiest stream {busiest / 1e3:.1f} us")
                for name, (count, ns) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:6]:
                    print(f"   {count:5d} x {ns / count / 1e3:8.2f} us  {name[:90]}")
            print(f"{variant:8s} {us:8.2f} us per reduce in a chain of {a.chain}; {busy:8.2f} us added to a"
                  f" step of products; max err {err:.3g}", flush=True)
        except Exception:  # noqa: BLE001
            print(variant, "FAILED")
            traceback.print_exc()


PORT = 43781


def launch(a) -> None:
    """Runs this script in `a.processes` processes, one GPU each; prints process 0's output."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    if a.nvshmem:
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_experimental_enable_nvshmem=true").strip()
    args = [sys.executable, __file__, "--hidden", str(a.hidden), "--rows", str(a.rows), "--chain", str(a.chain),
            "--processes", str(a.processes), "--variants", a.variants]
    logs = [None] + [open(f"/tmp/nvlink_allreduce_rank{r}.log", "w+") for r in range(1, a.processes)]
    children = [subprocess.Popen(args + ["--rank", str(r)], env=env, stdout=logs[r], stderr=logs[r])
                for r in range(a.processes)]
    for r, child in enumerate(children):
        if child.wait() and logs[r] is not None:
            logs[r].seek(0)
            print(f"process {r} exited with {child.returncode}:\n" + "".join(logs[r].readlines()[-20:]))


if __name__ == "__main__":
    main()
