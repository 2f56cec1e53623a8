"""Checks the engine on the GPU, then measures its throughput (`llmjax bench --throughput`).

    PYTHONPATH=. python benchmarks/engine_throughput.py --out DIR [--model llama2-7b] [--requests 1000]

1. `paged_attention` (the kernel on a GPU) against `paged_attention_reference` on the pool shapes of
   Llama-2-7B (32 kv heads) and a grouped-query model (8 kv heads), bf16, scrambled block tables,
   ragged lengths and an empty row.
2. The engine's greedy tokens against `llmjax.generate` on a small float32 random model, matmuls at
   full precision: 48 requests of random lengths through 16 slots, so they share and change steps;
   pages of 16 and of 64 tokens (the prompt chunks' keys gathered a token at a time, or a block at a
   time). `--checks-only` stops after the checks.
3. The throughput bench on random weights of `--model` (bf16): 1000 x 128/128, the length mix, the
   Poisson serving curve, transformers' batched generate (`--no-hf` skips it).
Writes `DIR/engine_throughput.json` (everything), `DIR/serving.png` and `DIR/report.txt`, and prints
the report. Exits with status 1 if a check fails (the bench then does not run).
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import llmjax
from llmjax import throughput
from llmjax.kernels.paged_attention import paged_attention, paged_attention_reference


def check_paged_attention(rng) -> list[dict]:
    rows = []
    for heads, kv_heads in ((32, 32), (32, 8)):
        batch, dim, page, pages, width = 64, 128, 16, 2048, 32
        k_pages = jnp.asarray(rng.standard_normal((pages, page, kv_heads, dim)), jnp.bfloat16)
        v_pages = jnp.asarray(rng.standard_normal((pages, page, kv_heads, dim)), jnp.bfloat16)
        q = jnp.asarray(rng.standard_normal((batch, heads, dim)), jnp.bfloat16)
        tables = jnp.asarray(rng.permutation(pages)[:batch * width].reshape(batch, width), jnp.int32)
        lengths = rng.integers(1, width * page + 1, batch)
        lengths[0] = 0
        lengths = jnp.asarray(lengths, jnp.int32)
        got = jax.jit(paged_attention)(q, k_pages, v_pages, tables, lengths).astype(jnp.float32)
        want = jax.jit(paged_attention_reference)(q, k_pages, v_pages, tables, lengths).astype(jnp.float32)
        err = float(jnp.max(jnp.abs(got - want)))
        rows.append({"heads": heads, "kv_heads": kv_heads, "max_abs_err": err, "ok": err < 2e-2 and
                     bool(jnp.all(got[0] == 0))})
    return rows


def check_engine_greedy(rng, page_size: int = 16) -> dict:
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), vocab_size=1024, hidden_size=256,
                                 intermediate_size=512, num_layers=4, num_heads=8, num_kv_heads=2,
                                 head_dim=32, max_position_embeddings=256, eos_token_ids=())
    params = llmjax.init_random(config, seed=1, dtype="float32")
    prompts = [rng.integers(3, 1024, rng.integers(1, 100)).tolist() for _ in range(48)]
    budgets = rng.integers(1, 40, len(prompts)).tolist()
    with jax.default_matmul_precision("highest"):
        full = llmjax.generate(params, prompts, max_new_tokens=max(budgets))
        expected = [ids[:n] for ids, n in zip(full, budgets)]
        got = llmjax.LLM(params, max_slots=16, prefill_tokens=256, decode_steps=4, page_size=page_size).generate(
            prompts, max_new_tokens=budgets, progress=False)
    same = sum(a == b for a, b in zip(got, expected))
    return {"requests": len(prompts), "page_size": page_size, "equal": same, "ok": same == len(prompts)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="llama2-7b")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--max-slots", type=int, default=256)
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=2048)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--serving-requests", type=int, default=200)
    parser.add_argument("--no-hf", action="store_true")
    parser.add_argument("--checks-only", action="store_true", help="run the checks, not the bench")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    checks = {"paged_attention": check_paged_attention(rng),
              "engine_greedy_vs_generate": [check_engine_greedy(rng, page) for page in (16, 64)]}
    print(json.dumps(checks, indent=1), flush=True)
    ok = all(r["ok"] for group in checks.values() for r in group)
    summary = {"checks": checks, "checks_s": time.perf_counter() - start}
    if ok and not args.checks_only:
        result = throughput.throughput_bench(
            args.model, requests=args.requests, prompt_len=args.prompt_len, gen_len=args.gen_len, max_slots=args.max_slots, decode_steps=args.decode_steps,
            prefill_tokens=args.prefill_tokens, page_size=args.page_size, serving_requests=args.serving_requests,
            compare_hf=not args.no_hf, log=lambda line: print(line, flush=True))
        summary["bench"] = dataclasses.asdict(result)
        report = result.report()
        print(report)
        with open(os.path.join(args.out, "report.txt"), "w", encoding="utf-8") as f:
            f.write(report + "\n")
        if result.serving:
            throughput.plot_serving(result, os.path.join(args.out, "serving.png"))
    summary["total_s"] = time.perf_counter() - start
    with open(os.path.join(args.out, "engine_throughput.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    print(f"total {summary['total_s']:.1f} s; wrote {args.out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
