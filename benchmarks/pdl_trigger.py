"""Batch-1 int4 decode with the one-row int4 kernels triggering their dependents' launch
(`griddepcontrol.launch_dependents`) at their start, after their K loop, or not at all (XLA launches
kernels with programmatic dependent launch by default on Hopper; `benchmarks/xla_flags.py`).

    PYTHONPATH=. python benchmarks/pdl_trigger.py [--model llama2-7b] [--rounds 2]

Each round runs `llmjax bench --dtype int4-g128` once per setting in one process.
"""

import argparse

import jax

from llmjax import cli
from llmjax.kernels import int4_matmul


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    for r in range(a.rounds):
        for trigger in (None, "start", "end"):
            int4_matmul.PDL_TRIGGER = trigger
            jax.clear_caches()
            print(f"== trigger {trigger}, round {r}", flush=True)
            cli.main(["bench", "--model", a.model, "--dtype", "int4-g128", "--gen-len", "256"])


if __name__ == "__main__":
    main()
