"""`generate`, `stream` and `logits`: the public entry points over a loaded model.

`generate` runs prefill and the whole decode loop (`lax.while_loop`) inside one jit: no Python per
token, and on one NVIDIA GPU the loop is one CUDA graph that tests its condition on the GPU
(`generate_ids_fn`), so no host round trip either. `stream` steps the same jitted decode from
Python so text can be shown as it comes.
Prompts are right-padded into one batch; each row keeps its own positions, so a batch gives each
prompt what it would get alone. When sampling, prompt i of the caller's list draws from the key
(seed, i): its tokens depend on the seed and its place in the list, never on how the list was batched.

Static shapes, and why each exists (each distinct value compiles once):
- prompt length is padded to a power of two (>= 16): prompts of similar length share a compilation;
- new tokens are budgeted in powers of two (>= 16): the output buffer and cache need a fixed size,
  while the loop itself stops at `max_new_tokens` or when every row has finished;
- the batch is padded to a power of two, up to `MAX_BATCH` rows per call.
Stop strings are matched on the host, on decoded text: the loop stops at EOS or the token budget, and
the text is cut before the first stop string.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax.cache import KVCache
from llmjax.kernels import allreduce, dispatch
from llmjax.models import llama
from llmjax.models.llama import Llama
from llmjax.params import Params, check_params, on_cpu
from llmjax.sampling import Sampling, check_seed, sample, scalar, seed_key
from llmjax.sharding import pipeline
from llmjax.sharding.mesh import is_integer
from llmjax.sharding.rules import cache_sharding

MIN_BUCKET = 16
# Prompt tokens decoded before a continuation, so that text joins the prompt as the tokenizer would
# render the two together (sentencepiece drops a leading space when new ids are decoded alone).
CONTEXT_TOKENS = 8
MAX_BATCH = 64  # rows per compiled call; longer lists run in several calls
PAD_ID = -1  # marks output slots after a row finished


def _bucket(n: int, cap: int | None = None) -> int:
    b = max(MIN_BUCKET, 1 << (int(n) - 1).bit_length())
    return min(b, cap) if cap else b


# ---------------------------------------------------------------- device side


def _row_keys(key: jax.Array, rows: jax.Array, step) -> jax.Array:
    """One key per row `[B]`: the seed's key folded with the prompt's index, then the step."""
    return jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(key, row), step))(rows)


def _positions(tokens: jax.Array) -> jax.Array:
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


def _prefill(model, weights, tokens, lengths, cache):
    """Writes the prompts into the cache; returns the last prompt position's logits `[B, V]`."""
    logits, cache = model.apply({"params": weights}, tokens, _positions(tokens), cache, logits_at=lengths - 1)
    return logits[:, 0], cache


def _decode(model, weights, last, positions, cache):
    """One token per row `[B]` at `positions` `[B]`; returns logits `[B, V]` and the cache."""
    logits, cache = model.apply({"params": weights}, last[:, None], positions[:, None], cache)
    return logits[:, 0], cache


def _new_cache(model, batch: int, length: int, dtype):
    """An empty KV cache placed as the rules say; in the pipeline's layout when the mesh has stages."""
    if pipeline.stages(model.mesh) > 1:
        cache = pipeline.zeros_cache(model.config, model.mesh, batch, length, dtype)
    else:
        cache = KVCache.zeros(model.config, batch, length, dtype)
    if model.mesh is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_sharding(model.mesh, batch))
    return cache


def _first_tokens(weights, tokens, lengths, knobs, key, rows, *, model, cache_len, greedy, filters):
    """A fresh cache holding the prompts, and each row's first new token `[B]`."""
    cache = _new_cache(model, tokens.shape[0], cache_len, weights["embed"]["embedding"].dtype)
    logits, cache = _prefill(model, weights, tokens, lengths, cache)
    return sample(logits, _row_keys(key, rows, 0), knobs, greedy=greedy, filters=filters), cache


def _next_tokens(weights, last, positions, cache, knobs, key, rows, step, *, model, greedy, filters):
    """Feeds `last` `[B]` at `positions`; returns the next tokens `[B]` and the cache."""
    logits, cache = _decode(model, weights, last, positions, cache)
    return sample(logits, _row_keys(key, rows, step), knobs, greedy=greedy, filters=filters), cache


