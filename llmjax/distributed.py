"""Several hosts: `llmjax.distributed.initialize(...)`, then the same program in every process.

A thin wrapper over `jax.distributed.initialize`: after it, `jax.devices()` lists every process's
devices, `llmjax.sharding.make_mesh` spans them all, and `load(path, mesh=mesh)`, `generate` and
`logits` run as one program (XLA with NCCL/RCCL on GPUs, gloo on CPUs). Each process must run the
same calls with the same arguments; each gets the same results.

    # on every host (the coordinator is process 0's address, reachable by all):
    import llmjax, llmjax.distributed
    llmjax.distributed.initialize("10.0.0.1:4321", num_processes=2, process_id=RANK)
    mesh = llmjax.sharding.make_mesh(tensor=8, data=2)      # 2 hosts x 8 GPUs
    params = llmjax.load("/shared/llama2-70b", mesh=mesh)
    print(llmjax.generate(params, "Hello"))
"""

from __future__ import annotations

import jax

from llmjax.sharding.mesh import is_integer


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: list[int] | None = None) -> None:
    """Joins this process to the others. With no arguments, cluster environments that jax detects
    (Slurm, Open MPI, Kubernetes with the right variables) fill them in."""
    given = [coordinator_address is None, num_processes is None, process_id is None]
    if any(given) and not all(given):
        raise ValueError("give coordinator_address, num_processes and process_id together (or none, to "
                         "let jax read them from the cluster environment)")
    if num_processes is not None:
        if not is_integer(num_processes) or num_processes < 1:
            raise ValueError(f"num_processes must be an integer >= 1, got {num_processes!r}")
        if not is_integer(process_id) or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id must be an integer in [0, {num_processes}), got {process_id!r}")
        num_processes, process_id = int(num_processes), int(process_id)
        if not isinstance(coordinator_address, str) or ":" not in coordinator_address:
            raise ValueError(f"coordinator_address must be 'host:port' (process 0's address), got "
                             f"{coordinator_address!r}")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids)
