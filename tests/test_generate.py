"""generate, stream and logits: return types, stopping, budgets, seeds, and bad input."""

import dataclasses
import enum
import importlib
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax

from conftest import hf_config, needs_devices, save_hf_model

# The module; `llmjax.generate` is the function of the same name.
gen = importlib.import_module("llmjax.generate")


@pytest.fixture(scope="module")
def params(tmp_path_factory, sp_dir):
    folder = tmp_path_factory.mktemp("model")
    save_hf_model(folder, hf_config(vocab_size=600, max_position_embeddings=64), seed=3, tokenizer_dir=sp_dir)
    return llmjax.load(folder)


def _no_eos(params):
    return dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=()))


def test_return_types_follow_the_prompt(params):
    p = _no_eos(params)
    text = llmjax.generate(p, "def f(x):", max_new_tokens=5)
    assert isinstance(text, str) and text
    texts = llmjax.generate(p, ["def f(x):", "import json"], max_new_tokens=5)
    assert isinstance(texts, list) and texts[0] == text
    ids = llmjax.generate(p, [1, 5, 9], max_new_tokens=5)
    assert isinstance(ids, list) and len(ids) == 5 and all(isinstance(t, int) for t in ids)
    batch = llmjax.generate(p, [[1, 5, 9], [1, 7]], max_new_tokens=5)
    assert batch[0] == ids and len(batch[1]) == 5
    assert llmjax.generate(p, np.array([1, 5, 9]), max_new_tokens=5) == ids
    assert llmjax.generate(p, [1, 5, 9], max_new_tokens=np.int64(5), seed=np.int32(0)) == ids
    assert llmjax.generate(p, [np.uint16(1), enum.IntEnum("E", {"A": 5}).A, 9], max_new_tokens=5) == ids
    import torch

    assert llmjax.generate(p, torch.tensor([[1, 5, 9]]), max_new_tokens=5) == [ids]
    # a list of rows, each an array of any library
    assert llmjax.generate(p, [jnp.array([1, 5, 9]), torch.tensor([1, 7]), np.array([3])], max_new_tokens=5) == \
        llmjax.generate(p, [[1, 5, 9], [1, 7], [3]], max_new_tokens=5)
    assert np.array_equal(llmjax.logits(p, [jnp.array([1, 5]), np.array([1, 7])]), llmjax.logits(p, [[1, 5], [1, 7]]))



def test_zero_dimensional_arrays_pass_as_the_numbers_they_hold(params):
    """`np.array(5)`, a jax scalar out of a computation, a torch scalar: each is the number it holds,
    for max_new_tokens, the sampling knobs and the seed, in generate and stream alike."""
    import torch

    p = _no_eos(params)
    knobs = dict(max_new_tokens=5, temperature=0.7, top_k=50, top_p=0.9, min_p=0.01, seed=3)
    want = llmjax.generate(p, [1, 5, 9], **knobs)
    for wrap in (np.array, jnp.array, torch.tensor):
        assert llmjax.generate(p, [1, 5, 9], **{k: wrap(v) for k, v in knobs.items()}) == want
    text = llmjax.generate(p, "def f(x):", **knobs)
    assert "".join(llmjax.stream(p, "def f(x):", **{k: jnp.array(v) for k, v in knobs.items()})) == text
    # token ids as 0-d arrays (ids taken from `jnp.argmax(logits)`), as `decode` takes them
    ids = [np.array(1), jnp.array(5), torch.tensor(9)]
    assert llmjax.generate(p, ids, max_new_tokens=5) == llmjax.generate(p, [1, 5, 9], max_new_tokens=5)
    assert np.array_equal(llmjax.logits(p, ids), llmjax.logits(p, [1, 5, 9]))
    with pytest.raises(ValueError, match=r"item 1 of the prompt is np.True_ \(bool\)"):
        llmjax.generate(p, [np.array(1), np.array(True)])
    # a 0-d bool is still no number, and an array of several is still refused
    with pytest.raises(ValueError, match="max_new_tokens must be an integer"):
        llmjax.generate(p, [1, 5, 9], max_new_tokens=np.array(True))
    with pytest.raises(ValueError, match="seed must be"):
        llmjax.generate(p, [1, 5, 9], seed=jnp.array([1, 2]))

