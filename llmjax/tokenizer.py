"""One tokenizer interface over sentencepiece `tokenizer.model` and Hugging Face `tokenizer.json`.

Token ids agree with `transformers.AutoTokenizer` on the same folder: `tokenizer.json` is run by the
`tokenizers` library itself; a sentencepiece model is run the way transformers runs it (a whitespace
marker prepended only at the start of the text, special-token strings such as `<s>` recognised in the
text, BOS/EOS added as `tokenizer_config.json` says). Chat templates are rendered with jinja2 from
`tokenizer_config.json` or `chat_template.jinja`, in a sandbox as transformers does.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
import traceback
from collections.abc import Mapping
from typing import Any, Sequence

import jinja2
import jinja2.ext
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


class ChatTemplateError(ValueError, jinja2.TemplateError):
    """An error in a chat template's own logic (an undefined variable, a wrong type): a ValueError, as
    llmjax reports bad input, and a `jinja2.TemplateError`, as transformers raises it."""


class Tokenizer:
    """`encode(text) -> ids`, `decode(ids) -> text`, `apply_chat_template(messages) -> text`."""

    def __init__(self, backend, *, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None = None, special_tokens: dict[str, str] | None = None,
                 chat_templates: dict[str, str] | None = None):
        self._backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        self.eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template  # the default template
        self.chat_templates = dict(chat_templates or {})  # the others, by name ("tool_use", "rag", ...)
        self._special_tokens = special_tokens or {}

    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def __repr__(self) -> str:
        kind = "sentencepiece" if isinstance(self._backend, _SentencePieceBackend) else "tokenizers"
        chat = "a chat template" if self.chat_template or self.chat_templates else "no chat template"
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

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool | None = None, *,
                            tools: list[dict] | None = None, documents: list[dict] | None = None,
                            chat_template: str | None = None, continue_final_message: bool | str = False,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """Renders a conversation with the checkpoint's chat template; returns the prompt text (or,
        with `tokenize=True`, its token ids, encoded without adding BOS/EOS, as transformers does).

        As `transformers`' `apply_chat_template(..., tokenize=False)`: `tools` and `documents` are
        passed to the template (None when not given), keys whose value is None are dropped from the
        messages, `chat_template` names one of the checkpoint's named templates (`tools` picks the
        one named "tool_use") or is a template itself, and `continue_final_message` leaves the last
        message open for the model to continue. Unlike transformers, `add_generation_prompt`
        defaults to True (to False with `continue_final_message`).

        The text begins with the BOS token where the template writes it; `llmjax.generate` then adds
        no second BOS (where the template writes none, `generate` adds one to the text; the ids of
        `tokenize=True` have none, as transformers').
        """
        asked = sorted(k for k in _TRANSFORMERS_OPTIONS if not (kwargs.get(k) is None or kwargs[k] is False
                                                                  or kwargs[k] == {}))  # their defaults: no change
        if asked:
            raise TypeError(f"apply_chat_template does not take transformers' {', '.join(asked)}: it returns the "
                            "prompt's text, or with tokenize=True its ids as a list, neither masked, padded nor "
                            "truncated; leave them out (for sanitize_control_tokens, remove special-token strings "
                            "from untrusted text yourself)")
        source = self._template(chat_template, tools)
        messages = _chat_messages(messages)
        if add_generation_prompt is None:
            add_generation_prompt = not continue_final_message
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt do not go together: the first "
                             "leaves the last message open, the second starts a new assistant message (pass "
                             "add_generation_prompt=False)")
        if tools is not None:
            for n, tool in enumerate(tools):
                if not isinstance(tool, dict):
                    raise TypeError(f"tools[{n}] is a {type(tool).__name__}; give each tool as a JSON schema "
                                    "(a dict), e.g. transformers.utils.get_json_schema(function)")
        if documents is not None:
            for n, document in enumerate(documents):
                if not isinstance(document, dict):
                    raise TypeError(f"documents[{n}] is a {type(document).__name__}; give each document as a dict "
                                    "such as {'title': ..., 'text': ...}")
        tools, documents, kwargs = _plain(tools), _plain(documents), _plain(kwargs)
        try:
            template = _compiled(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"the checkpoint's chat template does not parse (line {e.lineno}: {e.message}); "
                             "fix it where the checkpoint keeps it (chat_template.jinja, chat_template.json or "
                             "tokenizer_config.json)") from None
        continued = None
        if continue_final_message:
            messages, continued = _mark_final_message(messages, continue_final_message, source)
        variables = {**self._special_tokens, **kwargs}  # the caller may override e.g. bos_token
        try:
            text = template.render(messages=messages, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError:
            raise  # the template's own refusal (raise_exception), its message as it wrote it
        except (jinja2.UndefinedError, TypeError, ValueError, ArithmeticError, LookupError, AttributeError) as e:
            # An error in the template's own logic.
            line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__))
                         if f.filename == "<template>"), None)
            where = f" at line {line}" if line is not None else ""
            raise ChatTemplateError(f"the chat template failed{where} ({type(e).__name__}: {e}); check the "
                                    "messages (each a dict with 'role' and 'content') and the template's "
                                    "variables") from e
        if continued is not None:
            text = _cut_after_final_message(text, continued)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    def _template(self, name: str | None, tools) -> str:
        """The template source to render, chosen as transformers' `get_chat_template` chooses."""
        named = {**self.chat_templates, **({"default": self.chat_template} if self.chat_template else {})}
        if name is not None:
            return named.get(name, name)  # a template's name, or a template itself
        if tools is not None and "tool_use" in named:
            return named["tool_use"]
        if "default" in named:
            return named["default"]
        if named:
            raise ValueError(f"this tokenizer has several chat templates and none named 'default'; pick one with "
                             f"chat_template=NAME (one of {sorted(named)})")
        raise ValueError("this tokenizer has no chat template (no 'chat_template' in "
                         "tokenizer_config.json or chat_template.json, and no chat_template.jinja); format "
                         "the prompt yourself (from the command line: leave out --chat)")

    @classmethod
    def from_dir(cls, folder: str) -> "Tokenizer | None":
        """The tokenizer of a model folder, or None when it holds no tokenizer file."""
        cfg = read_json(os.path.join(folder, "tokenizer_config.json"), optional=True)
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            # transformers takes config.json's tokenizer_class where tokenizer_config.json names none
            label = cfg.get("tokenizer_class") or read_json(os.path.join(folder, "config.json"),
                                                            optional=True).get("tokenizer_class")
            backend = _HFTokenizersBackend(os.path.join(folder, "tokenizer.json"), dict(cfg, tokenizer_class=label))
        elif os.path.isfile(os.path.join(folder, "tokenizer.model")):
            backend = _SentencePieceBackend(os.path.join(folder, "tokenizer.model"), cfg)
        else:
            return None
        names = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
        raw = {name: cfg.get(name) for name in names}
        named = {name for name in names if name in cfg}
        if "added_tokens_decoder" not in cfg:
            # transformers' legacy path (a config without added_tokens_decoder): special_tokens_map.json's
            # tokens take the place of the config's
            legacy = read_json(os.path.join(folder, "special_tokens_map.json"), optional=True)
            for name in names:
                if name in legacy:
                    raw[name] = legacy[name]
                    named.add(name)
        special = {name: _token_str(value) for name, value in raw.items()}
        if isinstance(backend, _SentencePieceBackend):  # Llama's tokenizer: <s>, </s>, <unk> where the config names none
            for name, piece in backend.default_special_tokens().items():
                if name not in named:
                    special[name] = piece
        special = {k: v for k, v in special.items() if v is not None}
        extra = cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        backend.add_config_tokens(cfg, [raw[name] for name in names if name in special] + extra)
        return cls(backend, bos_token=special.get("bos_token"), eos_token=special.get("eos_token"),
                   special_tokens=special, **_chat_templates(folder, cfg))


def _token_str(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _chat_templates(folder: str, cfg: dict) -> dict:
    """The default template and the named others, from where transformers reads them: chat_template.jinja
    and additional_chat_templates/NAME.jinja before tokenizer_config.json's `chat_template` (a string or a
    list of {name, template}); chat_template.json last (transformers' processors read it)."""
    named = {}
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            named["default"] = f.read()
    extra = os.path.join(folder, "additional_chat_templates")
    if os.path.isdir(extra):
        for name in sorted(os.listdir(extra)):
            if name.endswith(".jinja") and os.path.isfile(os.path.join(extra, name)):
                with open(os.path.join(extra, name), encoding="utf-8") as f:
                    named[name.removesuffix(".jinja")] = f.read()
    if not named:
        template = cfg.get("chat_template") or read_json(
            os.path.join(folder, "chat_template.json"), optional=True).get("chat_template")
        if isinstance(template, list):  # named templates
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        elif template:
            named["default"] = template
    default = named.pop("default", None)
    return {"chat_template": default, "chat_templates": named}


# transformers' apply_chat_template options that change what it returns: llmjax would hand them to the template
# as variables, and return what it always does.
_TRANSFORMERS_OPTIONS = ("sanitize_control_tokens", "return_assistant_tokens_mask", "return_dict", "return_tensors",
                         "padding", "truncation", "max_length", "tokenizer_kwargs")
# Names a message's reasoning goes under; templates read the first (transformers fills it from the others).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _chat_messages(messages) -> list[dict]:
    """The messages as transformers hands them to the template: a list of dicts of plain data (`_plain`: a
    dataclass or a pydantic model is taken as a dict), keys whose value is None left out, reasoning under
    `reasoning_content` and `thinking` too. Refuses what is not a conversation."""
    if isinstance(messages, (str, bytes, dict)) or not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts ({{'role': ..., 'content': ...}}), got "
                        f"{type(messages).__name__} {messages!r:.80}")
    if not messages:
        raise ValueError("the conversation is empty; give at least one message")
    out = []
    for n, message in enumerate(messages):
        plain = _plain(message)
        if not isinstance(plain, dict):
            raise TypeError(f"message {n} is a {type(message).__name__} ({message!r:.80}), not a dict with 'role' "
                            "and 'content' (one conversation at a time: a list of dicts)")
        message = plain
        if message.get("role") is None:
            raise ValueError(f"message {n} has no 'role' (its keys: {sorted(map(str, message))}); give each message "
                             "a role such as 'system', 'user' or 'assistant'")
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(value):
    """`value` as transformers hands it to a template: plain data (str, int, float, bool, None, and dicts,
    lists and tuples of them; a numpy scalar as Python's, a dataclass or a pydantic model such as the
    OpenAI SDK's messages as a dict), anything else as a placeholder naming its type ("<ndarray>"). An
    `np.bool_(False)` is not `false` to a template, and the sandbox guards only underscore attributes, not
    an object's own methods (an array's `tofile` writes a file)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):  # a subclass (an enum, np.str_) may carry methods of its own
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _plain(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _mark_final_message(messages: list[dict], field: bool | str, source: str):
    """transformers' `continue_final_message`: a tag after the last message's text, where the text is cut."""
    field = field if isinstance(field, str) else "content"
    last = dict(messages[-1])
    final = last.get(field)
    if final is None:
        raise ValueError(f"continue_final_message: the final message has no {field!r} to continue")
    fields = [field]
    if field in _REASONING_FIELDS:
        fields = [f for f in _REASONING_FIELDS if last.get(f) == final]
    if not any(f in source for f in fields):
        raise ValueError(f"continue_final_message: the chat template does not read {field!r}")
    if isinstance(final, (list, tuple)):
        blocks = [dict(b) if isinstance(b, dict) else b for b in final]
        for block in reversed(blocks):
            if isinstance(block, dict) and "text" in block:
                final = block["text"]
                block["text"] = block["text"] + _CONTINUE_TAG
                break
        else:
            raise ValueError("continue_final_message: the final message has no text part to continue")
        last[field] = blocks
    else:
        for f in fields:
            last[f] = last[f] + _CONTINUE_TAG
    return messages[:-1] + [last], final


def _cut_after_final_message(text: str, final: str) -> str:
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise ValueError("continue_final_message: the final message does not appear in the rendered chat (the "
                         "template changes or drops it), so the text cannot end inside it")
    at = text.rindex(_CONTINUE_TAG.strip())
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _raise_exception(message):
    """A template's refusal of the conversation (Llama 2's "roles must alternate"): a ChatTemplateError,
    so it is the ValueError llmjax raises for bad input and the TemplateError transformers raises."""
    raise ChatTemplateError(message)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes HTML characters; transformers' takes json.dumps' options
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Namespace(jinja2.utils.Namespace):
    """transformers' namespace: no underscore-prefixed attributes (no way to CPython's internals)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> jinja2.Template:
    """A chat template compiled once (a Llama 3.1 template: ~11 ms to compile, ~0.02 ms to render, so a
    server rendering one per request would spend nearly all of it compiling the same source)."""
    return _jinja_env().from_string(source)


