"""llmjax against Hugging Face transformers on tiny random Llamas, converted through the CLI.

Each config varies one feature: multi-head, grouped-query (2 kv heads of 6), multi-query, Llama 3.1,
linear and YaRN rope scaling, tied embeddings, biases, explicit head_dim, odd sizes (hidden 96, vocab 1003).
"""

import numpy as np
import pytest
import torch

import llmjax
from llmjax.cli import main as cli_main

from conftest import hf_config, save_hf_model

LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32}

CONFIGS = {
    "multi-head": dict(num_key_value_heads=6),
    "grouped-query": dict(num_key_value_heads=2),
    "multi-query": dict(num_key_value_heads=1),
    "llama3.1-rope": dict(rope_scaling=LLAMA31_ROPE, rope_theta=500000.0),
    "linear-rope": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "yarn-rope": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                    "beta_fast": 8, "mscale": 1.2, "mscale_all_dim": 0.4}),
    "tied": dict(tie_word_embeddings=True),
    "biases": dict(attention_bias=True, mlp_bias=True),
    "head-dim": dict(head_dim=24, num_hidden_layers=3),
}

PROMPT = [1, 17, 250, 3, 999, 42, 7, 600, 81, 5, 333, 12, 1000, 64, 9, 128, 77]  # 17 tokens


def _convert(tmp_path, name, overrides):
    config = hf_config(**overrides)
    hf_dir, out_dir = tmp_path / f"hf-{name}", tmp_path / f"llmjax-{name}"
    model = save_hf_model(hf_dir, config, seed=len(name))
    assert cli_main(["convert", str(hf_dir), str(out_dir), "--quiet"]) == 0
    return model, llmjax.load(out_dir)


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _hf_greedy(model, ids, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2,
                             pad_token_id=0)[0, len(ids):].tolist()
    return out[:out.index(2) + 1] if 2 in out else out


def _relative_error(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_greedy_match_transformers(tmp_path, name):
    model, params = _convert(tmp_path, name, CONFIGS[name])
    ours = np.asarray(llmjax.logits(params, PROMPT))[0]
    assert ours.shape == (len(PROMPT), 1003)
    assert _relative_error(ours, _hf_logits(model, PROMPT)) < 1e-4
    assert llmjax.generate(params, PROMPT, max_new_tokens=24) == _hf_greedy(model, PROMPT, 24)


@pytest.mark.slow
def test_ragged_batch_equals_one_at_a_time(tmp_path):
    model, params = _convert(tmp_path, "batch", CONFIGS["grouped-query"])
    prompts = [PROMPT, PROMPT[:3], [1], PROMPT[5:16]]
    batched = llmjax.generate(params, prompts, max_new_tokens=12)
    alone = [llmjax.generate(params, p, max_new_tokens=12) for p in prompts]
    assert batched == alone
    assert batched == [_hf_greedy(model, p, 12) for p in prompts]


@pytest.mark.slow
def test_bfloat16_conversion_tracks_float32(tmp_path):
    config = hf_config()
    hf_dir = tmp_path / "hf"
    model = save_hf_model(hf_dir, config)
    assert cli_main(["convert", str(hf_dir), str(tmp_path / "bf16"), "--dtype", "bfloat16", "--quiet"]) == 0
    params = llmjax.load(tmp_path / "bf16", dtype="bfloat16")  # (a CPU widens to float32 by default)
    assert str(params.dtype) == "bfloat16"
    ours = np.asarray(llmjax.logits(params, PROMPT))[0]
    assert _relative_error(ours, _hf_logits(model, PROMPT)) < 3e-2


def test_load_reads_a_hugging_face_folder_directly(tmp_path):
    config = hf_config(num_hidden_layers=1)
    model = save_hf_model(tmp_path / "hf", config)
    params = llmjax.load(tmp_path / "hf")
    ours = np.asarray(llmjax.logits(params, PROMPT[:9]))[0]
    assert _relative_error(ours, _hf_logits(model, PROMPT[:9])) < 1e-4


@pytest.mark.parametrize("window,stride", [(12, 5), (12, 11), (6, 1), (64, 32)])
def test_perplexity_windows_match_transformers(tmp_path, window, stride):
    # Each window, computed with transformers: BOS, then the window - 1 tokens that end at its last
    # scored token; its last `stride` (fewer at the end) predictions are the tokens it scores.
    model = save_hf_model(tmp_path / "hf", hf_config(num_hidden_layers=1))
    params = llmjax.load(tmp_path / "hf")
    ids = PROMPT[1:] * 3  # 48 tokens: windows of 12 leave a last stride short
    want, end = [], 0
    while end < len(ids):
        last = min(len(ids), window - 1 if end == 0 else end + stride)
        row = [1] + ids[max(0, last - (window - 1)):last]
        logprobs = torch.log_softmax(torch.tensor(_hf_logits(model, row), dtype=torch.float64), -1).numpy()
        want += [logprobs[len(row) - 1 - last + k, ids[k]] for k in range(end, last)]
        end = last
    result = llmjax.perplexity(params, [1] + ids, window=window, stride=stride)
    assert result.ids == [ids]
    np.testing.assert_allclose(result.logprobs[0], want, atol=1e-5)
    assert result.nll == pytest.approx(-np.mean(want), abs=1e-6)