def test_seeds_differ_in_their_high_bits_and_a_huge_top_k_keeps_the_vocabulary(params):
    """A 64-bit seed is taken whole (jax.random.key alone keeps the low 32 bits); a top_k past
    int32 means the whole vocabulary (it wrapped to 1, or to 0, in the knobs' int32 arrays), in
    generate and in the engine alike."""
    p, prompts = _no_eos(params), [[1, 5, 9], [1, 7], [3], [1, 2, 3, 4]]
    draw = lambda seed, **kw: llmjax.generate(p, prompts, max_new_tokens=8, temperature=1.0, seed=seed, **kw)
    base = draw(0)
    assert draw(2**32) != base and draw(-1) != draw(2**32 - 1) and draw(-2**63) != base
    assert draw(2**32 + 5) == draw(2**32 + 5)
    assert jax.random.key_data(gen.seed_key(7)).tolist() == jax.random.key_data(jax.random.key(7)).tolist()
    assert draw(0, top_k=2**32 + 1) == draw(0, top_k=2**31) == base
    llm = llmjax.LLM(p, max_slots=4, page_size=8, prefill_tokens=64, prefill_row=16)
    assert llm.generate(prompts, max_new_tokens=8, temperature=1.0, seed=0, top_k=2**40, progress=False) == base
    assert llm.generate(prompts, max_new_tokens=8, temperature=1.0, seed=2**32, progress=False) == draw(2**32)
    # The engine's request keys (one compiled call on the host) are generate's (seed, index) keys.
    from llmjax.engine import _key_data
    for seed in (0, 7, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, -1, -2**31, -2**63, 2**63 - 1):
        for index in (0, 1, 999, 2**32 - 1):
            low, high = seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF  # the fold, eagerly, as first written
            key = jax.random.key(low) if not high else jax.random.fold_in(jax.random.key(low), high)
            assert jax.random.key_data(gen.seed_key(seed)).tolist() == jax.random.key_data(key).tolist(), seed
            want = jax.random.key_data(jax.random.fold_in(key, index))
            assert _key_data(seed, index).tolist() == want.tolist(), (seed, index)


def test_init_random_takes_whole_64_bit_seeds():
    weights = lambda seed: jax.tree.leaves(llmjax.init_random("tiny", dtype="float32", seed=seed).weights)
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(a, b))
    base = weights(0)
    assert not same(weights(2**32), base) and not same(weights(-1), weights(2**32 - 1))
    assert same(weights(np.int64(2**32)), weights(2**32))
    for bad in (1.5, True, 2**64, "3"):
        with pytest.raises(ValueError, match=r"seed must be a signed 64-bit integer, in \[-2\*\*63, 2\*\*63\)"):
            llmjax.init_random("tiny", seed=bad)


def test_text_continues_the_prompt_as_one_decode_would(params):
    p = _no_eos(params)
    for prompt in ("class A:", "import json", "x"):
        prompt_ids = p.tokenizer.encode(prompt)
        ids = llmjax.generate(p, prompt_ids, max_new_tokens=12)
        whole = p.tokenizer.decode(prompt_ids + ids)
        assert whole.startswith(prompt)
        assert prompt + llmjax.generate(p, prompt, max_new_tokens=12) == whole
        assert prompt + "".join(llmjax.stream(p, prompt, max_new_tokens=12)) == whole


def test_a_stream_stopped_part_way_says_so_when_read_again(params):
    """A stream's generator ends for good at an interrupt; read again (a notebook cell run twice), it
    says so rather than yielding nothing, which would cut the text short unseen."""
    stream = llmjax.stream(params, "def f", max_new_tokens=8)
    next(stream)

    def interrupted():
        raise KeyboardInterrupt
        yield
    stream._pieces = interrupted()  # as a Ctrl-C inside the stream's decode step
    with pytest.raises(KeyboardInterrupt):
        next(stream)
    with pytest.raises(RuntimeError, match=r"this stream stopped part way \(KeyboardInterrupt\).*llmjax.stream"):
        next(stream)
    assert repr(stream) == f"<llmjax Stream: prompt of {stream.stats.prompt_tokens} tokens, up to 8 new>"


def test_a_stream_closes_as_a_generator_does(params):
    """`close()` (a server whose client went away, `contextlib.closing`) ends the stream: no more
    tokens, stats counting those made, and reading on gives nothing; the next stream is whole."""
    import contextlib

    p = _no_eos(params)
    whole = "".join(llmjax.stream(p, "def f", max_new_tokens=12))
    with contextlib.closing(llmjax.stream(p, "def f", max_new_tokens=12)) as stream:
        first = next(stream)
    assert whole.startswith(first) and 1 <= stream.stats.new_tokens < 12
    assert list(stream) == []
    unread = llmjax.stream(p, "def f", max_new_tokens=12)
    unread.close()
    assert list(unread) == [] and unread.stats.new_tokens == 0
    assert "".join(llmjax.stream(p, "def f", max_new_tokens=12)) == whole



