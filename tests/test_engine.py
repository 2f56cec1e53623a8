"""The engine (continuous batching over a paged KV cache) against `llmjax.generate`.

Greedy tokens must equal `generate`'s for every request, whatever rows, batch, chunk or call it lands
in, through preemption and recomputation; sampled tokens depend only on (seed, index). The models are
float32: in bfloat16, `generate`'s own tokens depend on how a list is batched (rounding), so no
batching scheme can promise equal tokens there.
"""

import collections
import dataclasses
import importlib
import itertools
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax
from llmjax.config import LlamaConfig
from llmjax.engine import Engine, LLM, Request
from llmjax.tokenizer import Tokenizer

from conftest import SP_VOCAB, needs_devices

gen = importlib.import_module("llmjax.generate")

# Small pages and chunk rows, few slots: requests share calls, span several chunk rows and pages,
# and the test prompts land in different rows from call to call.
SMALL = dict(max_slots=8, page_size=8, prefill_tokens=48, prefill_row=16, decode_steps=4)


@pytest.fixture(scope="module")
def params(sp_dir):
    config = dataclasses.replace(LlamaConfig.preset("tiny"), vocab_size=SP_VOCAB, max_position_embeddings=96,
                                 eos_token_ids=(2,))
    return llmjax.init_random(config, seed=7, dtype="float32", tokenizer=Tokenizer.from_dir(sp_dir))


def _prompts(rng, count, longest, vocab=SP_VOCAB):
    return [rng.integers(3, vocab, rng.integers(1, longest + 1)).tolist() for _ in range(count)]


def _reference(params, prompts, budgets):
    """generate's tokens for each prompt, cut to its own budget (greedy tokens do not depend on the
    budget: a shorter run is a prefix of a longer one)."""
    full = llmjax.generate(params, prompts, max_new_tokens=max(budgets))
    eos = set(params.config.eos_token_ids)
    out = []
    for ids, n in zip(full, budgets):
        ids = ids[:n]
        ends = [i for i, t in enumerate(ids) if t in eos]
        out.append(ids[:ends[0] + 1] if ends else ids)
    return out


def test_greedy_tokens_equal_generate_whatever_the_batch(params):
    rng = np.random.default_rng(0)
    prompts = _prompts(rng, 40, 60)
    budgets = rng.integers(1, 25, len(prompts)).tolist()
    expected = _reference(params, prompts, budgets)
    assert LLM(params, **SMALL).generate(prompts, max_new_tokens=budgets, progress=False) == expected
    # The same requests arriving while others run: other rows, other chunks, other calls.
    engine = Engine(params, **SMALL)
    handles = []
    for i, (prompt, n) in enumerate(zip(prompts, budgets)):
        handles.append(engine.add_request(prompt, max_new_tokens=n))
        if i % 3 == 0:
            engine.step()
    while engine.pending:
        engine.step()
    assert [h.token_ids for h in handles] == expected
    assert engine.free_pages == engine.num_pages


def test_the_step_is_compiled_with_loop_graphs_where_generate_takes_them(params, monkeypatch):
    """Where `generate` compiles its loop as one CUDA graph (`gen.loop_graph`: one NVIDIA GPU), the engine
    compiles its step with the same command buffers, and its tokens stay `generate`'s (here, on the CPU,
    the installed XLA takes the option and ignores it); elsewhere it passes none."""
    seen = []
    compile_ = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile",
                        lambda self, options=None, **kw: seen.append(options) or compile_(self, options, **kw))
    prompts = _prompts(np.random.default_rng(3), 5, 30)
    expected = _reference(params, prompts, [6] * 5)
    for graphs in (False, True):
        monkeypatch.setattr(llmjax.engine, "loop_graph", lambda mesh: graphs and mesh is None)
        llmjax.engine._EXECUTABLES.clear()
        seen.clear()
        assert LLM(params, **SMALL).generate(prompts, max_new_tokens=6, progress=False) == expected
        want = {"xla_gpu_enable_command_buffer": gen.LOOP_COMMAND_BUFFERS} if graphs else None
        assert seen and all(options == want for options in seen)
    assert "WHILE" in gen.LOOP_COMMAND_BUFFERS and "CONDITIONAL" in gen.LOOP_COMMAND_BUFFERS


def _page_bytes(params, page_size):
    c = params.config
    return 2 * c.num_layers * page_size * c.num_kv_heads * c.head_dim * 4


def test_200_requests_with_cancellations_under_a_small_pool(params):
    """Each request not cancelled gets exactly its own tokens; pages run out, so requests are
    preempted and recomputed; the pool is whole again at the end; each token is produced once."""
    rng = np.random.default_rng(1)
    prompts = _prompts(rng, 200, 40)
    budgets = rng.integers(1, 25, len(prompts)).tolist()
    expected = _reference(params, prompts, budgets)
    engine = Engine(params, **SMALL, kv_memory=16 * _page_bytes(params, 8))  # 128 tokens in all
    assert engine.num_pages == 16
    handles = [engine.add_request(p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
    cancelled, states_cancelled = set(), set()
    while engine.pending:
        if rng.random() < 0.15:
            live = [h for h in handles if not h.finished]
            victim = live[rng.integers(len(live))]
            states_cancelled.add("running" if victim in engine._running else "waiting")
            assert engine.cancel(victim)
            cancelled.add(victim.id)
        engine.step()
    assert states_cancelled == {"running", "waiting"} and 10 < len(cancelled) < 100
    assert engine.stats.preemptions > 0 and engine.stats.recomputed_tokens > 0
    assert engine.free_pages == engine.num_pages
    assert len({h.id for h in handles}) == 200 and all(h.finished for h in handles)
    for h, ids in zip(handles, expected):
        if h.id in cancelled:
            assert h.finish_reason == "cancelled" and h.token_ids == ids[:len(h.token_ids)]
        else:
            assert h.finish_reason in ("eos", "length") and h.token_ids == ids
    assert engine.stats.decode_tokens == sum(len(h.token_ids) for h in handles)
    assert engine.stats.device_s > 0 and engine.stats.host_s > 0  # every call's time goes to one of them
    assert not engine.cancel(handles[0]) or handles[0].id not in cancelled


def test_a_float8_cache_takes_a_quarter_of_float32s_bytes_and_keeps_the_greedy_tokens_close(params):
    rng = np.random.default_rng(5)
    prompts = _prompts(rng, 24, 40)
    budgets = rng.integers(4, 16, len(prompts)).tolist()
    expected = _reference(params, prompts, budgets)
    engine = Engine(params, kv_dtype="float8_e4m3fn", **SMALL)
    assert engine._pool.k[0].dtype == jnp.float8_e4m3fn
    assert engine.page_bytes * 4 == Engine(params, **SMALL).page_bytes  # the model is float32
    got = LLM(params, kv_dtype="float8_e4m3fn", **SMALL).generate(prompts, max_new_tokens=budgets, progress=False)
    # Each request still gets its own budget (or stops at EOS); the tokens move only where the cache's
    # rounding tips a near tie of this random model: most first tokens and most tokens agree.
    assert all(len(g) == n or (g and g[-1] in params.config.eos_token_ids) for g, n in zip(got, budgets))
    firsts = np.mean([g[0] == e[0] for g, e in zip(got, expected)])
    same = np.mean([a == b for g, e in zip(got, expected) for a, b in zip(g, e)])
    assert firsts >= 0.75 and same >= 0.5, (firsts, same)


def test_sampled_tokens_depend_only_on_seed_and_index(params):
    rng = np.random.default_rng(2)
    prompts = _prompts(rng, 6, 16)
    knobs = dict(temperature=0.9, top_k=40, top_p=0.9)
    expected = llmjax.generate(params, prompts, max_new_tokens=12, seed=5, **knobs)
    assert LLM(params, **SMALL).generate(prompts, max_new_tokens=12, seed=5, progress=False, **knobs) == expected
    # add_request samples as prompt 0 of its own list; here among greedy and other sampled requests
    # that arrive earlier or later, so it lands in other rows and calls.
    alone = llmjax.generate(params, prompts[0], max_new_tokens=12, seed=3, **knobs)
    engine = Engine(params, **SMALL)
    noise = [engine.add_request(p, max_new_tokens=9, temperature=0.7, top_k=5) for p in _prompts(rng, 5, 16)]
    engine.step()
    mine = engine.add_request(prompts[0], max_new_tokens=12, seed=3, **knobs)
    noise += [engine.add_request(p, max_new_tokens=7) for p in _prompts(rng, 5, 16)]
    while engine.pending:
        engine.step()
    assert mine.token_ids == alone != expected[0]


def test_rows_of_one_call_keep_their_own_knobs_and_keys_through_preemption(params):
    """Sampled requests that differ in every knob (min-p and 64-bit seeds too) share calls under a pool
    too small for them all, so some are preempted and recomputed: each still gets the tokens
    `generate` draws for it alone, so no row took another's knobs or key, nor a step's key twice."""
    rng = np.random.default_rng(6)
    knobs = [dict(temperature=0.6, min_p=0.5, seed=-2**40), dict(temperature=1.7, top_p=0.8, seed=3),
             dict(temperature=1.0, top_k=30, min_p=0.7, seed=2**33 + 3)]
    # Prompts of 17 to 32 tokens: one length bucket, so generate compiles once.
    requests = [(rng.integers(3, SP_VOCAB, rng.integers(17, 33)).tolist(), knobs[i % 3]) for i in range(12)]
    expected = [llmjax.generate(params, prompt, max_new_tokens=14, **k) for prompt, k in requests]
    engine = Engine(params, **SMALL, kv_memory=10 * _page_bytes(params, 8))
    handles = [engine.add_request(prompt, max_new_tokens=14, **k) for prompt, k in requests]
    while engine.pending:
        engine.step()
    assert engine.stats.preemptions > 0
    assert [h.token_ids for h in handles] == expected


def test_stream_and_stop_strings_give_generates_text(params):
    no_eos = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=()))
    prompt = "def f(x):"
    full = llmjax.generate(no_eos, prompt, max_new_tokens=24)
    engine = Engine(no_eos, **SMALL)
    handle = engine.add_request(prompt, max_new_tokens=24)
    engine.add_request("import json", max_new_tokens=10)
    pieces = list(engine.stream(handle))
    assert len(pieces) > 1 and "".join(pieces) == full == engine.text(handle)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = llmjax.generate(no_eos, prompt, max_new_tokens=24, stop=stop)
    assert expected == full[:full.find(stop)]
    handle = engine.add_request(prompt, max_new_tokens=24, stop=["\x00never", stop])
    assert "".join(engine.stream(handle)) == expected == engine.text(handle)
    assert handle.finish_reason == "stop" and len(handle.token_ids) < 24
    texts = LLM(no_eos, **SMALL).generate([prompt, "import json"], max_new_tokens=24, stop=stop, progress=False)
    assert texts == llmjax.generate(no_eos, [prompt, "import json"], max_new_tokens=24, stop=stop)