# What `stream` steps from Python; `generate` runs the same two functions inside one jit.
_start = jax.jit(_first_tokens, static_argnames=("model", "cache_len", "greedy", "filters"))
_step = jax.jit(_next_tokens, static_argnames=("model", "greedy", "filters"), donate_argnames=("cache",))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Loop:
    step: jax.Array  # tokens produced so far
    out: jax.Array  # [B, out_len]
    last: jax.Array  # [B] the token to feed next
    positions: jax.Array  # [B] where `last` goes in the cache
    done: jax.Array  # [B]
    cache: KVCache


_GENERATE_STATIC = ("model", "cache_len", "out_len", "greedy", "filters")


@functools.partial(jax.jit, static_argnames=_GENERATE_STATIC)
def _generate_ids(weights, tokens, lengths, active, max_new, eos_ids, knobs, key, rows, *,
                  model, cache_len, out_len, greedy, filters):
    static = dict(model=model, greedy=greedy, filters=filters)
    first, cache = _first_tokens(weights, tokens, lengths, knobs, key, rows, cache_len=cache_len, **static)
    out = jnp.full((tokens.shape[0], out_len), PAD_ID, jnp.int32).at[:, 0].set(first)
    done = ~active | jnp.isin(first, eos_ids)
    if pipeline.microbatch_count(model.mesh, tokens.shape[0]) > 1:
        out, steps = _pipelined_decode(weights, first, lengths, done, out, cache, max_new, eos_ids, knobs,
                                       key, rows, **static)
        return _replicated(model, out), steps
    state = _Loop(jnp.int32(1), out, first, lengths, done, cache)

    def cond(s: _Loop):
        return (s.step < max_new) & ~jnp.all(s.done)

    def body(s: _Loop):
        token, cache = _next_tokens(weights, s.last, s.positions, s.cache, knobs, key, rows, s.step, **static)
        token = jnp.where(s.done, PAD_ID, token)
        out = s.out.at[:, s.step].set(token)
        done = s.done | jnp.isin(token, eos_ids)
        return _Loop(s.step + 1, out, jnp.maximum(token, 0), s.positions + 1, done, cache)

    final = jax.lax.while_loop(cond, body, state)
    return _replicated(model, final.out), final.step


# XLA runs a while loop from the host: after every step it copies the loop's condition to the host,
# which launches the next step only once the copy arrives, and the GPU idles meanwhile (~20 us a token
# on an H200, 1% of a Llama-2-7B int4 batch-1 step). With command buffers for WHILE and CONDITIONAL,
# XLA records the whole loop as one CUDA graph whose conditional nodes test the condition on the GPU:
# no copy, no idle (7B int4 batch 1: 600.7, 599.1 -> 604.4, 604.9 tok/s, BENCHMARKS.md, nineteenth
# session). The other types are the ones XLA enabled by default when this was measured. The setting
# is this compilation's own (it overrides XLA_FLAGS' for it). Used on one NVIDIA GPU (a mesh's
# collectives and rocm are left as they were, unmeasured; with LLMJAX_TP_GRAPH=on, on a tensor-only mesh
# whose every sum llmjax's NVLink all-reduce does: `allreduce.graph_loop`); LLMJAX_LOOP_GRAPH=off turns it off. The
# engine compiles its step's decode iterations the same way (`loop_graph`; its decode calls 0.9%
# shorter on the H200, BENCHMARKS.md, twenty-third session).
LOOP_COMMAND_BUFFERS = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
_generate_ids_graph = jax.jit(_generate_ids.__wrapped__, static_argnames=_GENERATE_STATIC,
                              compiler_options={"xla_gpu_enable_command_buffer": LOOP_COMMAND_BUFFERS})


def loop_graph(mesh) -> bool:
    """Whether a program with a device loop over `mesh` (None: one device) is compiled with
    `LOOP_COMMAND_BUFFERS`: on one NVIDIA GPU, unless LLMJAX_LOOP_GRAPH=off."""
    one_device = mesh is None or mesh.size == 1
    wanted = dispatch.mode("LLMJAX_LOOP_GRAPH", ("auto", "off")) == "auto"
    return one_device and wanted and dispatch.compute_capability() is not None


