"""Where a batch-1 decode step's time goes: weight products, attention over the cache, and the rest.

    PYTHONPATH=. python benchmarks/decode_breakdown.py --preset llama2-7b [--gen-len 256] [--json FILE]

Three timings in one process, each the median of 5 calls of one jit looping `STEPS` times:
- the whole step: `llmjax.bench` (the one-jit generate loop, decode time per step);
- weights: every projection of every layer plus the LM head, with the model's shapes and layout,
  chained as the step chains them, and nothing else;
- attention: the reference attention of every layer over a cache of the bench's length.
"The rest" is the step minus those two: norms, RoPE, residual adds, cache writes, sampling, the
loop's own bookkeeping and the gaps between kernels.
"""

import argparse
import json

import jax
import jax.numpy as jnp

from llmjax import bench
from llmjax.config import LlamaConfig
from llmjax.models.llama import attention

STEPS = 32


def _time(f, *args) -> float:
    f(*args).block_until_ready()
    return bench._median_time(lambda: f(*args), 5) / STEPS


def weights_only(c: LlamaConfig) -> tuple[float, int]:
    d, f, hd, kvh = c.hidden_size, c.intermediate_size, c.head_dim, c.num_kv_heads
    g = c.num_heads // kvh
    key = iter(jax.random.split(jax.random.key(0), 4 * c.num_layers + 1))
    layers = [dict(qkv=jax.random.normal(next(key), (kvh, g + 2, hd, d), jnp.bfloat16),
                   o=jax.random.normal(next(key), (d, c.num_heads, hd), jnp.bfloat16),
                   gate_up=jax.random.normal(next(key), (2, f, d), jnp.bfloat16),
                   down=jax.random.normal(next(key), (d, f), jnp.bfloat16)) for _ in range(c.num_layers)]
    head = jax.random.normal(next(key), (c.vocab_size, d), jnp.bfloat16)

    @jax.jit
    def run(x, layers, head):
        def step(_, x):
            for w in layers:
                qkv = jnp.einsum("btd,kchd->btkch", x, w["qkv"])
                x = x + jnp.einsum("btnh,dnh->btd", qkv[:, :, :, :g].reshape(1, 1, -1, hd), w["o"]) * 1e-3
                gu = jnp.einsum("btd,cfd->btcf", x, w["gate_up"])
                x = x + jnp.einsum("btf,df->btd", gu[:, :, 0] * gu[:, :, 1], w["down"]) * 1e-3
            logits = jnp.einsum("btd,vd->btv", x, head)
            return x + logits[..., :d] * 1e-6
        return jax.lax.fori_loop(0, STEPS, step, x)

    nbytes = sum(w.nbytes for w in jax.tree.leaves(layers)) + head.nbytes
    return _time(run, jnp.ones((1, 1, d), jnp.bfloat16), layers, head), nbytes


def attention_only(c: LlamaConfig, cache_len: int, filled: int) -> float:
    k = jax.random.normal(jax.random.key(1), (c.num_layers, 1, cache_len, c.num_kv_heads, c.head_dim),
                          jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), k.shape, jnp.bfloat16)

    @jax.jit
    def run(q, k, v):
        def step(_, q):
            pos = jnp.full((1, 1), filled, jnp.int32)
            k_pos = jnp.arange(cache_len)[None]
            for i in range(c.num_layers):
                q = q + attention(q, k[i], v[i], pos, k_pos) * 1e-3
            return q
        return jax.lax.fori_loop(0, STEPS, step, q)

    return _time(run, jnp.ones((1, 1, c.num_heads, c.head_dim), jnp.bfloat16), k, v)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    r = bench.bench(args.preset, prompt_len=args.prompt_len, gen_len=args.gen_len)
    c = LlamaConfig.preset(args.preset)
    cache_len = (r.cache_bytes_per_step // (2 * c.num_layers * c.num_kv_heads * c.head_dim * 2))
    step = r.decode_ms_per_step / 1e3
    w, w_bytes = weights_only(c)
    a = attention_only(c, cache_len, args.prompt_len + args.gen_len // 2)
    rest = step - w - a
    rows = {"step": step, "weights": w, "attention": a, "rest": rest}
    print(r.report())
    print(f"\nbreakdown of one decode step ({args.preset}, batch 1, cache {cache_len}):")
    for name, s in rows.items():
        extra = f"  ({w_bytes / s / 1e12:.2f} TB/s over {w_bytes / 1e9:.2f} GB)" if name == "weights" else ""
        print(f"  {name:10s} {s * 1e3:7.3f} ms  {s / step:6.1%}{extra}")
    bound = r.bytes_per_step / (r.bandwidth_gb_s * 1e9)
    print(f"  bound      {bound * 1e3:7.3f} ms (bytes per step / measured bandwidth)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bench": r.__dict__, "seconds": rows, "weight_bytes": w_bytes}, f, indent=1)


if __name__ == "__main__":
    main()