def test_a_stop_string_that_starts_first_but_ends_last_cuts_everywhere_as_in_generate(params):
    """Stops `a` and `b` where `b` is inside `a`: `b` is complete a few characters before `a`, but `a`
    starts first, and generate cuts the text at the stop that starts first. stream, the engine's
    stream and text, and LLM.generate must not cut at `b` just because it completed first."""
    no_eos = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=()))
    prompt = "def f(x):"
    full = llmjax.generate(no_eos, prompt, max_new_tokens=24)
    cases = [(full[i:i + 6], full[i + 3:i + 5]) for i in range(len(full) - 6)
             if full.find(full[i:i + 6]) == i and full.find(full[i + 3:i + 5]) == i + 3]
    assert cases, full
    for stops in cases[:3]:
        stops = list(stops)
        expected = full[:full.find(stops[0])]
        assert llmjax.generate(no_eos, prompt, max_new_tokens=24, stop=stops) == expected
        assert "".join(llmjax.stream(no_eos, prompt, max_new_tokens=24, stop=stops)) == expected
        engine = Engine(no_eos, **SMALL)
        handle = engine.add_request(prompt, max_new_tokens=24, stop=stops)
        assert "".join(engine.stream(handle)) == expected == engine.text(handle)
        assert handle.finish_reason == "stop"
        assert LLM(no_eos, **SMALL).generate(prompt, max_new_tokens=24, stop=stops, progress=False) == expected


def test_a_stop_seen_only_at_the_end_still_stops_the_request(params):
    """`b` completes on the last token while `a`, one character earlier, might still have come: the
    text is held back to the end, where the stop is found. The request ends "stop", keeping the tokens
    up to the one that completed `b`, as with `b` alone."""
    no_eos = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=()))
    prompt = "def f(x):"
    for n in range(6, 13):
        full = llmjax.generate(no_eos, prompt, max_new_tokens=n)
        if len(full) >= 3 and full.find(full[-2:]) == len(full) - 2:
            break
    b, a = full[-2:], full[-3:] + "\x00"
    engine = Engine(no_eos, **SMALL)
    alone = engine.add_request(prompt, max_new_tokens=n, stop=[b])
    both = engine.add_request(prompt, max_new_tokens=n, stop=[a, b])
    while engine.pending:
        engine.step()
    assert engine.text(both) == engine.text(alone) == full[:-2] == llmjax.generate(no_eos, prompt, max_new_tokens=n,
                                                                                   stop=[a, b])
    assert both.finish_reason == alone.finish_reason == "stop"
    assert both.token_ids == alone.token_ids


def test_an_interrupt_while_a_row_checks_its_end_loses_nothing(params, monkeypatch):
    """Ctrl-C while a row's text is decoded for its stop strings (real host time): the next step
    finishes the check, so the request ends and its pages come back."""
    from llmjax import engine as engine_module

    no_eos = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=()))
    engine = Engine(no_eos, **SMALL)
    handle = engine.add_request("def f(x):", max_new_tokens=3, stop=["\x00never"])
    push = engine_module._Text.push

    def interrupted(self, token_ids, finished):
        monkeypatch.setattr(engine_module._Text, "push", push)  # once
        raise KeyboardInterrupt
    monkeypatch.setattr(engine_module._Text, "push", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    for _ in range(10):
        if not engine.pending:
            break
        engine.step()
    assert handle.finish_reason == "length" and engine.stats.calls == 1
    assert engine.text(handle) == llmjax.generate(no_eos, "def f(x):", max_new_tokens=3)
    assert engine.free_pages == engine.num_pages
    assert _engine(params).warmup(16, rows=np.array([2, 4])) >= 0  # rows as a numpy array


def test_an_eos_that_is_an_ordinary_token_is_in_no_text(params):
    """EOS ends the ids and is never in text, also when the EOS id is a piece of the vocabulary
    that a decode would render: generate, stream, the engine's text and stream, and LLM agree."""
    no_eos = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=()))
    prompt, tok = "def f(x):", params.tokenizer
    ids = llmjax.generate(no_eos, tok.encode(prompt), max_new_tokens=12)
    at = next(i for i, t in enumerate(ids) if i >= 2 and tok.decode([t]).strip() and t not in ids[:i])
    p = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=(ids[at],)))
    want = tok.decode(tok.encode(prompt) + ids[:at])[len(prompt):]
    assert llmjax.generate(p, tok.encode(prompt), max_new_tokens=12) == ids[:at + 1]
    assert llmjax.generate(p, prompt, max_new_tokens=12) == want
    assert llmjax.generate(p, prompt, max_new_tokens=12, stop="\x00") == want
    assert "".join(llmjax.stream(p, prompt, max_new_tokens=12)) == want
    engine = Engine(p, **SMALL)
    handle = engine.add_request(prompt, max_new_tokens=12)
    assert "".join(engine.stream(handle)) == want == engine.text(handle)
    for stop in (None, "\x00"):
        assert LLM(p, **SMALL).generate([prompt], max_new_tokens=12, stop=stop, progress=False) == [want]


