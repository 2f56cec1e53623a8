"""Model definitions: `llama` (the Llama family) and `rope` (rotary embeddings)."""
