"""Sharding over a device mesh (axes `data`, `stage`, `tensor`) by logical axis names.

`make_mesh(tensor=, data=)` builds the mesh; `llmjax.load(path, mesh=mesh)` or `llmjax.shard(params,
mesh)` places the weights by the rules in `rules.py` (Megatron tensor parallelism, data parallelism
over the batch); `generate`, `stream` and `logits` then run on the mesh, across hosts too after
`llmjax.distributed.initialize`. Pipeline parallelism (`stage`) is not implemented yet.
"""

from llmjax.sharding.mesh import fit_config, make_mesh

__all__ = ["fit_config", "make_mesh"]