def generate_ids_fn(model: Llama, batch: int = 1):
    """The compiled `_generate_ids` that `generate` runs for `model` on `batch` rows: the whole loop as
    one CUDA graph on one NVIDIA GPU (`LOOP_COMMAND_BUFFERS`), or on several whose decode sums all go
    through llmjax's NVLink all-reduce (`allreduce.graph_loop`, LLMJAX_TP_GRAPH=on: a batch whose
    logits fit its slots), unless LLMJAX_LOOP_GRAPH=off; else XLA's host-driven loop."""
    logits = batch * model.config.embedding_rows * jnp.dtype(model.dtype).itemsize
    graph = loop_graph(model.mesh) or (loop_graph(None) and allreduce.graph_loop(model.mesh, logits, model.dtype))
    return _generate_ids_graph if graph else _generate_ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _PipelinedLoop:
    step: jax.Array  # tokens produced so far, for every row
    out: jax.Array  # [B, out_len]
    positions: jax.Array  # [B] where each row's latest token goes in the cache
    done: jax.Array  # [B]
    pipe: pipeline.DecodeState


def _pipelined_decode(weights, first, lengths, done, out, cache, max_new, eos_ids, knobs, key, rows, *,
                      model, greedy, filters):
    """The decode loop over pipeline stages kept full (`pipeline.decode_round`): each loop step gives
    every row one token, sampled as its microbatch leaves the last stage, with the key and knobs
    the plain loop would use, so the tokens are the same."""
    mesh, config = model.mesh, model.config
    stage = llama.stage_fn(config, model.dtype, mesh, model.quant)
    num_stages = pipeline.stages(mesh)
    width = first.shape[0] // num_stages

    def embed(tokens):
        return llama.embed(config, weights, tokens[:, None])

    def body(s: _PipelinedLoop):
        def leave(carry, m, x):
            out, done, positions = carry
            r = np.arange(width) * num_stages + m  # the rows of microbatch m
            logits = llama.head(config, weights, x, mesh, model.quant)[:, 0]
            knobs_r = jax.tree.map(lambda a: a[r], knobs)
            token = sample(logits, _row_keys(key, rows[r], s.step), knobs_r, greedy=greedy, filters=filters)
            token = jnp.where(done[r], PAD_ID, token)
            out = out.at[r, s.step].set(token)
            done = done.at[r].set(done[r] | jnp.isin(token, eos_ids))
            positions = positions.at[r].add(1)
            return (out, done, positions), embed(jnp.maximum(token, 0)), positions[r][:, None]

        pipe, (out, done, positions) = pipeline.decode_round(mesh, stage, weights["stages"], s.pipe, leave,
                                                            (s.out, s.done, s.positions))
        return _PipelinedLoop(s.step + 1, out, positions, done, pipe)

    pipe = pipeline.decode_prelude(mesh, stage, weights["stages"], embed(first), lengths[:, None], cache)
    final = jax.lax.while_loop(lambda s: (s.step < max_new) & ~jnp.all(s.done), body,
                               _PipelinedLoop(jnp.int32(1), out, lengths, done, pipe))
    return final.out, final.step


@functools.partial(jax.jit, static_argnames=("model",))
def _forward(weights, tokens, *, model):
    return _replicated(model, model.apply({"params": weights}, tokens, _positions(tokens))[0])


def _replicated(model, x):
    """On a mesh, `x` whole on every device, so every process can read it."""
    if model.mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(model.mesh, P()))


# ---------------------------------------------------------------- host side: prompts


# The exact types a token id list usually holds: checked with one `set(map(type, ...))`, in C, rather
# than `is_integer` per token (a 1000-prompt batch spent ~40 ms there); anything else takes `is_integer`.
_INT_TYPES = frozenset({int, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64})


def _all_ints(values) -> bool:
    return set(map(type, values)) <= _INT_TYPES or all(is_integer(t) for t in values)


