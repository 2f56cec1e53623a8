"""`generate` on a mesh with pipeline stages, called over and over with random batches, against one
device: greedy tokens must agree, and no call may hang. On 8 CPU devices, stage=4 x tensor=2 once
deadlocked XLA's CPU runtime within 2-29 calls (a stage's collectives run beside another; BENCHMARKS.md,
thirty-third session). Prints the calls made; XLA aborts the process (exit 134) on a hang.

    python benchmarks/pipeline_stress.py [DATA STAGE TENSOR SECONDS]   (default 1 4 2 120)

It makes its own 8 CPU devices unless XLA_FLAGS already names a count. The model: 5 layers, 6 query
heads sharing one kv head, hidden size 48 (so tensor must divide 6), random float32 weights.
"""

import os
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import llmjax  # noqa: E402
from llmjax.sharding import make_mesh  # noqa: E402


def main(argv: list[str]) -> None:
    data, stage, tensor, seconds = (int(a) for a in (argv or (1, 4, 2, 120)))
    config = llmjax.LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_layers=5, num_heads=6,
                                num_kv_heads=1, head_dim=8, max_position_embeddings=256)
    one = llmjax.init_random(config, dtype="float32", seed=0)
    devices = jax.devices()[:data * stage * tensor]
    mesh = llmjax.shard(one, make_mesh(tensor=tensor, stage=stage, data=data, devices=devices))
    rng = np.random.default_rng(0)
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        prompts = [rng.integers(3, 64, rng.integers(1, 20)).tolist() for _ in range(rng.integers(1, 10))]
        got, want = (llmjax.generate(p, prompts, max_new_tokens=9) for p in (mesh, one))
        calls += 1
        if got != want:
            sys.exit(f"call {calls}: the mesh's tokens differ from one device's for {prompts}")
    print(f"(data, stage, tensor) = ({data}, {stage}, {tensor}): {calls} calls in {seconds} s, no hang, "
          "every call's tokens those of one device")


if __name__ == "__main__":
    main(sys.argv[1:])
