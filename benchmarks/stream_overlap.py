"""Do the engine's decode attention (bound by memory) and its products (bound by the tensor cores) run
faster side by side on two streams than one after the other?

    PYTHONPATH=. python benchmarks/stream_overlap.py [--rows 410] [--json FILE]

A decode step of the engine (Llama-2-7B shape, bf16 pool in pages of 16, rows of 128-256 tokens)
spends its time in two kinds of kernel: paged attention, which reads the rows' keys and values at
close to the DRAM bound, and the four products, which run near the tensor cores' rate. Each variant
below is one jitted function, timed as the median of 5 calls of 20 chained rounds:

- `attention` / `products`: each alone on all rows;
- `both, one stream`: attention on all rows, then the products on all rows (independent inputs, so
  XLA may order them as it likes, but one stream runs them in turn);
- `both, two streams`: the same, with attention inside `compute_on("gpu_stream:1")` (an asynchronous
  call that XLA runs on a stream of its own);
- `halves, ...`: attention on one half of the rows and the products on the other half, in turn and
  on two streams: what a step split into two half-batches, one layer apart, would run at once.

The gain a step could take from the overlap is `one stream - two streams` against `one stream`.
"""

import argparse
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jax_core
from jax.experimental import compute_on
from jax.experimental.xla_metadata import set_xla_metadata

from llmjax.bench import _median_time
from llmjax.kernels import paged_attention

HEADS, HEAD_DIM, EMBED, MLP, PAGE = 32, 128, 4096, 11008, 16
ROUNDS = 20


def pool(rows: int, key, lo=128, hi=256, dtype=jnp.bfloat16):
    """A page pool holding `rows` rows of lo..hi tokens, their pages scattered, and one query a row."""
    per_row = -(-hi // PAGE)
    k1, k2, k3 = jax.random.split(key, 3)
    shape = (rows * per_row, PAGE, HEADS, HEAD_DIM)
    k_pages = jax.random.normal(k1, shape, dtype)
    v_pages = jax.random.normal(k2, shape, dtype)
    rng = np.random.default_rng(0)
    tables = jnp.asarray(rng.permutation(rows * per_row).reshape(rows, per_row), jnp.int32)
    lengths = jnp.asarray(rng.integers(lo, hi + 1, rows), jnp.int32)
    q = jax.random.normal(k3, (rows, HEADS, HEAD_DIM), dtype)
    return q, k_pages, v_pages, tables, lengths


def weights(key, dtype=jnp.bfloat16):
    """Llama-2-7B's four products of one layer, `[out, in]` as llmjax stores them."""
    shapes = [(3 * EMBED, EMBED), (EMBED, EMBED), (2 * MLP, EMBED), (EMBED, MLP)]
    return [jax.random.normal(k, s, dtype) * 0.02 for k, s in zip(jax.random.split(key, 4), shapes)]


def attention(q, k_pages, v_pages, tables, lengths):
    # the kernel itself with the engine's tuning, not `attend`, whose choice of platform is a `cond`
    # that XLA finds no stream for inside an asynchronous call
    return paged_attention.paged_attention(q, k_pages, v_pages, tables, lengths,
                                           interpret=jax.default_backend() == "cpu",
                                           **paged_attention.TUNING["bfloat16"])


def products(x, w):
    qkv, o, gate_up, down = w
    y = jnp.einsum("md,nd->mn", x, qkv)[:, :EMBED]
    x = x + jnp.einsum("md,nd->mn", y, o)
    h = jnp.einsum("md,nd->mn", x, gate_up)
    return x + jnp.einsum("mf,df->md", jax.nn.silu(h[:, :MLP]) * h[:, MLP:], down)


def _inline(jaxpr, consts, args):
    """Evaluates `jaxpr` with every nested `jit` (and custom-derivative wrapper) inlined: XLA finds no
    stream for a call nested inside an asynchronous call."""
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jax_core.Literal) else env[v]  # noqa: E731
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr", eqn.params.get("fun_jaxpr")))
        if eqn.primitive.name in ("pjit", "jit", "closed_call", "custom_jvp_call", "custom_vjp_call"):
            outs = _inline(inner.jaxpr, inner.consts, ins)
        else:
            outs = eqn.primitive.bind(*ins, **eqn.params)
            outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def on_stream(fn, stream):
    """`fn` as an asynchronous call on XLA's stream `stream` (jax 0.10's `compute_on2` is 0.11's
    `compute_on`), its nested calls inlined."""
    if stream is None:
        return fn

    def flat(*args):
        closed, shapes = jax.make_jaxpr(fn, return_shape=True)(*args)
        outs = _inline(closed.jaxpr, closed.consts, jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(shapes), outs)
    streamed = getattr(compute_on, "compute_on2", compute_on.compute_on)
    return streamed(flat, compute_type=f"gpu_stream:{stream}", out_memory_spaces=jax.memory.Space.Device)


