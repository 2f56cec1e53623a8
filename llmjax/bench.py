"""`llmjax bench`: decode speed on random weights, against the memory-bandwidth bound and a peer.

Decode reads every weight (but the embedding table) and the whole KV cache once per step, so a step can
take no less than `bytes_per_step / bandwidth`. `bench` measures that bandwidth in the same process
(the best of three XLA read kernels over 4 GiB), times llmjax's one-jit generate loop, and reports
the fraction of the bound reached. Timing, all medians over `repeats` runs of the compiled loop:
- `prefill_ms`: the loop stopped after the first token (prefill, sampling, the loop's setup);
- decode: `(gen_len - 1)` steps in the difference between a full run and that one-token run;
- `end_to_end_tok_s`: `gen_len` tokens over a full run, per sequence.
Both runs share one compilation (the token budget is a runtime value), so nothing is compiled inside
a timed region. `compare_hf=True` times Hugging Face transformers (static cache, `torch.compile`) on
the same shapes in the same process.

`dtype` may name a quantization (`int4-g128`, ..., `int8`, `llmjax.quant`): the projections are then
random codes made directly in their packed form (and in their shardings on a mesh), the other weights
bfloat16, and the bytes read per step count the packed codes and their scales. transformers has no
such format here, so `compare_hf` times it with bfloat16 weights and says so.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.config import LlamaConfig
from llmjax.params import Params, init_random
from llmjax.quant.tree import parse_dtype
from llmjax.quant.weights import SCHEMES
from llmjax.sharding import pipeline
from llmjax.sharding.rules import cache_sharding

gen = importlib.import_module("llmjax.generate")  # the module; `llmjax.generate` is also a function
DTYPES = ("bfloat16", "float16", "float32")


@dataclasses.dataclass
class BenchResult:
    model: str
    dtype: str
    batch: int
    prompt_len: int
    gen_len: int
    device: str
    jax_version: str
    num_params: int
    prefill_ms: float
    decode_ms_per_step: float
    decode_tok_s: float  # per sequence
    throughput_tok_s: float  # all sequences: batch * decode_tok_s
    end_to_end_tok_s: float  # per sequence, prefill included
    weight_bytes_per_step: int
    cache_bytes_per_step: int
    bandwidth_gb_s: float
    bound_tok_s: float  # per sequence
    fraction_of_bound: float
    peak_memory_gib: float | None
    hf_tok_s: float | None = None
    hf_setup: str | None = None
    hf_error: str | None = None
    quant_lm_head: bool = False  # the LM head quantized too (`dtype` names the scheme)

    @property
    def bytes_per_step(self) -> int:
        return self.weight_bytes_per_step + self.cache_bytes_per_step

    def report(self) -> str:
        lines = [
            f"device {self.device}, jax {self.jax_version}",
            f"model {self.model} ({_count(self.num_params)} parameters, {self.dtype}"
            f"{', LM head too' if self.quant_lm_head else ''}, random weights), "
            f"batch {self.batch}, prompt {self.prompt_len}, {self.gen_len} new tokens",
            f"prefill + first token   {self.prefill_ms:9.2f} ms",
            f"decode                  {self.decode_tok_s:9.1f} tok/s per sequence "
            f"({self.decode_ms_per_step:.3f} ms per step; {self.throughput_tok_s:.1f} tok/s in all)",
            f"end to end              {self.end_to_end_tok_s:9.1f} tok/s per sequence",
            f"read per step           {_size(self.bytes_per_step)} (weights "
            f"{_size(self.weight_bytes_per_step).strip()}, KV cache {_size(self.cache_bytes_per_step).strip()})",
            f"bandwidth (measured)    {_rate(self.bandwidth_gb_s * 1e9)} -> bound "
            f"{self.bound_tok_s:.1f} tok/s per sequence",
            f"fraction of bound       {self.fraction_of_bound:9.1%} (reads at "
            f"{_rate(self.bytes_per_step / self.decode_ms_per_step * 1e3).strip()})",
        ]
        if self.peak_memory_gib is not None:
            lines.append(f"peak device memory      {self.peak_memory_gib:9.2f} GiB")
        lines += transformers_line(f"{self.hf_setup}, same run", self.hf_tok_s, self.hf_error,
                                   "tok/s per sequence end to end", self.end_to_end_tok_s)
        return "\n".join(lines)


def transformers_line(setup: str, hf_tok_s: float | None, error: str | None, unit: str,
                      ours: float) -> list[str]:
    """The report's line on transformers, timed in the same run: its figure and llmjax's ratio to it,
    or why it was not timed (none when it was not asked for)."""
    if hf_tok_s is not None:
        return [f"transformers ({setup}) {hf_tok_s:.1f} {unit}: llmjax is {ours / hf_tok_s:.2f}x"]
    return [f"transformers: not timed ({error})"] if error else []


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def _size(n: float) -> str:
    """Bytes in GB, or in MB below one GB (a small model's reads would print as 0.000 GB)."""
    return f"{n / 1e9:9.3f} GB" if n >= 1e9 else f"{n / 1e6:9.3f} MB"


def _rate(bytes_per_s: float) -> str:
    return f"{bytes_per_s / 1e12:9.2f} TB/s" if bytes_per_s >= 1e11 else f"{bytes_per_s / 1e9:9.2f} GB/s"


def measure_bandwidth(gib: float | None = None, repeats: int = 10, passes: int | None = None) -> float:
    """Bytes per second that XLA reads from device memory: the best of three read kernels over `gib`
    GiB (default 4 on accelerators, 0.25 on CPU), each reading its data `passes` times (default 8 on
    accelerators, 1 on CPU) inside one call, in a loop that XLA cannot hoist a read out of
    (`probe_kernels`). Launch, loop and synchronization costs then fade: on 4 H200s one pass per
    call read 3.44-3.88 TB/s, 4 passes 4.05 and 8 passes 4.28, while decode steps read at up to 4.07. The kernels: a sum over float32, a row sum over bfloat16, and one row times 8192x28672
    bfloat16 matrices (the GEMV a decode step is made of; on the H200 it reads fastest). Median of
    `repeats` timed calls each, after as many untimed ones (a GPU fresh from idle reads slower until
    its clocks rise)."""
    on_cpu = jax.devices()[0].platform == "cpu"
    if gib is None:
        gib = 0.25 if on_cpu else 4.0
    if passes is None:
        passes = 1 if on_cpu else 8
    n = int(gib * 2**30)
    k, m = (8192, 28672) if not on_cpu else (1024, 4096)
    count = max(1, n // (k * m * 2))
    best = 0.0
    for make, f in probe_kernels(n, k, m, count, passes):
        args = make()
        nbytes = sum(a.nbytes for a in jax.tree.leaves(args)) * passes
        for _ in range(repeats):
            out = f(*args)
        out.block_until_ready()
        best = max(best, nbytes / _median_time(lambda: f(*args), repeats))
        args = None  # frees this kernel's input before the next allocates its own
    return best


def probe_kernels(n: int, k: int, m: int, count: int, passes: int):
    """`measure_bandwidth`'s kernels: `(make, f)` pairs, `make()` the inputs, `f` a jitted function
    reading them `passes` times. Each pass goes through an optimization barrier with the loop's
    carry, so the inputs it reads depend on the pass and XLA cannot hoist any read out of the loop."""
    def looped(read):
        def body(_, carry):
            c, args = jax.lax.optimization_barrier(carry)
            return c + read(1 + c * 1e-30, *args), args

        return jax.jit(lambda *args: jax.lax.fori_loop(0, passes, body, (jnp.float32(0), args))[0])

    return [(lambda: (jnp.ones((n // 4,), jnp.float32),), looped(lambda c, a: jnp.sum(a * c))),
            (lambda: (jnp.ones((n // 2 // 8192, 8192), jnp.bfloat16),),
             looped(lambda c, a: jnp.sum(jnp.sum(a, axis=1, dtype=jnp.float32) * c))),
            (lambda: (jnp.ones((k,), jnp.bfloat16), [jnp.ones((m, k), jnp.bfloat16) for _ in range(count)]),
             looped(lambda c, x, ws: sum(jnp.sum(jnp.einsum("k,mk->m", (x * c).astype(x.dtype), w,
                                                            preferred_element_type=jnp.float32)) for w in ws)))]


def _per_device(w, sharding=None) -> int:
    """Bytes of `w` (an array, or a shape under `sharding`) that one device holds."""
    sharding = sharding or getattr(w, "sharding", None)
    shape = w.shape if sharding is None else sharding.shard_shape(w.shape)
    return int(np.prod(shape)) * w.dtype.itemsize


MIN_TIMED_S = 0.25  # bench times generation at least this long, in all, for each of its two timings
MAX_REPEATS = 200
MEASURES = 3  # attempts at a decode time before bench gives up on it


def _timed(fn) -> float:
    """Seconds for `fn()` and the device work it starts."""
    t = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t


def _interleaved_medians(a, b, repeats: int) -> tuple[float, float]:
    """The median times of `a()` and `b()`, called in turn `repeats` times each (so that the machine's
    drift during the run weighs on both alike)."""
    pairs = [(_timed(a), _timed(b)) for _ in range(repeats)]
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def _median_time(fn, repeats: int) -> float:
    return statistics.median(_timed(fn) for _ in range(repeats))


def _model_config(model, dtype) -> LlamaConfig:
    """The preset (or config) to bench, after checking the dtype."""
    try:
        float_dtype, _ = parse_dtype(dtype)
    except ValueError as e:
        raise ValueError(f"dtype {dtype!r}: {e}") from None
    if float_dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES + SCHEMES)} (int4 "
                         "also takes -asym for zero points, e.g. int4-g128-asym)")
    return model if isinstance(model, LlamaConfig) else LlamaConfig.preset(model)


def model_context(model: str | LlamaConfig, dtype: str = "bfloat16") -> int:
    """The context (in tokens) of the model `bench` would time."""
    return _model_config(model, dtype).max_position_embeddings


def _check(model, dtype, batch, prompt_len, gen_len, repeats) -> LlamaConfig:
    config = _model_config(model, dtype)
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("gen_len", gen_len),
                        ("repeats", repeats)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if gen_len < 2:
        raise ValueError(f"gen_len must be at least 2 (decode speed is timed over gen_len - 1 steps), "
                         f"got {gen_len}")
    if prompt_len + gen_len > config.max_position_embeddings:
        raise ValueError(f"prompt_len {prompt_len} + gen_len {gen_len} exceeds the model's context of "
                         f"{config.max_position_embeddings} tokens; lower prompt_len (--prompt-len) or gen_len "
                         f"(--gen-len)")
    return config


def bench(model: str | LlamaConfig = "llama2-7b", *, dtype: str = "bfloat16", batch: int = 1,
          prompt_len: int = 8, gen_len: int = 256, repeats: int = 3, compare_hf: bool = False,
          seed: int = 0, mesh=None, params: Params | None = None,
          bandwidth: float | None = None, quant_lm_head: bool = False) -> BenchResult:
    """Times greedy generation of `gen_len` tokens after `prompt_len` random prompt tokens, `batch`
    sequences at once, on random weights of a preset (or a `LlamaConfig`), on one device or sharded
    over `mesh` (`llmjax.sharding.make_mesh`). Bytes and the bound are per device under a mesh,
    summed over the stages under pipeline parallelism. `quant_lm_head` quantizes the LM head with
    the projections' scheme (`dtype` must name one).
    `params` and `bandwidth` (from an earlier run, as `sweep` passes them) skip making and measuring."""
    config = _check(model, dtype, batch, prompt_len, gen_len, repeats)
    if params is None:
        params = random_params(config, dtype, seed, mesh, quant_lm_head)
    config = params.config
    name = model if isinstance(model, str) else "custom"
    prompts, cache_len, run = greedy_runner(params, batch, prompt_len, gen_len, seed)
    out, steps = run(gen_len)  # compiles; the one-token run reuses the compilation
    if int(steps) != gen_len:
        raise RuntimeError(f"the loop ran {int(steps)} steps, expected {gen_len}")
    run(1)[0].block_until_ready()
    # Decode is the difference of two timings; for a small model (tiny on a CPU) it is a fraction of a
    # millisecond, so short runs are timed more often, until the timed calls take MIN_TIMED_S.
    # A busy machine (other processes on its cores) can stall one timing's runs: measure again, more
    # often, before calling decode unmeasurable.
    # (`times`, not `repeats`: transformers' comparison runs the `repeats` asked for.)
    times = repeats
    for attempt in range(MEASURES):
        if attempt:
            times = max(times, min(MAX_REPEATS, 2 * times))
        once = _timed(lambda: run(gen_len))
        times = max(times, min(MAX_REPEATS, int(MIN_TIMED_S / once) + 1))
        full, first = _interleaved_medians(lambda: run(gen_len), lambda: run(1), times)
        if full > first:
            break
    else:
        raise ValueError(f"{gen_len} tokens took no measurably longer than one ({full * 1e3:.3f} ms against "
                         f"{first * 1e3:.3f} ms, medians of {times} runs), so decode cannot be timed: use a "
                         f"larger gen_len (--gen-len)")
    step_s = (full - first) / (gen_len - 1)

    weight_read, cache_read = _bytes_per_step(params, batch, cache_len)
    bandwidth = bandwidth or measure_bandwidth()
    bound = bandwidth / (weight_read + cache_read)
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")

    result = BenchResult(
        model=name, dtype=dtype, batch=batch, prompt_len=prompt_len, gen_len=gen_len,
        device=jax.devices()[0].device_kind, jax_version=jax.__version__, num_params=params.num_params,
        prefill_ms=first * 1e3, decode_ms_per_step=step_s * 1e3, decode_tok_s=1 / step_s,
        throughput_tok_s=batch / step_s, end_to_end_tok_s=gen_len / full,
        weight_bytes_per_step=int(weight_read), cache_bytes_per_step=int(cache_read),
        bandwidth_gb_s=bandwidth / 1e9, bound_tok_s=bound, fraction_of_bound=(1 / step_s) / bound,
        peak_memory_gib=None if peak is None else peak / 2**30,
        quant_lm_head=params.quant is not None and params.quant.lm_head)
    del params, out
    run = None  # drop the weights (its closure holds them) before transformers allocates its own
    if compare_hf:
        try:
            result.hf_tok_s, result.hf_setup = hf_tok_s(config, dtype, prompts, gen_len, repeats)
        except ImportError as e:
            result.hf_error = f"{e.name or e} is not installed"
    return result


def greedy_runner(params: Params, batch: int, prompt_len: int, gen_len: int, seed: int = 0):
    """Random prompts `[batch, prompt_len]` (as lists), the cache length, and `run(n)`: greedy
    generation of n <= gen_len tokens after them, in the one jit `llmjax.generate` runs (ids, steps)."""
    config = params.config
    rng = np.random.default_rng(seed)
    prompts = rng.integers(3, config.vocab_size, (batch, prompt_len)).tolist()
    prompt_bucket = gen._bucket(prompt_len, config.max_position_embeddings)
    cache_len = gen._cache_len(params, prompt_bucket, gen_len)
    args = (params.weights, jnp.asarray(gen._pad(prompts, prompt_bucket)),
            jnp.full((batch,), prompt_len, jnp.int32), jnp.ones((batch,), bool))
    tail = (jnp.asarray([gen.PAD_ID], jnp.int32), gen.Sampling().arrays(batch), gen.seed_key(seed),
            jnp.arange(batch, dtype=jnp.int32))
    static = dict(model=gen._model(params), cache_len=cache_len, out_len=gen._bucket(gen_len), greedy=True,
                  filters=())

    generate_ids = gen.generate_ids_fn(static["model"], batch)

    def run(n: int):
        return generate_ids(*args, jnp.int32(n), *tail, **static)
    return prompts, cache_len, run


def _bytes_per_step(params: Params, batch: int, cache_len: int) -> tuple[int, int]:
    """Bytes of weights and of KV cache one decode step reads on one device, or, under pipeline
    parallelism, on one device of each stage in turn (a token passes the stages one after another).
    The embedding table counts one row per sequence, and all of it again where it is also the LM head
    (tied). When the decode keeps the stages full, every stage also applies the LM head to its
    microbatch once a step."""
    mesh, weights = params.mesh, params.weights
    stages = pipeline.stages(mesh)
    embed = weights["embed"]["embedding"]
    outside = {name: w for name, w in weights.items() if name != "stages"}
    per_stage = sum(_per_device(w) for w in jax.tree.leaves(outside)) - _per_device(embed)
    per_stage += batch * embed.nbytes // params.config.embedding_rows
    if params.config.tie_word_embeddings:  # the head's product reads the whole table
        per_stage += _per_device(embed)
    heads = stages if pipeline.microbatch_count(mesh, batch) > 1 else 1
    layers = sum(_per_device(w) for w in jax.tree.leaves(weights.get("stages", {})))
    cache = jax.eval_shape(lambda: gen._new_cache(gen._model(params), batch, cache_len, embed.dtype))
    sharding = None if mesh is None else cache_sharding(mesh, batch)  # as generate places it
    cache_read = sum(_per_device(x, sharding) for x in jax.tree.leaves(cache))
    return stages * layers + heads * per_stage, stages * cache_read


def random_params(config: LlamaConfig, dtype: str, seed: int, mesh=None, quant_lm_head: bool = False) -> Params:
    """Random weights of `config` (made in place on `mesh`), never stopping on EOS."""
    return init_random(dataclasses.replace(config, eos_token_ids=()), seed=seed, dtype=dtype, mesh=mesh,
                       quant_lm_head=quant_lm_head)


def hf_tok_s(config: LlamaConfig, dtype: str, prompts: list[list[int]], gen_len: int,
             repeats: int) -> tuple[float, str]:
    """Hugging Face transformers on the same shapes: static cache, compiled decode step (on CUDA),
    greedy; tokens per second per sequence, end to end (prefill included), median of `repeats` runs
    after two warmups. Returns (tok/s, a description of the setup)."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_config = transformers.LlamaConfig(**config.to_hf())
    dtype, quant = parse_dtype(dtype)  # a quantized format: transformers runs the float weights
    torch_dtype = getattr(torch, dtype)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_config).to(torch_dtype).eval()
    # A static cache makes transformers compile the decode step itself (torch.compile, CUDA graphs).
    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = device != "cuda"  # no compiler toolchain assumed on CPU
    ids = torch.tensor(prompts, device=device)
    kwargs = dict(max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False, pad_token_id=0,
                  eos_token_id=None)

    def once():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    for _ in range(2):
        out = once()
    if out.shape[1] != ids.shape[1] + gen_len:
        raise RuntimeError(f"transformers generated {out.shape[1] - ids.shape[1]} tokens, expected {gen_len}")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        once()
        times.append(time.perf_counter() - t)
    model = None  # frees the GPU memory before the caller goes on
    if device == "cuda":
        torch.cuda.empty_cache()
    setup = "static cache, compiled" if device == "cuda" else "static cache, eager on CPU"
    if quant is not None:
        setup += f", {dtype} weights (no {quant.name} path)"
    return gen_len / statistics.median(times), f"{setup}, torch {torch.__version__}"


def parse_sweep(spec: str) -> tuple[str, list[int]]:
    """`"batch=1,8,32"` -> ("batch", [1, 8, 32])."""
    key, _, values = spec.partition("=")
    key = key.strip().replace("-", "_")
    if key not in ("batch", "prompt_len", "gen_len") or not values:
        raise ValueError(f"--sweep takes NAME=V1,V2,... with NAME one of batch, prompt_len, gen_len; "
                         f"got {spec!r}")
    try:
        return key, [int(v) for v in values.split(",")]
    except ValueError:
        raise ValueError(f"--sweep values must be integers, got {values!r}") from None


def _print_report(report: str) -> None:
    print(report, end="\n\n", flush=True)


def sweep(key: str, values: list[int], *, model: str | LlamaConfig = "llama2-7b", dtype: str = "bfloat16",
          seed: int = 0, mesh=None, quant_lm_head: bool = False, log=None, **kwargs) -> list[BenchResult]:
    """One bench per value of `key`; the random weights are made and the bandwidth measured once. Every
    value is checked before any runs. `log` gets each report as it is measured (default: printed)."""
    defaults = inspect.signature(bench).parameters
    for v in values:
        shape = {name: kwargs.get(name, defaults[name].default)
                 for name in ("batch", "prompt_len", "gen_len", "repeats")}
        _check(model, dtype, **{**shape, key: v})
    params = random_params(_model_config(model, dtype), dtype, seed, mesh, quant_lm_head)
    shared = dict(model=model, dtype=dtype, seed=seed, mesh=mesh, params=params, bandwidth=measure_bandwidth())
    results = []
    for v in values:
        results.append(bench(**{**kwargs, **shared, key: v}))
        (log or _print_report)(results[-1].report())
    return results


def plot(results: list[BenchResult], key: str, path: str) -> None:
    """Decode tokens per second (in all, and per sequence) against the swept value, with the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [getattr(r, key) for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(xs, [r.throughput_tok_s for r in results], "o-", label="llmjax")
    left.plot(xs, [r.bound_tok_s * r.batch for r in results], "--", color="gray",
              label="memory-bandwidth bound")
    left.set_ylabel("decode tokens/s, all sequences")
    right.plot(xs, [r.decode_tok_s for r in results], "o-", label="llmjax")
    right.plot(xs, [r.bound_tok_s for r in results], "--", color="gray", label="bound")
    if any(r.hf_tok_s for r in results):
        right.plot(xs, [r.hf_tok_s or np.nan for r in results], "s-", label="transformers (end to end)")
    right.set_ylabel("tokens/s per sequence")
    first = results[0]
    for ax in (left, right):
        ax.set_xlabel(key.replace("_", " "))
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{first.model} {first.dtype} on {first.device} (prompt {first.prompt_len}, "
                 f"{first.gen_len} new tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_json(results: list[BenchResult], path: str) -> None:
    rows: list[dict[str, Any]] = [dataclasses.asdict(r) for r in results]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(rows if len(rows) > 1 else rows[0], f, indent=2)