def _parse_prompt(prompt) -> tuple[str, list]:
    """Classifies a prompt: ("text", [str]), ("texts", [str...]), ("ids", [[int]]), ("ids_batch", ...)."""
    if isinstance(prompt, str):
        return "text", [prompt]
    if not isinstance(prompt, (str, list, tuple)) and hasattr(prompt, "__array__"):
        prompt = np.asarray(prompt)  # numpy, jax and torch arrays alike
    if isinstance(prompt, np.ndarray):
        if prompt.ndim not in (1, 2) or not jnp.issubdtype(prompt.dtype, jnp.integer):
            raise ValueError(f"a token-id prompt array must be 1-D or 2-D integers, got {prompt.dtype} "
                             f"of shape {prompt.shape}")
        prompt = np.asarray(prompt).tolist()
    if isinstance(prompt, (list, tuple)) and not prompt:
        raise ValueError(f"prompt is empty ({prompt!r}): neither a prompt's token ids nor a batch of prompts; "
                         "pass at least one prompt (a str, or a list of token ids)")
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"prompt must be a str, a list of str, a list of token ids or a list of such "
                         f"lists; got {prompt!r}")
    if all(isinstance(p, str) for p in prompt):
        return "texts", list(prompt)
    if _all_ints(prompt):
        return "ids", [list(prompt)]
    prompt = [scalar(p) for p in prompt]  # a 0-d array (`jnp.argmax(logits)`) is the token id it holds
    if _all_ints(prompt):
        return "ids", [prompt]
    # rows as lists, or as 1-D integer arrays of any library (numpy, jax, torch)
    rows = [np.asarray(p) if not isinstance(p, (list, tuple, str)) and hasattr(p, "__array__") else p for p in prompt]
    if all(isinstance(p, (list, tuple)) and _all_ints(p) or isinstance(p, np.ndarray) and p.ndim == 1
           and jnp.issubdtype(p.dtype, jnp.integer) for p in rows):
        return "ids_batch", [p.tolist() if isinstance(p, np.ndarray) else list(p) for p in rows]
    if not any(isinstance(p, (str, list, tuple)) or np.ndim(p) > 0 for p in prompt):  # one row of scalars
        n, bad = next((n, t) for n, t in enumerate(prompt) if not is_integer(t))
        raise ValueError(f"token ids must be integers (not bools or floats), but item {n} of the prompt is {bad!r} "
                         f"({type(bad).__name__}); pass ints, or a str to encode")
    raise ValueError("prompt must be a str, a list of str, a list of token ids or a list of such lists; "
                     "mixed or nested types are not accepted")


def _encode(params: Params, text: str) -> list[int]:
    tok = params.tokenizer
    if tok is None:
        raise ValueError("these params have no tokenizer (made by init_random without tokenizer=, or loaded "
                         "from a folder without tokenizer.model or tokenizer.json); pass token ids instead of "
                         "text")
    # A chat template already writes the BOS token into the text; do not add a second one.
    has_bos = tok.bos_token is not None and text.startswith(tok.bos_token)
    return tok.encode(text, add_special_tokens=not has_bos)


def _token_rows(params: Params, kind: str, prompts: list) -> list[list[int]]:
    from_text = kind in ("text", "texts")
    rows = [_encode(params, p) for p in prompts] if from_text else prompts
    for n, row in enumerate(rows):
        if not row:
            raise ValueError(f"prompt{'' if len(rows) == 1 else f' {n}'} is empty (no tokens); give at least one token")
    check_vocabulary(params, rows, from_text)
    return [list(map(int, row)) for row in rows]


def check_vocabulary(params: Params, rows: list[list[int]], from_text: bool) -> None:
    """Every id inside the model's vocabulary; from text, an id past it means the tokenizer is not
    this model's (its pieces outnumber the model's embedding rows)."""
    vocab = params.config.vocab_size
    for n, row in enumerate(rows):
        if row and (min(row) < 0 or max(row) >= vocab):
            bad = [t for t in row if not 0 <= t < vocab]
            which = "" if len(rows) == 1 else f" {n}"
            where = f"the text{which} encodes to" if from_text else f"prompt{which} has"
            fix = (f"; the tokenizer ({params.tokenizer.vocab_size} pieces) is not this model's: load the "
                   "tokenizer saved with the model" if from_text else "")
            raise ValueError(f"{where} token ids outside the vocabulary [0, {vocab}): {bad[:5]}{fix}")


def _check_budget(params: Params, rows: list[list[int]], max_new_tokens) -> int:
    """`max_new_tokens` as a Python int, once it fits the model's context after the longest row (a numpy
    integer would wrap or overflow in the sum, and pass a check it fails)."""
    max_new_tokens = scalar(max_new_tokens)
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    context = params.config.max_position_embeddings
    longest = max(len(r) for r in rows)
    which = "a prompt" if len(rows) == 1 else f"prompt {[len(r) for r in rows].index(longest)}"
    if longest >= context:
        raise ValueError(f"{which} of {longest} tokens leaves no room in the model's context of {context} "
                         "tokens; shorten it (llmjax never truncates a prompt)")
    if longest + max_new_tokens > context:
        raise ValueError(f"{which} of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {context} tokens; lower max_new_tokens to at most "
                         f"{context - longest} or shorten the prompt")
    return max_new_tokens