def test_compiling_is_counted_apart_from_the_hosts_work(params, monkeypatch):
    """A compilation inside `step` goes to compile_s, not host_s (JAX's own cache may make the real one
    instant, so this one is made to take an hour, on the engine's clock: a real wait would leave the
    host's share to race a threshold on a busy machine)."""
    engine_module = importlib.import_module("llmjax.engine")
    monkeypatch.setattr(engine_module, "_EXECUTABLES", {})  # nothing compiled yet
    lower, hour = engine_module._jitted_call.lower, 3600.0
    clock = types.SimpleNamespace(skipped=0.0)
    monkeypatch.setattr(engine_module, "time", types.SimpleNamespace(
        perf_counter=lambda: time.perf_counter() + clock.skipped))

    class SlowLowered:
        def __init__(self, *args, **kwargs):
            self.lowered = lower(*args, **kwargs)

        def compile(self, *args):
            clock.skipped += hour
            return self.lowered.compile(*args)

    monkeypatch.setattr(engine_module._jitted_call, "lower", SlowLowered, raising=False)
    engine = _engine(params)
    engine.add_request([1, 5, 9], max_new_tokens=4)
    engine.step()
    stats = engine.stats
    assert stats.compiled == 1 and stats.compile_s >= hour and stats.device_s > 0
    assert 0 < stats.host_s < hour  # scheduling and arrays, without the compilation's hour


def test_streams_taken_in_turn_each_give_the_whole_text(params):
    """Streams that step the engine in turn: a request that finishes while its own stream waits still
    yields its last pieces (they once ended at the finish, dropping them)."""
    no_eos = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=()))
    prompts, budgets = ["def f(x):", "import json", "x = 1"], [9, 24, 17]
    engine = Engine(no_eos, **SMALL)
    handles = [engine.add_request(p, max_new_tokens=n) for p, n in zip(prompts, budgets)]
    streams, texts = [engine.stream(h) for h in handles], ["", "", ""]
    texts[0] += next(streams[0])  # one piece, then the other streams run every request to its end
    for i in (1, 2, 0):
        texts[i] += "".join(streams[i])
    for handle, text, prompt, n in zip(handles, texts, prompts, budgets):
        assert handle.finished and text == engine.text(handle) == llmjax.generate(no_eos, prompt, max_new_tokens=n)
    other = Engine(no_eos, **SMALL).add_request("x", max_new_tokens=3)
    with pytest.raises(ValueError, match="this engine's add_request"):
        next(engine.stream(other))  # it would wait forever on an engine that never runs it


def test_two_streams_of_one_request_each_give_its_whole_text(params):
    """Two clients of one request (a server that serves a repeated prompt once), read in turn, one
    begun after the other has taken pieces, and a stream taken up again after leaving one: each gives
    the whole text (they once shared one cursor, each piece going to whichever read it first)."""
    no_eos = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=()))
    want = llmjax.generate(no_eos, "def f(x):", max_new_tokens=16)
    engine = Engine(no_eos, **{**SMALL, "decode_steps": 2})
    handle = engine.add_request("def f(x):", max_new_tokens=16)
    first = engine.stream(handle)
    early = next(first) + next(first)
    second = engine.stream(handle)
    texts = [early, ""]
    for a, b in itertools.zip_longest(first, second, fillvalue=""):
        texts[0], texts[1] = texts[0] + a, texts[1] + b
    assert texts == [want, want] and "".join(engine.stream(handle)) == want == engine.text(handle)


def test_demo_model_gives_generates_text():
    params = llmjax.load("tiny-stdlib", dtype="float32")
    prompts = ["def fibonacci(n):", "import os\n\n", "class Stack:\n    def push(self, item):",
               "for line in open(path):", "    return", "x"]
    expected = llmjax.generate(params, prompts, max_new_tokens=40)
    assert LLM(params, **SMALL).generate(prompts, max_new_tokens=40, progress=False) == expected


def test_paged_attention_reference_reads_each_rows_pages():
    """`paged_attention_reference` on pages in scrambled order equals the model's attention over the
    same keys laid out contiguously; an empty row gives zeros."""
    from llmjax.kernels.paged_attention import paged_attention_reference
    from llmjax.models.llama import attention

    rng = np.random.default_rng(3)
    b, h, n_kv, d, page, max_pages = 3, 6, 2, 16, 4, 5
    k, v = (rng.standard_normal((b, max_pages * page, n_kv, d)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((b, h, d)).astype(np.float32)
    lengths = np.array([7, 20, 0], np.int32)
    order = rng.permutation(b * max_pages + 4)[:b * max_pages].reshape(b, max_pages).astype(np.int32)
    k_pages, v_pages = (np.zeros((b * max_pages + 4, page, n_kv, d), np.float32) for _ in range(2))
    k_pages[order] = k.reshape(b, max_pages, page, n_kv, d)
    v_pages[order] = v.reshape(b, max_pages, page, n_kv, d)
    tables = order.copy()
    tables[0, 2:] = 0  # past row 0's pages: any id
    got = np.asarray(paged_attention_reference(q, k_pages, v_pages, tables, lengths))
    k_pos = np.broadcast_to(np.arange(max_pages * page), (b, max_pages * page))
    want = np.asarray(attention(q[:, None], k, v, (lengths - 1)[:, None], k_pos))[:, 0]
    np.testing.assert_allclose(got[:2], want[:2], rtol=1e-5, atol=1e-5)
    assert np.all(got[2] == 0)


@needs_devices(8)
def test_llm_on_a_mesh_gives_one_devices_tokens(params):
    from llmjax.sharding import make_mesh

    rng = np.random.default_rng(4)
    prompts = _prompts(rng, 10, 30)
    expected = _reference(params, prompts, [10] * len(prompts))
    llm = LLM(params, mesh=make_mesh(tensor=2, data=4), **SMALL)
    assert llm.engine.params.mesh is not None
    assert llm.generate(prompts, max_new_tokens=10, progress=False) == expected
    knobs = dict(max_new_tokens=6, temperature=0.9, top_p=0.9, seed=-5)  # rows split over `data` draw alike
    assert llm.generate(prompts[:5], progress=False, **knobs) == llmjax.generate(params, prompts[:5], **knobs)


@pytest.mark.slow
@pytest.mark.parametrize("on_mesh", [pytest.param(False, id="one-device"),
                                     pytest.param(True, marks=needs_devices(4), id="mesh")])
def test_the_engine_through_the_attention_kernels_gives_the_references_tokens(params, monkeypatch, on_mesh):
    """Greedy tokens of the engine with its attention in the kernels (interpret mode): decode rows
    through the paged decode kernel, prompt rows through the prefill kernel reading their queries and
    writing their output in place in the step's flat array (`paged_prefill_rows`, after decode rows of
    any count), on one device and on a (tensor 2, data 2) mesh (each device its own kv heads), equal
    those with the references on one device; a float8 pool too (on one device)."""
    from llmjax.sharding import make_mesh

    rng = np.random.default_rng(8)
    prompts = _prompts(rng, 7, 40)

    def run(mode, p, kv_dtype):
        monkeypatch.setenv("LLMJAX_ATTENTION", mode)
        jax.clear_caches()
        llmjax.engine._EXECUTABLES.clear()
        return LLM(p, kv_dtype=kv_dtype, **{**SMALL, "max_slots": 5}).generate(prompts, max_new_tokens=7,
                                                                                progress=False)

    p = llmjax.shard(params, make_mesh(tensor=2, data=2, devices=jax.devices()[:4])) if on_mesh else params
    for kv_dtype in (None,) if on_mesh else (None, "float8_e4m3fn"):
        assert run("interpret", p, kv_dtype) == run("off", params, kv_dtype)


def test_overlap_sends_the_next_call_before_reading_the_tokens_and_changes_none(params):
    """The next call counts on every row of the one in flight going on; rows that meet EOS there
    (here an EOS that many requests meet within a call) lose only that next call's work, and each
    request still gets `generate`'s tokens, with the pool whole at the end, as without overlap."""
    rng = np.random.default_rng(4)
    prompts = _prompts(rng, 30, 30)
    budgets = rng.integers(2, 30, len(prompts)).tolist()
    with_eos = lambda *ids: dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=ids))
    plain = LLM(with_eos(), **SMALL, overlap=False).generate(prompts, max_new_tokens=budgets, progress=False)
    p = with_eos(collections.Counter(t for ids in plain for t in ids[1:-1]).most_common(1)[0][0])
    expected = _reference(p, prompts, budgets)
    for overlap in (True, False):
        engine = Engine(p, **SMALL, overlap=overlap)
        handles = [engine.add_request(prompt, max_new_tokens=n) for prompt, n in zip(prompts, budgets)]
        engine.step()
        assert (engine._flight is not None) == overlap  # sent before the first call's tokens were read
        while engine.pending:
            engine.step()
        assert [h.token_ids for h in handles] == expected
        assert engine.free_pages == engine.num_pages
        assert sum(h.finish_reason == "eos" and len(h.token_ids) < n for h, n in zip(handles, budgets)) >= 5
        assert engine.stats.decode_tokens == sum(len(h.token_ids) for h in handles)