def test_threads_sharing_a_stream_take_its_pieces_in_turn(params):
    """A generator stepped from two threads at once raises in one of them; a stream serves each in turn."""
    p = _no_eos(params)
    want = list(llmjax.stream(p, "def f(x):", max_new_tokens=40))
    shared, got, errors = llmjax.stream(p, "def f(x):", max_new_tokens=40), [], []

    def drain():
        try:
            got.extend(shared)
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=drain) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sorted(got) == sorted(want) and len(want) > 3

def test_a_thread_waiting_on_a_stream_that_fails_meanwhile_is_told_it_stopped(params):
    """A thread that waits for its turn while another's piece fails gets the stream's error, not a
    silent end of the stream (the rest of the text would go unsaid)."""
    stream = llmjax.stream(_no_eos(params), "def f(x):", max_new_tokens=4)
    waiting, results = threading.Event(), []

    class Lock:  # the stream's lock, telling when the second thread waits on it
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            if threading.current_thread() is not threading.main_thread():
                waiting.set()
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    def failing():  # run by the main thread, holding the lock
        other.start()
        assert waiting.wait(60)
        raise MemoryError("out of memory")
        yield  # noqa: unreachable (a generator)

    def second():
        try:
            results.append(next(stream))
        except BaseException as e:  # noqa: BLE001 (checked below)
            results.append(e)

    stream._lock, stream._pieces = Lock(stream._lock), failing()
    other = threading.Thread(target=second)
    with pytest.raises(MemoryError):
        next(stream)
    other.join(60)
    assert len(results) == 1 and isinstance(results[0], RuntimeError), results
    assert "stopped part way (MemoryError)" in str(results[0])


def test_stream_yields_what_generate_returns(params):
    p = _no_eos(params)
    pieces = list(llmjax.stream(p, "for i in range(", max_new_tokens=20))
    assert len(pieces) > 1
    assert "".join(pieces) == llmjax.generate(p, "for i in range(", max_new_tokens=20)
    s = llmjax.stream(p, "x = ", max_new_tokens=7, temperature=0.8, seed=5)
    assert "".join(s) == llmjax.generate(p, "x = ", max_new_tokens=7, temperature=0.8, seed=5)
    assert s.stats.new_tokens == 7 and s.stats.prompt_tokens == len(p.tokenizer.encode("x = "))


@pytest.fixture(scope="module")
def sp_json_dir(sp_dir, tmp_path_factory):
    """sp_dir's tokenizer as transformers converts it: a tokenizer.json whose decoder renders a byte
    run that is not valid UTF-8 as one U+FFFD per byte (ByteFallback), the file a Llama-2 release has."""
    import transformers

    folder = tmp_path_factory.mktemp("sp_json")
    transformers.AutoTokenizer.from_pretrained(sp_dir).save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    return folder


