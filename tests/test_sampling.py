"""Sampling: exact masks on crafted logits, seeded reproducibility, and refusal of bad knobs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llmjax.sampling import Sampling, filter_logits, sample

# Probabilities 0.4, 0.3, 0.15, 0.1, 0.05 (as logits), shuffled so sorting matters.
PROBS = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
LOGITS = jnp.log(jnp.asarray(PROBS, jnp.float32))[None, :]


def _kept(top_k=0, top_p=1.0, min_p=0.0):
    return set(np.flatnonzero(_our_kept(LOGITS, top_k, top_p, min_p)[0]).tolist())


@pytest.mark.parametrize("top_k, kept", [(1, {1}), (2, {1, 3}), (3, {1, 3, 4}), (5, set(range(5))),
                                         (99, set(range(5))), (0, set(range(5)))])
def test_top_k_keeps_the_k_largest(top_k, kept):
    assert _kept(top_k=top_k) == kept


@pytest.mark.parametrize("top_p, kept", [(0.3, {1}), (0.4, {1}), (0.41, {1, 3}), (0.7, {1, 3}),
                                         (0.71, {1, 3, 4}), (0.9, {1, 3, 4, 0}), (1.0, set(range(5)))])
def test_top_p_keeps_the_smallest_prefix_reaching_p(top_p, kept):
    assert _kept(top_p=top_p) == kept


def test_top_p_applies_to_what_top_k_kept():
    # After top-k=2 the mass renormalises to 0.4/0.7 = 0.571 and 0.3/0.7: p=0.5 keeps one token.
    assert _kept(top_k=2, top_p=0.5) == {1}
    assert _kept(top_k=2, top_p=0.6) == {1, 3}


@pytest.mark.parametrize("min_p, kept", [(0.0, set(range(5))), (0.3, {1, 3, 4}), (0.5, {1, 3}),
                                         (0.76, {1}), (1.0, {1})])
def test_min_p_keeps_tokens_within_a_fraction_of_the_best(min_p, kept):
    assert _kept(min_p=min_p) == kept


def _draw(sampling: Sampling, seed: int, n: int = 2000):
    logits = jnp.broadcast_to(LOGITS, (n, 5))
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(sample(logits, keys, sampling.arrays(n), greedy=sampling.greedy,
                             filters=sampling.filters))


def test_sampling_follows_the_distribution_and_respects_masks():
    counts = np.bincount(_draw(Sampling(temperature=1.0), seed=0), minlength=5) / 2000
    np.testing.assert_allclose(counts, PROBS, atol=0.04)
    assert set(_draw(Sampling(temperature=1.0, top_k=2), seed=1).tolist()) == {1, 3}
    assert set(_draw(Sampling(temperature=1.0, top_p=0.71), seed=2).tolist()) == {1, 3, 4}
    # Temperature applies first: at 5 the distribution flattens and top-p 0.71 keeps four tokens.
    assert set(_draw(Sampling(temperature=5.0, top_p=0.71), seed=3).tolist()) == {0, 1, 3, 4}


def warped_probs(logits, temperature, top_k=None, top_p=None, min_p=None):
    """The distribution transformers' warpers leave, in float64 numpy: temperature, top-k (ties with
    the k-th kept), top-p (the smallest prefix of the ascending sort's complement reaching top_p, at
    least one token), min-p (at least the best)."""
    s = np.asarray(logits, np.float64) / temperature
    if top_k:
        s = np.where(s < np.sort(s)[::-1][min(top_k, s.size) - 1], -np.inf, s)
    if top_p is not None and top_p < 1:
        order = np.argsort(s, kind="stable")
        p = np.exp(s[order] - s.max())
        cut = np.cumsum(p / p.sum()) <= 1 - top_p
        cut[-1] = False
        s[order[cut]] = -np.inf
    if min_p:
        p = np.exp(s - s.max())
        s = np.where(p < min_p * p.max(), -np.inf, s)
    p = np.exp(s - s.max())
    return p / p.sum()


SKEWED = np.random.default_rng(0).standard_normal(12) * 1.5
TIED = np.array([2.0, 2.0, 2.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, -5.0, 3.0, 3.0])
HOLED = np.where(np.isin(np.arange(12), [2, 7]), -np.inf, SKEWED)


@pytest.mark.parametrize("logits, knobs", [
    (SKEWED, dict(temperature=1.0)), (SKEWED, dict(temperature=0.7, top_p=0.9)),
    (SKEWED, dict(temperature=1.3, top_k=4)), (SKEWED, dict(temperature=1.0, top_k=5, top_p=0.8)),
    (SKEWED, dict(temperature=2.0, min_p=0.1)), (SKEWED, dict(temperature=1.0, top_k=6, top_p=0.9, min_p=0.05)),
    (TIED, dict(temperature=1.0, top_k=2)), (TIED, dict(temperature=1.0, top_k=3)),
    (TIED, dict(temperature=0.5, top_p=0.6)), (HOLED, dict(temperature=1.0, top_p=0.95)),
    (HOLED, dict(temperature=50.0)), (SKEWED, dict(temperature=1e6)), (SKEWED, dict(temperature=1.0, top_k=1000)),
    (SKEWED, dict(temperature=1.0, top_p=1.0)), (SKEWED, dict(temperature=1e-3)),
    (SKEWED, dict(temperature=1.0, top_p=1e-9)), (TIED, dict(temperature=1.0, top_k=1))])
def test_draws_follow_transformers_warped_distribution(logits, knobs):
    """20,000 draws (fixed keys) against the exact distribution: within a total-variation distance
    of 0.02 (sampling noise is about 0.01 here), and never a token the warpers removed."""
    want = warped_probs(logits, **knobs)
    n = 20000
    sampling = Sampling(**knobs)
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32)[None], (n, logits.size))
    drawn = np.asarray(sample(rows, jax.random.split(jax.random.key(logits.size), n), sampling.arrays(n),
                              greedy=sampling.greedy, filters=sampling.filters))
    got = np.bincount(drawn, minlength=logits.size) / n
    assert got[want == 0].sum() == 0
    assert 0.5 * np.abs(got - want).sum() < 0.02


def test_a_fixed_seed_reproduces_and_another_differs():
    s = Sampling(temperature=1.0, top_p=0.95)
    assert (_draw(s, seed=7) == _draw(s, seed=7)).all()
    assert (_draw(s, seed=7) != _draw(s, seed=8)).any()


def test_greedy_and_low_temperature_pick_the_argmax():
    assert set(_draw(Sampling(), seed=0, n=10).tolist()) == {1}
    assert set(_draw(Sampling(temperature=1e-4), seed=0, n=50).tolist()) == {1}


def test_rows_may_differ_in_temperature():
    knobs = Sampling(temperature=1.0).arrays(2)
    knobs["temperature"] = jnp.array([0.0, 1.0], jnp.float32)
    logits = jnp.broadcast_to(LOGITS, (2, 5))
    draws = [np.asarray(sample(logits, jax.random.split(jax.random.key(s), 2), knobs, greedy=False,
                               filters=False)) for s in range(40)]
    assert {int(d[0]) for d in draws} == {1} and len({int(d[1]) for d in draws}) > 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature="hot"), "temperature"), (dict(temperature=3e38), r"temperature must be a number in \[0, 1e\+06\]"), (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=-0.1), "min_p"), (dict(min_p=2), "min_p")])
def test_out_of_range_knobs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sampling(**kwargs)


def test_top_p_one_keeps_a_long_tail_exactly():
    logits = jnp.concatenate([jnp.array([[20.0]]), jnp.full((1, 32000), -10.0)], axis=-1)
    assert _our_kept(logits, top_p=1.0).sum() == 32001


def _hf_kept(logits, top_k=0, top_p=1.0, min_p=0.0):
    """What transformers' warpers keep, in its order: top-k, then top-p, then min-p."""
    import torch
    from transformers.generation import logits_process as lp

    scores = torch.tensor(np.asarray(logits))
    if top_k:
        scores = lp.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1:
        scores = lp.TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = lp.MinPLogitsWarper(min_p)(None, scores)
    return np.isfinite(scores.numpy())


