"""One tokenizer interface over sentencepiece `tokenizer.model` and Hugging Face `tokenizer.json`.

Token ids agree with `transformers.AutoTokenizer` on the same folder: `tokenizer.json` is run by the
`tokenizers` library itself; a sentencepiece model is run the way transformers runs it (a whitespace
marker prepended only at the start of the text, special-token strings such as `<s>` recognised in the
text, BOS/EOS added as `tokenizer_config.json` says). Chat templates are rendered with jinja2 from
`tokenizer_config.json` or `chat_template.jinja`, in a sandbox as transformers does.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
import re
from typing import Any, Sequence

import jinja2
import jinja2.sandbox
import numpy as np

from llmjax.files import not_permitted, read_json

FILES = ("tokenizer.json", "tokenizer.model")


def train_sentencepiece(text: str, folder: str | os.PathLike, vocab_size: int,
                        chat_template: str | None = None, add_prefix_space: bool = True) -> "Tokenizer":
    """Trains a Llama-style sentencepiece tokenizer on `text` and writes it into `folder`.

    BPE with byte fallback (any text encodes), digits split, whitespace kept as it is, ids 0-2 for
    `<unk>`, `<s>`, `</s>`: the conventions of Llama 2's tokenizer. With `add_prefix_space=False` the
    text's start gets no whitespace marker, so a line encodes the same at the start of a text as
    after a newline (what a code model wants). Writes `tokenizer.model` and `tokenizer_config.json`;
    returns the loaded tokenizer.
    """
    import io

    import sentencepiece as spm

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995, minloglevel=2)
    with open(os.path.join(folder, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
              "add_prefix_space": add_prefix_space}
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return Tokenizer.from_dir(folder)


class Tokenizer:
    """`encode(text) -> ids`, `decode(ids) -> text`, `apply_chat_template(messages) -> text`."""

    def __init__(self, backend, *, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None):
        self._backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template
        self._special_tokens = special_tokens or {}

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def __repr__(self) -> str:
        kind = "sentencepiece" if isinstance(self._backend, _SentencePieceBackend) else "tokenizers"
        chat = "a chat template" if self.chat_template else "no chat template"
        return f"Tokenizer({kind}, {self.vocab_size} pieces, bos {self.bos_token!r}, eos {self.eos_token!r}, {chat})"

    @functools.cached_property
    def unstable_bytes(self) -> frozenset[int]:
        """Ids of byte tokens (`<0xNN>`) whose run decodes as a whole: `tokenizers`' ByteFallback
        decoder renders a run that is not valid UTF-8 as one U+FFFD per byte, so a byte that decoded
        alone as a character may turn into U+FFFD when the next byte comes. A streaming decoder holds
        text back while the ids end in one of these. (sentencepiece decodes a byte run a prefix at a
        time: none.)"""
        return getattr(self._backend, "unstable_bytes", frozenset())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate, e.g. half of an emoji cut from UTF-16
            raise ValueError(f"the text is not valid Unicode: {text[e.start:e.end]!r} at index {e.start} is a "
                             "lone surrogate; fix or remove it (decode the source with errors='replace')") from None
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of a list (or 1-D integer array) of token ids."""
        return self._backend.decode(_token_ids(ids), skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """Renders a conversation with the checkpoint's chat template; returns the prompt text.

        The text begins with the BOS token where the template writes it; `llmjax.generate` then adds
        no second BOS.
        """
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (no 'chat_template' in "
                             "tokenizer_config.json or chat_template.json, and no chat_template.jinja); format "
                             "the prompt yourself (from the command line: leave out --chat)")
        try:
            template = _jinja_env().from_string(self.chat_template)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the checkpoint's chat template does not parse (line {e.lineno}: {e.message}); "
                             "fix it where the checkpoint keeps it (chat_template.jinja, chat_template.json or "
                             "tokenizer_config.json)") from None
        variables = {**self._special_tokens, **kwargs}  # the caller may override e.g. bos_token
        return template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)

    @classmethod
    def from_dir(cls, folder: str) -> "Tokenizer | None":
        """The tokenizer of a model folder, or None when it holds no tokenizer file."""
        cfg = read_json(os.path.join(folder, "tokenizer_config.json"), optional=True)
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            backend = _HFTokenizersBackend(os.path.join(folder, "tokenizer.json"))
        elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
            backend = _SentencePieceBackend(os.path.join(folder, "tokenizer.model"), cfg)
        else:
            return None
        special = {name: _token_str(cfg.get(name)) for name in
                   ("bos_token", "eos_token", "unk_token", "pad_token")}
        special = {k: v for k, v in special.items() if v is not None}
        return cls(backend, bos_token=special.get("bos_token"), eos_token=special.get("eos_token"),
                   chat_template=_chat_template(folder, cfg), special_tokens=special)


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _chat_template(folder: str, cfg: dict) -> str | None:
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = cfg.get("chat_template") or read_json(
        os.path.join(folder, "chat_template.json"), optional=True).get("chat_template")
    if isinstance(template, list):  # named templates: the one called "default"
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _jinja_env() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class _HFTokenizersBackend:
    def __init__(self, path: str):
        import tokenizers

        if not os.access(path, os.R_OK):
            raise PermissionError(not_permitted(path))
        try:
            self._tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path}: cannot read tokenizer ({e}); restore it from the model's "
                             "release") from e

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def unstable_bytes(self) -> frozenset[int]:
        byte = re.compile(r"<0x[0-9A-Fa-f]{2}>")
        return frozenset(i for token, i in self._tok.get_vocab(with_added_tokens=False).items() if byte.fullmatch(token))

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