@pytest.mark.parametrize("which", ["sp_dir", "sp_json_dir"])
def test_streamed_text_is_one_decodes_text_for_any_ids(request, which):
    # Special tokens (no text), lone and repeated "▁" pieces, byte pieces that make up characters
    # over several tokens (and bytes that are characters alone, 0x11 and 0x41, which a ByteFallback
    # decoder turns into U+FFFD beside an invalid byte), and ordinary pieces, in random runs: the pieces
    # the detokenizer releases join to the text one decode of everything gives, with and without stop
    # strings.
    tok = llmjax.Tokenizer.from_dir(request.getfixturevalue(which))
    assert type(tok._backend).__name__ == ("_SentencePieceBackend" if which == "sp_dir" else "_HFTokenizersBackend")
    after_a = {i: tok.decode([100, i])[len(tok.decode([100])):] for i in range(600)}
    spaces = [i for i, text in after_a.items() if text and set(text) == {" "}]
    assert len(spaces) >= 3
    assert tok.decode([3 + 0xC3, 3 + 0xA9]) == "é"  # ids 3-258 are the byte pieces <0x00>-<0xFF>
    byte = [3 + b for b in (0xC3, 0xE4, 0xF0, 0xA9, 0xBD, 0x80, 0x11, 0x41)]  # lead bytes of 2, 3 and 4; continuations
    pool = [0, 1, 2] + spaces + byte * 3 + list(range(3, 600, 7))
    rng = np.random.default_rng(0)
    for trial in range(300):
        prompt = rng.choice(pool, rng.integers(0, 12)).tolist()
        new = rng.choice(pool, rng.integers(1, 30)).tolist()
        whole = gen._continuation(tok, prompt, new)
        stops = [] if trial % 3 else [whole[len(whole) // 2:len(whole) // 2 + 2] or "\x00"]
        detok = gen._Detokenizer(tok, prompt, stops)
        text = "".join(detok.push(t) for t in new) + detok.flush()
        assert text == gen._cut_at_stop(whole, stops)[0], (prompt, new, stops)


def test_a_byte_run_from_the_prompt_into_the_new_ids_does_not_stall_the_stream(sp_json_dir):
    # The prompt ends in "é" as two byte tokens; a third byte continues the run and makes it invalid,
    # so a ByteFallback decoder renders the prompt's "é" as U+FFFD U+FFFD, and the text generate gives
    # is the new ids decoded alone. Once an ordinary token ends the run, the text comes as it is
    # decoded (it used to come only at the end, and stop strings went unseen until then).
    tok = llmjax.Tokenizer.from_dir(sp_json_dir)
    e_acute = [3 + 0xC3, 3 + 0xA9]
    words = [i for i in range(300, 600) if tok.decode([i]).strip().isalpha()][:6]
    for silent in ([], [2]):  # a skipped special token between the prompt's bytes and the new byte
        prompt, new = [100] + e_acute + silent, [3 + 0xA9] + words
        whole = gen._continuation(tok, prompt, new)
        assert not tok.decode(prompt + new).startswith(tok.decode(prompt))  # the prompt's text was rewritten
        detok = gen._Detokenizer(tok, prompt, [])
        pieces = [detok.push(t) for t in new]
        assert pieces[0] == "" and all(pieces[1:]), pieces  # held in the run, then one piece a token
        assert "".join(pieces) + detok.flush() == whole
        stop = tok.decode(words[2:4])
        detok = gen._Detokenizer(tok, prompt, [stop])
        text = "".join(detok.push(t) for t in new[:5])
        assert detok.stopped and text == whole[:whole.find(stop)]


def test_eos_ends_generation_and_is_kept_in_ids(params):
    first = llmjax.generate(_no_eos(params), [1, 5, 9], max_new_tokens=4)
    p = dataclasses.replace(params, config=dataclasses.replace(params.config, eos_token_ids=(first[2],)))
    assert llmjax.generate(p, [1, 5, 9], max_new_tokens=10) == first[:3]
    text = llmjax.generate(p, p.tokenizer.decode([5, 9]), max_new_tokens=10)
    assert isinstance(text, str)


def test_stop_strings_cut_text_in_generate_and_stream(params):
    p = _no_eos(params)
    full = llmjax.generate(p, "def f(x):", max_new_tokens=24)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    expected = full[:full.find(stop)]
    assert llmjax.generate(p, "def f(x):", max_new_tokens=24, stop=stop) == expected
    assert llmjax.generate(p, "def f(x):", max_new_tokens=24, stop=["\x00never", stop]) == expected
    assert "".join(llmjax.stream(p, "def f(x):", max_new_tokens=24, stop=stop)) == expected


def test_seeds_reproduce_and_differ(params):
    p = _no_eos(params)
    a = llmjax.generate(p, [1, 5], max_new_tokens=16, temperature=1.0, seed=1)
    assert a == llmjax.generate(p, [1, 5], max_new_tokens=16, temperature=1.0, seed=1)
    assert a != llmjax.generate(p, [1, 5], max_new_tokens=16, temperature=1.0, seed=2)
    filtered = llmjax.generate(p, [1, 5], max_new_tokens=16, temperature=1.0, top_k=3, top_p=0.9, seed=1)
    assert len(filtered) == 16


def test_first_tokens_follow_transformers_warped_distribution(params):
    """Prompt i of a list draws from its own key (seed, i), so 2048 copies of a prompt are 2048 draws of
    its first token: they follow the distribution transformers' warpers make of the prompt's logits
    (an LM head scaled up spreads them over 12, so temperature and top-p change it). Sampling noise
    is about 0.025 in total variation (0.018-0.031 over ten seeds); a draw with temperature 1 or 2
    instead of 1.5 is 0.16 or 0.10 away (measured: at least 0.14 and 0.09)."""
    from test_sampling import warped_probs

    p = _no_eos(params)
    p = dataclasses.replace(p, weights=dict(p.weights, lm_head={"kernel": p.weights["lm_head"]["kernel"] * 8}))
    knobs = dict(temperature=1.5, top_k=12, top_p=0.9)
    want = warped_probs(np.asarray(llmjax.logits(p, [1, 5, 9]))[0, -1], **knobs)
    drawn = [ids[0] for ids in llmjax.generate(p, [[1, 5, 9]] * 2048, max_new_tokens=1, seed=0, **knobs)]
    got = np.bincount(drawn, minlength=want.size) / len(drawn)
    assert got[want == 0].sum() == 0 and 4 < np.count_nonzero(want) < 12
    assert 0.5 * np.abs(got - want).sum() < 0.05


def test_rows_steps_and_seeds_draw_independently(params):
    """With the LM head zeroed every logit ties, so each token is a uniform draw over the 600 ids and
    any two draws agree with probability 1/600: rows (copies of one prompt), steps of a row and the
    same row under another seed. A key shared between rows, steps or seeds would repeat its token
    (agreement ~1); the counts stay uniform (chi-square ~599 +- 35)."""
    p = _no_eos(params)
    p = dataclasses.replace(p, weights=dict(p.weights, lm_head={"kernel": p.weights["lm_head"]["kernel"] * 0}))
    draws = np.array(llmjax.generate(p, [[1, 5, 9]] * 2048, max_new_tokens=2, temperature=1.0, seed=0))
    other = np.array(llmjax.generate(p, [[1, 5, 9]] * 2048, max_new_tokens=2, temperature=1.0, seed=1))
    for a, b in [(draws[:, 0], draws[:, 1]), (draws[1:, 0], draws[:-1, 0]), (draws[:, 0], other[:, 0])]:
        assert np.mean(a == b) < 0.01
    for tokens in (draws[:, 0], draws[:, 1], other[:, 0]):
        counts = np.bincount(tokens, minlength=600)
        assert counts.size == 600 and ((counts - 2048 / 600) ** 2 / (2048 / 600)).sum() < 800


def test_more_prompts_than_one_batch(params, monkeypatch):
    p = _no_eos(params)
    prompts = [[1, 5 + i, 9] for i in range(5)]
    sampled = llmjax.generate(p, prompts, max_new_tokens=6, temperature=1.0, seed=4)
    monkeypatch.setattr(gen, "MAX_BATCH", 2)
    assert llmjax.generate(p, prompts, max_new_tokens=4) == [
        llmjax.generate(p, q, max_new_tokens=4) for q in prompts]
    # Prompt i samples from (seed, i), however the list is split into batches.
    assert llmjax.generate(p, prompts, max_new_tokens=6, temperature=1.0, seed=4) == sampled
    assert sampled[0] == llmjax.generate(p, prompts[0], max_new_tokens=6, temperature=1.0, seed=4)


def test_chat_prompt_gets_no_second_bos(params):
    text = params.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text.startswith("<s>")
    ids = gen._encode(params, text)
    assert ids[0] == 1 and ids[1] != 1


def test_logits_shapes_and_padding_invariance(params):
    one = np.asarray(llmjax.logits(params, [1, 5, 9, 4]))
    assert one.shape == (1, 4, 600) and one.dtype == np.float32
    two = np.asarray(llmjax.logits(params, [[1, 5, 9, 4], [1, 7, 7, 7]]))
    np.testing.assert_allclose(two[0], one[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(llmjax.logits(params, [1, 5]))[0], one[0, :2], rtol=1e-5, atol=1e-5)


def test_logits_of_other_lengths_and_batches_in_a_warm_bucket_compile_nothing(params, caplog):
    """On a CPU the padding is cut off on the host: cutting it on the device compiled a program for
    every length, and each one stayed in memory (a user scoring texts of many lengths ran out)."""
    ids = np.random.default_rng(4).integers(3, 600, 32).tolist()
    whole = np.asarray(llmjax.logits(params, [ids] * 4))  # the 32-token bucket, the batch of 4
    assert whole.shape == (4, 32, 600)
    with jax.log_compiles(True), caplog.at_level(logging.WARNING):
        cut = {(n, b): llmjax.logits(params, [ids[:n]] * b) for n in (17, 23, 31) for b in (3, 4)}
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert [m for m in compiled if "slice" not in m] == []  # never the model again
    if jax.default_backend() == "cpu":  # and on a CPU nothing (a GPU compiles a slice per shape)
        assert compiled == []
    for (n, b), out in cut.items():
        assert out.shape == (b, n, 600) and isinstance(out, jax.Array)
        np.testing.assert_allclose(np.asarray(out), whole[:b, :n], rtol=1e-5, atol=1e-5)
    many = np.asarray(llmjax.logits(params, [ids[:20]] * 9))  # 16 rows computed (a multiple of 8 past 8)
    assert many.shape == (9, 20, 600)
    np.testing.assert_allclose(many, np.broadcast_to(whole[:1, :20], many.shape), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda p: llmjax.generate(p, "x", max_new_tokens=0), "max_new_tokens"),
    (lambda p: llmjax.generate(p, "x", max_new_tokens=2.5), "max_new_tokens"),
    (lambda p: llmjax.generate(p, [1] * 65), "leaves no room in the model's context of 64"),
    (lambda p: llmjax.generate(p, [1] * 64, max_new_tokens=1), "^a prompt of 64 tokens leaves no room"),
    (lambda p: llmjax.generate(p, [[1] * 3, [1] * 40], max_new_tokens=30), "^prompt 1 of 40 tokens plus.*at most 24"),
    (lambda p: llmjax.generate(p, [1] * 40, max_new_tokens=30), "at most 24"),
    (lambda p: llmjax.generate(p, [1, 600]), r"^prompt has token ids outside the vocabulary \[0, 600\): \[600\]"),
    (lambda p: llmjax.generate(p, [[1], [1, 600]]), r"^prompt 1 has token ids outside the vocabulary"),
    (lambda p: llmjax.generate(p, [1, -3]), "outside the vocabulary"),
    (lambda p: llmjax.generate(p, []), "prompt is empty.*pass at least one prompt"),
    (lambda p: llmjax.LLM(p).generate([]), "prompt is empty"),
    (lambda p: llmjax.generate(p, [[1], []]), "prompt 1 is empty"),
    (lambda p: llmjax.generate(p, [1, "a"]), "mixed"),
    (lambda p: llmjax.generate(p, [1, True]), r"token ids must be integers .* item 1 of the prompt is True \(bool\)"),
    (lambda p: llmjax.generate(p, [1.0, 5.0]), r"token ids must be integers .* item 0 of the prompt is 1.0 \(float\)"),
    (lambda p: llmjax.logits(p, [1, np.float32(5)]), r"item 1 of the prompt is np.float32\(5.0\) \(float32\)"),
    (lambda p: llmjax.generate(p, [[1, 2], [np.int32(1), 2.0]]), "mixed"),
    (lambda p: llmjax.generate(p, [1, 2], stop="x"), "stop strings apply to text"),
    (lambda p: llmjax.generate(p, "x", stop=[""]), "stop must be"),
    (lambda p: llmjax.generate(p, "x", temperature=-1), "temperature"),
    (lambda p: llmjax.generate(p, "x", top_p=2), "top_p"),
    (lambda p: llmjax.generate(p, "x", seed="s"), "seed"),
    (lambda p: llmjax.generate(p, "x", seed=2**64), "signed 64-bit"),
    (lambda p: llmjax.generate(p, "x", stop=5), "stop must be"),
    (lambda p: llmjax.generate(p, "x", stop=[]), "stop must be"),
    (lambda p: llmjax.stream(p, ["a", "b"]), "one prompt"),
    (lambda p: llmjax.logits(p, "text"), "encode text"),
    (lambda p: llmjax.logits(p, [[1, 2], [1]]), "equal length"),
    (lambda p: llmjax.logits(p, [1] * 65), "context of 64"),
    (lambda p: llmjax.generate(dataclasses.replace(p, tokenizer=None), "x"), "no tokenizer"),
    # numpy integers wrapped or overflowed in the context check, which then passed
    (lambda p: llmjax.generate(p, [1] * 40, max_new_tokens=np.int16(32760)), "at most 24"),
    (lambda p: llmjax.generate(p, [1] * 40, max_new_tokens=np.int64(2**63 - 1)), "at most 24"),
    (lambda p: llmjax.generate(p, [1] * 40, max_new_tokens=np.uint8(200)), "at most 24"),
    (lambda p: llmjax.stream(p, [1] * 40, max_new_tokens=np.int32(2**31 - 1)), "at most 24"),
    # the model's name where its params go
    (lambda p: llmjax.generate("tiny-stdlib", "x"), r"params must be llmjax Params .* got str; load them "
                                                    r"first: params = llmjax.load\('tiny-stdlib'\)"),
    (lambda p: llmjax.stream(None, "x"), "params must be llmjax Params"),
    (lambda p: llmjax.logits(None, [1, 2]), "params must be llmjax Params"),
    (lambda p: llmjax.perplexity({}, "x"), "params must be llmjax Params"),
    (lambda p: llmjax.LLM("model"), "params must be llmjax Params"),
    (lambda p: llmjax.generate(p, [jnp.array([1, 2]), jnp.array([1.0])]), "mixed"),
])
def test_bad_input_is_refused_with_a_reason(params, call, match):
    with pytest.raises(ValueError, match=match):
        call(params)


@pytest.mark.parametrize("call, error, match", [
    (lambda: llmjax.init_random(None), TypeError, "config must be an llmjax.LlamaConfig or a preset's name"),
    (lambda: llmjax.init_random("tiny", tokenizer="tiny-stdlib"), TypeError, "tokenizer must be an llmjax Tokenizer"),
    (lambda: llmjax.load(None), TypeError, "the model path must be a folder's path or a bundled model's name"),
    (lambda: llmjax.load(""), ValueError, "the model path must be .* got ''"),
])
def test_params_entry_points_name_a_wrong_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_a_batch_whose_cache_cannot_fit_names_the_fixes():
    """64 rows with room for 32768 tokens of 64 kv heads of 256 (512 GiB of keys and values): a
    MemoryError that says what to lower, not XLA's RESOURCE_EXHAUSTED."""
    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_heads=64, num_kv_heads=64, head_dim=256,
                                 max_position_embeddings=32768)
    params = llmjax.init_random(config, dtype="float32")
    with pytest.raises(MemoryError, match=r"generating 64 prompts at once ran out of device memory: the call "
                                          r"holds 64 rows with room for 32768 tokens each \(549755813888 bytes.*"
                                          r"pass fewer prompts per call or a smaller max_new_tokens"):
        llmjax.generate(params, [[1, 2]] * 64, max_new_tokens=32000)