def _stage_mesh():
    from llmjax.sharding import make_mesh

    return make_mesh(stage=2, devices=jax.devices()[:2])


def _engine(params, **options):
    return Engine(params, **{**SMALL, **options})


def test_a_call_fills_the_chunk_size_its_prompt_work_fills_and_warmup_covers_each(params):
    """A lone short prompt runs the smallest chunk that holds it (a big prefill budget must not pad it
    to all of it); prompts arriving beside a decoding request fill the largest size they fill and the
    rest waits for the next call (no chunk of mostly padding); a queue that fills the chunk runs it
    whole. After `warmup` (every row bucket without a chunk and with each chunk size) serving compiles
    nothing, and the tokens are generate's. (Without `overlap`, so that a step is the call it sends.)"""
    engine = _engine(params, prefill_tokens=128, prefill_row=8, overlap=False)  # 16 chunk rows, 2 or 1
    assert engine.chunk_buckets == (1, 2, 16)
    chunks = []
    real = engine._executable
    engine._executable = lambda variant: chunks.append(variant[2]) or real(variant)
    rng = np.random.default_rng(9)
    short = rng.integers(3, SP_VOCAB, 12).tolist()  # 2 rows of 8
    handle = engine.add_request(short, max_new_tokens=20)
    engine.step()
    assert chunks == [2] and engine.stats.prefill_tokens == 12  # the size it fills
    prompts = [rng.integers(3, SP_VOCAB, 40).tolist() for _ in range(10)]  # 5 rows each
    handles = [engine.add_request(p, max_new_tokens=3) for p in prompts[:2]]
    engine.step()  # 10 rows wanted beside a decoding row: 2 rows now, 8 later
    assert chunks[-1] == 2 and engine.stats.prefill_tokens == 12 + 2 * 8
    handles += [engine.add_request(p, max_new_tokens=3) for p in prompts[2:]]
    engine.step()
    assert chunks[-1] == 16 and engine.stats.prefill_tokens == 12 + 2 * 8 + 16 * 8  # a whole chunk
    while engine.pending:
        engine.step()
    budgets = [20] + [3] * len(prompts)
    assert [h.token_ids for h in [handle, *handles]] == _reference(params, [short, *prompts], budgets)

    warmed = _engine(params, prefill_tokens=128, prefill_row=8)
    importlib.import_module("llmjax.engine")._FEEDS.clear()  # overlap's token gathers: warmup compiles them too
    warmed.warmup()
    assert {v[2] for v in warmed._warmed} == {0, 1, 2, 16}  # no chunk, and each size
    assert len(warmed._warmed) == len(warmed.row_buckets) * 4
    before, compile_s, chunks = warmed.stats.compiled, warmed.stats.compile_s, []
    real = warmed._executable
    warmed._executable = lambda variant: chunks.append(variant[2]) or real(variant)
    handles = [warmed.add_request(short, max_new_tokens=40)]  # it decodes on alone after the others end
    warmed.step()
    handles += [warmed.add_request(p, max_new_tokens=3) for p in prompts]
    while warmed.pending:
        warmed.step()
    assert warmed.stats.compiled == before and warmed.stats.compile_s == compile_s
    assert chunks[0] == 2 and {0, 16} <= set(chunks)  # the warmed variants keep each chunk size
    assert [h.token_ids for h in handles] == _reference(params, [short, *prompts], [40, *budgets[1:]])


def test_every_prompt_token_counts_once_as_prefill_when_a_chunk_stops_a_prompt_one_short(params):
    """Two rows of 3 tokens a call: prompts of 3 and 4 tokens take one row each, so the second's last
    prompt token waits for the next call, which feeds it as a decode row. It is still a prompt token
    written into the pool: `stats.prefill_tokens` counts every prompt token once."""
    engine = _engine(params, prefill_tokens=6, prefill_row=3, overlap=False)
    prompts = [[5, 6, 7], [8, 9, 10, 11]]
    handles = [engine.add_request(p, max_new_tokens=3) for p in prompts]
    engine.step()
    assert engine.stats.prefill_tokens == 6 and handles[1]._decoding  # its last prompt token is left
    while engine.pending:
        engine.step()
    assert [h.token_ids for h in handles] == _reference(params, prompts, [3, 3])
    assert engine.stats.prefill_tokens == 7 and engine.free_pages == engine.num_pages


@pytest.mark.parametrize("lengths, pages, target", [
    ([14], None, 8),  # 7 rows fill 7/8 of the 8-row size: it runs whole
    ([10], None, 1),  # 5 rows fill 5/8 of it: one row now, the rest later
    ([80], None, 8),  # 40 rows fill 40/64 of the whole chunk: the eighth, full
    ([90, 10], None, 64),  # 50 rows fill 50/64
    ([90, 90], None, 64),  # more than the chunk
    ([1], None, 1),  # less than the smallest size
    ([80, 80], 15, 8),  # pages for the first only (11 of 15): its 40 rows
])
def test_a_call_counts_the_prompt_work_it_can_place_and_rounds_to_a_chunk_size(params, lengths, pages, target):
    """Chunk sizes of 64, 8 and 1 rows of 2 tokens: the call fills the smallest size holding the
    waiting work when the work fills three quarters of it, else the largest size the work fills; work
    the pool has no pages for does not count (`_admit` would stop there)."""
    memory = None if pages is None else pages * _page_bytes(params, 8)
    engine = _engine(params, prefill_tokens=128, prefill_row=2, kv_memory=memory)
    assert engine.chunk_buckets == (1, 8, 64)
    for n in lengths:
        engine.add_request(list(range(3, 3 + n)), max_new_tokens=4)
    assert engine._chunk_target() == target