def _token_ids(ids) -> list[int]:
    """`ids` as Python ints: any iterable of integers (Python's, numpy's, 0-d arrays such as
    `jnp.argmax(logits)`) or a 1-D integer array, each from 0 to 2**31 - 1. A float, a bool or a
    negative id is not a token and must not decode as one: refused, naming what is wrong."""
    if hasattr(ids, "__array__") and not isinstance(ids, (list, tuple)):
        array = np.asarray(ids)
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise TypeError(f"decode takes one sequence of token ids (a list, or a 1-D integer array), got an array "
                            f"of shape {array.shape} and dtype {array.dtype}")
        ids = array.tolist()
    elif isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__iter__"):
        raise TypeError(f"decode takes a list of token ids, got {type(ids).__name__} {ids!r:.80}")
    out = []
    for i in ids:
        if hasattr(i, "__array__") and not isinstance(i, (bool, np.bool_)):  # a 0-d array: jnp.argmax(...)
            value = np.asarray(i)
            i = value.item() if value.ndim == 0 and value.dtype.kind in "iu" else i
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)) or not 0 <= i < 2**31:
            raise ValueError(f"decode takes token ids, integers from 0 to 2**31 - 1; got {i!r}")
        out.append(int(i))
    return out


class _SentencePieceBackend:
    """Sentencepiece with transformers' conventions (see the module docstring)."""

    def __init__(self, path: str, cfg: dict):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        try:
            with open(path, "rb") as f:
                data = f.read()
        except PermissionError:
            raise PermissionError(not_permitted(path)) from None
        try:
            proto = sentencepiece_model_pb2.ModelProto.FromString(data)
            self._sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
            # The same model without the automatic prefix, so that only the text's start gets one.
            proto.normalizer_spec.add_dummy_prefix = False
            self._sp_bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        except Exception as e:  # protobuf's DecodeError and sentencepiece's RuntimeError
            raise ValueError(f"{path}: not a sentencepiece model ({e}); restore it from the model's "
                             "release") from e
        self._add_bos = cfg.get("add_bos_token", True)
        self._add_eos = cfg.get("add_eos_token", False)
        prefix = cfg.get("add_prefix_space")
        self._prefix = True if prefix is None else bool(prefix)
        # transformers' `legacy` mode (only an explicit true): the text after each special token gets
        # the whitespace marker too, as sentencepiece gives every piece of text it encodes.
        self._legacy = cfg.get("legacy") is True
        self._specials = self._special_tokens(cfg)
        self._special_ids = {i: t for t, i in self._specials.items()}
        # Added tokens marked "special": false keep their text when special tokens are skipped.
        self._kept = {int(key) for key, value in (cfg.get("added_tokens_decoder") or {}).items()
                      if isinstance(value, dict) and value.get("special") is False}
        # Added tokens may take ids past the model's pieces (chat markers added to a Llama-2 model).
        self._size = max([self._sp.get_piece_size(), *(i + 1 for i in self._special_ids)])
        pattern = "|".join(re.escape(t) for t in sorted(self._specials, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None

    def _special_tokens(self, cfg: dict) -> dict[str, int]:
        sp = self._sp
        specials = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())
                    if sp.is_control(i) or sp.is_unknown(i)}
        for key, value in (cfg.get("added_tokens_decoder") or {}).items():
            specials[_token_str(value)] = int(key)
        return specials

    @property
    def vocab_size(self) -> int:
        return self._size

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        chunks = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        for n, chunk in enumerate(chunks):
            if chunk in self._specials:
                ids.append(self._specials[chunk])
            elif chunk:
                # The start of the text gets the whitespace marker unless it begins with a space
                # (or the tokenizer's config sets add_prefix_space to false); with `legacy`, so
                # does the text after each special token.
                first = n == 0 or self._legacy
                prefix = " " if self._prefix and first and not chunk.startswith(" ") else ""
                ids += self._sp_bare.encode(prefix + chunk)
        if add_special_tokens:
            bos, eos = self._sp.bos_id(), self._sp.eos_id()
            ids = ([bos] if self._add_bos and bos >= 0 else []) + ids
            ids += [eos] if self._add_eos and eos >= 0 else []
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        # Pieces are joined with special tokens in place, then one leading space (the marker that
        # encode prepended) is stripped from the whole text, as transformers' decoder does.
        out, run = [], []
        for i in ids:
            if not 0 <= i < self._sp.get_piece_size() and i not in self._special_ids:
                continue  # an id of a model vocabulary padded past the tokenizer's (or between added ids): no text
            if i in self._special_ids:
                out.append(self._sp_bare.decode(run))
                run = []
                if not skip_special_tokens or i in self._kept:
                    out.append(self._special_ids[i])
            else:
                run.append(i)
        out.append(self._sp_bare.decode(run))
        text = "".join(out)
        return text[1:] if self._prefix and text.startswith(" ") else text