def _exhausted(*args, **kwargs):
    raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68862607360 bytes")


def test_logits_and_stream_out_of_memory_name_the_fixes(monkeypatch):
    """XLA's RESOURCE_EXHAUSTED from `logits` and `stream` becomes a MemoryError that names the sizes and
    what to lower, as `generate`'s does."""
    gen = importlib.import_module("llmjax.generate")

    params = llmjax.load("tiny-stdlib")
    with monkeypatch.context() as m:
        m.setattr(gen, "_forward", _exhausted)
        with pytest.raises(MemoryError, match=r"logits of 3 rows of 5 tokens ran out of device memory: the call "
                                              r"computes 4 rows of \d+ positions.*pass fewer rows"):
            llmjax.logits(params, [[1, 2, 3, 4, 5]] * 3)
    compile_stream = gen.Stream._compile
    for failing in (lambda self, bucket: (_exhausted, *compile_stream(self, bucket)[1:]), _exhausted):  # run, compile
        monkeypatch.setattr(gen.Stream, "_compile", failing)
        with pytest.raises(MemoryError, match=r"streaming ran out of device memory: the cache has room for \d+ "
                                              r"tokens \(\d+ bytes.*a prompt of 3 tokens and max_new_tokens=9; pass"):
            next(iter(llmjax.stream(params, [1, 2, 3], max_new_tokens=9)))