def _stop_strings(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop) if isinstance(stop, (list, tuple)) else None
    if not stops or not all(isinstance(s, str) and s for s in stops):
        raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
    return stops


def _continuation(tokenizer, prompt: list[int], new: list[int], eos=()) -> str:
    """The text of `new` as it reads after the prompt; a last token in `eos` gives none (an EOS id
    may be an ordinary token of the vocabulary, which a decode would render)."""
    if new and new[-1] in eos:
        new = new[:-1]
    context = prompt[-CONTEXT_TOKENS:]
    before, full = tokenizer.decode(context), tokenizer.decode(context + new)
    return full[len(before):] if full.startswith(before) else tokenizer.decode(new)


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(hits)], True) if hits else (text, False)


def _pad(rows: list[list[int]], length: int) -> np.ndarray:
    out = np.zeros((len(rows), length), np.int32)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def _model(params: Params) -> Llama:
    """The module for `params`, with today's LLMJAX_* settings, so a jit taking it as a static
    argument traces again when they change (`Llama.settings`)."""
    return Llama(params.config, params.dtype, params.mesh, params.quant, dispatch.trace_settings())


def _batch_size(params: Params, rows: int) -> int:
    """Rows per compiled call: a power of two, and a multiple of the mesh's `data` degree."""
    data = params.mesh.shape["data"] if params.mesh is not None else 1
    return max(1 << (rows - 1).bit_length(), data)


def _cache_len(params: Params, prompt_bucket: int, max_new_tokens: int) -> int:
    return min(prompt_bucket + _bucket(max_new_tokens), params.config.max_position_embeddings)


def _kv_bytes(params: Params, rows: int, cache_len: int) -> int:
    """The bytes of a cache of `rows` rows of `cache_len` tokens, over all devices."""
    c = params.config
    return 2 * c.num_layers * rows * cache_len * c.num_kv_heads * c.head_dim * jnp.dtype(params.dtype).itemsize


# ---------------------------------------------------------------- host side: public API


def generate(params: Params, prompt, *, max_new_tokens: int = 256, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
             seed: int = 0, stop: str | Sequence[str] | None = None):
    """Continues a prompt. Greedy when `temperature` is 0.

    `prompt` is a str (returns a str), a list of str (a list of str; ragged lengths batched), a list
    of token ids (returns the new ids) or a list of such lists. Generation ends at an EOS token (kept
    at the end of returned ids, never in text), after `max_new_tokens`, or, for text, before the first
    `stop` string in the new text (the prompt is not searched: a stop string in it, or one that begins
    in it, stops nothing).
    """
    check_params(params)
    sampling = Sampling(temperature, top_k, top_p, min_p)
    check_seed(seed)
    kind, prompts = _parse_prompt(prompt)
    stops = _stop_strings(stop)
    if stops and kind.startswith("ids"):
        raise ValueError("stop strings apply to text prompts; with token ids, stop on EOS or "
                         "max_new_tokens")
    rows = _token_rows(params, kind, prompts)
    max_new_tokens = _check_budget(params, rows, max_new_tokens)
    outputs = []
    for start in range(0, len(rows), MAX_BATCH):
        outputs += _generate_batch(params, rows[start:start + MAX_BATCH], max_new_tokens, sampling,
                                   seed, first_row=start)
    if kind.startswith("ids"):
        return outputs[0] if kind == "ids" else outputs
    eos = params.config.eos_token_ids
    texts = [_cut_at_stop(_continuation(params.tokenizer, row, ids, eos), stops)[0]
             for row, ids in zip(rows, outputs)]
    return texts[0] if kind == "text" else texts


