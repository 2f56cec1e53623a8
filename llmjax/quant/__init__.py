"""Weight-only quantization (int4 group-wise, int8 per-channel). Not implemented yet."""
