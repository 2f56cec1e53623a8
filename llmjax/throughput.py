"""`llmjax bench --throughput`: how many requests the engine serves, on random weights of a preset.

Three measurements, all through one `llmjax.Engine` (its step variants compiled first, by `warmup`,
those of a full batch also run once on a short untimed pass, outside every timed region; a smaller
variant's first launch, which costs a little more, may fall in a timed run):
- fixed: `requests` prompts of `prompt_len` random tokens, each generating exactly `gen_len` tokens
  (random weights never stop on EOS), all queued at once; output tokens per second and requests per
  minute, from the first request queued to the last one finished.
- mix: as many requests with lengths drawn from a documented distribution: each request's input
  length is uniform over the integers `[L/8, 2L - L/8]` for L = `prompt_len` (mean L), its output
  length likewise around `gen_len`, independently (seeded).
- serving: requests of the mix arrive as a Poisson process at several rates (by default 25%, 50%,
  75%, 100% and 125% of the rate the offline mix run sustained). For each rate: the throughput
  achieved and the mean normalized latency, a request's end-to-end latency (from its arrival to its
  last token) divided by its input + output tokens, the figure vLLM's paper plots. `plot_serving`
  draws normalized latency against throughput.
`compare_hf` times Hugging Face transformers' batched `generate` (eager, its default dynamic cache,
greedy, batches of `hf_batch`) on the first `hf_requests` prompts of the fixed set, in the same
process, after the engine's pool is freed.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np

from llmjax.bench import _count, _model_config, random_params, transformers_line
from llmjax.config import LlamaConfig
from llmjax.engine import Engine

SERVING_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.25)
# The engine settings that served 1000 x 128/128 fastest (Llama-2-7B shape, one H200, BENCHMARKS.md):
# the bench's defaults (`throughput_bench`, `llmjax bench --throughput`, the engine scripts under
# benchmarks/). `Engine`'s own defaults (256 slots, 2048 prompt tokens a call) favour latency.
BENCH_ENGINE = dict(max_slots=512, page_size=16, decode_steps=8, prefill_tokens=32768, prefill_row=32)


@dataclasses.dataclass
class Workload:
    name: str
    requests: int
    input_tokens: int
    output_tokens: int
    seconds: float
    output_tok_s: float
    total_tok_s: float  # input and output tokens
    requests_per_min: float
    calls: int  # engine steps (device calls)
    preemptions: int
    mean_rows: float  # requests decoding per call, on average
    device_s: float = 0.0  # of `seconds`, in device calls: sending them, waiting for their tokens
    host_s: float = 0.0  # of `seconds`, the engine's host work (with `overlap`, while the device works)
    compile_s: float = 0.0  # of `seconds`, compiling a step variant the warmup had not (normally none)


@dataclasses.dataclass
class ServingPoint:
    rate: float  # requests per second asked (Poisson)
    requests: int
    throughput_req_s: float  # achieved: requests over the time from the first arrival to the last finish
    output_tok_s: float
    mean_normalized_latency: float  # seconds per token (input + output)
    p90_normalized_latency: float
    mean_latency_s: float


@dataclasses.dataclass
class ThroughputResult:
    model: str
    dtype: str
    device: str
    jax_version: str
    num_params: int
    engine: dict  # the engine's options and pool
    compile_s: float
    fixed: Workload
    mix: Workload | None = None
    serving: list[ServingPoint] = dataclasses.field(default_factory=list)
    hf_tok_s: float | None = None  # output tokens per second, fixed set
    hf_requests: int | None = None
    hf_setup: str | None = None
    hf_error: str | None = None

    def report(self) -> str:
        e = self.engine
        lines = [f"device {self.device}, jax {self.jax_version}",
                 f"model {self.model} ({_count(self.num_params)} parameters, {self.dtype}, random weights)",
                 f"engine: {e['max_slots']} slots, pages of {e['page_size']} tokens x {e['num_pages']} "
                 f"({e['kv_gib']:.1f} GiB, {e.get('kv_dtype', 'model dtype')}), {e['decode_steps']} decode steps per call, "
                 f"{e['prefill_tokens']} prefill tokens per call"
                 + ("" if e.get("overlap", True) else ", no overlap") + f"; compiled in {self.compile_s:.1f} s"]
        for w in (self.fixed, self.mix):
            if w is not None:
                lines.append(f"{w.name:<28} {w.output_tok_s:10.1f} output tok/s  {w.requests_per_min:9.1f} "
                             f"requests/min  ({w.requests} requests, {w.output_tokens} output tokens in "
                             f"{w.seconds:.2f} s; {w.total_tok_s:.1f} tok/s in+out; {w.calls} calls, "
                             f"{w.mean_rows:.1f} rows per call, {w.preemptions} preemptions; "
                             f"{w.device_s:.2f} s in device calls, {w.host_s:.2f} s of host work"
                             + (f", {w.compile_s:.2f} s compiling" if w.compile_s else "") + ")")
        lines += [_serving_line(s) for s in self.serving]
        lines += transformers_line(f"{self.hf_setup}, same run, {self.hf_requests} requests", self.hf_tok_s,
                                   self.hf_error, "output tok/s", self.fixed.output_tok_s)
        return "\n".join(lines)


def mix_lengths(rng: np.random.Generator, count: int, mean: int) -> np.ndarray:
    """`count` lengths uniform over the integers [mean/8, 2*mean - mean/8] (their mean is `mean`)."""
    low = max(1, mean // 8)
    return rng.integers(low, 2 * mean - low + 1, count)


def _check(requests, prompt_len, gen_len, serving_requests, hf_requests, hf_batch) -> None:
    for name, value, least in (("requests", requests, 1), ("prompt_len", prompt_len, 1), ("gen_len", gen_len, 1),
                               ("serving_requests", serving_requests, 0), ("hf_requests", hf_requests, 1),
                               ("hf_batch", hf_batch, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")


def throughput_bench(model: str | LlamaConfig = "llama2-7b", *, dtype: str = "bfloat16", requests: int = 1000,
                     prompt_len: int = 128, gen_len: int = 128, mix: bool = True, serving_requests: int = 200,
                     rates: list[float] | None = None, compare_hf: bool = False, hf_requests: int = 128,
                     hf_batch: int = 64, seed: int = 0, mesh=None, max_slots: int = BENCH_ENGINE["max_slots"],
                     page_size: int = BENCH_ENGINE["page_size"], decode_steps: int = BENCH_ENGINE["decode_steps"],
                     prefill_tokens: int = BENCH_ENGINE["prefill_tokens"],
                     prefill_row: int = BENCH_ENGINE["prefill_row"],
                     kv_memory: int | None = None, kv_dtype=None, overlap: bool = True,
                     log=print) -> ThroughputResult:
    """Serves the fixed set, the mix and the Poisson arrivals on random weights (see the module
    docstring); `log` gets each line as it is measured. Rates are requests per second."""
    _check(requests, prompt_len, gen_len, serving_requests, hf_requests, hf_batch)
    if rates is not None and not all(isinstance(r, (int, float)) and r > 0 for r in rates):
        raise ValueError(f"serving rates must be > 0 requests per second, got {rates!r}")
    config = _model_config(model, dtype)
    rng = np.random.default_rng(seed)
    vocab = config.vocab_size
    fixed = [rng.integers(3, vocab, prompt_len).tolist() for _ in range(requests)]
    mix_in, mix_out = mix_lengths(rng, requests, prompt_len), mix_lengths(rng, requests, gen_len)
    longest = max(prompt_len + gen_len, int(mix_in.max() + mix_out.max()) if mix else 0)
    if longest > config.max_position_embeddings:
        mixed = f" (the mix draws lengths up to 2L - L/8 around prompt_len {prompt_len} and gen_len {gen_len})" \
            if longest > prompt_len + gen_len else ""
        raise ValueError(f"the longest request ({longest} tokens){mixed} exceeds the model's context of "
                         f"{config.max_position_embeddings} tokens; lower prompt_len (--prompt-len) or gen_len "
                         f"(--gen-len)" + (", or leave the mix out (mix=False, --no-mix)" if mixed else ""))
    params = random_params(config, dtype, seed, mesh)
    engine = Engine(params, max_slots=max_slots, page_size=page_size, kv_memory=kv_memory, max_seq_len=longest,
                    prefill_tokens=prefill_tokens, prefill_row=prefill_row, decode_steps=decode_steps,
                    kv_dtype=kv_dtype, overlap=overlap)
    start = time.perf_counter()
    # Rows down to a quarter of the slots: the tail of a run drains through them; fewer rows would
    # save little and cost another compilation of the whole model.
    engine.warmup(longest, rows=[r for r in engine.row_buckets if r >= max_slots // 4])
    compile_s = time.perf_counter() - start
    log(f"engine ready: {_engine_options(engine)}; compiled in {compile_s:.1f} s")
    # One untimed pass, so first-run costs (buffer allocation, first launches) stay out of the figures.
    _offline(engine, "warm", fixed[:max_slots], [min(gen_len, 2 * decode_steps)] * min(requests, max_slots))
    result = ThroughputResult(
        model=model if isinstance(model, str) else "custom", dtype=dtype, device=jax.devices()[0].device_kind,
        jax_version=jax.__version__, num_params=params.num_params, engine=_engine_options(engine),
        compile_s=compile_s,
        fixed=_offline(engine, f"fixed {prompt_len} in / {gen_len} out", fixed, [gen_len] * requests))
    log(_line(result.fixed))
    if mix:
        prompts = [rng.integers(3, vocab, n).tolist() for n in mix_in]
        result.mix = _offline(engine, f"mix (means {prompt_len}/{gen_len})", prompts, mix_out.tolist())
        log(_line(result.mix))
        reference = result.mix.requests_per_min / 60
        for rate in rates or [f * reference for f in SERVING_FRACTIONS]:
            if serving_requests:
                result.serving.append(_serve(engine, rng, rate, serving_requests, prompt_len, gen_len))
                log(_serving_line(result.serving[-1]))
    engine = params = None  # frees the pool and the weights before transformers allocates its own
    if compare_hf:
        try:
            subset = fixed[:hf_requests]
            result.hf_tok_s, result.hf_setup = hf_batched_tok_s(config, dtype, subset, gen_len, hf_batch)
            result.hf_requests = len(subset)
        except ImportError as e:
            result.hf_error = f"{e.name or e} is not installed"
    return result


def _engine_options(engine: Engine) -> dict:
    return {"max_slots": engine.max_slots, "page_size": engine.page_size, "num_pages": engine.num_pages,
            "kv_gib": engine.num_pages * engine.page_bytes / 2**30, "decode_steps": engine.decode_steps,
            "prefill_tokens": engine.chunk_rows * engine.prefill_row, "prefill_row": engine.prefill_row,
            "max_seq_len": engine.max_seq_len, "kv_dtype": engine.kv_dtype.name, "overlap": engine.overlap}


def _serving_line(s: ServingPoint) -> str:
    return (f"serving at {s.rate:8.2f} req/s: achieved {s.throughput_req_s:8.2f} req/s ({s.output_tok_s:.1f} "
            f"output tok/s), normalized latency mean {s.mean_normalized_latency * 1e3:.2f} ms/token, p90 "
            f"{s.p90_normalized_latency * 1e3:.2f}; mean latency {s.mean_latency_s:.2f} s")


def _line(w: Workload) -> str:
    return f"{w.name}: {w.output_tok_s:.1f} output tok/s, {w.requests_per_min:.1f} requests/min"


def _offline(engine: Engine, name: str, prompts: list[list[int]], budgets: list[int]) -> Workload:
    """All requests queued at once, served to the end."""
    before = dataclasses.replace(engine.stats)
    start = time.perf_counter()
    handles = [engine.add_request(p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
    while engine.pending:
        engine.step()
    seconds = time.perf_counter() - start
    out = sum(len(h.token_ids) for h in handles)
    if out != sum(budgets):
        raise RuntimeError(f"the engine produced {out} tokens where {sum(budgets)} were asked")
    inputs = sum(len(p) for p in prompts)
    calls = engine.stats.calls - before.calls
    return Workload(name, len(prompts), inputs, out, seconds, out / seconds, (inputs + out) / seconds,
                    60 * len(prompts) / seconds, calls, engine.stats.preemptions - before.preemptions,
                    (engine.stats.busy_rows - before.busy_rows) / max(calls, 1),
                    engine.stats.device_s - before.device_s, engine.stats.host_s - before.host_s,
                    engine.stats.compile_s - before.compile_s)


def _serve(engine: Engine, rng, rate: float, count: int, prompt_len: int, gen_len: int) -> ServingPoint:
    """Requests of the mix arriving as a Poisson process of `rate` per second; each is queued when
    its arrival time has passed, between engine steps."""
    arrivals = np.cumsum(rng.exponential(1 / rate, count))
    inputs, outputs = mix_lengths(rng, count, prompt_len), mix_lengths(rng, count, gen_len)
    prompts = [rng.integers(3, engine.config.vocab_size, n).tolist() for n in inputs]
    handles, start, nxt = [], time.perf_counter(), 0
    while nxt < count or engine.pending:
        now = time.perf_counter() - start
        while nxt < count and arrivals[nxt] <= now:
            handles.append(engine.add_request(prompts[nxt], max_new_tokens=int(outputs[nxt])))
            handles[-1].arrival_time = start + arrivals[nxt]  # latency counts from the arrival
            nxt += 1
        if engine.pending:
            engine.step()
        elif nxt < count:
            time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - start)))
    latency = np.array([h.finish_time - h.arrival_time for h in handles])
    normalized = latency / (inputs + outputs)
    elapsed = max(h.finish_time for h in handles) - (start + arrivals[0])
    return ServingPoint(float(rate), count, float(count / elapsed), float(outputs.sum() / elapsed),
                        float(normalized.mean()), float(np.percentile(normalized, 90)), float(latency.mean()))


def hf_batched_tok_s(config: LlamaConfig, dtype: str, prompts: list[list[int]], gen_len: int,
                     batch: int) -> tuple[float, str]:
    """Hugging Face transformers' batched `generate` on the same prompts (equal lengths, so no
    padding): eager, its default dynamic cache, greedy, exactly `gen_len` new tokens each, `batch`
    prompts per call. Output tokens per second over all calls, after one warmup call."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config.to_hf())).to(
            getattr(torch, dtype)).eval()
    kwargs = dict(max_new_tokens=gen_len, min_new_tokens=gen_len, do_sample=False, pad_token_id=0,
                  eos_token_id=None)

    def run(rows):
        ids = torch.tensor(rows, device=device)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()
        return out.shape[1] - ids.shape[1]

    run(prompts[:batch])
    start = time.perf_counter()
    made = sum(run(prompts[i:i + batch]) * len(prompts[i:i + batch]) for i in range(0, len(prompts), batch))
    seconds = time.perf_counter() - start
    model = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return made / seconds, f"eager, dynamic cache, batch {batch}, torch {torch.__version__}"


def plot_serving(result: ThroughputResult, path: str) -> None:
    """Mean normalized latency against achieved throughput, one point per arrival rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = result.serving
    if not points:
        raise ValueError("no serving points to plot; run with the mix and serving_requests > 0")
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p.throughput_req_s for p in points], [p.mean_normalized_latency * 1e3 for p in points], "o-",
            label="llmjax engine (mean)")
    ax.plot([p.throughput_req_s for p in points], [p.p90_normalized_latency * 1e3 for p in points], "s--",
            alpha=0.6, label="p90")
    for p in points:
        ax.annotate(f"{p.rate:.1f}/s", (p.throughput_req_s, p.mean_normalized_latency * 1e3),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("normalized latency (ms/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{result.model} {result.dtype} on {result.device}: Poisson arrivals (labels: rate asked)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_json(result: ThroughputResult, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(dataclasses.asdict(result), f, indent=2)