def test_the_default_pool_takes_most_of_the_free_device_memory(params, monkeypatch):
    """With no kv_memory, the pool takes 90% of what the device reports free, less the step's workspace,
    and no more than max_slots full sequences; a device too full for one page is refused."""
    engine_module = importlib.import_module("llmjax.engine")
    workspace, page = _engine(params)._workspace_bytes(), _page_bytes(params, 8)

    def device(free):
        monkeypatch.setattr(engine_module, "_memory_stats",
                            lambda: {"bytes_limit": free + 2**30, "bytes_in_use": 2**30})

    device(12 * 2**30)
    assert _engine(params).num_pages == 8 * 12  # 8 slots of 96 tokens in pages of 8: all fit
    device(-(-(workspace + 50 * page + page // 2) * 10 // 9))  # room for 50 pages and a half
    assert _engine(params).num_pages == 50  # the memory, not the slots, sets it
    device(workspace)  # 90% of it leaves nothing after the workspace
    with pytest.raises(ValueError, match=rf"would hold no page.* and 0 bytes are available for the pool \(90% of "
                                         rf"the device's {workspace} free bytes, less {workspace}"):
        _engine(params)


def test_the_workspace_holds_gathered_keys_only_where_rows_gather_them(params, monkeypatch):
    """The step's workspace sets aside each row's gathered keys and values and float32 scores only
    where the rows gather their pages (the references, as on a CPU), not where the kernels read them
    in place (here in interpret mode): a GPU's pool keeps those bytes. The prompt rows and the decode
    rows are counted apart, since the prompt rows may gather while the decode kernel runs."""
    monkeypatch.setenv("LLMJAX_ATTENTION", "off")  # the references on every platform
    engine = _engine(params)
    gathered, c = engine._workspace_bytes(), params.config
    length = engine.max_pages * engine.page_size
    row_kv = 2 * length * c.num_kv_heads * c.head_dim * 4  # a row's float32 keys and values
    prompt = engine.chunk_rows * (row_kv + 2 * c.num_heads * engine.prefill_row * length * 4)  # and scores
    decode = engine.max_slots * (row_kv + 2 * c.num_heads * length * 4)
    monkeypatch.setenv("LLMJAX_ATTENTION", "interpret")
    in_place = _engine(params)._workspace_bytes()
    assert gathered - in_place == 2 * (prompt + decode)
    monkeypatch.setenv("LLMJAX_PAGED_PREFILL", "off")  # the prefill kernel runs, but on gathered copies
    assert _engine(params)._workspace_bytes() - in_place == 2 * prompt


@pytest.mark.parametrize("device, kv_dtype, environment, head_dim, prompt_in_place, decode_in_place", [
    ("cuda", None, {}, 16, True, True),
    ("cuda", "float8_e4m3fn", {}, 16, True, True),  # widened as the kernels read
    ("rocm", None, {}, 16, True, True),
    ("rocm", "float8_e4m3fn", {}, 16, False, False),  # the references on rocm
    ("cpu", None, {}, 16, False, False),
    ("cpu", None, {"LLMJAX_ATTENTION": "interpret"}, 16, True, True),
    ("cuda", None, {"LLMJAX_ATTENTION": "off"}, 16, False, False),
    ("cuda", None, {"LLMJAX_PAGED_PREFILL": "off"}, 16, False, True),  # only the prompt rows gather
    ("cuda", None, {}, 24, False, False),  # a head dim the kernels do not take
])
def test_rows_read_the_pages_in_place_where_the_kernels_run(device, kv_dtype, environment, head_dim,
                                                            prompt_in_place, decode_in_place, monkeypatch):
    """The engine sizes its workspace by these answers, so they must follow the paths the step takes."""
    llama = importlib.import_module("llmjax.models.llama")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    capability = {"cuda": "9.0", "rocm": "gfx942", "cpu": None}[device]
    fake = types.SimpleNamespace(platform="cpu" if device == "cpu" else "gpu", compute_capability=capability)
    config = dataclasses.replace(LlamaConfig.preset("tiny"), head_dim=head_dim)
    kv_dtype = jnp.dtype(kv_dtype or jnp.bfloat16)
    assert llama.paged_chunk_in_place(config, jnp.bfloat16, kv_dtype, None, fake) is prompt_in_place
    assert llama.paged_decode_in_place(config, jnp.bfloat16, kv_dtype, fake) is decode_in_place


def test_a_refused_warmup_marks_nothing_warmed(params):
    engine = _engine(params)
    with pytest.raises(ValueError, match="threads"):
        engine.warmup(threads=0)
    assert engine._warmed == frozenset()  # a step would otherwise take variants nobody compiled


def test_zero_dimensional_arrays_pass_as_the_sizes_they_hold(params):
    """An engine's sizes given as 0-d arrays (a `jnp.sum`, `np.array(8)`) are taken as `generate` takes
    its numbers; a 0-d bool or float stays refused."""
    sizes = {name: np.array(value) for name, value in SMALL.items()}
    engine = Engine(params, **sizes, max_seq_len=jnp.array(64), kv_memory=np.array(16 * _page_bytes(params, 8)))
    assert (engine.max_slots, engine.page_size, engine.decode_steps, engine.max_seq_len) == (8, 8, 4, 64)
    assert (engine.chunk_rows, engine.num_pages) == (3, 16)
    assert engine.warmup(jnp.array(16), rows=[np.array(2)], threads=np.array(1)) > 0
    for bad in (np.array(True), np.array(8.5)):
        with pytest.raises(ValueError, match="max_slots must be an integer >= 1"):
            _engine(params, max_slots=bad)


def test_kv_memory_takes_a_whole_float_of_bytes(params):
    for memory in (float(16 * _page_bytes(params, 8)), np.float32(16 * _page_bytes(params, 8))):
        assert _engine(params, kv_memory=memory).num_pages == 16


def test_kv_memory_past_what_the_slots_can_use_is_capped_and_a_pool_too_large_is_named(params):
    assert _engine(params, max_slots=2, max_seq_len=16, kv_memory=2**26).num_pages == 4  # 2 x 16 tokens
    page = _page_bytes(params, 8)
    with pytest.raises(MemoryError, match=f"the page pool of {2**29} pages .{2**29 * page} bytes per device. "
                                          "does not fit in the device's memory; pass a smaller kv_memory"):
        _engine(params, max_slots=2**28, decode_steps=1, kv_memory=2**29 * page)  # 4 TiB
    with pytest.raises(ValueError, match=r"would hold 4294967296 pages, more than 2\*\*31 - 1"):
        _engine(params, max_slots=2**30, decode_steps=1, kv_memory=2**32 * page)


def _finished(engine):
    """A request of `engine`, run to its end."""
    request = engine.add_request([1, 2], max_new_tokens=1)
    while engine.pending:
        engine.step()
    return request


@pytest.mark.parametrize("call, match", [
    (lambda p: _engine(p, max_slots=0), "max_slots must be an integer >= 1"),
    (lambda p: _engine(p, page_size=0), "page_size"),
    (lambda p: _engine(p, decode_steps=1.5), "decode_steps"),
    (lambda p: _engine(p, max_slots=2**70), r"max_slots must be below 2\*\*31, got 1180591620717411303424"),
    (lambda p: _engine(p, max_slots=2**31 - 1), r"decode_steps x max_slots must be below 2\*\*31, got 4 x 2147483647"),
    (lambda p: _engine(p, prefill_row=2**31, prefill_tokens=2**31), r"prefill_row must be below 2\*\*31"),
    (lambda p: _engine(p, prefill_row=2**30, prefill_tokens=2**32), r"prefill_tokens must be below 2\*\*31"),
    (lambda p: _engine(p, prefill_tokens=40), "multiple of prefill_row .16., got 40; pass a multiple, or a prefill_row"),
    (lambda p: _engine(p, max_seq_len=200), "exceeds the model's context of 96 tokens; pass max_seq_len=96 or less"),
    (lambda p: _engine(p, kv_memory=100), "would hold no page"),
    (lambda p: _engine(p, kv_memory=1.5), "a whole number of bytes"),
    (lambda p: _engine(p, kv_memory=np.float32(1.5)), "a whole number of bytes"),
    (lambda p: _engine(p, kv_memory=2.0 ** 40 + 0.5), "a whole number of bytes"),
    (lambda p: _engine(p, kv_dtype="int8"), "kv_dtype must be one of"),
    (lambda p: _engine(p, kv_dtype="fp9"), "kv_dtype must be one of"),
    (lambda p: _engine(p).add_request([]), "prompt is empty"),
    (lambda p: _engine(p).add_request(["a", "b"]), "one prompt"),
    (lambda p: _engine(p).add_request([1, SP_VOCAB]), "outside the vocabulary"),
    (lambda p: _engine(p).add_request("x", max_new_tokens=0), "max_new_tokens"),
    (lambda p: _engine(p).add_request([1] * 90, max_new_tokens=10), "at most 6"),
    (lambda p: _engine(p, max_seq_len=32).add_request([1] * 30, max_new_tokens=5), "max_seq_len of 32; lower "
     "max_new_tokens to at most 2"),
    (lambda p: _engine(p, max_seq_len=32).add_request([1] * 40, max_new_tokens=1),
     "40 tokens leaves no room in this engine's"),
    (lambda p: LLM(p, **SMALL).generate([[1, 2], [1] * 95], max_new_tokens=[1, 5]), "prompt 1: .* at most 1"),
    (lambda p: LLM(p, **SMALL).generate([[1, 2]], max_new_tokens=np.array(0)), "max_new_tokens must be"),
    (lambda p: _engine(p, mesh="x"), "mesh must be a jax.sharding.Mesh"),
    (lambda p: _engine(p, mesh=jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("tensor",))), "Auto axes"),
    (lambda p: _engine(p, kv_memory=4 * _page_bytes(p, 8)).add_request([1] * 40, max_new_tokens=10),
     "could never fit: 49 tokens take 7 pages of 8 and the pool holds 4"),
    (lambda p: _engine(p).add_request([1, 2], stop="x"), "stop strings apply to text"),
    (lambda p: _engine(p).add_request("x", temperature=-1), "temperature"),
    (lambda p: _engine(p).add_request("x", seed="s"), "seed"),
    (lambda p: _engine(p).cancel("x"), "Request handle"),
    (lambda p: _engine(p).text(None), "text takes a Request handle"),
    (lambda p: _engine(p).add_request([1] * 90, max_new_tokens=np.uint8(200)), "at most 6"),
    (lambda p: LLM(p, **SMALL).generate([[1] * 90], max_new_tokens=np.int16(32000)), "at most 6"),
    (lambda p: _engine(None), "params must be llmjax Params"),
    (lambda p: _engine(p).cancel(_engine(p).add_request("x", max_new_tokens=4)), "does not belong"),
    (lambda p: LLM(p, **SMALL).generate(["a", "b"], max_new_tokens=[1]), "one per prompt"),
    (lambda p: LLM(p, **SMALL).generate(["a", "b"], max_new_tokens=np.array([[2, 3]])), "a flat list of one per prompt"),
    (lambda p: LLM(p, **SMALL).generate(["a", "b"], max_new_tokens=[3, [4]]), "a flat list of one per prompt"),
    (lambda p: LLM(p, **SMALL).generate("a", max_new_tokens=[3]), "the prompt is a single one"),
    (lambda p: LLM(p, **SMALL).generate([1, 2], max_new_tokens=(3,)), "the prompt is a single one"),
    (lambda p: _engine(p).warmup(97), r"max_len must be at most the engine's max_seq_len \(96\), got 97"),
    (lambda p: _engine(p).warmup(0), "max_len must be an integer >= 1, got 0"),
    (lambda p: _engine(p).warmup(1.5), "max_len must be an integer >= 1, got 1.5"),
    (lambda p: _engine(p).warmup(rows=[100]), r"each of rows must be at most the engine's max_slots \(8\), got 100"),
    (lambda p: _engine(p).warmup(rows=4), "rows must be a list of row counts, got 4"),
    (lambda p: _engine(p).warmup(threads="x"), "threads must be an integer >= 1, got 'x'"),
    (lambda p: _engine(p).warmup(threads=0), "threads must be an integer >= 1, got 0"),
    (lambda p: LLM(p, **SMALL).generate([[1, 2]], max_new_tokens=2, progress="no"), "progress must be True or False"),
    (lambda p: _engine(p).cancel(_engine(p).add_request([1, 2], max_new_tokens=1)), "does not belong"),
    (lambda p: _engine(p).cancel(_finished(_engine(p))), "does not belong"),
    pytest.param(lambda p: _engine(p, mesh=_stage_mesh()), "meshes without pipeline stages", marks=needs_devices(2)),
    (lambda p: list(_engine(dataclasses.replace(p, tokenizer=None)).stream(None)), "no tokenizer"),
])
def test_bad_input_is_refused_with_a_reason(params, call, match):
    with pytest.raises(ValueError, match=match):
        call(params)


def test_budgets_one_per_prompt_come_as_a_list_or_any_integer_array(params):
    llm, prompts = LLM(params, **SMALL), [[1, 5, 9], [1, 7]]
    want = _reference(params, prompts, [3, 5])
    for budgets in ([3, 5], (3, 5), np.array([3, 5], np.int16), jnp.array([3, 5])):
        assert llm.generate(prompts, max_new_tokens=budgets, progress=False) == want
    with pytest.raises(ValueError, match="prompt 0: max_new_tokens must be an integer"):
        llm.generate(prompts, max_new_tokens=jnp.array([3.0, 5.0]), progress=False)


def test_a_call_out_of_memory_names_the_sizes_and_stops_the_engine(params):
    """A call whose prompt chunk cannot be allocated (2**30 tokens of activations) raises MemoryError
    naming the options that size it, not XLA's RESOURCE_EXHAUSTED; the engine then refuses to go on."""
    huge = dict(prefill_row=2**30, prefill_tokens=2**30, kv_memory=16 * _page_bytes(params, 8))  # on a GPU, a
    engine = _engine(params, **huge)  # pool sized by the memory free is refused at once, counting the call
    engine.add_request([1, 2, 3], max_new_tokens=4)
    with pytest.raises(MemoryError, match=r"ran out of memory.*prompt chunk of 1073741824 tokens "
                                          r"\(prefill_tokens.*smaller prefill_tokens or max_slots"):
        engine.step()
    with pytest.raises(RuntimeError, match="stopped at a failed device call .out of memory.*build a new Engine"):
        engine.step()
    with pytest.raises(MemoryError, match="prefill_tokens"):
        LLM(params, **{**SMALL, **huge}).generate(
            [[1, 2]], max_new_tokens=2, progress=False)


def test_an_interrupted_generate_leaves_nothing_queued(params, monkeypatch):
    """Ctrl-C (or any error) inside LLM.generate cancels its unfinished requests: the next call
    serves only its own prompts."""
    llm = LLM(params, **SMALL, overlap=np.True_)
    step, calls = llm.engine._try_step, []  # (what LLM.generate steps with)

    def interrupted():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "_try_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 5 + i, 9] for i in range(20)], max_new_tokens=12, progress=False)
    assert len(calls) == 3 and llm.engine.pending == 0 and llm.engine.free_pages == llm.engine.num_pages
    monkeypatch.setattr(llm.engine, "_try_step", step)
    before = llm.engine.stats.calls
    assert llm.generate([[1, 5, 9]], max_new_tokens=3, progress=False) == llmjax.generate(
        params, [[1, 5, 9]], max_new_tokens=3)
    assert llm.engine.stats.calls - before <= 2


@pytest.mark.parametrize("overlap", [True, False])
def test_an_interrupt_while_a_step_waits_for_its_call_loses_nothing(params, monkeypatch, overlap):
    """Ctrl-C while `step` waits for the device (where a step spends its time): the call is read on the
    next step, so every request, including those an interrupted LLM.generate does not own, goes on
    with exactly `generate`'s tokens."""
    from llmjax.engine import Engine

    llm = LLM(params, **SMALL, overlap=overlap)
    engine = llm.engine
    mine = engine.add_request([1, 5, 9], max_new_tokens=20)
    engine.step()
    land = Engine._land

    def interrupted(self, flight):
        monkeypatch.setattr(Engine, "_land", land)  # once
        raise KeyboardInterrupt
    monkeypatch.setattr(Engine, "_land", interrupted)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 7 + i, 3] for i in range(3)], max_new_tokens=12, progress=False)
    assert llm.generate([[1, 4, 4]], max_new_tokens=5, progress=False) == llmjax.generate(
        params, [[1, 4, 4]], max_new_tokens=5)
    _drain(engine)
    assert mine.finished and mine.token_ids == llmjax.generate(params, [1, 5, 9], max_new_tokens=20)
    assert engine.free_pages == engine.num_pages


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("where", ["send", "account", "release", "finish"])
def test_a_ctrl_c_inside_the_engines_bookkeeping_waits_until_it_is_done(params, monkeypatch, overlap, where):
    """A SIGINT (as Ctrl-C sends it: `_thread.interrupt_main`) that arrives while a call is sent, while
    the engine counts its tokens, or between a finished request's release and finish is held until the
    state is whole: then KeyboardInterrupt, and the engine goes on with every request's exact tokens
    and all its pages back. (Raised there before, it left a donated pool the engine still used, a call
    nobody would land, or a request with no pages that was not finished.)"""
    import _thread

    from llmjax.engine import Engine

    engine = _engine(params, overlap=overlap)
    prompts = [[1, 5, 9], [1, 6, 2, 8], [1, 3], [1, 9, 9, 9, 4]]
    handles = [engine.add_request(p, max_new_tokens=n) for p, n in zip(prompts, (15, 6, 11, 3))]
    engine.step()
    fired = []
    if where == "send":
        executable = Engine._executable

        def sending(self, variant):
            run = executable(self, variant)

            def interrupted(*args):
                out = run(*args)
                if not fired:
                    fired.append(1)
                    _thread.interrupt_main()  # arrives as the call returns, before the pool is taken back
                return out
            return interrupted
        monkeypatch.setattr(Engine, "_executable", sending)
    else:
        name = {"account": "_account", "release": "_release", "finish": "_finish"}[where]
        original = getattr(Engine, name)

        def interrupted(self, *args):
            out = original(self, *args)
            if not fired:  # just after it: the state the next statement completes
                fired.append(1)
                _thread.interrupt_main()
            return out
        monkeypatch.setattr(Engine, name, interrupted)
    with pytest.raises(KeyboardInterrupt):
        _drain(engine)
    assert fired
    _drain(engine)
    assert [h.token_ids for h in handles] == [llmjax.generate(params, p, max_new_tokens=n)
                                              for p, n in zip(prompts, (15, 6, 11, 3))]
    assert all(h.finished for h in handles) and engine.free_pages == engine.num_pages


