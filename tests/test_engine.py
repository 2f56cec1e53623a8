"""The engine (continuous batching over a paged KV cache) against `llmjax.generate`.

Greedy tokens must equal `generate`'s for every request, whatever rows, batch, chunk or call it lands
in, through preemption and recomputation; sampled tokens depend only on (seed, index). The models are
float32: in bfloat16, `generate`'s own tokens depend on how a list is batched (rounding), so no
batching scheme can promise equal tokens there.
"""

import dataclasses
import importlib

import numpy as np
import pytest

import llmjax
from llmjax.config import LlamaConfig
from llmjax.engine import Engine, LLM
from llmjax.tokenizer import Tokenizer

from conftest import SP_VOCAB

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
