"""Pallas kernels (Triton backend, so they lower for cuda and rocm), each beside a pure-jnp reference.

`gemv` (few-row products against `[out, in]` weights), `flash_attention` (prefill; on Hopper GPUs its
Mosaic GPU twin `flash_attention_mgpu`), `decode_attention`
(one token per row, contiguous cache), `paged_attention` (one token per row, paged cache);
`dispatch` picks the kernel on cuda and rocm and the reference elsewhere.
"""