def test_a_request_is_not_copied_and_an_engine_steps_in_one_thread_at_a_time(params):
    import copy
    import pickle
    import threading

    engine = _engine(params)
    request = engine.add_request([1, 5, 9], max_new_tokens=4)
    assert repr(request) == "Request(id=0, prompt of 3 tokens, 0 of 4 new tokens, finish_reason=None)"
    for duplicate in (copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="a Request is a handle into its Engine and is not copied"):
            duplicate(request)
    engine._stepping.acquire()  # as if another thread were in step()
    try:
        errors = []
        thread = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, engine.step)))
        thread.start()
        thread.join()
        assert "stepping in another thread" in str(errors[0].value)
    finally:
        engine._stepping.release()
    _drain(engine)
    assert request.token_ids == llmjax.generate(params, [1, 5, 9], max_new_tokens=4)


def test_a_dropped_engine_with_requests_running_is_freed_at_once(params):
    """An engine dropped with requests still running (a stream left midway, handles kept) goes, page pool
    and all, as its last reference does, without waiting for Python's cyclic collector: a new Engine
    sizes its pool by the device memory free then. Its handles keep what they had."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        engine = _engine(params)
        handles = [engine.add_request("def f(x):", max_new_tokens=20, stop="zzz"),
                   engine.add_request([1, 5, 9], max_new_tokens=20)]
        stream = engine.stream(handles[0])
        next(stream)
        engine.step()
        assert engine.pending == 2 and engine._flight is not None
        gone = weakref.ref(engine)
        del engine, stream
        assert gone() is None
        assert not any(h.finished for h in handles) and all(h.token_ids for h in handles)
        with pytest.raises(ValueError, match="does not belong to this engine"):
            _engine(params).cancel(handles[1])
        made_by_hand = Request(7, [1, 2], 3, handles[1].sampling, 0, 0, [])
        with pytest.raises(ValueError, match="request 7 does not belong to this engine"):
            _engine(params).cancel(made_by_hand)
    finally:
        gc.enable()


def test_llm_generates_with_its_bar_on_a_stderr_that_is_no_terminal_and_without_one_on_none(params, monkeypatch, capsys):
    """The progress bar goes to stderr, as lines when it is not a terminal; a process without stderr
    (pythonw, some services: sys.stderr is None) gets its outputs without a bar, not tqdm's
    AttributeError after the work."""
    import sys

    prompts = [[1, 5, 9], [1, 7]]
    want = _reference(params, prompts, [3, 3])
    llm = LLM(params, **SMALL)
    assert llm.generate(prompts, max_new_tokens=3) == want
    assert "2/2" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stderr", None)
    assert llm.generate(prompts, max_new_tokens=3) == want
    assert llm.engine.pending == 0


def test_llm_generate_from_several_threads_shares_the_engine(params):
    """Threads calling one LLM's generate at once (a server's pool): a call that finds the engine
    stepped by another waits for that step, whose call advances its requests too; each call gets
    what it gets alone. A call whose requests another thread cancels returns, not raises."""
    import threading

    llm = llmjax.LLM(params, **SMALL)
    rng = np.random.default_rng(3)
    jobs = [(_prompts(rng, int(rng.integers(1, 4)), 20), int(rng.integers(2, 12))) for _ in range(6)]
    alone = [llm.generate(p, max_new_tokens=n, progress=False) for p, n in jobs]
    got, errors = [None] * len(jobs), []

    def call(i):
        try:
            got[i] = llm.generate(jobs[i][0], max_new_tokens=jobs[i][1], progress=False)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == alone
    assert llm.engine.pending == 0 and llm.engine.free_pages == llm.engine.num_pages
    # another thread cancels every request of a call while it runs: the call ends, with what it has
    engine, started = llm.engine, threading.Event()
    original = engine._try_step

    def step_then_cancel():
        started.set()
        for request in list(engine._running) + list(engine._waiting):
            engine.cancel(request)
        return original()

    engine._try_step = step_then_cancel
    try:
        out = llm.generate(jobs[0][0], max_new_tokens=30, progress=False)
    finally:
        del engine._try_step
    assert started.is_set() and len(out) == len(jobs[0][0]) and engine.pending == 0


def test_llm_generate_whose_requests_are_cancelled_returns_while_the_engine_stays_busy(params):
    """Another thread cancels a call's requests while the engine has other work (another user's long
    request): the call returns at its next step, rather than stepping on for the others until the
    engine runs dry (a busy server's would never return)."""
    llm = llmjax.LLM(params, **SMALL)
    engine = llm.engine
    other = engine.add_request([1, 5, 9], max_new_tokens=80)
    original, steps = engine._try_step, []

    def cancel_on_the_second_step():
        steps.append(1)
        if len(steps) == 2:
            for request in list(engine._running) + list(engine._waiting):
                if request is not other:
                    engine.cancel(request)
        return original()

    engine._try_step = cancel_on_the_second_step
    try:
        out = llm.generate([[1, 7, 8], [1, 3]], max_new_tokens=60, progress=False)
    finally:
        del engine._try_step
    assert len(steps) == 2 and len(out) == 2 and not other.finished
    engine.cancel(other)
    assert engine.pending == 0 and engine.free_pages == engine.num_pages


def test_adds_and_cancels_while_another_thread_steps_wait_for_its_step_to_end(params):
    """While a step runs, add_request and cancel from other threads touch no queue or page: they take
    effect as the step ends. A cancel of a request that finishes in that step keeps its reason."""
    engine = _engine(params)
    a = engine.add_request([1, 5, 9], max_new_tokens=12)
    engine.step()
    assert a._admitted and not a.finished
    engine._stepping.acquire()  # as if another thread were in step()
    b = engine.add_request([1, 7, 7, 3], max_new_tokens=5)
    assert engine.cancel(a) and not engine.cancel(a)  # asked once
    assert not a.finished and a._admitted and b not in engine._waiting and engine.pending == 2
    engine._unlock()  # the step ends
    assert a.finish_reason == "cancelled" and not a._pages and b in engine._waiting
    _drain(engine)
    assert b.token_ids == llmjax.generate(params, [1, 7, 7, 3], max_new_tokens=5)
    c = engine.add_request([1, 4], max_new_tokens=2)
    engine._stepping.acquire()
    assert engine.cancel(c)
    while not c.finished:  # the stepping thread's step finishes c
        engine._step()
    engine._unlock()
    assert c.finish_reason == "length" and engine.pending == 0 and engine.free_pages == engine.num_pages


def test_an_add_and_its_cancel_posted_while_the_step_reads_its_mail_are_both_carried_out(params):
    """Another thread adds and cancels a request just after the stepping thread has read the adds
    (and found no more): the cancel met a request still in the inbox, the step raised, and the
    request ran to its end. Now the adds are counted after the cancels, and both are carried out."""
    engine = _engine(params)
    posted, fired = [], []

    class Inbox(collections.deque):
        def __len__(self):
            count = super().__len__()
            if count == 0 and not fired:  # the first look that finds it empty: another thread runs here
                fired.append(True)
                posted.append(engine.add_request([1, 5, 9], max_new_tokens=4))
                assert engine.cancel(posted[0])
            return count
    engine._stepping.acquire()  # a step runs
    a = engine.add_request([1, 4, 4], max_new_tokens=6)  # waits in the inbox
    engine._inbox = Inbox(engine._inbox)
    engine._unlock()  # the step ends and reads its mail
    (r,) = posted
    assert r.finish_reason == "cancelled" and r not in engine._waiting and a in engine._waiting
    assert not engine._inbox and not engine._cancels and not engine.cancel(r)
    _drain(engine)
    assert a.token_ids == llmjax.generate(params, [1, 4, 4], max_new_tokens=6)
    assert engine.pending == 0 and engine.free_pages == engine.num_pages


def test_a_thread_whose_release_a_ctrl_c_cut_short_takes_the_engine_up_again(params):
    """A Ctrl-C can land where Python cannot hold it back, between a step's end and the lock's
    release: the lock stays held by the thread. That thread's next call takes it up again (before,
    every later step said another thread was stepping); other threads still find it held."""
    import threading

    engine = _engine(params)
    assert engine._acquire()  # a step whose release never ran
    request = engine.add_request([1, 5, 9], max_new_tokens=4)  # carried out at once: the lock taken up
    assert request in engine._waiting and not engine._stepping.locked()
    assert engine._acquire()
    errors = []
    other = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, engine.step)))
    other.start()
    other.join()
    assert "stepping in another thread" in str(errors[0].value)
    _drain(engine)
    assert not engine._stepping.locked() and request.token_ids == llmjax.generate(params, [1, 5, 9], max_new_tokens=4)


