"""Continuous batching: many requests share one page pool and one compiled step.

```python
engine = llmjax.Engine(params, max_slots=256)
a = engine.add_request("def f(x):", max_new_tokens=64)
b = engine.add_request([1, 450, 4996], max_new_tokens=16, temperature=0.8, seed=3)
for piece in engine.stream(a):       # steps the engine; b advances too
    print(piece, end="")
outputs = llmjax.LLM(params).generate(prompts, max_new_tokens=128)   # offline, in request order
```

Each `step()` is one call of a compiled function on the device. The call runs a first iteration that
feeds one token to every decoding row *and* a chunk of prompt tokens (chunked prefill, mixed into the
same forward so the weights are read once for both), then up to `decode_steps - 1` more decode
iterations in a `lax.while_loop`, sampling on the device, before the host looks at the tokens. So the
host decides (admits, preempts, frees) once per `decode_steps` tokens, not once per token; a row that
meets EOS or its token budget stops inside the call, and the loop ends early when every row has.
With `overlap` (the default), `step` sends the next call before it reads this one's tokens: the host
schedules while the device works, counting on every row of the call in flight to produce all the
tokens its budget allows (the next call feeds each row its last token straight from that call's
output, on the device). A row that meets EOS or a stop string instead loses only the next call's
work for it; a schedule that would have to preempt waits for the tokens.

Memory is a pool of fixed-size pages (`llmjax.cache.PagedKVCache`). A request holds the pages its
tokens need, taken as it grows and returned when it ends. Admission waits for free pages; when pages
run out, the latest-arrived running request is preempted: its pages are freed and it goes back to
the head of the queue, to be recomputed from its prompt and the tokens it already produced (no work is
kept, nothing fails). Requests are served in arrival order and the oldest one always advances.

Static shapes, and why each exists (each distinct value compiles once; `warmup` compiles them ahead):
- decode rows: the running requests are packed into the first rows, and the row count is the
  smallest bucket that holds them (eighths of `max_slots` from a quarter up, then `max_slots / 4**k`
  down to 8), so a nearly drained batch does not pay for `max_slots` rows. Moving a request between rows is free: its cache is its pages.
- block-table width: the pages of the longest sequence in the call, rounded up to
  `max_pages / 4**k`, so short sequences do not gather a `max_seq_len`-long view.
- the prefill chunk: up to `prefill_tokens` tokens as rows of `prefill_row` tokens. A row holds one
  piece of one prompt (a long prompt spans several rows, in order). The chunk has up to three sizes:
  all `prefill_tokens // prefill_row` rows, an eighth and a sixty-fourth of them (at least one row).
  A call fills the largest size that the prompt work it can place (seats and pages allowing) fills,
  or the size above when the work fills three quarters of it; the rest waits for the next call. So
  a few prompts arriving while others decode do not pay for a whole chunk, and a chunk above the
  smallest size is at most a quarter padding rows (each costs the products of a prompt row) unless
  the schedule places less than it counted (a preemption, a piece cut to the pages left). A prompt's
  last row is padded within; rows of fewer tokens waste less. A call with no prompt work compiles
  without the chunk.
- `decode_steps`: the iterations per call.

Sampling: a request's tokens depend only on its seed and its index, never on which rows, batch or
call it lands in: token n of a request drawn with key `fold_in(fold_in(key(seed), index), n)`, the
convention of `llmjax.generate` (index 0 for `add_request`, the prompt's place in the list for
`LLM.generate`). Greedy requests match `llmjax.generate` token for token (float32; in bfloat16 both
depend on rounding, as `generate`'s own batches do). Stop strings are matched on the host, on
decoded text, as in `generate`.
"""

from __future__ import annotations

import _signal
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import os
import signal
import sys
import threading
import time
import weakref
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from llmjax import cache as kv
from llmjax.kernels import dispatch
from llmjax.models import llama
from llmjax.generate import (LOOP_COMMAND_BUFFERS, _check_budget, _continuation, _cut_at_stop, _Detokenizer,
                             _model, _parse_prompt, _stop_strings, _token_rows, loop_graph)
from llmjax.params import Params, check_params, shard
from llmjax.sampling import Sampling, check_seed, sample, scalar, seed_words, words_key
from llmjax.sharding import mesh as meshes, pipeline

PAD_ID = -1  # an output slot after a row stopped
MIN_ROWS = 8  # the fewest decode rows a call is compiled for
HOST_POOL_BYTES = 256 * 2**20  # default pool on a device that reports no memory (the CPU)
MEMORY_FRACTION = 0.9  # of the device memory left after the weights, less the step's workspace
CHUNK_SIZES = 3  # prompt chunk sizes: chunk_rows, and each a CHUNK_SHRINK-th of the one above (at least one row)
CHUNK_SHRINK = 8  # the ratio of neighbouring chunk sizes
CHUNK_FILL = 0.75  # a call runs the chunk size above its prompt work when the work fills this much of it


# ---------------------------------------------------------------- requests


class _Text:
    """A request's text, decoded as its tokens come: the pieces `_Detokenizer` releases (text that
    cannot change any more, held back before a possible stop string). Each stream keeps its own place."""

    def __init__(self, tokenizer, prompt: list[int], stops: list[str], eos: set[int]):
        self._detok, self._eos = _Detokenizer(tokenizer, prompt, stops), eos
        # Held while pushing and taking: the stepping thread pushes a request with stop strings
        # (`Engine._check_end`) while the request's reader may push it from another thread.
        self.lock = threading.Lock()
        self.fed = 0  # tokens pushed into the detokenizer
        self.pieces: list[str] = []
        self._flushed = False

    @property
    def stopped(self) -> bool:
        """A stop string has appeared; tokens after `fed` are not part of the text."""
        return self._detok.stopped

    def push(self, token_ids: list[int], finished: bool) -> None:
        while self.fed < len(token_ids) and not self._detok.stopped:
            token = token_ids[self.fed]
            self.fed += 1
            self._keep(self._detok.push(None if token in self._eos else token))
        if finished and self.fed >= len(token_ids) and not self._flushed:
            self._flushed = True
            self._keep(self._detok.flush())

    def _keep(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)


