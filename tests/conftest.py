"""Test setup: 8 fake CPU devices, rank promotion raises, float32 matmuls at full precision.

`LLMJAX_TEST_DEVICES` sets another number of CPU devices (`LLMJAX_TEST_DEVICES=1` shows on a CPU what a
single GPU skips). A test that needs several devices carries `needs_devices(n)`, and one that runs an
interpreter on the CPU `needs_cpu`: skipped, with the reason, where the process has fewer or none.

Helpers here build Hugging Face model folders with `transformers` (random weights; biases and norm
scales randomised too, so a mis-mapped one shows) and a sentencepiece tokenizer trained on standard
library source, which every machine has.
"""

import os
import signal

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# A process started in the background by a shell without job control (`cmd &`, nohup) inherits SIGINT
# ignored, and Python then leaves it so; the tests of what a Ctrl-C does need Python's own handler.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", int(os.environ.get("LLMJAX_TEST_DEVICES", "8")))
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SP_VOCAB = 600


def needs_devices(n: int):
    """Skips a test on fewer than `n` devices (a single GPU, say); CI's 8 CPU devices run it."""
    have = jax.device_count()
    return pytest.mark.skipif(have < n, reason=f"needs {n} devices, this process has {have}")


def _has_cpu() -> bool:
    try:
        jax.devices("cpu")
    except RuntimeError:  # JAX_PLATFORMS without cpu (a GPU-only run)
        return False
    return True


# Pallas' and Mosaic GPU's interpret modes call back into Python on a CPU device.
needs_cpu = pytest.mark.skipif(not _has_cpu(), reason="needs a CPU device (interpret mode); JAX_PLATFORMS leaves none")


@pytest.fixture(scope="session", autouse=True)
def _verified_triton_modules():
    """Every Triton module a test lowers (for an abstract cuda or rocm device) is verified here, as
    Triton will parse it on the GPU: a type that Triton refuses (an unsigned integer out of inline
    assembly, say) fails the lowering test on a CPU instead of the first GPU run."""
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:  # a jax without the Triton backend: nothing to verify
        yield
        return
    lower = lowering.lower_jaxpr_to_triton_module

    def lower_and_verify(*args, **kwargs):
        result = lower(*args, **kwargs)
        result.module.operation.verify()  # raises with Triton's message
        return result

    lowering.lower_jaxpr_to_triton_module = lower_and_verify
    yield
    lowering.lower_jaxpr_to_triton_module = lower


# The shape of Llama 2's chat template: BOS per turn, [INST] markers, an optional system prompt.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set messages = messages[1:] %}{% else %}{% set system = false %}{% endif %}"
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system %}{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + "
    "message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}")


@pytest.fixture(scope="session")
def sp_dir(tmp_path_factory) -> pathlib.Path:
    import inspect
    import json as json_module

    from llmjax.tokenizer import train_sentencepiece

    folder = tmp_path_factory.mktemp("sp")
    text = inspect.getsource(json_module) + inspect.getsource(pathlib) + "héllo wörld 你好 😀\n" * 5
    train_sentencepiece(text, folder, SP_VOCAB, chat_template=LLAMA2_CHAT_TEMPLATE)
    return folder


def hf_config(**overrides):
    """A tiny transformers LlamaConfig with distinct odd sizes, float32, eager attention."""
    import transformers

    kwargs = dict(vocab_size=1003, hidden_size=96, intermediate_size=136, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    kwargs.update(overrides)
    config = transformers.LlamaConfig(**kwargs)
    config._attn_implementation = "eager"
    return config


def save_hf_model(folder: pathlib.Path, config, seed: int = 0, tokenizer_dir=None, **save_kwargs):
    """Saves a random `LlamaForCausalLM` (float32) in Hugging Face layout; returns the torch model."""
    import shutil

    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(folder, **save_kwargs)
    if tokenizer_dir is not None:
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, folder / name)
    return model