def test_requests_added_cancelled_and_streamed_from_many_threads_are_their_own(params, monkeypatch):
    """A server's threads: each adds its request and reads its stream (one steps, the others wait for
    its step), one cancels another's request mid-admission; every text is generate's, pages come back."""
    import threading

    from llmjax import engine as engine_module

    engine = _engine(params)
    rng = np.random.default_rng(12)
    words = ["def", "class", "return", "import", "for", "while"]
    prompts = [" ".join(rng.choice(words, 4)) for _ in range(8)]
    stops = [None, "\n", None, "e", None, None, "(", None]
    texts, errors = {}, []

    def client(i):
        try:
            request = engine.add_request(prompts[i], max_new_tokens=24, stop=stops[i])
            texts[i] = "".join(engine.stream(request))
        except BaseException as e:  # (pytest sees no thread's exception)
            errors.append(e)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [texts[i] for i in range(8)] == [llmjax.generate(params, p, max_new_tokens=24, stop=s)
                                           for p, s in zip(prompts, stops)]
    assert engine.pending == 0 and engine.free_pages == engine.num_pages

    # A reader that found the engine held by an add (not a step) goes on once it is let go.
    request = engine.add_request(prompts[0], max_new_tokens=24)
    engine._stepping.acquire()  # as `_post` holds it for a moment
    reader = threading.Thread(target=lambda: texts.update(late="".join(engine.stream(request))))
    reader.start()
    time.sleep(0.2)
    engine._unlock()
    reader.join(timeout=60)
    assert not reader.is_alive() and texts["late"] == texts[0]

    # A cancel from another thread while the step admits the request (it once left the engine broken).
    admitting, piece = threading.Event(), engine_module.Engine._piece

    def slow_piece(self, request, rows):
        admitting.set()
        time.sleep(0.05)
        return piece(self, request, rows)
    monkeypatch.setattr(engine_module.Engine, "_piece", slow_piece)
    a = engine.add_request([1, 5, 6, 7], max_new_tokens=30)  # more than a call gives it
    b = engine.add_request([1, 8, 9, 10], max_new_tokens=3)
    stepper = threading.Thread(target=engine.step)
    stepper.start()
    admitting.wait()
    assert engine.cancel(a)
    stepper.join()
    monkeypatch.undo()
    _drain(engine)
    assert a.finish_reason == "cancelled" and b.token_ids == llmjax.generate(params, [1, 8, 9, 10], max_new_tokens=3)
    assert engine.pending == 0 and engine.free_pages == engine.num_pages


