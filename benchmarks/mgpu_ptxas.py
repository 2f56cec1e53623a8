"""Compiles the Hopper prefill kernel at 8k x 2 in each tuning named on the command line, for ptxas's report.

    MOSAIC_GPU_DUMP_PTXAS=1 PYTHONPATH=. python benchmarks/mgpu_ptxas.py '{}' '{"block_kv": 64, "stages": 3}' \\
        2>&1 | grep -iE '===|spill|serializ|registers'

Mosaic GPU prints ptxas's verbose output (registers, spills, and warnings such as wgmma serialization)
when `MOSAIC_GPU_DUMP_PTXAS=1`.
"""

import json
import sys

import jax.numpy as jnp

from llmjax.kernels import flash_attention_mgpu as fm

t, b = 8192, 2
q, k = jnp.ones((b, t, 32, 128), jnp.bfloat16), jnp.ones((b, t, 8, 128), jnp.bfloat16)
zeros, full = jnp.zeros((b,), jnp.int32), jnp.full((b,), t, jnp.int32)
for spec in sys.argv[1:]:
    print("=== variant", spec, flush=True)
    fm.flash_attention(q, k, k, zeros, full, **json.loads(spec)).block_until_ready()
    print(flush=True)