def _our_kept(logits, top_k=0, top_p=1.0, min_p=0.0):
    """What `filter_logits` keeps with the knobs `Sampling.arrays` gives it."""
    knobs = Sampling(1.0, top_k or None, top_p, min_p).arrays(logits.shape[0])
    del knobs["temperature"]
    return np.isfinite(np.asarray(filter_logits(logits, **knobs)))


@pytest.mark.parametrize("seed, knobs", list(enumerate([
    dict(top_k=7), dict(top_p=0.5), dict(top_p=0.93), dict(min_p=0.05), dict(top_k=20, top_p=0.8),
    dict(top_k=50, top_p=0.9, min_p=0.02)])))
def test_masks_equal_transformers_warpers(seed, knobs):
    logits = jax.random.normal(jax.random.key(seed), (4, 301)) * 3
    np.testing.assert_array_equal(_our_kept(logits, **knobs), _hf_kept(logits, **knobs))


@pytest.mark.parametrize("top_p", [0.3, 0.5, 0.999, 0.9999])
def test_top_p_cuts_where_transformers_cuts_on_long_tails_and_ties(top_p):
    """A top_p near 1 on a 32000-token vocabulary cuts the same tail (the mass is summed from the
    smallest up, as transformers sums it); rows of tied tokens (flat, integer logits) keep as many."""
    rng = np.random.default_rng(int(top_p * 1e4))
    wide = (rng.standard_normal((2, 32000)) * 2).astype(np.float32)
    np.testing.assert_array_equal(_our_kept(jnp.asarray(wide), top_p=top_p), _hf_kept(wide, top_p=top_p))
    tied = np.concatenate([np.zeros((1, 64)), np.array([[2.0, 2.0, 0.0, 0.0] * 16]),
                           rng.integers(-3, 4, (3, 64))]).astype(np.float32)
    np.testing.assert_array_equal(_our_kept(jnp.asarray(tied), top_p=top_p).sum(-1),
                                  _hf_kept(tied, top_p=top_p).sum(-1))