@functools.lru_cache(maxsize=1)
def _jinja_env() -> jinja2.Environment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, "jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = _Namespace
    return env


def _prefix_settings(cfg: dict) -> tuple[bool, bool]:
    """A Llama tokenizer config's whitespace marker settings, as transformers reads them:
    `add_prefix_space` (unset: True) and `legacy` (only an explicit true)."""
    prefix = cfg.get("add_prefix_space")
    return (True if prefix is None else bool(prefix)), cfg.get("legacy") is True


class _HFTokenizersBackend:
    def __init__(self, path: str, cfg: dict | None = None):
        import tokenizers

        if not os.access(path, os.R_OK):
            raise PermissionError(not_permitted(path))
        try:
            with open(path, encoding="utf-8") as f:
                spec = f.read()
            self._tok = tokenizers.Tokenizer.from_str(spec)
        except Exception as e:  # tokenizers raises a bare Exception on a malformed file
            raise ValueError(f"{path}: cannot read tokenizer ({e}); restore it from the model's "
                             "release") from e
        # A byte-level file (Llama 3's, which some releases label LlamaTokenizer) runs as it is, as
        # transformers runs it.
        if (cfg or {}).get("tokenizer_class") in ("LlamaTokenizer", "LlamaTokenizerFast") and \
                '"ByteLevel"' not in spec and isinstance(self._tok.model, tokenizers.models.BPE):
            self._as_llama_tokenizer(cfg)
        # `"split_special_tokens": true`: special tokens written in the text are encoded as text, as transformers does
        self._tok.encode_special_tokens = bool((cfg or {}).get("split_special_tokens"))

    def _as_llama_tokenizer(self, cfg: dict) -> None:
        """transformers' LlamaTokenizer takes only the vocabulary, merges and added tokens from a
        tokenizer.json and builds the rest itself, as for a `tokenizer.model`: no normalizer (a
        sentencepiece conversion's prepends a marker to every run of text, after each special token
        and before a leading space too), a Metaspace marker at the text's start only (every run's with
        `"legacy": true`, none with `"add_prefix_space": false`). BOS/EOS stay the file's post-processor's:
        transformers ignores the config's add_bos_token/add_eos_token beside a tokenizer.json."""
        from tokenizers import decoders, pre_tokenizers

        prefix, legacy = _prefix_settings(cfg)
        scheme = ("always" if legacy else "first") if prefix else "never"
        self._tok.normalizer = None
        self._tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme=scheme, split=False)
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        self._tok.decoder = decoders.Sequence(steps + ([decoders.Strip(content=" ", left=1)] if prefix else []))
        # Its BPE model holds the file's vocabulary and merges with transformers' settings, not the file's:
        # no unknown token (a character with no byte token is dropped), no dropout, no subword affixes.
        model = self._tok.model
        model.byte_fallback, model.fuse_unk, model.unk_token, model.dropout = True, True, None, None
        model.continuing_subword_prefix = model.end_of_word_suffix = None
        model.ignore_merges = False

    def add_config_tokens(self, cfg: dict, named: list) -> None:
        """transformers adds to a tokenizer.json's added tokens those of tokenizer_config.json's
        `added_tokens_decoder` that it lacks or holds with other flags (in id order, each at the next free
        id, or at its piece's id where the vocabulary has it), and the special tokens the config names
        (`bos_token`, ..., `extra_special_tokens`) that are not added tokens yet: so they are found in the
        text, and skipped in decoding, as the file's own are."""
        from tokenizers import AddedToken

        flags = ("single_word", "lstrip", "rstrip", "normalized", "special")

        def added(value: dict) -> AddedToken:
            return AddedToken(value["content"], **{k: bool(value[k]) for k in flags if k in value})
        have = {repr(t) for t in self._tok.get_added_tokens_decoder().values()}
        tokens = []
        for _, value in sorted((cfg.get("added_tokens_decoder") or {}).items(), key=lambda item: int(item[0])):
            if isinstance(value, dict) and isinstance(value.get("content"), str):
                token = added(value)
                if repr(token) not in have:
                    tokens.append(token)
        known = {t.content for t in self._tok.get_added_tokens_decoder().values()} | {t.content for t in tokens}
        for value in named:
            if isinstance(value, dict) and isinstance(value.get("content"), str):
                token = added(value)
                token.special = True
            elif isinstance(value, str) and value:
                token = AddedToken(value, special=True)
            else:
                continue
            if token.content not in known:
                tokens.append(token)
                known.add(token.content)
        if tokens:
            self._tok.add_tokens(tokens)

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