def test_random_params_need_no_files():
    p = llmjax.init_random("tiny", dtype="float32", seed=1)
    assert "tiny" not in repr(p) and "no tokenizer" in repr(p)
    out = llmjax.generate(p, [[3, 4, 5]], max_new_tokens=3)
    assert len(out[0]) <= 3


def test_a_changed_kernel_setting_traces_the_program_again(params, monkeypatch):
    """The jitted programs take the model as a static argument, and the model carries the LLMJAX_*
    settings it is traced under: after LLMJAX_NORM=interpret, LLMJAX_NORM=off traces the norms'
    reference instead of reusing the kernels' program; the same settings again reuse it."""
    from llmjax.kernels import rms_norm

    traced, reference = [], rms_norm.rms_norm_reference
    monkeypatch.setattr(rms_norm, "rms_norm_reference", lambda *a, **k: traced.append(1) or reference(*a, **k))
    runs = {}
    for mode in ("interpret", "off", "off", "interpret"):
        monkeypatch.setenv("LLMJAX_NORM", mode)
        traced.clear()
        tokens = llmjax.generate(params, [[3, 4, 5, 6]], max_new_tokens=3)
        runs.setdefault(mode, []).append((len(traced), tokens))
    assert runs["interpret"][0][0] == 0 and runs["off"][0][0] > 0  # each traced its own program
    assert runs["off"][1][0] == 0 and runs["interpret"][1][0] == 0  # and reused it
    assert runs["off"][0][1] == runs["interpret"][0][1]
    settings = gen._model(params).settings
    assert settings == gen.dispatch.trace_settings() and ("LLMJAX_NORM", "interpret") in settings


