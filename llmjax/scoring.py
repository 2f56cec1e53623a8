"""`perplexity`: how well a model predicts a text, token by token.

A text longer than the model's context is scored in overlapping windows: the first window scores its
tokens from the start of the text; each later window begins with BOS, re-reads `window - stride - 1`
tokens of context and scores the next `stride` tokens. Every token is scored exactly once, and (past
the first window) always with at least `window - stride - 1` tokens of context. Each text is scored on
its own (texts never see each other), and the result pools the tokens of all of them; an empty text
adds no tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from llmjax.generate import _all_ints, _batch_size, _bucket, _model, _positions, _replicated, _token_rows, \
    check_vocabulary
from llmjax.kernels import dispatch
from llmjax.models import llama
from llmjax.params import Params, check_params
from llmjax.sharding.mesh import is_integer

BATCH = 8  # the most windows a compiled call scores
TOKENS = 32768  # ... and the most tokens: past that, fewer windows a call (one, at the least)
LOGITS = 2**26  # the most float32 logits a slice of the head holds at once (256 MiB)


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """`perplexity = exp(nll)`; `nll` is the mean negative log-likelihood per token, in nats.

    `ids` are the scored tokens of each text (without the BOS added before it) and `logprobs` the
    log-probability the model gave each of them, so `logprobs[i][j]` belongs to `ids[i][j]`.
    """

    perplexity: float
    nll: float
    tokens: int
    ids: list[list[int]]
    logprobs: list[np.ndarray]

    def __repr__(self):
        return f"Perplexity({self.perplexity:.3f} over {self.tokens} tokens, nll {self.nll:.4f} nats)"


def _slice_len(rows: int, width: int, vocab: int) -> int:
    """Positions per slice of the head: a power of two, at most `width`, with at most LOGITS logits."""
    fit = max(1, LOGITS // (rows * vocab))
    return min(width, 1 << (fit.bit_length() - 1))


@functools.partial(jax.jit, static_argnames=("model", "piece"))
def _logprobs(weights, tokens, targets, *, model, piece):
    """Log-probability of `targets[b, t]` after `tokens[b, :t+1]`, float32 `[B, T]`. The head runs a
    `piece` positions at a time, so the whole `[B, T, vocab]` logits never exist at once (for a
    128k-token window and a 128k vocabulary they would take 67 GB a row)."""
    x, _ = model.apply({"params": weights}, tokens, _positions(tokens), with_head=False)  # [B, T, D]
    (b, t), c = tokens.shape, model.config
    pad = -t % piece
    x = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(b, -1, piece, x.shape[-1]).swapaxes(0, 1)
    targets = jnp.pad(targets, ((0, 0), (0, pad))).reshape(b, -1, piece).swapaxes(0, 1)

    def score(args):  # [B, piece, D], [B, piece] -> [B, piece]
        h, target = args
        logits = llama.project(c, weights, h, model.mesh, model.quant)
        return jnp.take_along_axis(logits, target[..., None], axis=-1)[..., 0] - jax.nn.logsumexp(logits, axis=-1)
    out = jax.lax.map(score, (x, targets)).swapaxes(0, 1).reshape(b, -1)[:, :t]
    return _replicated(model, out)


def _windows(ids: list[int], bos: int, window: int, stride: int):
    """(input tokens, first scored input index, number scored) per window over `[bos] + ids`."""
    seq = [bos] + ids
    first = seq[:window]
    out = [(first, 0, len(first) - 1)]
    scored = len(first) - 1  # tokens of `ids` scored so far
    while scored < len(ids):
        n = min(stride, len(ids) - scored)
        start = scored + 1 + n - (window - 1)  # index into seq of the first context token
        out.append(([bos] + seq[start:scored + 1 + n], window - 1 - n, n))
        scored += n
    return out


def _text_ids(tok, text: str) -> list[int]:
    """The ids of `text` without a BOS first: a text that begins with the BOS token (a chat template
    writes it) has it read as BOS, as `generate` reads such a prompt, not scored as a second one."""
    ids = tok.encode(text, add_special_tokens=False)
    if tok.bos_token is not None and text.startswith(tok.bos_token) and ids[:1] == [tok.bos_id]:
        return ids[1:]
    return ids


def scored_text(tok, text: str) -> str:
    """`text` less a BOS token written at its start, which `_text_ids` reads as BOS, not scores: the text
    whose bytes a bits-per-byte figure counts."""
    bos = tok.bos_token
    if bos and text.startswith(bos) and tok.encode(bos, add_special_tokens=False) == [tok.bos_id]:
        return text[len(bos):]
    return text


def perplexity(params: Params, text: str | Sequence[str] | Sequence[int], *, window: int | None = None,
               stride: int | None = None) -> Perplexity:
    """Perplexity of the model on a text, a list of texts, or a list of token ids.

    Text is encoded with BOS first (as `generate` encodes a prompt: a text that already begins with
    the BOS token, as a chat template writes it, gets no second one); every token after BOS is scored.
    BOS comes first even where the tokenizer adds none (`add_bos_token` false), and `generate` then
    feeds none: every window needs it. To score such a text as the model reads it, pass its token ids;
    their first is read as BOS (context) and not scored.
    `window` (default: the model's context) is the most tokens the model sees at once, BOS included;
    `stride` (default: half the window) is how many new tokens each later window scores; each later
    window begins with BOS too, then `window - stride - 1` tokens of context (Hugging Face's "perplexity
    of fixed-length models" recipe starts later windows mid-text instead, so its numbers differ).
    """
    check_params(params)
    config, tok = params.config, params.tokenizer
    window = config.max_position_embeddings if window is None else window
    if not is_integer(window) or not 2 <= window <= config.max_position_embeddings:
        raise ValueError(f"window must be an integer in [2, {config.max_position_embeddings}] (the "
                         f"model's context), got {window!r}")
    stride = max(1, window // 2) if stride is None else stride
    if not is_integer(stride) or not 1 <= stride <= window - 1:
        why = ("" if not is_integer(stride) or stride < 1 else ": every window begins with BOS, so it scores at "
               "most window - 1 new tokens (the Hugging Face recipe's stride == window, windows that do not "
               "overlap, is stride=window - 1 here)")
        raise ValueError(f"stride must be an integer in [1, window - 1 = {window - 1}], got {stride!r}{why}")
    window, stride = int(window), int(stride)
    if isinstance(text, str):
        text = [text]
    if hasattr(text, "__array__") and not isinstance(text, np.ndarray) and np.ndim(text) == 1:
        text = np.asarray(text)  # a jax or torch array of ids, taken as numpy's is
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
        if tok is None or tok.bos_id is None:
            raise ValueError("scoring text needs a tokenizer with a BOS token; these params have none, "
                             "so pass token ids (BOS first) instead")
        bos, rows = tok.bos_id, [_text_ids(tok, t) for t in text]
        check_vocabulary(params, [[bos, *r] for r in rows], from_text=True)
    elif isinstance(text, (list, tuple, np.ndarray)) and len(text) >= 2 and _all_ints(text):
        (row,) = _token_rows(params, "ids", [list(text)])
        bos, rows = row[0], [row[1:]]
    else:
        raise ValueError("perplexity takes a str, a list of str, or a list of at least 2 token ids (the "
                         f"first one is read as BOS and not scored); got {text!r:.80}")
    if not any(rows):
        raise ValueError("there are no tokens to score: every text is empty or the BOS token alone; give a "
                         "text with tokens after BOS")

    model = _model(params)
    jobs = [(n, w) for n, row in enumerate(rows) if row for w in _windows(row, bos, window, stride)]
    width = _bucket(max(len(w[0]) for _, w in jobs), window)  # few distinct shapes, few compilations
    # Windows a call: a power of two (the mesh's `data` degree divides it), no more than the windows
    # there are, and fewer for wide windows, so a call's activations stay near TOKENS tokens' worth.
    batch = _batch_size(params, min(len(jobs), BATCH, max(1, TOKENS // width)))
    piece = _slice_len(batch, width, params.config.vocab_size)
    pending = []  # dispatched batches: the host prepares the next while the device runs one
    try:
        for i in range(0, len(jobs), batch):
            chunk = jobs[i:i + batch]
            tokens = np.zeros((batch, width), np.int32)
            for b, (_, (inp, _, _)) in enumerate(chunk):
                tokens[b, :len(inp)] = inp
            targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
            pending.append((chunk, _logprobs(params.weights, tokens, targets, model=model, piece=piece)))
        pending = [(chunk, np.asarray(lp)) for chunk, lp in pending]
    except jax.errors.JaxRuntimeError as e:
        if not dispatch.out_of_memory(e):
            raise
        raise MemoryError(f"scoring ran out of device memory: a call scores {batch} windows of {width} tokens "
                          f"at once; pass a smaller window= (now {window}) to score fewer tokens a call") from e
    scores = [[] for _ in rows]
    for chunk, lp in pending:
        for b, (n, (_, first, count)) in enumerate(chunk):
            scores[n].append(lp[b, first:first + count])
    logprobs = [np.concatenate(s) if s else np.zeros(0, np.float32) for s in scores]
    total = sum(len(s) for s in logprobs)
    nll = -float(sum(np.sum(s, dtype=np.float64) for s in logprobs)) / total
    return Perplexity(float(np.exp(nll)), nll, total, rows, logprobs)