def _generate_batch(params, rows, max_new_tokens, sampling: Sampling, seed: int, first_row: int):
    batch = _batch_size(params, len(rows))
    prompt_bucket = _bucket(max(len(r) for r in rows), params.config.max_position_embeddings)
    padded = rows + [[0]] * (batch - len(rows))
    eos = jnp.asarray(params.config.eos_token_ids or (PAD_ID,), jnp.int32)
    row_ids = first_row + jnp.arange(batch, dtype=jnp.int32)
    model = _model(params)
    cache_len = _cache_len(params, prompt_bucket, max_new_tokens)
    try:
        out, steps = generate_ids_fn(model, batch)(
            params.weights, jnp.asarray(_pad(padded, prompt_bucket)),
            jnp.asarray([len(r) for r in padded], jnp.int32), jnp.arange(batch) < len(rows),
            jnp.int32(max_new_tokens), eos, sampling.arrays(batch), seed_key(seed), row_ids,
            model=model, cache_len=cache_len, out_len=_bucket(max_new_tokens),
            greedy=sampling.greedy, filters=sampling.filters)
        out = np.asarray(out)[:len(rows), :int(steps)]
    except jax.errors.JaxRuntimeError as e:
        if not dispatch.out_of_memory(e):
            raise
        raise MemoryError(f"generating {len(rows)} prompts at once ran out of device memory: the call holds "
                          f"{batch} rows with room for {cache_len} tokens each "
                          f"({_kv_bytes(params, batch, cache_len)} bytes of keys and values "
                          f"over all devices, beside the weights); pass fewer prompts per call or a smaller "
                          "max_new_tokens, or use llmjax.LLM(params).generate, whose paged cache takes the "
                          "prompts as memory allows") from e
    eos_set = set(params.config.eos_token_ids)
    results = []
    for row in out.tolist():
        ids = [t for t in row if t != PAD_ID]
        ends = [i for i, t in enumerate(ids) if t in eos_set]
        results.append(ids[:ends[0] + 1] if ends else ids)
    return results


@dataclasses.dataclass
class StreamStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    compile_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - 1  # the first token comes out of prefill
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


class Stream:
    """Iterates over text pieces as they are decoded; `stats` holds the timings afterwards."""

    def __init__(self, params: Params, prompt, *, max_new_tokens=256, temperature=0.0, top_k=None,
                 top_p=None, min_p=None, seed=0, stop=None):
        check_params(params)
        self._sampling = Sampling(temperature, top_k, top_p, min_p)
        check_seed(seed)
        kind, prompts = _parse_prompt(prompt)
        if kind not in ("text", "ids"):
            raise ValueError("stream takes one prompt (a str or a list of token ids); use generate for "
                             "a batch")
        if params.tokenizer is None:
            raise ValueError("stream yields text and these params have no tokenizer; use generate with "
                             "token ids")
        self._params, self._stops = params, _stop_strings(stop)
        self._row = _token_rows(params, kind, prompts)[0]
        self._max_new, self._key = _check_budget(params, [self._row], max_new_tokens), seed_key(seed)
        self._rows = jnp.zeros((1,), jnp.int32)  # a single prompt is prompt 0, as in generate
        self.stats = StreamStats(prompt_tokens=len(self._row))
        self._pieces = self._run()
        self._stopped: BaseException | None = None  # what ended the stream before its end
        # A generator run from two threads at once raises in one ("already executing"), which would
        # end the stream for both: threads that share a stream take its pieces in turn instead.
        self._lock = threading.Lock()

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        with self._lock:  # (a thread that waited here while another's piece failed is told so too)
            if self._stopped is not None:  # a finished generator would just stop: the rest would go unsaid
                raise RuntimeError(f"this stream stopped part way ({type(self._stopped).__name__}) and cannot go "
                                   "on; start a new one with llmjax.stream(...)") from self._stopped
            try:
                return next(self._pieces)
            except StopIteration:
                raise
            except BaseException as e:  # Ctrl-C, an error: the generator is spent
                self._stopped = e
                raise

    def close(self) -> None:
        """Ends the stream early, as a generator's `close` does (a server's client went away): no more
        tokens are computed, `stats` counts those made, and iterating on gives nothing more. From
        another thread, it waits for the piece being computed."""
        with self._lock:
            self._pieces.close()

    def __repr__(self) -> str:
        return f"<llmjax Stream: prompt of {len(self._row)} tokens, up to {self._max_new} new>"

    def _compile(self, bucket: int):
        p, s = self._params, self._sampling
        static = dict(model=_model(p), greedy=s.greedy, filters=s.filters)
        tokens = jnp.asarray(_pad([self._row], bucket))
        lengths = jnp.asarray([len(self._row)], jnp.int32)
        args = (p.weights, tokens, lengths, s.arrays(1), self._key, self._rows)
        static_start = dict(static, cache_len=_cache_len(p, bucket, self._max_new))
        start = _start.lower(*args, **static_start).compile()
        cache_shape = jax.eval_shape(functools.partial(_start, **static_start), *args)[1]
        last = jnp.zeros((1,), jnp.int32)
        step = _step.lower(p.weights, last, lengths, cache_shape, s.arrays(1), self._key, self._rows,
                           jnp.int32(0), **static).compile()
        return start, step, args

    def _run(self) -> Iterator[str]:
        t0 = time.perf_counter()
        bucket = _bucket(len(self._row), self._params.config.max_position_embeddings)
        try:  # compiling may run out of memory too (XLA sizes some buffers then)
            start, step, args = self._compile(bucket)
            t1 = time.perf_counter()
            token, cache = start(*args)
        except jax.errors.JaxRuntimeError as e:
            if not dispatch.out_of_memory(e):
                raise
            room = _cache_len(self._params, bucket, self._max_new)
            raise MemoryError(f"streaming ran out of device memory: the cache has room for {room} tokens "
                              f"({_kv_bytes(self._params, 1, room)} bytes of keys and values, beside the "
                              f"weights) for a prompt of {len(self._row)} tokens and max_new_tokens="
                              f"{self._max_new}; pass a smaller max_new_tokens or a shorter prompt") from e
        ids = [int(token[0])]
        t2 = time.perf_counter()
        self.stats.compile_s, self.stats.prefill_s = t1 - t0, t2 - t1
        knobs, position = self._sampling.arrays(1), len(self._row)
        detok = _Detokenizer(self._params.tokenizer, self._row, self._stops)
        eos = set(self._params.config.eos_token_ids)
        try:
            while True:
                piece = detok.push(ids[-1] if ids[-1] not in eos else None)
                if piece:
                    yield piece
                if detok.stopped or ids[-1] in eos or len(ids) >= self._max_new:
                    break
                token, cache = step(self._params.weights, token, jnp.asarray([position], jnp.int32),
                                    cache, knobs, self._key, self._rows, jnp.int32(len(ids)))
                ids.append(int(token[0]))
                position += 1
            tail = detok.flush()
            if tail:
                yield tail
        finally:
            self.stats.new_tokens = len(ids)
            self.stats.decode_s = time.perf_counter() - t2


