"""The one-row int4 kernel's machine code: what each packed word costs in instructions.

    PYTHONPATH=. python benchmarks/int4_sass.py --out DIR [--shapes 4096x12288,8192x28672] [--triton-python P]

For each weight shape (K x N), lowers `int4_matmul` at one bf16 row with the configuration llmjax
picks for that shape (`default_config`), compiles the Triton IR with the installed `triton` package
for sm_90 (no GPU needed: `--triton-python` names any environment with `triton` installed) and writes the IR, PTX and SASS into DIR. Prints the SASS opcode counts of the kernel's
loop body (the basic blocks that branch back) per packed word the body consumes. XLA compiles with
its own Triton build, so this shows the shape of the code, not XLA's exact binary.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp

from triton_offline_compile import triton_ir
from llmjax.kernels import int4_matmul as K

COMPILE = """
import sys, triton
from triton.backends.compiler import GPUTarget
path, out, warps, stages = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
k = triton.compile(path, target=GPUTarget('cuda', 90, 32), options=dict(num_warps=warps, num_stages=stages))
for name in ("ttgir", "ptx", "sass"):
    try:
        text = k.asm[name]
    except Exception as e:
        text = f"unavailable: {e}"
    with open(out + "." + name, "w") as f:
        f.write(text if isinstance(text, str) else text.decode())
print("shared", k.metadata.shared)
"""


def loop_opcodes(sass: str) -> collections.Counter:
    """SASS opcode counts of the lines between a loop's label and the branch back to it (nvdisasm's
    text as triton prints it: `LABEL:` lines, instructions after their control codes and a tab)."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := re.match(r"\s*\.?(\w+):\s*$", line))}
    counts = collections.Counter()
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\s+`?\(?\.?(\w+)", line)
        if m and labels.get(m.group(1), i) < i:
            for body in lines[labels[m.group(1)] + 1:i + 1]:
                op = re.search(r"(?:^|\t|\*/\s+)(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)(?:\.[A-Z0-9_.]+)?\b", body)
                if op:
                    counts[op.group(1)] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default="4096x12288,8192x28672")
    ap.add_argument("--triton-python", default=sys.executable, help="an interpreter with the triton package")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    for shape in args.shapes.split(","):
        size, *tiling = shape.split(":")  # KxN, or KxN:block_n:block_k:splits:num_warps
        k, n = map(int, size.split("x"))
        config = K.default_config(1, shape=(k, n))
        if tiling:
            bn, bk, sp, nw = map(int, tiling)
            config = K.Int4Config(config.kind, block_n=bn, block_k=bk, splits=sp, num_warps=nw)
        x = jax.ShapeDtypeStruct((1, k), jnp.bfloat16)
        values = jax.ShapeDtypeStruct((n, k // 8), jnp.uint32)
        scales = jax.ShapeDtypeStruct((n, k // 128), jnp.bfloat16)

        def fn(x, v, s, config=config):
            return K.int4_matmul(x, v, s, group_size=128, config=config)

        base = os.path.join(args.out, shape.replace(":", "_"))
        with open(base + ".ttir", "w") as f:
            f.write(triton_ir(fn, (x, values, scales), "cuda"))
        done = subprocess.run([args.triton_python, "-c", COMPILE, base + ".ttir", base, str(config.num_warps),
                               str(config.num_stages)], capture_output=True, text=True)
        print(shape, config, done.stdout.strip(), done.stderr.strip()[-600:], flush=True)
        sass = open(base + ".sass").read() if os.path.exists(base + ".sass") else ""
        counts = loop_opcodes(sass)
        words = config.block_n * config.block_k // 8  # one loop step's words, one program
        threads = 32 * config.num_warps
        total = sum(counts.values())
        print(f"  loop body: {total} instructions a thread for {words / threads:.0f} words a thread "
              f"({total * threads / words:.1f} a word)")
        for op, c in counts.most_common(25):
            print(f"    {op:10s} {c:5d}  {c * threads / words:5.2f} a word")


if __name__ == "__main__":
    main()
