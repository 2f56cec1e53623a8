"""Compiles the attention kernels' Triton IR for an H200 (sm_90) and an MI300 (gfx942) without a GPU.

    PYTHONPATH=. python benchmarks/triton_offline_compile.py --out DIR [--triton-python PYTHON]

CI proves that each kernel lowers from Pallas to Triton IR for cuda and rocm. This goes one step
further on a machine with no GPU: it writes each kernel's Triton IR (as jax lowers it) to DIR, then
compiles it with the `triton` package's own compiler down to PTX and AMDGCN, each with the tuning
llmjax uses on that platform, and prints the shared memory each kernel takes (an H200 has 227 KB per
block, an MI300 64 KB per workgroup) and whether the Hopper build uses warp-group MMA. The `triton` package is
not one of llmjax's dependencies: install it into any environment (`pip install triton`) and name
that environment's interpreter with `--triton-python` (default: this one). XLA compiles with its own
Triton build, so this is evidence that the IR is well formed and fits the targets, not a proof of
how XLA will compile it.
"""

import argparse
import functools
import inspect
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax._src.pallas.triton import lowering
from jax.sharding import AbstractDevice, AbstractMesh, AxisType

from llmjax.kernels import decode_attention as da, flash_attention as fa, paged_attention as pa

S = jax.ShapeDtypeStruct
BF16 = jnp.bfloat16
TARGETS = {"cuda": ("NVIDIA H200", "GPUTarget('cuda', 90, 32)"),
           "rocm": ("gfx942", "GPUTarget('hip', 'gfx942', 64)")}
SHARED_LIMIT = {"cuda": 232448, "rocm": 65536}  # bytes per block (H200) / per workgroup (MI300)
# kernel module, abstract arguments
CASES = {
    "flash_hd128": (fa, (S((2, 1000, 32, 128), BF16), S((2, 1000, 8, 128), BF16), S((2, 1000, 8, 128), BF16),
                         S((2,), jnp.int32), S((2,), jnp.int32))),
    "flash_hd64": (fa, (S((2, 1000, 8, 64), BF16), S((2, 1000, 8, 64), BF16), S((2, 1000, 8, 64), BF16),
                        S((2,), jnp.int32), S((2,), jnp.int32))),
    "decode": (da, (S((4, 32, 128), BF16), S((4, 1000, 8, 128), BF16), S((4, 1000, 8, 128), BF16),
                    S((4,), jnp.int32))),
    "paged_16": (pa, (S((4, 32, 128), BF16), S((100, 16, 8, 128), BF16), S((100, 16, 8, 128), BF16),
                      S((4, 20), jnp.int32), S((4,), jnp.int32))),
    "paged_128": (pa, (S((4, 32, 128), BF16), S((100, 128, 8, 128), BF16), S((100, 128, 8, 128), BF16),
                       S((4, 20), jnp.int32), S((4,), jnp.int32))),
}


def tuning(module, platform: str) -> dict:
    """The kernel's default tuning on `platform`: its keyword defaults, with `ROCM_TUNING` on rocm."""
    kernel = getattr(module, module.__name__.rsplit(".", 1)[1])
    defaults = {name: p.default for name, p in inspect.signature(kernel).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name != "interpret"}
    return {**defaults, **(module.ROCM_TUNING if platform == "rocm" else {})}


COMPILE = """
import json, sys, triton
from triton.backends.compiler import GPUTarget
path, target, warps, stages = sys.argv[1], eval(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
try:
    k = triton.compile(path, target=target, options=dict(num_warps=warps, num_stages=stages))
    code = k.asm.get("ptx") or k.asm.get("amdgcn")
    code = code if isinstance(code, str) else code.decode()
    print(json.dumps(dict(ok=True, shared=k.metadata.shared, wgmma="wgmma" in code)))
except Exception as e:
    print(json.dumps(dict(ok=False, error=f"{type(e).__name__}: {str(e)[:400]}")))
"""


def triton_ir(fn, args, platform: str) -> str:
    """The Triton IR (text) of the one pallas_call inside `fn`, as jax lowers it for `platform`."""
    captured = []
    original = lowering.lower_jaxpr_to_triton_module

    def capture(*a, **k):
        result = original(*a, **k)
        captured.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    lowering.lower_jaxpr_to_triton_module = capture
    try:
        mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,), abstract_device=AbstractDevice(
            device_kind=TARGETS[platform][0], num_cores=None, platform="gpu"))
        with jax.sharding.use_abstract_mesh(mesh):
            jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
    finally:
        lowering.lower_jaxpr_to_triton_module = original
    (text,) = captured
    return text


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--triton-python", default=sys.executable)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    failed = False
    for name, (module, shapes) in CASES.items():
        for platform, (_, target) in TARGETS.items():
            config = tuning(module, platform)
            warps, stages = config["num_warps"], config["num_stages"]
            fn = functools.partial(getattr(module, module.__name__.rsplit(".", 1)[1]), **config)
            path = os.path.join(args.out, f"{name}-{platform}.ttir")
            with open(path, "w") as f:
                f.write(triton_ir(fn, shapes, platform))
            done = subprocess.run([args.triton_python, "-c", COMPILE, path, target, str(warps), str(stages)],
                                  capture_output=True, text=True)
            lines = done.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if lines else dict(ok=False, error=done.stderr.strip()[-400:])
            if result["ok"] and result["shared"] > SHARED_LIMIT[platform]:
                result = dict(ok=False, error=f"needs {result['shared']} B of shared memory; the GPU has "
                                              f"{SHARED_LIMIT[platform]}")
            failed |= not result["ok"]
            detail = (f"shared {result['shared']:6d} B" + ("  wgmma" if result["wgmma"] else "")
                      if result["ok"] else result["error"])
            print(f"{name:10s} {platform:4s} warps {warps} stages {stages}: "
                  f"{'compiled' if result['ok'] else 'FAILED'}  {detail}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