class _Detokenizer:
    """Turns a growing list of ids into new text, decoding only a window of recent ids per token.

    Text that might still change is held back: an incomplete UTF-8 character (decoded as U+FFFD
    until its last byte comes), a run of byte tokens a decoder renders as a whole
    (`Tokenizer.unstable_bytes`), or what could be the start of a stop string. The window starts at
    the last ids that gave complete text (at first, the prompt's last tokens), so each delta joins
    the text before it exactly as one decode of everything would.
    """

    def __init__(self, tokenizer, prompt: list[int], stops: list[str]):
        self._tok, self._stops = tokenizer, stops
        self._bytes, self._silent = tokenizer.unstable_bytes, {}  # _silent: id -> decodes to no text
        self._ids = list(prompt[-CONTEXT_TOKENS:])
        self._context = len(self._ids)
        self._start, self._done = 0, len(self._ids)  # ids[_start:_done] are already in _text
        self._text, self._sent = "", 0
        self.stopped = False

    def push(self, token: int | None) -> str:
        if token is not None:
            self._ids.append(token)
            if self._bytes and self._in_byte_run():
                return ""  # the byte run's text may still change (`Tokenizer.unstable_bytes`)
        delta = self._pending()
        if delta is None and self._run_crossed():
            # A byte run that began in the prompt went on into the new ids and now ends: it rewrote the
            # prompt's last characters for good, and the text `generate` gives is the new ids decoded
            # alone (`_continuation`). The window restarts there, rather than waiting for the end.
            self._start = self._done = self._context
            delta = self._pending()
        if delta is None or delta.endswith("\ufffd"):
            return ""  # a character is incomplete: wait for its next byte
        self._take(delta)
        return self._release(final=False)

    def _in_byte_run(self) -> bool:
        """Whether the ids not yet taken end in a byte token, ignoring those that decode to no text (a
        skipped special token does not end a byte run: the decoder never sees it)."""
        return self._spoken(reversed(self._ids[self._done:])) in self._bytes

    def _run_crossed(self) -> bool:
        """Whether nothing new is taken yet, and the prompt's last id and the first new one that give text
        are both byte tokens (`Tokenizer.unstable_bytes`)."""
        if not self._bytes or self._done != self._context or self._start == self._context:
            return False
        return self._spoken(reversed(self._ids[:self._context])) in self._bytes and \
            self._spoken(self._ids[self._context:]) in self._bytes

    def _spoken(self, ids) -> int | None:
        """The first of `ids` that is a byte token or decodes to some text alone (None if none is; a byte
        token alone may decode to nothing, a space at the text's start)."""
        for token in ids:
            if token in self._bytes:
                return token
            if token not in self._silent:
                self._silent[token] = self._tok.decode([token]) == ""
            if not self._silent[token]:
                return token
        return None

    def flush(self) -> str:
        delta = self._pending()
        if delta is None:  # the window's text changed: decode the whole continuation once, as generate does
            whole = _continuation(self._tok, self._ids[:self._context], self._ids[self._context:])
            delta = (whole[len(self._text):] if whole.startswith(self._text)
                     else self._tok.decode(self._ids[self._done:]))
        self._take(delta)
        return self._release(final=True)

    def _pending(self) -> str | None:
        """The text of the ids not yet taken, decoded after the window's start; None if it would
        rewrite text already taken."""
        before = self._tok.decode(self._ids[self._start:self._done])
        after = self._tok.decode(self._ids[self._start:])
        return after[len(before):] if after.startswith(before) else None

    def _take(self, delta: str) -> None:
        self._text += delta
        # The window moves on only past ids that gave text. Ids of no text (a special token) would
        # leave it empty, and a decode then strips the next piece's leading space as the text's start.
        if delta:
            self._start = self._done
        self._done = len(self._ids)

    def _release(self, final: bool) -> str:
        text, stopped = _cut_at_stop(self._text, self._stops)
        if not final:
            # What could still become a stop string that starts before any stop found (generate cuts
            # at the stop that starts first, which may end after one found already) is held back.
            whole = self._text
            starts = [len(whole) - k for s in self._stops for k in range(1, len(s)) if whole.endswith(s[:k])]
            start = min((i for i in starts if i < len(text)), default=None)
            if start is not None:
                text, stopped = text[:start], False
        self.stopped = stopped
        piece = text[self._sent:]
        self._sent = max(self._sent, len(text))
        return piece


