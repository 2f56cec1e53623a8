"""Sharding over a device mesh (axes `data`, `stage`, `tensor`) by logical axis names.

Every weight already declares its logical axes (`llmjax.models.llama.logical_axes`); the rules table
that maps them onto mesh axes, mesh construction and pipeline parallelism are not implemented yet:
today llmjax runs on one device.
"""
