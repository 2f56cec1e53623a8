"""Sharding over a device mesh (axes `data`, `stage`, `tensor`) by logical axis names.

`make_mesh(tensor=, stage=, data=)` builds the mesh; `llmjax.load(path, mesh=mesh)` or
`llmjax.shard(params, mesh)` places the weights by the rules in `rules.py` (Megatron tensor
parallelism, layers split into pipeline stages, data parallelism over the batch); `generate`,
`stream` and `logits` then run on the mesh, across hosts too after `llmjax.distributed.initialize`.
`pipeline.py` schedules the stages.
"""

from llmjax.sharding.mesh import fit_config, make_mesh

__all__ = ["fit_config", "make_mesh"]