def variant(attn_rows, prod_rows, attn_stream, prod_stream=None, group=False):
    """One jitted function: ROUNDS rounds of attention on `attn_rows` rows and the products on
    `prod_rows` rows, each round's inputs the last round's outputs, so nothing is hoisted. The rounds
    are unrolled: XLA finds no stream for an asynchronous call inside a loop's body."""
    attn, prod = on_stream(attention, attn_stream), on_stream(products, prod_stream)

    def run(q, k_pages, v_pages, tables, lengths, x, w):
        for r in range(ROUNDS):
            # `group`: each round's two calls in one scheduling group, which asks XLA's scheduler to
            # overlap them
            with set_xla_metadata(**({"_scheduling_group_id": str(r)} if group else {})):
                if attn_rows:
                    q = q.at[:attn_rows].set(attn(q[:attn_rows], k_pages, v_pages, tables[:attn_rows],
                                                  lengths[:attn_rows]))
                if prod_rows:
                    x = x.at[:prod_rows].set(prod(x[:prod_rows], w))
        return q, x
    return jax.jit(run)


def timed(fn, args, calls=5) -> float:
    """Seconds a round: the median of `calls` calls (after one that compiles), over ROUNDS."""
    jax.block_until_ready(fn(*args))
    return _median_time(lambda: fn(*args), calls) / ROUNDS


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=410)
    parser.add_argument("--json")
    parser.add_argument("--schedule", action="store_true", help="print the order of the calls and kernels")
    args = parser.parse_args()
    rows, half = args.rows, args.rows // 2
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {rows} rows")
    key = jax.random.key(0)
    q, k_pages, v_pages, tables, lengths = pool(rows, key)
    x = jax.random.normal(jax.random.fold_in(key, 1), (rows, EMBED), jnp.bfloat16)
    w = weights(jax.random.fold_in(key, 2))
    operands = (q, k_pages, v_pages, tables, lengths, x, w)
    cases = {
        "attention": (rows, 0, None),
        "products": (0, rows, None),
        "both, one stream": (rows, rows, None),
        "both, two streams": (rows, rows, 1),
        "halves, one stream": (half, half, None),
        "halves, two streams": (half, half, 1),
        "both, products on 1": (rows, rows, None, 1),
        "both, streams 1 and 2": (rows, rows, 1, 2),
        "both, 1 and 2, grouped": (rows, rows, 1, 2, True),
        "both, two streams, grouped": (rows, rows, 1, None, True),
    }
    results = {}
    for name, (a, p, *streams) in cases.items():
        try:
            fn = variant(a, p, *streams)
            text = fn.lower(*operands).compile().as_text() or ""
            streams = "call-start" in text and "_xla_stream_annotation" in text
            if streams and args.schedule:  # the order the entry computation runs its calls and kernels in
                entry = text[text.index("ENTRY"):]
                ops = []
                for line in entry.splitlines():
                    op = re.search(r" = .*? (call-start|call-done|custom-call|fusion)\(", line)
                    target = re.search(r'custom_call_target="([^"]+)"', line)
                    if op:
                        ops.append(target.group(1) if target else op.group(1))
                print("  schedule:", " ".join(ops[:40]))
            results[name] = timed(fn, operands) * 1e6
            print(f"{name:22s} {results[name]:8.1f} us a round{'  (an asynchronous call)' if streams else ''}",
                  flush=True)
        except Exception as e:  # an XLA without stream annotations: say so and go on
            print(f"{name:22s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    for scope in ("both", "halves"):
        one, two = results.get(f"{scope}, one stream"), results.get(f"{scope}, two streams")
        if one and two:
            print(f"{scope}: two streams take {two / one:.3f}x the time of one")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