@dataclasses.dataclass(eq=False)
class Request:
    """A handle on one request. `token_ids` grows as it is generated (EOS, if reached, kept at the
    end, as `generate` returns ids; after a stop string, up to the token that completed it, while the
    text ends before it); `finish_reason` is "eos", "length", "stop" or "cancelled" once it is done.
    `Engine.text(request)` and `Engine.stream(request)` give its text. `arrival_time`,
    `first_token_time` (when the host read it) and `finish_time` are `time.perf_counter()` readings."""

    id: int
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: Sampling
    seed: int
    index: int  # the request's place in a list (LLM.generate), for its sampling key
    stops: list[str]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None
    # engine bookkeeping
    _pages: list[int] = dataclasses.field(default_factory=list, repr=False)
    _computed: int = 0  # tokens (prompt, then generated) whose keys and values are in the pages
    _admitted: bool = False  # running: it holds a seat (and pages)
    _pending: int = 0  # tokens the call in flight will give it (counted as its own: see `Engine.overlap`)
    _pending_row: int = 0  # its decode row in that call
    _cancelled: bool = False  # `cancel` asked for (it finishes "cancelled" once carried out)
    # A weak reference: the engine holds its running requests, and a strong one back would make a cycle
    # that keeps a dropped engine's page pool (most of a GPU's memory) alive until Python's cyclic
    # collector happens to run, which a new Engine sizing its pool by the memory free would not wait for.
    _engine: weakref.ref | None = dataclasses.field(default=None, repr=False)
    _key: np.ndarray | None = dataclasses.field(default=None, repr=False)
    _text: _Text | None = dataclasses.field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def __repr__(self) -> str:
        return (f"Request(id={self.id}, prompt of {len(self.prompt_ids)} tokens, {len(self.token_ids)} of "
                f"{self.max_new_tokens} new tokens, finish_reason={self.finish_reason!r})")

    def _of(self, engine) -> bool:
        """Whether this handle came from `engine`'s add_request."""
        return self._engine is not None and self._engine() is engine

    def __getstate__(self):  # pickle and copy.deepcopy: a copy would be a handle into no engine's queues and pool
        raise TypeError("a Request is a handle into its Engine and is not copied or pickled; keep what you need "
                        "from it (request.token_ids, engine.text(request), request.finish_reason)")

    @property
    def _produced(self) -> int:
        """Its tokens, those of the call in flight included."""
        return len(self.token_ids) + self._pending

    @property
    def _sequence_len(self) -> int:
        return len(self.prompt_ids) + self._produced

    @property
    def _decoding(self) -> bool:
        """Its last token is the only one without keys and values: the next step feeds it as a decode
        row (the last generated token, or a prompt's last token when its prefill stopped one short)."""
        return self._computed == self._sequence_len - 1

    def _budget(self, steps: int) -> int:
        return min(steps, self.max_new_tokens - self._produced)

    def _tokens(self, start: int, stop: int) -> list[int]:
        ids = self.prompt_ids + self.token_ids if stop > len(self.prompt_ids) else self.prompt_ids
        return ids[start:stop]


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine was made (`engine.stats`)."""

    calls: int = 0  # device calls (`step`s that ran)
    decode_tokens: int = 0  # tokens sampled
    prefill_tokens: int = 0  # prompt (and recomputed) tokens written into the pool
    recomputed_tokens: int = 0  # keys and values a preemption threw away (computed again later)
    preemptions: int = 0
    busy_rows: int = 0  # decode rows that held a request, summed over calls
    compiled: int = 0  # step variants compiled
    compile_s: float = 0.0  # seconds compiling them (in `step`, when a call first needs a variant)
    device_s: float = 0.0  # seconds `step` spent in device calls: sending one (XLA's launch of the compiled
    # step: 4-8 ms for Llama-2-7B on an H200) and waiting for its tokens
    host_s: float = 0.0  # seconds `step` spent on the host: scheduling, inputs, results (not compiling);
    # with `overlap`, mostly while the device works


# ---------------------------------------------------------------- device side


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Rows:
    """The decode rows of one call, `[R]` each (`tables` `[R, W]`, `keys` `[R, 2]`)."""

    last: jax.Array  # the token fed at the first iteration (rows that are `active`)
    positions: jax.Array  # its position (for a row finishing its prefill: the last prompt position)
    active: jax.Array  # bool: the row feeds `last` at the first iteration
    generated: jax.Array  # tokens the request had before the call: the index of its next token
    budget: jax.Array  # tokens the row may produce in this call
    tables: jax.Array
    keys: jax.Array  # uint32 key data of (seed, index)
    knobs: dict


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Chunk:
    """The prefill rows of one call: `[P, T]` tokens, each row a piece of one prompt."""

    tokens: jax.Array
    positions: jax.Array
    valid: jax.Array  # bool [P, T]: not padding
    tables: jax.Array  # [P, W] the pages of the row's sequence
    last: jax.Array  # [P] the index in the row of the prompt's last token when the prefill ends there
    target: jax.Array  # [P] the decode row that takes the first sampled token (R: none)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Loop:
    step: jax.Array
    last: jax.Array  # [R] the token to feed next
    positions: jax.Array  # [R] its position
    alive: jax.Array  # [R] the row feeds `last` in the next iteration
    out: jax.Array  # [steps, R] sampled tokens, PAD_ID where none
    pool: kv.PagedKVCache


def _forward(model, weights, pool, tokens, positions, batch, logits_at=None):
    view = kv.PagedView(pool, batch)
    logits, view = model.apply({"params": weights}, tokens[None], positions[None], view, logits_at=logits_at)
    return logits[0], view.pool


def _decode_batch(rows: _Rows, positions, alive, pool) -> kv.PagedBatch:
    slots = kv.page_slots(rows.tables, positions[:, None], alive[:, None], pool.page_size, pool.num_pages)
    return kv.PagedBatch(slots[:, 0], rows.tables, jnp.where(alive, positions + 1, 0))


def _mixed_iteration(model, weights, pool, rows: _Rows, chunk: _Chunk):
    """Decode rows and prefill rows in one forward; logits `[R, V]` for each row that produces a
    token (a decode row, or the row of a request whose prompt ends in this chunk) and which rows."""
    r, (p, t) = rows.last.shape[0], chunk.tokens.shape
    decode = _decode_batch(rows, rows.positions, rows.active, pool)
    chunk_slots = kv.page_slots(chunk.tables, chunk.positions, chunk.valid, pool.page_size, pool.num_pages)
    batch = kv.PagedBatch(jnp.concatenate([decode.slots, chunk_slots.reshape(-1)]), decode.tables,
                          decode.lengths, chunk.tables)
    tokens = jnp.concatenate([rows.last, chunk.tokens.reshape(-1)])
    positions = jnp.concatenate([rows.positions, chunk.positions.reshape(-1)])
    picks = jnp.concatenate([jnp.arange(r), r + jnp.arange(p) * t + jnp.maximum(chunk.last, 0)])
    logits, pool = _forward(model, weights, pool, tokens, positions, batch, picks[None])
    logits = logits[:r].at[chunk.target].set(logits[r:], mode="drop")
    finishing = jnp.zeros((r,), bool).at[chunk.target].set(True, mode="drop")
    return logits, rows.active | finishing, pool


def _sample(logits, rows: _Rows, step, greedy, filters):
    keys = None
    if not greedy:
        base = jax.random.wrap_key_data(rows.keys)
        keys = jax.vmap(jax.random.fold_in)(base, rows.generated + step)
    return sample(logits, keys, rows.knobs, greedy=greedy, filters=filters)


def _engine_call(weights, pool, rows: _Rows, chunk: _Chunk | None, eos, *, model, steps, greedy, filters,
                 out_rows):
    """One step: the mixed first iteration (when there is a chunk), then decode iterations until
    `steps` or until no row is alive. Returns tokens `[steps, out_rows]` (PAD_ID after a row stopped,
    and in the columns past its R rows: every call's tokens have one shape, for `_feed`)."""
    r = rows.last.shape[0]

    def record(state: _Loop, logits, producing, pool):
        token = jnp.where(producing, _sample(logits, rows, state.step, greedy, filters), PAD_ID)
        alive = producing & ~jnp.isin(token, eos) & (state.step + 1 < rows.budget)
        return _Loop(state.step + 1, jnp.maximum(token, 0), state.positions + 1, alive,
                     state.out.at[state.step].set(token), pool)

    state = _Loop(jnp.int32(0), rows.last, rows.positions, rows.active,
                  jnp.full((steps, r), PAD_ID, jnp.int32), pool)
    if chunk is not None:
        logits, producing, pool = _mixed_iteration(model, weights, pool, rows, chunk)
        state = record(state, logits, producing, pool)

    def body(s: _Loop):
        batch = _decode_batch(rows, s.positions, s.alive, s.pool)
        logits, pool = _forward(model, weights, s.pool, s.last, s.positions, batch)
        return record(s, logits, s.alive, pool)

    state = jax.lax.while_loop(lambda s: (s.step < steps) & jnp.any(s.alive), body, state)
    out = jnp.pad(state.out, ((0, 0), (0, out_rows - r)), constant_values=PAD_ID)
    if model.mesh is not None:  # whole on every device, so every process can read it
        out = jax.lax.with_sharding_constraint(out, NamedSharding(model.mesh, P()))
    return out, state.pool


_jitted_call = jax.jit(_engine_call, static_argnames=("model", "steps", "greedy", "filters", "out_rows"),
                       donate_argnames=("pool",))


class _Programs(dict):
    """Compiled programs by key, kept for the process's life like jit's own, and emptied with them by
    `jax.clear_caches()`: each engine size compiles its own step variants (the demo model's hold ~25
    MiB of host memory each on a CPU), so a notebook that tries many sizes frees them that way.
    Engines still alive compile again what they next need."""

    __hash__ = object.__hash__  # jax keeps its caches in a WeakKeyDictionary

    def cache_clear(self):
        self.clear()

    def cache_info(self):
        return len(self)

    def cache_keys(self):
        return list(self)


def _cleared_with_jax(programs: _Programs) -> _Programs:
    try:  # jax's registry of what clear_caches() empties (no public one; without it, nothing clears them)
        from jax._src.util import register_cache
        register_cache(programs, "llmjax engine programs")
    except Exception:  # (a jax whose private registry moved or changed)
        pass
    return programs


# Compiled step variants, shared by every engine of the same model and shapes (as jit shares its
# own): keyed by the model, the pool's shape and every static size of the call.
_EXECUTABLES: dict[tuple, jax.stages.Compiled] = _cleared_with_jax(_Programs())


@contextlib.contextmanager
def _uninterrupted():
    """Holds a Ctrl-C (SIGINT) back until the block ends, then raises it as Python would have: the
    engine's state never stops half changed (a pool given to a call the engine does not know of, a
    request with its pages freed but not finished). Only the main thread receives SIGINT; elsewhere
    the block just runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    # `_signal.signal`, not `signal.signal`: the latter's enum conversions cost ~6 us a call, which
    # every `add_request` paid four times.
    previous = _signal.signal(signal.SIGINT, lambda number, frame: held.append(frame))
    try:
        yield
    finally:
        _signal.signal(signal.SIGINT, previous)
        if held and callable(previous):  # Python's handler raises KeyboardInterrupt; an outer block holds it
            previous(signal.SIGINT, held[0])
        elif held and previous == signal.SIG_DFL:
            os.kill(os.getpid(), signal.SIGINT)


@dataclasses.dataclass
class _Flight:
    """A call sent to the device: its rows (requests, in row order), its tokens `[steps, R]` (on the
    device until landed) and each row's budget."""

    rows: list
    out: jax.Array
    budgets: list[int]
    landed: int = 0  # rows the host has handed their tokens (`Engine._land`)
    read: bool = False  # the host has its tokens
    checking: object = None  # the request whose end `_land` was checking (an interrupt may stop it there)


def _feed(out, picks, last):
    """`last`, where `picks` (a flat index into a call's tokens `out`, -1: none) takes it from `out`."""
    taken = jnp.maximum(out.reshape(-1)[jnp.maximum(picks, 0)], 0)  # PAD_ID: a row that ended there
    return jnp.where(picks >= 0, taken, last)


# `_feed` compiled, by (tokens' shape, rows, mesh)
_FEEDS: dict[tuple, jax.stages.Compiled] = _cleared_with_jax(_Programs())


def _key_data(seed: int, index: int) -> np.ndarray:
    """The key data of (seed, index): `generate`'s key for prompt `index`, before the token's fold
    (`seed_key`'s, then `index` folded in). One compiled call on a CPU device where there is one: as
    eager operations on a GPU, a sampled `add_request` spent ~0.3 ms here."""
    host = _host_device()
    with contextlib.nullcontext() if host is None else jax.default_device(host):  # (device_put: 0.1 ms)
        return np.asarray(_folded_key(*seed_words(seed), np.uint32(index)))


@jax.jit
def _folded_key(low, high, index):
    return jax.random.key_data(jax.random.fold_in(words_key(low, high), index))


@functools.cache
def _host_device():
    try:
        return jax.devices("cpu")[0]
    except RuntimeError:  # a jax without its CPU backend
        return None


@functools.cache
def _key_words() -> int:
    return jax.random.key_data(jax.random.key(0)).shape[-1]


# ---------------------------------------------------------------- the engine


def _positive(name: str, value) -> int:
    value = scalar(value)  # a 0-d array passes as the number it holds, as in `generate`
    if not meshes.is_integer(value) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if value >= 2**31:  # sizes of arrays and indices, in JAX's 32-bit integers
        raise ValueError(f"{name} must be below 2**31, got {value!r}")
    return int(value)


KV_DTYPES = ("bfloat16", "float16", "float32", "float8_e4m3fn")


def _kv_dtype(kv_dtype, model_dtype) -> jnp.dtype:
    if kv_dtype is None:
        return jnp.dtype(model_dtype)
    try:
        dtype = jnp.dtype(kv_dtype)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be one of {', '.join(KV_DTYPES)} (or None: the model's), got {kv_dtype!r}")
    return dtype


def _row_buckets(top: int, floor: int) -> tuple[int, ...]:
    """Eighths of `top` from a quarter up (a busy engine's row counts: padding a call to the next
    bucket costs the padded rows' products), then `top / 16`, `top / 64`, ... while at least `floor`."""
    step = max(1, top // 8)
    sizes = set(range(max(top // 4, step), top + 1, step)) | set(_quarters(top, floor))
    return tuple(sorted(s for s in sizes if s >= min(floor, top)))


def _quarters(top: int, floor: int) -> tuple[int, ...]:
    """`top`, `top / 4`, `top / 16`, ... while at least `floor` (always `top`), ascending."""
    sizes = {top}
    while top // 4 >= floor:
        top //= 4
        sizes.add(top)
    return tuple(sorted(sizes))


class Engine:
    """Serves many requests at once over one model; see the module docstring.

    params: from `llmjax.load` / `init_random`. mesh: shard the weights over it (params already
    sharded keep theirs); the pool is split by kv heads like the contiguous cache.
    max_slots: requests running at once (decode rows). page_size: tokens per page.
    kv_memory: bytes of each device's memory for the page pool; by default what the device has free
    after the weights, times 0.9, less the step's workspace (on a device that reports no memory,
    such as the CPU, 256 MiB); either way never more than `max_slots` sequences of `max_seq_len`
    tokens, each in whole pages (a page holds one sequence's tokens: a page_size past max_seq_len
    leaves the rest of every page unused). A pool the device cannot hold raises MemoryError.
    max_seq_len: the longest prompt + new tokens a request may have (default: the model's context).
    prefill_tokens, prefill_row: prompt tokens per step and per chunk row. decode_steps: tokens
    each running request may produce per step, between the host's scheduling decisions. Sizes are
    below 2**31 (JAX's 32-bit integers), and so is `decode_steps * max_slots`.
    kv_dtype: the page pool's dtype: the model's (the default), or "float8_e4m3fn" (half the bytes
    of bfloat16: twice the tokens in the same memory and half the reads of decode attention, at a
    precision of ~6% per stored key and value, which moves logits slightly; values past +-448
    saturate).
    overlap: send each call to the device before reading the tokens of the one before, so that the
    host's scheduling runs while the device works. The next call then counts on every row of the
    one in flight producing all the tokens its budget allows; a row that meets EOS or a stop string
    there has its next call's tokens thrown away (a call's work, no request's output, is lost),
    and a call that would have to preempt waits for the tokens first. False: the host reads each
    call's tokens before scheduling the next (the device idles meanwhile).
    """

    def __init__(self, params: Params, mesh=None, *, max_slots: int = 256, page_size: int = 16,
                 kv_memory: int | None = None, max_seq_len: int | None = None, prefill_tokens: int = 2048,
                 prefill_row: int = 64, decode_steps: int = 8, kv_dtype=None, overlap: bool = True):
        dispatch.refuse_x64()
        check_params(params, mesh)
        if mesh is not None:
            meshes.check_axes(mesh)
        if pipeline.stages(mesh if mesh is not None else params.mesh) > 1:
            raise ValueError("the engine runs on meshes without pipeline stages: its page pool and step are "
                             "split over `tensor` and `data` only; use a mesh with stage=1 (tensor parallelism "
                             "serves faster on one host), or llmjax.generate, which runs stages")
        if mesh is not None and params.mesh is None:
            params = shard(params, mesh)
        elif mesh is not None and mesh != params.mesh:
            raise ValueError("these params are sharded over another mesh; pass mesh=None to keep theirs")
        self.params, self.config = params, params.config
        self.kv_dtype = _kv_dtype(kv_dtype, params.dtype)
        self.max_slots = _positive("max_slots", max_slots)
        self.page_size = _positive("page_size", page_size)
        self.decode_steps = _positive("decode_steps", decode_steps)
        if self.decode_steps * self.max_slots >= 2**31:  # a call's tokens, one per step and row
            raise ValueError(f"decode_steps x max_slots must be below 2**31, got {self.decode_steps} x "
                             f"{self.max_slots}")
        self.prefill_row = _positive("prefill_row", prefill_row)
        prefill_tokens = _positive("prefill_tokens", prefill_tokens)
        if prefill_tokens < self.prefill_row or prefill_tokens % self.prefill_row:
            raise ValueError(f"prefill_tokens must be a positive multiple of prefill_row ({self.prefill_row}), "
                             f"got {prefill_tokens!r}; pass a multiple, or a prefill_row that divides it")
        self.chunk_rows = prefill_tokens // self.prefill_row
        context = self.config.max_position_embeddings
        self.max_seq_len = context if max_seq_len is None else _positive("max_seq_len", max_seq_len)
        if self.max_seq_len > context:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's context of {context} tokens; pass "
                             f"max_seq_len={context} or less, or leave it out (the model's context)")
        self.max_pages = -(-self.max_seq_len // self.page_size)
        self._eos = jnp.asarray(self.config.eos_token_ids or (PAD_ID,), jnp.int32)
        self._eos_set = set(self.config.eos_token_ids)
        self.num_pages = self._pool_pages(kv_memory)
        self._pool = self._make_pool()
        self._free = list(range(self.num_pages - 1, -1, -1))  # a stack: pop() takes the lowest id
        self._waiting: list[Request] = []  # by arrival (id)
        self._running: list[Request] = []  # admitted, by arrival (id)
        self._ids = itertools.count()
        if not isinstance(overlap, (bool, np.bool_)):
            raise ValueError(f"overlap must be True or False, got {overlap!r}")
        self.overlap = bool(overlap)
        self._flight: _Flight | None = None  # the call on the device whose tokens the host has not read
        self._landing: _Flight | None = None  # the call `_land` is reading (kept if an interrupt stops it)
        self._failed: str | None = None  # why a device call failed, after which the engine cannot go on
        self._stepping = threading.Lock()  # held by the thread in `step`
        self._owner: int | None = None  # the thread holding `_stepping` (`_acquire`)
        # Requests added and cancelled while another thread steps wait here for that step to end
        # (`_post`): nothing but the stepping thread touches the queues, pages and calls meanwhile.
        self._inbox: collections.deque[Request] = collections.deque()
        self._cancels: collections.deque[Request] = collections.deque()
        self._released = threading.Condition()  # notified, and `_releases` counted, as `_stepping` is released
        self._releases = 0
        self._finishes = 0  # requests finished (`_finish`), however: `LLM._run` tells by it what its step did not
        self.stats = EngineStats()
        self._warmed: frozenset[tuple] = frozenset()  # variants `warmup` compiled
        self.row_buckets = _row_buckets(self.max_slots, min(MIN_ROWS, self.max_slots))
        # A call's prompt chunk: all `chunk_rows` rows, an eighth, a sixty-fourth (see `_chunk_target`): a
        # few prompts arriving while others decode need not pay for a whole chunk's products.
        self.chunk_buckets = tuple(sorted({max(1, self.chunk_rows // CHUNK_SHRINK**k) for k in range(CHUNK_SIZES)}))
        self.width_buckets = _quarters(self.max_pages, 1)

    def __repr__(self) -> str:
        return (f"<llmjax Engine: {self.max_slots} slots, {self.free_pages} of {self.num_pages} pages of "
                f"{self.page_size} tokens free, {self.pending} requests pending, {self.stats.calls} calls>")

    # ------------------------------------------------------------ memory

    @property
    def page_bytes(self) -> int:
        """Bytes one page takes on each device, over all layers, keys and values."""
        c = self.config
        heads = c.num_kv_heads // self._tensor_degree()
        return 2 * c.num_layers * self.page_size * heads * c.head_dim * self.kv_dtype.itemsize

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def _tensor_degree(self) -> int:
        mesh = self.params.mesh
        return 1 if mesh is None or self.config.num_kv_heads % mesh.shape["tensor"] else mesh.shape["tensor"]

    def _workspace_bytes(self) -> int:
        """A generous bound on one step's activations: every token's MLP activations, the logits with a
        sampling copy or two, and, unless the prompt rows read their pages in place (the prefill kernel,
        on a GPU), their gathered keys and values and float32 scores; the same for the decode rows
        unless the decode kernel reads theirs in place."""
        c, itemsize = self.config, jnp.dtype(self.params.dtype).itemsize
        tokens = self.max_slots + self.chunk_rows * self.prefill_row
        length = self.max_pages * self.page_size
        row_kv = 2 * length * c.num_kv_heads * c.head_dim * itemsize  # a row's pages gathered, K and V
        gathered = scores = 0
        if not self._chunk_in_place():
            gathered = self.chunk_rows * row_kv
            scores = 2 * self.chunk_rows * c.num_heads * self.prefill_row * length * 4
        if not self._decode_in_place():  # the reference gathers each decode row's pages too
            gathered += self.max_slots * row_kv
            scores += 2 * self.max_slots * c.num_heads * length * 4
        mlp = 4 * tokens * (c.hidden_size + c.intermediate_size) * itemsize
        logits = 4 * (self.max_slots + self.chunk_rows) * c.vocab_size * 4
        return 2 * (gathered + scores + mlp + logits) + 2**29

    def _device(self):
        mesh = self.params.mesh
        return jax.local_devices()[0] if mesh is None else mesh.devices.flat[0]

    def _chunk_in_place(self) -> bool:
        return llama.paged_chunk_in_place(self.config, self.params.dtype, self.kv_dtype, self.params.mesh,
                                          self._device())

    def _decode_in_place(self) -> bool:
        return llama.paged_decode_in_place(self.config, self.params.dtype, self.kv_dtype, self._device())

    def _pool_pages(self, kv_memory) -> int:
        wanted = self.max_slots * self.max_pages
        source, hint = "", "pass a larger kv_memory or a smaller page_size"
        if kv_memory is None:
            stats = _memory_stats()
            if "bytes_limit" in stats:
                free, workspace = stats["bytes_limit"] - stats.get("bytes_in_use", 0), self._workspace_bytes()
                kv_memory = max(int(MEMORY_FRACTION * free) - workspace, 0)
                source = (f" ({MEMORY_FRACTION:.0%} of the device's {free} free bytes, less {workspace} for "
                          "one step's activations)")
                hint = ("pass kv_memory=, lower max_slots, max_seq_len or prefill_tokens (they size the "
                        "step's activations), or take a smaller page_size")
            else:
                kv_memory = HOST_POOL_BYTES
            pages = min(wanted, kv_memory // self.page_bytes)
        else:
            kv_memory = scalar(kv_memory)
            if isinstance(kv_memory, (float, np.floating)) and float(kv_memory).is_integer():  # 0.5 * 2**30
                kv_memory = int(kv_memory)
            if not meshes.is_integer(kv_memory) or kv_memory < 1:
                raise ValueError(f"kv_memory must be a whole number of bytes >= 1, got {kv_memory!r}")
            pages = min(wanted, kv_memory // self.page_bytes)  # no more than the slots can ever use
        if pages >= 2**31:  # block tables hold page ids as 32-bit integers
            raise ValueError(f"the page pool would hold {pages} pages, more than 2**31 - 1; pass a smaller "
                             "kv_memory or a larger page_size")
        if pages < 1:
            raise ValueError(f"the page pool would hold no page: one page of {self.page_size} tokens takes "
                             f"{self.page_bytes} bytes per device and {kv_memory} bytes are available for "
                             f"the pool{source}; {hint}")
        return int(pages)

    def _pool_sharding(self):
        mesh = self.params.mesh
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return NamedSharding(mesh, P(None, None, "tensor" if self._tensor_degree() > 1 else None, None))

    def _make_pool(self) -> kv.PagedKVCache:
        def zeros():
            return kv.PagedKVCache.zeros(self.config, self.num_pages, self.page_size, self.kv_dtype)
        try:
            return jax.block_until_ready(jax.jit(zeros, out_shardings=self._pool_sharding())())
        except jax.errors.JaxRuntimeError as e:
            if not dispatch.out_of_memory(e):
                raise
            raise MemoryError(f"the page pool of {self.num_pages} pages ({self.num_pages * self.page_bytes} bytes "
                              "per device) does not fit in the device's memory; pass a smaller kv_memory (bytes "
                              "per device), or leave it out to size the pool by the memory free") from e

    def _pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    # ------------------------------------------------------------ requests

    def add_request(self, prompt, *, max_new_tokens: int = 256, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                    seed: int = 0, stop: str | Sequence[str] | None = None) -> Request:
        """Queues one prompt (a str or a list of token ids); returns its handle. Its sampling key is
        (seed, 0), as `generate(params, prompt, seed=seed)` uses for a single prompt."""
        kind, prompts = _parse_prompt(prompt)
        if kind not in ("text", "ids"):
            raise ValueError("add_request takes one prompt (a str or a list of token ids); call it once "
                             "per prompt, or use llmjax.LLM(params).generate for a list")
        sampling, stops = Sampling(temperature, top_k, top_p, min_p), self._check_options(kind, seed, stop)
        (ids, max_new_tokens), = self._checked_ids(kind, prompts, [max_new_tokens])
        return self._queue(ids, max_new_tokens, sampling, seed, stops, index=0)

    def _check_options(self, kind: str, seed, stop) -> list[str]:
        check_seed(seed)
        stops = _stop_strings(stop)
        if stops and kind.startswith("ids"):
            raise ValueError("stop strings apply to text prompts; with token ids, stop on EOS or "
                             "max_new_tokens")
        return stops

    def _checked_ids(self, kind: str, prompts: list, budgets: list) -> list[tuple[list[int], int]]:
        """Every prompt's token ids and its budget as a Python int, after checking all of them (errors
        name the prompt's index)."""
        rows, checked = _token_rows(self.params, kind, prompts), []
        for i, (ids, max_new) in enumerate(zip(rows, budgets)):
            try:
                max_new = _check_budget(self.params, [ids], max_new)
                self._check_fits(len(ids), max_new)
            except ValueError as e:
                if len(rows) == 1:
                    raise
                raise ValueError(f"prompt {i}: {e}") from None
            checked.append((ids, max_new))
        return checked

    def _queue(self, ids: list[int], max_new_tokens: int, sampling: Sampling, seed: int, stops: list[str],
               index: int) -> Request:
        request = Request(next(self._ids), ids, max_new_tokens, sampling, int(seed), index, stops,
                          arrival_time=time.perf_counter(), _engine=weakref.ref(self))
        if not sampling.greedy:
            request._key = _key_data(request.seed, index)
        if self.params.tokenizer is not None:
            request._text = _Text(self.params.tokenizer, ids, stops, self._eos_set)
        self._post(self._inbox, request)
        return request

    def _post(self, box: collections.deque, request: Request) -> None:
        """Queues an add or a cancel, and carries it out now unless another thread is stepping; that
        thread then carries it out as its step ends (`_unlock`)."""
        box.append(request)
        with self._holding(self._unlock):
            pass

    @contextlib.contextmanager
    def _holding(self, release):
        """Yields whether this thread took `_stepping` (`_acquire`); if it did, `release` (`_unlock`
        or `_let_go`) runs as the block ends, however it ends."""
        acquired = False
        try:
            with _uninterrupted():
                acquired = self._acquire()
            yield acquired
        finally:
            if acquired:
                release()

    def _acquire(self) -> bool:
        """Takes `_stepping` if it is free (call it under `_uninterrupted()`, inside the `try` whose
        `finally` unlocks), or if this thread holds it already: a Ctrl-C landed where Python cannot
        hold it back (between a step's end and the lock's release), and the thread's next call takes
        the lock up again rather than finding the engine locked for good. (The engine calls no code
        of its user while it holds the lock, so a thread never meets its own step here.)"""
        if self._stepping.acquire(blocking=False):
            self._owner = threading.get_ident()
            return True
        return self._owner == threading.get_ident()

    def _let_go(self) -> None:
        self._owner = None  # (no Ctrl-C is raised between these two statements)
        self._stepping.release()

    def _read_mail(self) -> None:
        """Carries out the adds and cancels posted (the caller holds `_stepping`): the cancels counted
        first, then the adds, so every cancel read has its request's add among the adds read (a cancel
        is posted after its add), and a reader does no more than what was posted when it began."""
        cancels = len(self._cancels)
        adds = len(self._inbox)
        if not (cancels or adds):
            return
        with _uninterrupted():  # (a Ctrl-C between the insort and the popleft would add a request twice)
            for _ in range(adds):
                bisect.insort(self._waiting, self._inbox[0], key=lambda r: r.id)  # (threads may post out of order)
                self._inbox.popleft()  # after the insort: `pending` never misses the request
            for _ in range(cancels):
                request = self._cancels.popleft()
                if not request.finished:  # (it may have ended in the step that ran meanwhile)
                    if request._admitted:
                        self._release(request)
                    else:  # found by its id (`_waiting` is in id order): `list.remove` took ~1.4 ms at 50k waiting
                        at = bisect.bisect_left(self._waiting, request.id, key=lambda r: r.id)
                        del self._waiting[at if self._waiting[at] is request else self._waiting.index(request)]
                    self._finish(request, "cancelled")

    def _unlock(self) -> None:
        """Reads the mail and releases `_stepping`; mail posted while it was held and found it held
        is read by whichever thread holds it next, or here, after the release, by this one. Readers
        of `stream` waiting for the engine are woken."""
        try:
            try:
                self._read_mail()
            finally:
                self._let_go()
            while self._inbox or self._cancels:
                with self._holding(self._let_go) as acquired:
                    if not acquired:
                        break
                    self._read_mail()
        finally:
            with self._released:
                self._releases += 1
                self._released.notify_all()

    def _check_fits(self, prompt_len: int, max_new: int) -> None:
        total = prompt_len + max_new
        if prompt_len >= self.max_seq_len:
            raise ValueError(f"a prompt of {prompt_len} tokens leaves no room in this engine's max_seq_len of "
                             f"{self.max_seq_len}; shorten it (llmjax never truncates a prompt) or make the "
                             "Engine with a larger max_seq_len")
        if total > self.max_seq_len:
            raise ValueError(f"a prompt of {prompt_len} tokens plus max_new_tokens={max_new} exceeds this "
                             f"engine's max_seq_len of {self.max_seq_len}; lower max_new_tokens to at most "
                             f"{self.max_seq_len - prompt_len}, shorten the prompt, or make the Engine with a "
                             "larger max_seq_len")
        pages = self._pages_for(total - 1)  # the last new token is never fed back, so never stored
        if pages > self.num_pages:
            raise ValueError(f"this request could never fit: {total - 1} tokens take {pages} pages of "
                             f"{self.page_size} and the pool holds {self.num_pages} "
                             f"({self.num_pages * self.page_bytes} bytes); give the Engine a larger "
                             "kv_memory, or lower max_new_tokens or the prompt's length")

    def cancel(self, request: Request) -> bool:
        """Stops a request and frees its pages; False if it had already finished (or was cancelled).
        Called while another thread steps, it takes effect as that step ends, unless the request
        finished in that step."""
        if not isinstance(request, Request):
            raise ValueError(f"cancel takes a Request handle from add_request, got {type(request).__name__}")
        if not request._of(self):
            raise ValueError(f"request {request.id} does not belong to this engine")
        if request.finished or request._cancelled:
            return False
        request._cancelled = True
        self._post(self._cancels, request)
        return True

    @property
    def pending(self) -> int:
        """Requests not finished: waiting (or added while another thread steps) or running. Exact in
        the thread that steps; read in another while a step runs, it may be off by one for a moment."""
        return len(self._inbox) + len(self._waiting) + len(self._running)

    def stream(self, request: Request) -> Iterator[str]:
        """Text pieces of `request` as they are produced; steps the engine (every running request
        advances) whenever the request has nothing new to give. Each stream gives the whole text from
        its start: several may read one request (and one begun late first gives the text so far)."""
        if self.params.tokenizer is None:
            raise ValueError("stream yields text and these params have no tokenizer; read "
                             "request.token_ids instead")
        if not isinstance(request, Request) or not request._of(self):
            raise ValueError("stream takes a Request handle from this engine's add_request")
        taken = 0  # this stream's pieces handed out
        while True:
            done = request.finished  # read first: once finished, the tokens pushed are all there are
            with request._text.lock:
                request._text.push(request.token_ids, done)
                piece, taken = "".join(request._text.pieces[taken:]), len(request._text.pieces)
            if piece:
                yield piece
            if done:
                return
            if not request.finished:  # (while this generator waited, another may have stepped it to its end)
                calls, releases = self.stats.calls, self._releases
                if self._try_step() is None:  # another thread holds the engine: its step may bring tokens
                    with self._released:
                        self._released.wait_for(lambda: self._releases != releases)
                elif self.stats.calls == calls and not request.finished:
                    raise RuntimeError("the engine has unfinished requests but scheduled nothing")

    def text(self, request: Request) -> str:
        """The request's continuation so far (its whole text once finished), cut before a stop string."""
        if not isinstance(request, Request) or not request._of(self):
            raise ValueError("text takes a Request handle from this engine's add_request")
        if self.params.tokenizer is None:
            raise ValueError("these params have no tokenizer; read request.token_ids instead")
        if request.finished and not request.stops:  # as generate renders it, in one decode
            return _continuation(self.params.tokenizer, request.prompt_ids, request.token_ids, self._eos_set)
        with request._text.lock:
            request._text.push(request.token_ids, request.finished)
            return "".join(request._text.pieces)

    # ------------------------------------------------------------ scheduling

    def _release(self, request: Request) -> None:
        self._running.remove(request)
        request._admitted = False
        self._free.extend(reversed(request._pages))
        request._pages = []

    def _finish(self, request: Request, reason: str) -> None:
        self._finishes += 1
        request.finish_reason = reason
        request.finish_time = time.perf_counter()

    def _preempt_latest(self) -> None:
        victim = self._running[-1]
        self._release(victim)
        self.stats.preemptions += 1
        self.stats.recomputed_tokens += victim._computed
        victim._computed = 0
        bisect.insort(self._waiting, victim, key=lambda r: r.id)

    def _grow(self, request: Request, tokens: int) -> None:
        """Gives `request` pages for its first `tokens` tokens (the caller checked they are free)."""
        for _ in range(self._pages_for(tokens) - len(request._pages)):
            request._pages.append(self._free.pop())

    def _piece(self, request: Request, rows: int) -> tuple[int, int]:
        """(prompt tokens to compute now, tokens the request's pages must then cover) when it may
        use `rows` chunk rows; when the prefill ends, its first decode iterations are covered too."""
        remaining = request._sequence_len - request._computed
        count = min(remaining, rows * self.prefill_row)
        if count == remaining:
            return count, self._call_cover(request)
        return count, request._computed + count

    def _call_cover(self, request: Request) -> int:
        """Tokens `request`'s pages must cover when it decodes in this call: its sequence and the
        call's decode iterations."""
        return request._sequence_len - 1 + request._budget(self.decode_steps)

    def _schedule(self, speculative: bool = False):
        """Decides one call: the decode requests and the prompt pieces `(request, start, count)`.
        `speculative` (a call in flight): None where the call would have to preempt (that waits for
        the call's tokens)."""
        decode, pieces, rows_left = [], [], self._chunk_target()
        for request in list(self._running):
            if not request._admitted:  # preempted below for an older request
                continue
            if request._decoding:
                if not request._budget(self.decode_steps):  # the call in flight gives its last tokens
                    continue
                count, cover = 0, self._call_cover(request)
            elif rows_left:
                count, cover = self._piece(request, rows_left)
            else:
                continue
            if not self._reserve(request, cover, preempt=not speculative):
                if speculative:
                    return None
                count = self._shrunk_piece(request, count)
                if not count:
                    self._preempt_latest()  # `request` itself, the youngest
                    continue
                cover = request._computed + count
            self._grow(request, cover)
            if count:
                pieces.append((request, request._computed, count))
                rows_left -= self._rows_of(count)
            else:
                decode.append(request)
        self._admit(pieces, rows_left)
        return decode, pieces

    def _chunk_target(self) -> int:
        """The chunk rows this call may fill: the smallest chunk size that holds the prompt work the
        call can place when that work fills `CHUNK_FILL` of it (or no smaller size exists); otherwise
        the largest size the work fills, the rest waiting for the next call rather than the call's
        decoding rows waiting on the products of padding. The work the call can place: the running
        requests' prompt pieces, then waiting requests in order while seats and pages last (pages as
        `_schedule` will take them, the decoding rows' growth first)."""
        want, top, free = 0, self.chunk_buckets[-1], len(self._free)
        for request in self._running:
            count, cover = (0, self._call_cover(request)) if request._decoding else self._piece(request, top)
            want += self._rows_of(count)
            free -= max(0, self._pages_for(cover) - len(request._pages))
        for request in self._waiting[:self.max_slots - len(self._running)]:  # seats: never fewer than 0
            if want >= top:
                break
            count, cover = self._piece(request, top)
            free -= self._pages_for(cover)
            if free < 0:  # `_admit` stops at the first request that does not fit
                break
            want += self._rows_of(count)
        if want >= top:
            return top
        above = self._bucket(self.chunk_buckets, want)
        if want >= CHUNK_FILL * above:
            return above
        return max((b for b in self.chunk_buckets if b <= want), default=above)

    def _rows_of(self, count: int) -> int:
        """The chunk rows a prompt piece of `count` tokens takes."""
        return -(-count // self.prefill_row)

    def _reserve(self, request: Request, cover: int, preempt: bool = True) -> bool:
        """Frees pages for `request` to cover `cover` tokens by preempting younger requests; False if
        only preempting `request` itself would do (or, without `preempt`, if any preemption would)."""
        while self._pages_for(cover) - len(request._pages) > len(self._free):
            if self._running[-1] is request or not preempt:
                return False
            self._preempt_latest()
        return True

    def _shrunk_piece(self, request: Request, count: int) -> int:
        """The youngest request's prompt piece cut to the pages left (0 if none). It stops short of
        the prompt's last token, whose step would need pages for the decode iterations too."""
        if not count:
            return 0
        room = (len(request._pages) + len(self._free)) * self.page_size - request._computed
        return max(0, min(count, room, request._sequence_len - request._computed - 1))

    def _admit(self, pieces: list, rows_left: int) -> None:
        """Admits waiting requests, in arrival order, while seats, chunk rows and pages allow."""
        while self._waiting and rows_left and len(self._running) < self.max_slots:
            request = self._waiting[0]
            count, cover = self._piece(request, rows_left)
            if self._pages_for(cover) > len(self._free):
                return
            self._waiting.pop(0)
            bisect.insort(self._running, request, key=lambda r: r.id)
            request._admitted = True
            self._grow(request, cover)
            pieces.append((request, request._computed, count))
            rows_left -= self._rows_of(count)

    # ------------------------------------------------------------ one step

    def step(self) -> list[Request]:
        """Runs one device call; returns the requests that got tokens or finished in it. With
        `overlap`, the next call is on its way to the device before this one's tokens are read. A
        call out of device memory raises MemoryError (its message names the sizes to lower), and the
        engine refuses further steps. One thread steps an engine at a time (`stream` and
        `LLM.generate` step it too): a step begun while another runs raises RuntimeError (`stream`
        and `LLM.generate` wait for that step instead). `add_request` and `cancel` may come from any thread."""
        done = self._try_step()
        if done is None:
            raise RuntimeError("this Engine is stepping in another thread; step it from one thread at a time "
                               "(stream and LLM.generate wait for another thread's step), or give each thread its own Engine")
        return done

    def _try_step(self) -> list[Request] | None:
        """`step`, or None if another thread is stepping."""
        dispatch.refuse_context_mesh(self.params.mesh)  # set after the engine was made
        with self._holding(self._unlock) as acquired:
            if not acquired:
                return None
            self._read_mail()
            return self._step()

    def _step(self) -> list[Request]:
        if self._failed is not None:
            raise RuntimeError(f"this engine stopped at a failed device call ({self._failed}); its page pool "
                               "and requests are gone: build a new Engine (or LLM)")
        start, compiling, in_calls = time.perf_counter(), self.stats.compile_s, self.stats.device_s
        try:
            landing = self._landing  # a call an interrupt (Ctrl-C) stopped `_land` reading: read it first
            if landing is None:
                if self._flight is None:
                    self._launch(in_flight=None)
                landing = self._flight
                if landing is not None:
                    with _uninterrupted():
                        self._landing, self._flight = landing, None
                    if self.overlap:
                        self._launch(in_flight=landing)
            done = []
            if landing is not None:
                done = self._land(landing)
                self._landing = None
        except jax.errors.JaxRuntimeError as e:
            if not dispatch.out_of_memory(e):
                raise
            self._failed = "out of memory"
            raise MemoryError(self._out_of_memory()) from e
        apart = self.stats.compile_s - compiling + self.stats.device_s - in_calls  # counted by themselves
        self.stats.host_s += time.perf_counter() - start - apart
        return done

    def _out_of_memory(self) -> str:
        return (f"the engine's device call ran out of memory. A call holds up to {self.max_slots} decode rows "
                f"(max_slots) for {self.decode_steps} steps (decode_steps) and a prompt chunk of "
                f"{self.chunk_rows * self.prefill_row} tokens (prefill_tokens, in rows of prefill_row="
                f"{self.prefill_row}), beside a page pool of {self.num_pages} pages "
                f"({self.num_pages * self.page_bytes} bytes per device). Build a new Engine (or LLM) with a smaller "
                "prefill_tokens or max_slots, or a smaller kv_memory to leave the call more room: this "
                "one cannot continue, as its page pool went to the failed call")

    def _launch(self, in_flight: _Flight | None) -> None:
        """Schedules a call and sends it to the device, as `_flight` (left None: nothing to run).
        `in_flight`: the call on the device, whose tokens the host has not read; this one then counts on
        it giving each of its rows the tokens its budget allows. Sending and the bookkeeping after it
        hold a Ctrl-C back until they are done: the pool went to the call, and the engine's state must
        say so (an interrupt that lands before, while scheduling or compiling, changes nothing)."""
        scheduled = self._schedule(in_flight is not None)
        if scheduled is None:
            return
        decode, pieces = scheduled
        if not decode and not pieces:
            return
        finishing = [req for req, start, count in pieces if start + count == req._sequence_len]
        rows = decode + finishing
        pages = max(len(r._pages) for r in rows + [p[0] for p in pieces])
        greedy, filters = all(r.sampling.greedy for r in rows), any(r.sampling.filters for r in rows)
        chunk_rows = sum(self._rows_of(count) for _, _, count in pieces)
        variant = self._variant(len(rows), pages, chunk_rows, greedy, filters)
        num_rows, width, chunk_rows = variant[:3]
        host_rows = self._rows(rows, decode, num_rows, width)
        chunk = self._chunk(pieces, {id(r): i for i, r in enumerate(rows)}, num_rows, width,
                            chunk_rows) if pieces else None
        run = self._executable(variant)
        device_rows, device_chunk = self._place((host_rows, chunk))
        if any(r._pending for r in decode):  # their last tokens are still on the device
            device_rows = dataclasses.replace(device_rows, last=self._fed_tokens(in_flight, decode, host_rows.last))
        budgets = host_rows.budget[:len(rows)].tolist()
        with _uninterrupted():
            sent = time.perf_counter()
            out, self._pool = run(self.params.weights, self._pool, device_rows, device_chunk, self._eos)
            self.stats.device_s += time.perf_counter() - sent
            self._account(decode, pieces, rows, budgets)
            self._flight = _Flight(rows, out, budgets)

    def _fed_tokens(self, flight: _Flight, decode: list[Request], last: np.ndarray) -> jax.Array:
        """The decode rows' first tokens, where the call in flight gives them: its output gathered on
        the device (the host has not read it)."""
        picks = np.full(last.shape, -1, np.int32)
        width = flight.out.shape[1]
        picks[:len(decode)] = [(r._pending - 1) * width + r._pending_row if r._pending else -1 for r in decode]
        return self._feeder(len(last))(flight.out, *jax.device_put((picks, last), self._input_sharding()))

    def _feeder(self, num_rows: int):
        """`_feed` compiled for calls of `num_rows` decode rows (its compilation goes to compile_s)."""
        key = (self.decode_steps, self.max_slots, num_rows, self.params.mesh)
        feeder = _FEEDS.get(key)
        if feeder is None:
            start = time.perf_counter()
            spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self._input_sharding())  # noqa: E731
            feeder = _FEEDS[key] = jax.jit(_feed).lower(spec((self.decode_steps, self.max_slots)),
                                                        spec((num_rows,)), spec((num_rows,))).compile()
            self.stats.compile_s += time.perf_counter() - start
        return feeder

    def _land(self, flight: _Flight) -> list[Request]:
        """Waits for a call's tokens and hands each row its own; finishes those that ended. Rows whose
        request finished meanwhile (cancelled, or ended in the call before, whose next call counted on
        it going on) are skipped. An interrupt (Ctrl-C) while waiting loses nothing: the call stays
        `_landing`, and the next step lands it; once the tokens are here, a Ctrl-C waits until they are
        handed out (an error part way leaves the rows not yet landed to the next step)."""
        waited = time.perf_counter()
        out = np.asarray(flight.out)
        with _uninterrupted():  # the tokens, once here, are handed out whole (a Ctrl-C waits for it)
            if not flight.read:  # a call landed again after an interrupt is counted once
                flight.read = True
                self.stats.device_s += time.perf_counter() - waited
                self.stats.calls += 1
            if flight.checking is not None and not flight.checking.finished:
                self._check_end(flight.checking)  # its tokens were handed out before the interrupt
            flight.checking = None
            now = time.perf_counter()
            out = out[:, :len(flight.rows)]
            produced = out != PAD_ID  # each row's tokens run up to its first PAD_ID
            counts = np.where(produced.all(axis=0), out.shape[0], produced.argmin(axis=0)).tolist()
            done = []
            rows = zip(flight.rows, out.T.tolist(), counts, flight.budgets)
            for request, column, count, budget in itertools.islice(rows, flight.landed, None):
                flight.landed += 1  # an interrupt past here leaves this row landed, and the next step lands the rest
                request._pending -= budget
                if request.finished:
                    continue
                self.stats.decode_tokens += count
                if request.first_token_time is None and count:
                    request.first_token_time = now
                request.token_ids.extend(column[:count])
                request._computed -= budget - count
                flight.checking = request
                self._check_end(request)
                flight.checking = None
                if count < budget and not request.finished:
                    raise RuntimeError(f"request {request.id} stopped short of its budget in a call without "
                                       "ending (an llmjax bug: its next call counted on those tokens)")
                done.append(request)
        return done

    @staticmethod
    def _bucket(buckets: tuple[int, ...], n: int) -> int:
        return next(b for b in buckets if b >= n)

    def _rows(self, rows: list[Request], decode: list[Request], num_rows: int, width: int) -> _Rows:
        """The call's decode rows as arrays, filled a field at a time (the host's time between calls
        leaves the GPU idle, so no per-element writes over hundreds of rows)."""
        n, d = len(rows), len(decode)
        last = np.zeros(num_rows, np.int32)
        positions, generated, budget = np.zeros_like(last), np.zeros_like(last), np.zeros_like(last)
        active = np.zeros(num_rows, bool)
        tables = np.zeros((num_rows, width), np.int32)
        keys = np.zeros((num_rows, _key_words()), np.uint32)
        knobs = {"temperature": np.zeros(num_rows, np.float32), "top_k": np.zeros(num_rows, np.int32),
                 "top_p_cut": np.zeros(num_rows, np.float32), "min_p": np.zeros(num_rows, np.float32)}
        last[:d] = [0 if r._pending else (r.token_ids or r.prompt_ids)[-1] for r in decode]
        active[:d] = True
        positions[:n] = [r._sequence_len - 1 for r in rows]
        generated[:n] = [r._produced for r in rows]
        budget[:n] = [r._budget(self.decode_steps) for r in rows]
        for i, request in enumerate(rows):  # a slice a row: 0.1 ms for 410 rows
            tables[i, :len(request._pages)] = request._pages
        keyed = [i for i, r in enumerate(rows) if r._key is not None]
        if keyed:
            keys[keyed] = np.stack([rows[i]._key for i in keyed])
        samplings = [r.sampling for r in rows]
        knobs["temperature"][:n] = [s.temperature for s in samplings]
        knobs["top_k"][:n] = [s.top_k or 0 for s in samplings]
        knobs["top_p_cut"][:n] = [s.top_p_cut for s in samplings]
        knobs["min_p"][:n] = [s.min_p or 0.0 for s in samplings]
        return _Rows(last, positions, active, generated, budget, tables, keys, knobs)

    def _chunk(self, pieces, row_of: dict, num_rows: int, width: int, p: int) -> _Chunk:
        t = self.prefill_row
        tokens, positions = np.zeros((p, t), np.int32), np.zeros((p, t), np.int32)
        valid, tables = np.zeros((p, t), bool), np.zeros((p, width), np.int32)
        last, target = np.full(p, -1, np.int32), np.full(p, num_rows, np.int32)
        row = 0
        for request, start, count in pieces:
            ids = request._tokens(start, start + count)
            for offset in range(0, count, t):
                n = min(t, count - offset)
                tokens[row, :n] = ids[offset:offset + n]
                positions[row, :n] = np.arange(start + offset, start + offset + n)
                valid[row, :n] = True
                tables[row, :len(request._pages)] = request._pages
                row += 1
            if start + count == request._sequence_len:
                last[row - 1], target[row - 1] = n - 1, row_of[id(request)]
        return _Chunk(tokens, positions, valid, tables, last, target)

    def _place(self, tree):
        """The call's host arrays on the device (replicated over a mesh)."""
        return jax.device_put(tree, self._input_sharding())

    def _account(self, decode: list[Request], pieces: list, rows: list[Request], budgets: list[int]) -> None:
        """Counts a call's work as done when it is sent: each row's tokens as its budget allows (its
        pages cover them); `_land` takes back those a row did not produce."""
        s = self.stats
        s.busy_rows += len(rows)
        # A decode row with no token yet feeds its prompt's last token (its prefill stopped one short).
        s.prefill_tokens += sum(not request._produced for request in decode)
        for request, start, count in pieces:
            s.prefill_tokens += count
            request._computed = start + count
        for i, (request, budget) in enumerate(zip(rows, budgets)):
            if i >= len(decode):  # its prefill ends in this call: the first token comes from the chunk
                request._computed -= 1
            request._computed += budget
            request._pending += budget
            request._pending_row = i

    def _check_end(self, request: Request) -> None:
        """Finishes a request at EOS, its budget or a stop string (its text is decoded now only when
        it has stop strings; otherwise when someone reads it)."""
        reason = None
        if request.token_ids and request.token_ids[-1] in self._eos_set:
            reason = "eos"
        elif len(request.token_ids) >= request.max_new_tokens:
            reason = "length"
        if request.stops:
            with request._text.lock:  # (the request's reader may push it in another thread)
                request._text.push(request.token_ids, finished=False)
                if reason is not None and not request._text.stopped:
                    # Text held back until the end (a longer stop that might still have come, a byte
                    # run) may hold a stop: the end decodes it all.
                    request._text.push(request.token_ids, finished=True)
                if request._text.stopped:
                    del request.token_ids[self._stop_end(request):]  # tokens past the stop string are not its own
                    reason = "stop"
        if reason is not None:  # `_land`, the only caller, holds a Ctrl-C back: released means finished
            self._release(request)
            self._finish(request, reason)
            if request.stops:
                with request._text.lock:
                    request._text.push(request.token_ids, finished=True)

    def _stop_end(self, request: Request) -> int:
        """How many of a stopped request's tokens its text needs: up to the one that completed the
        stop string, which the text may have seen a few tokens later (held back meanwhile)."""
        tokenizer, ids = self.params.tokenizer, request.token_ids[:request._text.fed]

        def cut(n: int) -> tuple[str, bool]:
            return _cut_at_stop(_continuation(tokenizer, request.prompt_ids, ids[:n], self._eos_set), request.stops)
        n, want = len(ids), cut(len(ids))
        while n > 1 and cut(n - 1) == want:
            n -= 1
        return n

    # ------------------------------------------------------------ compilation

    def _cache_key(self, variant: tuple) -> tuple:
        # The model carries the LLMJAX_* settings (kernel modes, the all-reduce), which change what a
        # trace gives (`Llama.settings`), as `_compile` traces it. The variant holds the chunk's rows;
        # engines of other `prefill_tokens` share its programs.
        return (_model(self.params), self.num_pages, self.page_size, self.kv_dtype.name, self.prefill_row,
                self.decode_steps, self.max_slots, *variant)

    def _variant(self, rows: int, pages: int, chunk_rows: int, greedy: bool, filters: bool) -> tuple:
        """The step variant for a call: the smallest buckets that hold `rows` rows, `pages` pages and
        `chunk_rows` prompt-chunk rows (0: no chunk); after `warmup`, the smallest warmed variant that
        holds them, if any (so nothing compiles while the engine serves)."""
        chunk = self._bucket(self.chunk_buckets, chunk_rows) if chunk_rows else 0
        exact = (self._bucket(self.row_buckets, rows), self._bucket(self.width_buckets, pages), chunk, greedy,
                 filters)
        if self._warmed and self._cache_key(exact) not in _EXECUTABLES:
            fits = [v for v in self._warmed if v[3:] == exact[3:] and v[0] >= rows and v[1] >= pages
                    and (v[2] >= chunk if chunk else not v[2])]
            if fits:
                return min(fits)
        return exact

    def _executable(self, variant: tuple):
        key = self._cache_key(variant)
        compiled = _EXECUTABLES.get(key)  # read once: another thread's jax.clear_caches() may empty it
        if compiled is None:
            compiled = _EXECUTABLES[key] = self._compile(*variant)
        return compiled

    def _compile(self, num_rows: int, width: int, chunk_rows: int, greedy: bool, filters: bool):
        start = time.perf_counter()
        self.stats.compiled += 1
        shapes = self._abstract_inputs(num_rows, width, chunk_rows)
        # the decode iterations' loop as one CUDA graph that tests its condition on the GPU, as generate's
        options = {"xla_gpu_enable_command_buffer": LOOP_COMMAND_BUFFERS} if loop_graph(self.params.mesh) else {}
        options |= dispatch.gemm_options()
        compiled = _jitted_call.lower(self.params.weights, self._pool, *shapes, self._eos, model=_model(self.params),
                                      steps=self.decode_steps, greedy=greedy, filters=filters,
                                      out_rows=self.max_slots).compile(options or None)
        self.stats.compile_s += time.perf_counter() - start
        return compiled

    def _input_sharding(self):
        """Where a call's host inputs go: the first local device, or whole on every device of the mesh."""
        mesh = self.params.mesh
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0]) if mesh is None else \
            NamedSharding(mesh, P())

    def _abstract_inputs(self, num_rows: int, width: int, chunk_rows: int):
        sharding = self._input_sharding()

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

        r, i32 = (num_rows,), jnp.int32
        knobs = {"temperature": spec(r, jnp.float32), "top_k": spec(r, i32), "top_p_cut": spec(r, jnp.float32),
                 "min_p": spec(r, jnp.float32)}
        rows = _Rows(spec(r, i32), spec(r, i32), spec(r, bool), spec(r, i32), spec(r, i32),
                     spec((num_rows, width), i32), spec((num_rows, _key_words()), jnp.uint32), knobs)
        if not chunk_rows:
            return rows, None
        pt, p = (chunk_rows, self.prefill_row), (chunk_rows,)
        return rows, _Chunk(spec(pt, i32), spec(pt, i32), spec(pt, bool), spec((chunk_rows, width), i32),
                            spec(p, i32), spec(p, i32))

    def warmup(self, max_len: int | None = None, *, rows: Sequence[int] | None = None, greedy: bool = True,
               filters: bool = False, threads: int = 8) -> int:
        """Compiles, several at once, the step variants for sequences of up to `max_len` tokens
        (default `max_seq_len`): the block-table width they need, without a prompt chunk and with
        each chunk size (`chunk_buckets`), for each of `rows` (default every row bucket: eighths of
        `max_slots` from a quarter up, and `max_slots / 4**k` below). From then on a step uses
        the smallest of these that holds it (a narrower call pads its tables), so serving compiles
        nothing more unless a step fits none of them. Returns how many were compiled. Without
        `warmup`, each variant compiles the first time a step needs it."""
        if max_len is not None and not 1 <= _positive("max_len", max_len) <= self.max_seq_len:
            raise ValueError(f"max_len must be at most the engine's max_seq_len ({self.max_seq_len}), got {max_len}")
        if rows is not None and (isinstance(rows, (str, bytes)) or np.ndim(rows) != 1):
            raise ValueError(f"rows must be a list of row counts, got {rows!r}")
        for r in () if rows is None else rows:
            if not 1 <= _positive("rows", r) <= self.max_slots:
                raise ValueError(f"each of rows must be at most the engine's max_slots ({self.max_slots}), got {r}")
        threads = _positive("threads", threads)
        width = self._bucket(self.width_buckets, self._pages_for(max_len or self.max_seq_len))
        rows = self.row_buckets if rows is None else [self._bucket(self.row_buckets, r) for r in rows]
        variants = {(r, width, c, greedy, filters) for r in rows for c in (0, *self.chunk_buckets)}
        todo = [v for v in variants if self._cache_key(v) not in _EXECUTABLES]
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            for variant, compiled in zip(todo, pool.map(lambda v: self._compile(*v), todo)):
                _EXECUTABLES[self._cache_key(variant)] = compiled
        self._warmed = self._warmed | variants  # only once compiled: an interrupted warmup marks none
        if self.overlap:
            for r in rows:
                self._feeder(r)
        return len(todo)


# ---------------------------------------------------------------- offline


class LLM:
    """Offline batch generation over an `Engine`: `LLM(params, **engine_options).generate(prompts)`."""

    def __init__(self, params: Params, **engine_options):
        self.engine = Engine(params, **engine_options)

    def __repr__(self) -> str:
        return f"LLM({self.engine!r})"

    def generate(self, prompts, *, max_new_tokens: int | Sequence[int] = 256, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                 seed: int = 0, stop: str | Sequence[str] | None = None, progress: bool = True):
        """Like `llmjax.generate` (same prompts, same return types, same tokens), but served by the
        engine: prompts run as slots and pages free up, with a progress bar. `max_new_tokens` may
        be one number or one per prompt. Prompt i samples from the key (seed, i)."""
        if not isinstance(progress, (bool, np.bool_)):
            raise ValueError(f"progress must be True or False, got {progress!r}")
        sampling = Sampling(temperature, top_k, top_p, min_p)
        kind, items = _parse_prompt(prompts)
        budgets = self._budgets(max_new_tokens, len(items), one_prompt=kind in ("text", "ids"))
        engine = self.engine
        stops = engine._check_options(kind, seed, stop)
        requests = [engine._queue(ids, n, sampling, seed, stops, index=i)
                    for i, (ids, n) in enumerate(engine._checked_ids(kind, items, budgets))]
        self._run(requests, progress)
        if kind.startswith("ids"):
            outputs = [r.token_ids for r in requests]
            return outputs[0] if kind == "ids" else outputs
        texts = [engine.text(r) for r in requests]
        return texts[0] if kind == "text" else texts

    @staticmethod
    def _budgets(max_new_tokens, count: int, one_prompt: bool) -> list:
        if isinstance(max_new_tokens, (list, tuple)) or getattr(max_new_tokens, "ndim", 0) > 0:
            if one_prompt:
                raise ValueError(f"max_new_tokens={max_new_tokens!r} is a sequence, but the prompt is a single "
                                 "one; give one number (a sequence gives one per prompt of a list)")
            try:
                flat = np.ndim(max_new_tokens) == 1
            except ValueError:  # ragged: [3, [4]]
                flat = False
            if not flat:
                raise ValueError(f"max_new_tokens must be one number, or a flat list of one per prompt; got "
                                 f"{max_new_tokens!r:.80}")
            if len(max_new_tokens) != count:
                raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {count} prompts; "
                                 "give one number, or one per prompt")
            # An array's entries as Python numbers: a jax array's are 0-d arrays, which no check takes.
            if isinstance(max_new_tokens, (list, tuple)):
                return list(max_new_tokens)
            return np.asarray(max_new_tokens).tolist()
        return [max_new_tokens] * count

    def _run(self, requests: list[Request], progress: bool) -> None:
        from tqdm.auto import tqdm

        engine, pending = self.engine, {id(r): r for r in requests}
        # No stderr (pythonw, some services): tqdm would write its bar to None and raise AttributeError.
        progress = progress and sys.stderr is not None
        try:
            with tqdm(total=len(requests), unit="req", disable=not progress, desc="generate") as bar:
                while pending:
                    calls, releases, finishes = engine.stats.calls, engine._releases, engine._finishes
                    advanced = engine._try_step()
                    if advanced is None:  # another thread steps the engine (its own LLM.generate, a
                        with engine._released:  # stream): its step advances these requests too
                            engine._released.wait_for(lambda: engine._releases != releases)
                        advanced = list(pending.values())
                    elif engine.stats.calls == calls:  # no call: another thread cancelled them, or stuck
                        advanced = list(pending.values())
                        if not any(r.finished for r in advanced):
                            raise RuntimeError("the engine has unfinished requests but scheduled nothing")
                    elif engine._finishes - finishes != sum(r.finished for r in advanced):
                        # requests finished outside this step's call (cancelled by another thread, or in
                        # another thread's step just before this one): the engine may stay busy with
                        # other threads' requests, so look at all of these
                        advanced = list(pending.values())
                    for request in advanced:
                        if request.finished and pending.pop(id(request), None) is not None:
                            bar.update(1)
        except BaseException:  # an interrupt (Ctrl-C in a notebook) or an error: the next call
            for request in requests:  # must not serve this one's leftovers first
                if not request.finished:
                    self.engine.cancel(request)
            raise


def _memory_stats() -> dict:
    """The first local device's memory figures (`bytes_limit`, `bytes_in_use`); empty on a device that
    reports none (the CPU)."""
    return jax.local_devices()[0].memory_stats() or {}
