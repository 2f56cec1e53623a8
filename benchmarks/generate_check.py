"""Times `llmjax.generate` at batch 1 on random weights and compares it with the bandwidth bound.

    PYTHONPATH=. python benchmarks/generate_check.py --preset llama2-7b [--prompt-len 8] [--gen-len 256]

Batch-1 decode reads every weight except the embedding table once per token, so
tok/s <= bandwidth / bytes. The bandwidth is measured in the same process (a read-only reduction over
2 GiB through XLA), so the ratio is taken on one machine state. Also times `llmjax.stream`, which
steps the same jitted decode from Python and pays a host round trip per token.
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import llmjax


def measure_bandwidth(gib: float = 2.0, repeats: int = 20) -> float:
    x = jax.random.normal(jax.random.key(0), (int(gib * 2**30 / 4),), jnp.float32)
    reduce = jax.jit(lambda a: jnp.sum(a))
    reduce(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        reduce(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return x.nbytes / statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt-len", type=int, default=8)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    config = dataclasses.replace(llmjax.LlamaConfig.preset(args.preset), eos_token_ids=())
    params = llmjax.init_random(config, dtype=args.dtype)
    weights_bytes = sum(w.nbytes for w in jax.tree.leaves(params.weights))
    embed = params.weights["embed"]["embedding"]
    read_per_token = weights_bytes - embed.nbytes + embed.nbytes // config.vocab_size
    bandwidth = measure_bandwidth()
    prompt = np.random.default_rng(0).integers(3, config.vocab_size, args.prompt_len).tolist()

    out = llmjax.generate(params, prompt, max_new_tokens=args.gen_len)  # compiles
    assert len(out) == args.gen_len
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        llmjax.generate(params, prompt, max_new_tokens=args.gen_len)
        times.append(time.perf_counter() - t)
    total = statistics.median(times)
    tok_s = args.gen_len / total
    bound = bandwidth / read_per_token

    class _Tok:  # stream needs a tokenizer; ids are shown as numbers
        bos_token = None
        def decode(self, ids): return " ".join(map(str, ids))
    stream_params = dataclasses.replace(params, tokenizer=_Tok())
    s = llmjax.stream(stream_params, prompt, max_new_tokens=args.gen_len)
    for _ in s:
        pass

    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(f"model: {args.preset} {args.dtype}, {params.num_params / 1e9:.2f} B params, "
          f"{read_per_token / 1e9:.2f} GB read per token")
    print(f"bandwidth (XLA read-only reduce, same process): {bandwidth / 1e12:.2f} TB/s -> bound "
          f"{bound:.1f} tok/s")
    print(f"generate (one jit, prompt {args.prompt_len}, {args.gen_len} new): {total * 1e3:.1f} ms, "
          f"{tok_s:.1f} tok/s, {total / args.gen_len * 1e3:.2f} ms/token, {tok_s / bound:.1%} of bound, "
          f"weights at {tok_s * read_per_token / 1e12:.2f} TB/s")
    print(f"stream (Python loop over the jitted step): {s.stats.decode_tok_s:.1f} tok/s, prefill "
          f"{s.stats.prefill_s * 1e3:.1f} ms, compile {s.stats.compile_s:.1f} s")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
