"""Pallas kernels (Triton backend, so they lower for cuda and rocm), each beside a pure-jnp reference.

None yet: attention and every projection run through XLA (`llmjax.models.llama`).
"""
