"""llmjax: Llama-family inference with JAX and XLA.

```python
import llmjax
params = llmjax.load("path/to/model")          # llmjax checkpoint or Hugging Face folder
print(llmjax.generate(params, "def fibonacci(n):", max_new_tokens=64))
for piece in llmjax.stream(params, "Once upon a time"):
    print(piece, end="", flush=True)
scores = llmjax.logits(params, [1, 450, 4996])   # float32 [batch, seq, vocab]
texts = llmjax.LLM(params).generate(prompts)      # continuous batching over a paged KV cache
```
"""

from llmjax.config import LlamaConfig, RopeScaling
from llmjax.convert.hf import convert
from llmjax.engine import LLM, Engine
from llmjax.generate import generate, logits, stream
from llmjax.params import Params, init_random, load, shard
from llmjax.sampling import Sampling
from llmjax.scoring import Perplexity, perplexity
from llmjax.tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = ["LLM", "Engine", "LlamaConfig", "RopeScaling", "Params", "Perplexity", "Sampling", "Tokenizer", "convert",
           "generate", "init_random", "load", "logits", "perplexity", "shard", "stream"]