def stream(params: Params, prompt, **kwargs) -> Stream:
    """Like `generate` for one prompt, but yields text pieces as they are decoded."""
    return Stream(params, prompt, **kwargs)


def logits(params: Params, token_ids) -> jax.Array:
    """float32 logits `[batch, seq, vocab]` for token ids `[seq]` or `[batch, seq]` (one forward)."""
    check_params(params)
    if isinstance(token_ids, str):
        raise ValueError("logits takes token ids; encode text with params.tokenizer.encode(text)")
    kind, rows = _parse_prompt(token_ids)
    if kind not in ("ids", "ids_batch"):
        raise ValueError("logits takes token ids: a list of ints, a list of equal-length lists, or an "
                         "integer array")
    rows = _token_rows(params, kind, rows)
    if len({len(r) for r in rows}) > 1:
        raise ValueError(f"logits needs rows of equal length, got lengths {sorted({len(r) for r in rows})}; "
                         "score ragged sequences one at a time")
    length = len(rows[0])
    context = params.config.max_position_embeddings
    if length > context:
        raise ValueError(f"{length} tokens are longer than the model's context of {context} tokens")
    # Padding at the end leaves earlier positions unchanged (attention is causal), so the length is
    # bucketed, and the batch rounded up (to a power of two, and past 8 to a multiple of 8: never
    # near twice the rows' memory), to bound the number of compilations.
    batch = _batch_size(params, min(len(rows), 8)) * -(-len(rows) // 8)
    tokens = _pad(rows + [rows[0]] * (batch - len(rows)), _bucket(length, context))
    try:
        out = _forward(params.weights, jnp.asarray(tokens), model=_model(params))
    except jax.errors.JaxRuntimeError as e:
        if not dispatch.out_of_memory(e):
            raise
        size = 4 * len(tokens) * len(tokens[0]) * params.config.vocab_size
        raise MemoryError(f"logits of {len(rows)} rows of {length} tokens ran out of device memory: the call "
                          f"computes {len(tokens)} rows of {len(tokens[0])} positions (padded), and their float32 "
                          f"logits alone take {size} bytes; pass fewer rows or shorter ones per call, or use "
                          "llmjax.perplexity, which scores long texts in windows") from e
    if out.shape[:2] == (len(rows), length):
        return out
    if on_cpu(params.mesh):  # cut on the host, as slicing on the device compiles (and keeps) a program per shape
        return jax.device_put(np.asarray(out.addressable_data(0))[:len(rows), :length], out.sharding)
    return out[:len(rows), :length]  # on a GPU that small program costs less than two copies over PCIe
