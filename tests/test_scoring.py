"""perplexity: every token scored once, with the context its window promises, and bad input refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import llmjax

from conftest import hf_config, needs_devices, save_hf_model


@pytest.fixture(scope="module")
def params(tmp_path_factory, sp_dir):
    folder = tmp_path_factory.mktemp("model")
    save_hf_model(folder, hf_config(vocab_size=600, max_position_embeddings=64), seed=5, tokenizer_dir=sp_dir)
    return llmjax.load(folder)


def _logprob_after(params, context: list[int], token: int) -> float:
    """log p(token | context), from one forward pass over exactly `context`."""
    row = np.asarray(llmjax.logits(params, [context]))[0, -1].astype(np.float64)
    return float(row[token] - np.log(np.sum(np.exp(row - row.max()))) - row.max())


def test_short_text_scores_each_token_after_all_before_it(params):
    text = "def add(a, b):\n    return a + b\n"
    result = llmjax.perplexity(params, text)
    (ids,) = result.ids
    assert ids == params.tokenizer.encode(text, add_special_tokens=False)
    bos = params.tokenizer.bos_id
    want = [_logprob_after(params, [bos] + ids[:k], ids[k]) for k in range(len(ids))]
    np.testing.assert_allclose(result.logprobs[0], want, atol=2e-5)
    assert result.tokens == len(ids)
    assert result.nll == pytest.approx(-np.mean(want), abs=1e-5)
    assert result.perplexity == pytest.approx(np.exp(-np.mean(want)), rel=1e-5)


def test_ids_as_numpy_jax_or_torch_arrays_score_as_a_list(params):
    ids = [params.tokenizer.bos_id, 17, 250, 3, 99, 41]
    want = llmjax.perplexity(params, ids).nll
    for array in (np.asarray(ids), jnp.asarray(ids)):
        assert llmjax.perplexity(params, array).nll == want
    with pytest.raises(ValueError, match="a list of at least 2 token ids"):
        llmjax.perplexity(params, jnp.asarray([[1, 2], [3, 4]]))
    torch = pytest.importorskip("torch")
    assert llmjax.perplexity(params, torch.tensor(ids)).nll == want


@pytest.mark.parametrize("window,stride", [(8, 3), (9, 8), (6, 1), (16, 8)])
def test_long_text_windows_give_each_token_its_promised_context(params, window, stride):
    rng = np.random.default_rng(window * 100 + stride)
    bos = params.tokenizer.bos_id
    ids = [int(t) for t in rng.integers(3, 600, size=29)]
    result = llmjax.perplexity(params, [bos] + ids, window=window, stride=stride)
    assert result.ids == [ids] and len(result.logprobs[0]) == len(ids)
    # The spec, token by token: the first window scores ids[:window-1] from the start; each later
    # window scores the next `stride` tokens, reading BOS and the window-1 tokens that end at its last.
    want, end = [], window - 1
    want += [_logprob_after(params, [bos] + ids[:k], ids[k]) for k in range(min(end, len(ids)))]
    while end < len(ids):
        last = min(end + stride, len(ids))
        first_context = last - (window - 1)
        want += [_logprob_after(params, [bos] + ids[first_context:k], ids[k]) for k in range(end, last)]
        end = last
    np.testing.assert_allclose(result.logprobs[0], want, atol=2e-5)


def test_texts_are_scored_apart_and_pooled(params):
    a, b = "import os\n", "x = [i * i for i in range(10)]\n"
    both = llmjax.perplexity(params, [a, "", b])
    one, two = llmjax.perplexity(params, a), llmjax.perplexity(params, b)
    np.testing.assert_allclose(both.logprobs[0], one.logprobs[0], atol=1e-6)
    np.testing.assert_allclose(both.logprobs[2], two.logprobs[0], atol=1e-6)
    assert len(both.logprobs[1]) == 0 and both.tokens == one.tokens + two.tokens
    pooled = -np.concatenate([one.logprobs[0], two.logprobs[0]]).mean()
    assert both.nll == pytest.approx(pooled, abs=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(window=1), "window"), (dict(window=65), "window"),
    (dict(window=8, stride=8), r"stride must be .* got 8: every window begins with BOS"),
    (dict(window=8, stride=0), r"stride must be .* got 0$"), (dict(window=8, stride=2.5), r"got 2.5$"),
    (dict(window=8.0), "window")])
def test_bad_window_and_stride_are_refused(params, kwargs, match):
    with pytest.raises(ValueError, match=match):
        llmjax.perplexity(params, "x = 1", **kwargs)


def test_numpy_integers_are_integers_for_window_and_stride(params):
    text = "def f(x):\n    return x\n" * 3
    assert llmjax.perplexity(params, text, window=np.int64(16), stride=np.int32(5)).nll == pytest.approx(
        llmjax.perplexity(params, text, window=16, stride=5).nll)


@pytest.mark.parametrize("text", ["", [""], [], [1], None, [1, "a"], 3.5, [1, 10**6]])
def test_nothing_to_score_or_wrong_type_is_refused(params, text):
    with pytest.raises(ValueError):
        llmjax.perplexity(params, text)


@pytest.mark.parametrize("text", ["", ["", ""], "<s>", ["<s>", ""]])
def test_no_token_after_bos_is_named(params, text):
    with pytest.raises(ValueError, match="no tokens to score: every text is empty or the BOS token alone"):
        llmjax.perplexity(params, text)


def test_a_tokenizer_larger_than_the_model_is_named_not_scored(tmp_path, sp_dir):
    """Text whose ids fall past the model's vocabulary (a tokenizer of 600 pieces on a model of 500)
    is refused in perplexity as in generate; it scored NaN before."""
    save_hf_model(tmp_path, hf_config(vocab_size=500, max_position_embeddings=64), seed=5, tokenizer_dir=sp_dir)
    small = llmjax.load(tmp_path)
    text = "def add(a, b):\n    return a + b\n" * 3
    assert max(small.tokenizer.encode(text)) >= 500
    for call in (lambda: llmjax.perplexity(small, text), lambda: llmjax.generate(small, text, max_new_tokens=2)):
        with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 500\).*tokenizer \(600 pieces\)"):
            call()


def test_calls_hold_the_windows_there_are_and_the_head_runs_in_slices(params, monkeypatch):
    """One short text is one window: a call of one row, not of eight (seven were padding). Wide windows
    take fewer rows a call (TOKENS), and the head turns the hidden states into logits a slice of
    positions at a time (LOGITS), so a 128k-token window never holds all its logits at once; a slice
    that does not divide the window, and one of a single position, score as the whole head does."""
    from llmjax import scoring

    shapes, real = [], scoring._logprobs
    monkeypatch.setattr(scoring, "_logprobs", lambda *a, **k: shapes.append((a[1].shape, k["piece"])) or real(*a, **k))
    rng = np.random.default_rng(8)
    bos = params.tokenizer.bos_id
    texts = [[bos] + rng.integers(3, 600, n).tolist() for n in (9, 40, 63)]
    whole = [llmjax.perplexity(params, ids, window=64) for ids in texts]
    assert shapes == [((1, 16), 16), ((1, 64), 64), ((1, 64), 64)]
    in_windows = llmjax.perplexity(params, texts[2], window=40, stride=7)  # 5 windows of 40: 5 rows, a call of 8
    for ids, want in zip(texts, whole):
        assert want.logprobs[0] == pytest.approx([_logprob_after(params, ids[:k], ids[k]) for k in range(1, len(ids))],
                                                 abs=2e-5)
    monkeypatch.setattr(scoring, "TOKENS", 64)  # one window of 64 a call
    monkeypatch.setattr(scoring, "LOGITS", 600 * 7)  # 7 positions' logits: slices of 4
    sliced = llmjax.perplexity(params, texts[2], window=64)
    windows = llmjax.perplexity(params, texts[2], window=40, stride=7)  # 5 windows, 40 wide, 1 a call
    assert shapes[4:] == [((1, 64), 4)] + [((1, 40), 4)] * 5  # 40 = 10 slices of 4; 64 = 16
    np.testing.assert_allclose(sliced.logprobs[0], whole[2].logprobs[0], atol=1e-6)
    monkeypatch.setattr(scoring, "LOGITS", 1)
    np.testing.assert_allclose(llmjax.perplexity(params, texts[1], window=64).logprobs[0], whole[1].logprobs[0],
                               atol=1e-6)
    assert shapes[-1] == ((1, 64), 1)
    assert shapes[3] == ((8, 40), 40) and windows.tokens == in_windows.tokens == 63
    np.testing.assert_allclose(windows.logprobs[0], in_windows.logprobs[0], atol=1e-6)


def test_running_out_of_device_memory_names_the_window(params, monkeypatch):
    from llmjax import scoring

    def exhausted(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 68862607360 bytes")
    monkeypatch.setattr(scoring, "_logprobs", exhausted)
    with pytest.raises(MemoryError, match=r"a call scores 1 windows of 64 tokens at once; pass a smaller "
                                          r"window= \(now 64\)"):
        llmjax.perplexity(params, [1] + list(range(3, 50)))


@needs_devices(8)
def test_a_mesh_scores_as_one_device(params):
    from llmjax.sharding import make_mesh

    texts = ["import os\n" * 3, "x = [i * i for i in range(10)]\n" * 4, "def f():\n    pass\n"]
    want = llmjax.perplexity(params, texts, window=16, stride=5)
    for shape in (dict(tensor=2, data=4), dict(stage=2, tensor=2, data=2)):
        got = llmjax.perplexity(llmjax.shard(params, make_mesh(**shape)), texts, window=16, stride=5)
        for a, b in zip(got.logprobs, want.logprobs):
            np.testing.assert_allclose(a, b, atol=2e-5)


def test_a_text_that_begins_with_bos_is_not_given_a_second_one(params):
    # A chat template writes BOS into the text; generate reads it as the prompt's BOS, and so does
    # perplexity: it was scoring the written BOS after the BOS it added.
    tok = params.tokenizer
    text = tok.bos_token + "def add(a, b):\n    return a + b\n"
    ids = tok.encode(text, add_special_tokens=False)  # what generate reads: BOS, then the text's tokens
    assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
    result = llmjax.perplexity(params, text)
    assert result.ids == [ids[1:]] and result.tokens == len(ids) - 1
    np.testing.assert_allclose(result.logprobs[0], llmjax.perplexity(params, ids).logprobs[0], atol=1e-6)
    both = llmjax.perplexity(params, [text, "x = 1\n"])
    np.testing.assert_allclose(both.logprobs[0], result.logprobs[0], atol=1e-6)