def test_the_loop_runs_as_one_graph_only_on_one_nvidia_gpu(params, monkeypatch):
    """`generate_ids_fn` picks the loop compiled with WHILE and CONDITIONAL command buffers on one NVIDIA
    GPU and XLA's loop elsewhere (here: the CPU) or under LLMJAX_LOOP_GRAPH=off; the installed XLA
    takes its option string, and the graph variant generates what the plain loop does (on a GPU: the
    loop as a CUDA graph against XLA's)."""
    monkeypatch.delenv("LLMJAX_LOOP_GRAPH", raising=False)
    model = gen._model(params)
    nvidia = jax.devices()[0].platform == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()
    assert gen.generate_ids_fn(model) is (gen._generate_ids_graph if nvidia else gen._generate_ids)

    class Device:  # an AMD GPU reports its gfx name where NVIDIA's report a compute capability
        platform, compute_capability = "gpu", "gfx942"
    with monkeypatch.context() as m:
        m.setattr(gen.dispatch.jax, "devices", lambda *a: [Device()])
        assert gen.generate_ids_fn(model) is gen._generate_ids
        Device.compute_capability = "9.0"
        assert gen.generate_ids_fn(model) is gen._generate_ids_graph
    monkeypatch.setenv("LLMJAX_LOOP_GRAPH", "off")
    assert gen.generate_ids_fn(model) is gen._generate_ids
    monkeypatch.setenv("LLMJAX_LOOP_GRAPH", "yes")
    with pytest.raises(ValueError, match="LLMJAX_LOOP_GRAPH must be one of auto, off"):
        gen.generate_ids_fn(model)
    monkeypatch.setenv("LLMJAX_LOOP_GRAPH", "auto")
    # generate runs what the chooser gives: here the graph program (its option ignored on the CPU)
    calls, graph_fn = [], gen._generate_ids_graph
    monkeypatch.setattr(gen, "_generate_ids_graph", lambda *a, **k: calls.append(1) or graph_fn(*a, **k))
    monkeypatch.setattr(gen.dispatch, "compute_capability", lambda: "9.0")
    p = _no_eos(params)

    def both():  # greedy, and sampled with every filter (sorts and top-k inside the loop)
        return (llmjax.generate(p, [[1, 5, 9], [1, 7]], max_new_tokens=6),
                llmjax.generate(p, [1, 5], max_new_tokens=9, temperature=0.8, top_p=0.9, top_k=20, seed=3))
    graph = both()
    assert calls == [1, 1]
    monkeypatch.setenv("LLMJAX_LOOP_GRAPH", "off")
    assert both() == graph and len(graph[0][0]) == 6 and len(graph[1]) == 9
    assert calls == [1, 1]