def _drain(engine, limit: int = 50) -> None:
    for _ in range(limit):  # bounded: a lost call once left requests waiting for tokens forever
        if not engine.pending:
            return
        engine.step()


@pytest.mark.parametrize("overlap", [True, False])
def test_an_interrupt_between_rows_of_a_landing_call_loses_nothing(params, monkeypatch, overlap):
    """Ctrl-C after the first row of a call has its tokens: the next step hands the other rows theirs."""
    from llmjax.engine import Engine

    engine = _engine(params, overlap=overlap)
    prompts = [[1, 5, 9], [1, 6, 2, 8], [1, 3]]
    handles = [engine.add_request(p, max_new_tokens=15) for p in prompts]
    engine.step()
    engine.step()
    check_end = Engine._check_end

    def interrupted(self, request):
        check_end(self, request)
        monkeypatch.setattr(Engine, "_check_end", check_end)  # once
        raise KeyboardInterrupt
    monkeypatch.setattr(Engine, "_check_end", interrupted)
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    _drain(engine)
    assert [h.token_ids for h in handles] == llmjax.generate(params, prompts, max_new_tokens=15)
    assert engine.free_pages == engine.num_pages


@pytest.mark.parametrize("platform, device_kind", [("rocm", "gfx942"), ("cuda", "NVIDIA H200")])
def test_engine_step_lowers_for_gpu(platform, device_kind):
    """The whole step (mixed prefill + decode iteration, the decode loop, sampling with filters)
    lowers for AMD and NVIDIA on a CPU-only machine (lowered, not run)."""
    import functools

    from jax.sharding import AbstractDevice, AbstractMesh, AxisType

    from llmjax import cache as kv, engine
    from llmjax.models.llama import Llama, abstract_params

    config = LlamaConfig.preset("tiny")
    rows, width, chunk_rows, row_len = 4, 3, 2, 8
    i32 = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
    knobs = {"temperature": jax.ShapeDtypeStruct((rows,), jnp.float32), "top_k": i32((rows,)),
             "top_p_cut": jax.ShapeDtypeStruct((rows,), jnp.float32), "min_p": jax.ShapeDtypeStruct((rows,), jnp.float32)}
    decode = engine._Rows(i32((rows,)), i32((rows,)), jax.ShapeDtypeStruct((rows,), jnp.bool_), i32((rows,)),
                          i32((rows,)), i32((rows, width)), jax.ShapeDtypeStruct((rows, 2), jnp.uint32), knobs)
    chunk = engine._Chunk(i32((chunk_rows, row_len)), i32((chunk_rows, row_len)),
                          jax.ShapeDtypeStruct((chunk_rows, row_len), jnp.bool_), i32((chunk_rows, width)),
                          i32((chunk_rows,)), i32((chunk_rows,)))
    pool = jax.eval_shape(lambda: kv.PagedKVCache.zeros(config, 16, 8, jnp.bfloat16))
    fn = functools.partial(engine._engine_call, model=Llama(config, jnp.bfloat16), steps=4, greedy=False,
                           filters=True, out_rows=rows)
    mesh = AbstractMesh((1,), ("data",), axis_types=(AxisType.Auto,),
                        abstract_device=AbstractDevice(device_kind=device_kind, num_cores=None, platform="gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        text = jax.jit(fn).trace(abstract_params(config, jnp.bfloat16), pool, decode, chunk, i32((1,))).lower(
            lowering_platforms=(platform,)).as_text()
    assert "stablehlo.while" in text and "stablehlo.sort" in text and "tensor<16x8x2x16xbf16>" in text


def test_gemm_setting_asks_xla_for_triton_products_on_nvidia_only(monkeypatch):
    """LLMJAX_GEMM=triton turns into XLA's option on an NVIDIA GPU and into nothing elsewhere; other
    values are refused, naming the choices."""
    from llmjax.kernels import dispatch

    monkeypatch.setenv("LLMJAX_GEMM", "triton")
    monkeypatch.setattr(dispatch, "compute_capability", lambda device=None: None)  # a CPU or a rocm GPU
    assert dispatch.gemm_options() == {}
    monkeypatch.setattr(dispatch, "compute_capability", lambda device=None: "9.0")
    assert dispatch.gemm_options() == {"xla_gpu_experimental_disable_binary_libraries": True}
    monkeypatch.setenv("LLMJAX_GEMM", "auto")
    assert dispatch.gemm_options() == {}
    monkeypatch.setenv("LLMJAX_GEMM", "cublas")
    with pytest.raises(ValueError, match="LLMJAX_GEMM must be one of auto, triton, got 'cublas'"):
        dispatch.gemm_options()


def test_jax_clear_caches_frees_the_engines_programs_and_the_engine_compiles_again(params):
    """The engine's compiled steps and token gathers are kept per model and engine size for the
    process's life (each engine size its own); `jax.clear_caches()`, a notebook's way to free
    compiled programs, empties them with jax's own, and a live engine compiles what it next needs."""
    engine_module = importlib.import_module("llmjax.engine")
    llm = LLM(params, **SMALL)
    prompts = [[1, 5, 9], [1, 7], [1, 4, 4, 8]]
    first = llm.generate(prompts, max_new_tokens=12, progress=False)
    assert engine_module._EXECUTABLES and engine_module._FEEDS
    jax.clear_caches()
    assert not engine_module._EXECUTABLES and not engine_module._FEEDS
    compiled = llm.engine.stats.compiled
    assert llm.generate(prompts, max_new_tokens=12, progress=False) == first
    assert llm.engine.stats.compiled > compiled and engine_module._EXECUTABLES and engine_module._FEEDS
