"""Whether `llmjax.models.rope.apply_rope`, compiled on this device, rounds its cos and sin tables to
the keys' dtype as its kernels do: its output against numpy's (the rotation in float32, the result
rounded once), with tables rounded to the keys' dtype and with float32 tables, element by element,
for bfloat16 and float16 keys. A device that keeps the rounding matches the first (up to products
fused into multiply-adds); one that drops it matches the second more closely. Two programs: the
tables passed in, and the tables made by `rope_tables` inside the same jit, as the model makes them
(where XLA could fuse the cos and sin into the rotation and drop the rounding between).

    PYTHONPATH=. python -P benchmarks/rope_rounding.py [--positions 4096]
"""

import argparse

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from llmjax.config import LlamaConfig
from llmjax.models.rope import apply_rope, rope_tables


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=4096)
    args = parser.parse_args()
    config = LlamaConfig.preset("llama2-7b")
    positions = jnp.arange(args.positions, dtype=jnp.int32)[None]
    cos, sin = (np.asarray(t) for t in rope_tables(config, positions))
    for name, dtype in (("bfloat16", ml_dtypes.bfloat16), ("float16", np.float16)):
        x = np.asarray(jax.random.normal(jax.random.key(0), (1, args.positions, 4, config.head_dim)), dtype)
        half = config.head_dim // 2
        x32 = x.astype(np.float32)
        rotated = np.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
        programs = {"tables passed in": lambda x: apply_rope(x, jnp.asarray(cos), jnp.asarray(sin)),
                    "tables made in the jit": lambda x: apply_rope(x, *rope_tables(config, positions))}
        for program, fn in programs.items():
            got = np.asarray(jax.jit(fn)(jnp.asarray(x)))
            differ = []
            for table_dtype in (dtype, np.float32):
                c, s = (t[:, :, None, :].astype(table_dtype).astype(np.float32) for t in (cos, sin))
                want = (x32 * c + rotated * s).astype(dtype)
                differ.append((got.view(np.uint16) != want.view(np.uint16)).sum())
            print(f"{jax.devices()[0].device_kind}: {name} keys, {program}: of {got.size} rotated values "
                  f"{differ[0]} differ from numpy's with tables rounded to {name}, {differ[1]} with float32 tables")


if __name__ == "__main__":
    main()