@needs_devices(2)
def test_a_tensor_mesh_keeps_xlas_loop_on_nvidia_gpus(params, monkeypatch):
    """A tensor mesh's sums are XLA's (NCCL): its loop is XLA's, where one NVIDIA GPU's would be the graph."""
    monkeypatch.delenv("LLMJAX_LOOP_GRAPH", raising=False)
    mesh = llmjax.sharding.make_mesh(tensor=2, devices=jax.devices()[:2])
    model = dataclasses.replace(gen._model(params), mesh=mesh)

    class Device:
        platform, compute_capability = "gpu", "9.0"
    monkeypatch.setattr(gen.dispatch.jax, "devices", lambda *a: [Device()])
    assert gen.generate_ids_fn(model) is gen._generate_ids


def test_jax_enable_x64_is_refused_with_the_fix(params):
    jax.config.update("jax_enable_x64", True)
    try:
        for call in (lambda: llmjax.generate(params, [1, 5], max_new_tokens=2), lambda: llmjax.logits(params, [1, 5]),
                     lambda: llmjax.init_random("tiny"), lambda: llmjax.Engine(params, max_slots=2),
                     lambda: llmjax.load("tiny-stdlib"), lambda: llmjax.perplexity(params, [1, 5])):
            with pytest.raises(ValueError, match=r"jax.config.update\('jax_enable_x64', False\)"):
                call()
    finally:
        jax.config.update("jax_enable_x64", False)
    assert len(llmjax.generate(params, [1, 5], max_new_tokens=2)) == 2