@pytest.mark.parametrize("top_p", [0.6, 0.8, 0.9, 0.99])
def test_top_p_cuts_at_transformers_threshold_to_the_last_bit(top_p):
    """Two-token rows whose smaller probability sweeps float32's values around 1 - top_p: the cut is
    transformers' float32(1 - top_p), not 1 - float32(top_p), which differs in its last bits (for 0.9,
    rows that transformers keeps whole were cut to one token)."""
    small = (np.log((1 - top_p) / top_p) + np.arange(-1000, 1000) * 4e-9).astype(np.float32)
    # On the CPU, as transformers here: a GPU's exp may differ from it in the last bit, which moves the
    # row where the kept mask flips, whatever the cut.
    with jax.default_device(jax.devices("cpu")[0]):
        rows = jnp.stack([jnp.asarray(small), jnp.zeros_like(small)], axis=-1)
        ours, hf = _our_kept(rows, top_p=top_p), _hf_kept(rows, top_p=top_p)
    assert ours[:, 0].any() and not ours[:, 0].all()  # the sweep crosses the cut
    np.testing.assert_array_equal(ours, hf)


def test_ties_top_k_keeps_all_tied_top_p_cuts_by_rank():
    tied = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # three tokens of probability 0.297 each
    assert _our_kept(tied, top_k=1).sum() == _hf_kept(tied, top_k=1).sum() == 3
    for top_p in (0.25, 0.5, 0.65):
        assert _our_kept(tied, top_p=top_p).sum() == _hf_kept(tied, top_p=top_p).sum()
    assert [_our_kept(tied, top_p=p).sum() for p in (0.25, 0.5, 0.65)] == [1, 2, 3]


def test_numpy_scalars_are_accepted_as_knobs():
    s = Sampling(temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.9))
    assert s == Sampling(temperature=0.5, top_k=5, top_p=0.9) and isinstance(s.top_k, int)


def test_zero_dimensional_arrays_are_accepted_as_knobs():
    s = Sampling(temperature=jnp.array(0.5), top_k=np.array(5), top_p=jnp.float32(0.875), min_p=np.array(0.25))
    assert s == Sampling(temperature=0.5, top_k=5, top_p=0.875, min_p=0.25) and isinstance(s.top_k, int)
    with pytest.raises(ValueError, match="top_k"):
        Sampling(temperature=1.0, top_k=np.array(True))
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=jnp.array([0.5]))
