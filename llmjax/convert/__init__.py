"""Hugging Face -> llmjax conversion: `names` holds the explicit name map, `hf` the streaming reader."""