_WORD = re.compile(r"\w")


def _strip_flags(token: dict) -> tuple[bool, bool, bool]:
    """An added token's (lstrip, rstrip, single_word), as `_SentencePieceBackend._split` applies them."""
    return bool(token.get("lstrip")), bool(token.get("rstrip")), bool(token.get("single_word"))


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
        # transformers' `legacy` mode: the text after each special token gets the whitespace marker too,
        # as sentencepiece gives every piece of text it encodes.
        self._prefix, self._legacy = _prefix_settings(cfg)
        self._specials = self._special_tokens(cfg)
        self._special_ids = {i: t for t, i in self._specials.items()}
        # Added tokens marked "special": false keep their text when special tokens are skipped.
        self._kept = {int(key) for key, value in (cfg.get("added_tokens_decoder") or {}).items()
                      if isinstance(value, dict) and value.get("special") is False}
        # Added tokens may take ids past the model's pieces (chat markers added to a Llama-2 model).
        self._size = max([self._sp.get_piece_size(), *(i + 1 for i in self._special_ids)])
        # How each added token is found in the text, as its AddedToken flags tell `tokenizers` (which
        # transformers runs a tokenizer.model with): `lstrip`/`rstrip` take the whitespace beside it into
        # the token, `single_word` matches it only between non-word characters, and `normalized` tokens
        # are looked for after the others, in the text between those.
        added = {_token_str(v): v for v in (cfg.get("added_tokens_decoder") or {}).values() if isinstance(v, dict)}
        self._strips = {t: _strip_flags(f) for t, f in added.items()}
        self._normalized = {t for t, f in added.items() if f.get("normalized", not f.get("special", False))}
        # `"split_special_tokens": true`: special tokens written in the text are encoded as text, as transformers does
        self._split_special = bool(cfg.get("split_special_tokens"))
        self._find_added_tokens()

    def _find_added_tokens(self) -> None:
        found = [t for t, i in self._specials.items() if t and (i in self._kept or not self._split_special)]
        self._passes = [re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True)))
                        for tokens in ([t for t in found if t not in self._normalized],
                                       [t for t in found if t in self._normalized]) if tokens]

    def add_config_tokens(self, cfg: dict, named: list) -> None:
        """The special tokens the config names (`bos_token`, ..., `extra_special_tokens`) that are not added
        tokens yet become special added tokens, as transformers makes them: at their piece's id where the
        model has the piece, else at the next id past the others."""
        for value in named:
            content = _token_str(value)
            if not isinstance(content, str) or not content or content in self._specials:
                continue
            i = self._sp.piece_to_id(content)
            if self._sp.id_to_piece(i) != content:
                i, self._size = self._size, self._size + 1
            self._specials[content], self._special_ids[i] = i, content
            if isinstance(value, dict):
                self._strips[content] = _strip_flags(value)
        self._find_added_tokens()

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

    def default_special_tokens(self) -> dict[str, str]:
        sp = self._sp
        ids = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id()}
        return {name: sp.id_to_piece(i) for name, i in ids.items() if i >= 0}

    def token_to_id(self, token: str) -> int | None:
        if token in self._specials:
            return self._specials[token]
        i = self._sp.piece_to_id(token)
        return None if i == self._sp.unk_id() and token != self._sp.id_to_piece(i) else i

    def _split(self, text: str) -> list[tuple[int | None, int, str]]:
        """The text as (added token's id or None, start, text) pieces, the added tokens found as
        `tokenizers` finds them (leftmost, then longest)."""
        pieces = [(None, 0, text)]
        for pattern in self._passes:
            out = []
            for token, offset, chunk in pieces:
                if token is not None:
                    out.append((token, offset, chunk))
                    continue
                done = 0  # chunk[:done] is in out
                for match in pattern.finditer(chunk):
                    (start, stop), content = match.span(), match.group()
                    lstrip, rstrip, single_word = self._strips.get(content, (False, False, False))
                    if single_word and (_WORD.match(chunk, max(start - 1, 0), start) or _WORD.match(chunk, stop)):
                        continue
                    while lstrip and start > done and chunk[start - 1].isspace():
                        start -= 1
                    while rstrip and stop < len(chunk) and chunk[stop].isspace():
                        stop += 1
                    if done < start:
                        out.append((None, offset + done, chunk[done:start]))
                    out.append((self._specials[content], offset + start, chunk[start:stop]))
                    done = stop
                if done < len(chunk):
                    out.append((None, offset + done, chunk[done:]))
            pieces = out
        return pieces

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids: list[int] = []
        for token, start, chunk in self._split(text):
            if token is not None:
                ids.append(token)
            elif chunk:
                # The start of the text gets the whitespace marker unless it begins with one (a space
                # or U+2581), or the tokenizer's config sets add_prefix_space to false; with `legacy`,
                # so does the text after each special token.
                first = start == 0 or self._legacy
                prefix = " " if self._prefix and first and not chunk.startswith((" ", "\u2581")) else ""
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
