"""Tokenizer parity with transformers.AutoTokenizer, for sentencepiece and tokenizer.json folders."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from llmjax.tokenizer import Tokenizer

from conftest import LLAMA2_CHAT_TEMPLATE

TEXTS = ["", " ", "   ", "\n", "\t tab", "hello world", " hello", "trailing  ", "  two leading",
         "hello  world\n\n  x", "héllo wörld", "你好，世界", "emoji 😀👍🏽", "ünïcödé ☃ ∑ 𝔘",
         "def f(x):\n    return x ** 2\n", "12345 67.89", "<s>special</s> tokens", "x</s>", "a<unk>b"]

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is 2+2?"}]


# llmjax follows transformers 5.24 where 5.17 (the GPU machine's) differs: 5.17 kept a message's keys
# whose value is None and did not copy `reasoning` to `reasoning_content` and `thinking`, and rebuilt a
# byte-level tokenizer.json labelled LlamaTokenizer as a sentencepiece one.
_NEWER_TRANSFORMERS = pytest.mark.skipif(
    tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 24),
    reason="llmjax follows transformers 5.24 here")


def _assert_same(ours: Tokenizer, theirs):
    for text in TEXTS:
        for special in (True, False):
            ids = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, (text, special)
            for skip in (True, False):
                expected = theirs.decode(ids, skip_special_tokens=skip)
                assert ours.decode(ids, skip_special_tokens=skip) == expected, (text, skip)


def test_sentencepiece_matches_autotokenizer(sp_dir):
    theirs = transformers.AutoTokenizer.from_pretrained(sp_dir)
    ours = Tokenizer.from_dir(str(sp_dir))
    _assert_same(ours, theirs)
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) == (1, 2)
    assert ours.vocab_size == 600
    # A model's vocabulary may be padded past the tokenizer's; such ids decode to nothing.
    assert ours.decode([300, 5000, 301]) == theirs.decode([300, 5000, 301]) == ours.decode([300, 301])


def test_sentencepiece_add_eos_token(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    cfg = json.loads((sp_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token=False,
                                                                    add_eos_token=True)))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(str(tmp_path))
    for text in TEXTS[:8]:
        assert ours.encode(text) == theirs.encode(text)
    assert ours.encode("hi")[-1] == 2 and ours.encode("hi")[0] != 1


def _sp_with(sp_dir, folder, **config):
    """The sentencepiece fixture with `config` over its tokenizer_config.json: (ours, transformers')."""
    shutil.copy(sp_dir / "tokenizer.model", folder)
    cfg = json.loads((sp_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(cfg, **config)))
    return Tokenizer.from_dir(str(folder)), transformers.AutoTokenizer.from_pretrained(folder)


def test_sentencepiece_without_prefix_space(sp_dir, tmp_path):
    ours, theirs = _sp_with(sp_dir, tmp_path, add_prefix_space=False)
    _assert_same(ours, theirs)
    # A line encodes the same at the start of the text as after a newline.
    line = ours.encode("def f(x):", add_special_tokens=False)
    assert ours.encode("x\ndef f(x):", add_special_tokens=False)[-len(line):] == line


@pytest.mark.parametrize("legacy", [True, False, None])
def test_sentencepiece_legacy_marks_the_text_after_special_tokens(sp_dir, tmp_path, legacy):
    # `"legacy": true` (in many Llama 2 derivatives' tokenizer_config.json): transformers gives the text
    # after each special token the whitespace marker too ("<s>[INST]" -> "<s>", "▁[", ...).
    ours, theirs = _sp_with(sp_dir, tmp_path, legacy=legacy)
    _assert_same(ours, theirs)
    for text in ("<s>[INST] hi [/INST]", "a</s>b", "a</s> b", "<s>\nx"):
        assert ours.encode(text) == theirs.encode(text), text
    after = ours.encode("</s>b", add_special_tokens=False)[1:]
    assert (after == ours.encode("b", add_special_tokens=False)) == (legacy is True)


def test_sentencepiece_with_added_tokens_past_its_pieces(sp_dir, tmp_path):
    """Chat markers added in tokenizer_config.json take ids past the model's 600 pieces; one added
    token is not special, so skipping special tokens keeps its text. As transformers."""
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    cfg = json.loads((sp_dir / "tokenizer_config.json").read_text())
    flags = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False}
    added = {"0": ("<unk>", True), "1": ("<s>", True), "2": ("</s>", True), "600": ("<|im_start|>", True),
             "601": ("<|im_end|>", True), "602": ("<tool>", False)}
    cfg["added_tokens_decoder"] = {i: dict(flags, content=c, special=special) for i, (c, special) in added.items()}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(str(tmp_path))
    assert ours.vocab_size == len(theirs) == 603
    for text in ["<|im_start|>user\nhi<|im_end|>", "a <tool> b", "x<|im_end|>", "<tool><tool>", *TEXTS]:
        ids = theirs.encode(text)
        assert ours.encode(text) == ids, text
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip), (text, skip)
    # Without 601, an id between the added ones has no text (a model may sample it; it must not raise).
    del cfg["added_tokens_decoder"]["601"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    gap = Tokenizer.from_dir(str(tmp_path))
    assert gap.decode([300, 601, 602]) == gap.decode([300]) + "<tool>"


def test_sentencepiece_added_token_flags_as_transformers(sp_dir, tmp_path):
    """An added token's lstrip/rstrip take the whitespace beside it, single_word matches it only between
    non-word characters, and a text starting with U+2581 gets no second marker: as transformers, which
    ran them so while llmjax ignored the flags ("<|im_end|>\\n" gave the newline its own token)."""
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    cfg = json.loads((sp_dir / "tokenizer_config.json").read_text())
    flags = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
    added = {"1": {"content": "<s>", "rstrip": True}, "2": {"content": "</s>", "lstrip": True},
             "600": {"content": "<|im_end|>", "rstrip": True}, "601": {"content": "<tool>", "lstrip": True, "special": False},
             "602": {"content": "[PAD]", "single_word": True}, "603": {"content": "Hello", "normalized": True, "special": False}}
    cfg["added_tokens_decoder"] = {i: dict(flags, **f) for i, f in added.items()}
    for legacy in (False, True):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, legacy=legacy)))
        ours, theirs = Tokenizer.from_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(tmp_path)
        for text in ["<|im_end|>\n x", "a \t<tool>b", "a  <|im_end|>  <tool>  b", "x[PAD]", "é [PAD] y", "_[PAD]",
                     "<s>  hi </s>", "HelloHello <tool>Hello", "\u2581x", " \u2581x", "\u2581", *TEXTS]:
            for special in (True, False):
                assert ours.encode(text, special) == theirs.encode(text, add_special_tokens=special), (text, legacy)
    assert ours.encode("<|im_end|>\n x", False) == [600] + ours.encode("x", False)
    assert ours.encode("a \t<tool>", False) == ours.encode("a", False) + [601]


@pytest.fixture(scope="module")
def json_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json (Llama 3's kind) built with the tokenizers library."""
    import inspect

    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("tokjson")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([inspect.getsource(json)], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))])
    tok.save(str(folder / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | trim }}"
                "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "chat_template": template}))
    return folder


def _llama2_tokenizer_json(sp_dir, folder, **config):
    """A sentencepiece-converted tokenizer.json as Llama 2 and its derivatives ship it (a normalizer that
    prepends the marker to every run of text) beside a LlamaTokenizer config: (ours, transformers')."""
    transformers.AutoTokenizer.from_pretrained(sp_dir).save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["normalizer"] = {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "\u2581"}, {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"}]}
    spec["pre_tokenizer"] = None
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "}, {"type": "ByteFallback"},
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    cfg = json.loads((sp_dir / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {k: v for k, v in dict(cfg, **config).items() if v is not None}))
    return Tokenizer.from_dir(str(folder)), transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("config", [{}, {"legacy": True}, {"legacy": False}, {"add_prefix_space": False},
                                    {"tokenizer_class": "LlamaTokenizerFast"}])
def test_llama2_tokenizer_json_matches_autotokenizer(sp_dir, tmp_path, config):
    # transformers' LlamaTokenizer keeps only a tokenizer.json's vocabulary, merges and added tokens and
    # builds its own pre-tokenizer and decoder: " a" is "▁a" (the file's normalizer makes "▁▁a"), and
    # the text after a special token gets no marker unless the config says "legacy": true.
    ours, theirs = _llama2_tokenizer_json(sp_dir, tmp_path, **config)
    _assert_same(ours, theirs)
    for text in (" a", "  a", "<s> x", "a</s>b", "<s>[INST] hi [/INST]", "x\n y"):
        assert ours.encode(text) == theirs.encode(text), text
    assert ours.encode("hi")[0] == ours.bos_id == theirs.bos_token_id == 1


def test_llama_tokenizer_json_model_settings_are_transformers_own(sp_dir, tmp_path):
    # LlamaTokenizer builds its BPE model from the file's vocabulary and merges alone: no unknown token
    # (a character with no byte token is dropped, not <unk>), no dropout (the file's would make encoding
    # random), merges always applied.
    ours, _ = _llama2_tokenizer_json(sp_dir, tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"].update(unk_token="<unk>", dropout=0.5, ignore_merges=True)
    for piece in [f"<0x{b:02X}>" for b in range(0x80, 0x100)]:  # no byte pieces for non-ASCII characters
        del spec["model"]["vocab"][piece]
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    ours, theirs = Tokenizer.from_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(tmp_path)
    _assert_same(ours, theirs)
    text = "😀 the json module, " * 3
    assert [ours.encode(text) for _ in range(5)] == [theirs.encode(text)] * 5
    assert 0 not in ours.encode(text)


def test_llama_label_in_config_json_counts_as_in_tokenizer_config(sp_dir, tmp_path):
    # transformers reads tokenizer_class from config.json where tokenizer_config.json has none.
    _llama2_tokenizer_json(sp_dir, tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["tokenizer_class"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "tokenizer_class": "LlamaTokenizer"}))
    ours, theirs = Tokenizer.from_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert type(theirs).__name__ == "LlamaTokenizer"
    _assert_same(ours, theirs)
    assert ours.encode(" a", add_special_tokens=False) == theirs.encode(" a", add_special_tokens=False)


@_NEWER_TRANSFORMERS
def test_byte_level_tokenizer_json_labelled_llama_runs_as_it_is(json_dir, tmp_path):
    # Some Llama 3 releases name LlamaTokenizer in tokenizer_config.json; transformers runs their
    # byte-level tokenizer.json as it is (a Metaspace pre-tokenizer would make " " the "Ġ" piece).
    shutil.copy(json_dir / "tokenizer.json", tmp_path)
    cfg = json.loads((json_dir / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, tokenizer_class="LlamaTokenizer")))
    ours, theirs = Tokenizer.from_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(tmp_path)
    _assert_same(ours, theirs)
    assert ours.encode(" hi  there") == Tokenizer.from_dir(str(json_dir)).encode(" hi  there")


def test_tokenizer_json_matches_autotokenizer(json_dir):
    theirs = transformers.AutoTokenizer.from_pretrained(json_dir)
    ours = Tokenizer.from_dir(str(json_dir))
    _assert_same(ours, theirs)
    assert ours.encode("hi")[0] == ours.bos_id == theirs.bos_token_id


@pytest.mark.parametrize("which", ["sp", "json"])
def test_tokens_the_config_adds_are_found_as_transformers_finds_them(which, sp_dir, json_dir, tmp_path):
    """Tokens tokenizer_config.json adds to the tokenizer file (an added token it lacks or holds with other
    flags, an EOS or pad token named but not in it, extra_special_tokens) were encoded as plain text, and
    EOS had no id; transformers adds them."""
    source = sp_dir if which == "sp" else json_dir
    shutil.copy(source / ("tokenizer.model" if which == "sp" else "tokenizer.json"), tmp_path)
    cfg = json.loads((source / "tokenizer_config.json").read_text())
    old = Tokenizer.from_dir(str(source))
    bos, eos, size = cfg["bos_token"], cfg["eos_token"], old.vocab_size
    flags = {"lstrip": False, "rstrip": False, "normalized": False, "single_word": False, "special": True}
    cfg["added_tokens_decoder"] = {str(old.bos_id): dict(flags, content=bos, rstrip=True),
                                   str(old.eos_id): dict(flags, content=eos), str(size): dict(flags, content="<|new|>", lstrip=True)}
    cfg.update(eos_token="<|im_end|>", extra_special_tokens=["<x1>", "<x2>"],
               pad_token={"__type": "AddedToken", **flags, "content": "<pad>", "rstrip": True})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, theirs = Tokenizer.from_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert ours.vocab_size == len(theirs) == size + 5
    assert (ours.bos_id, ours.eos_id) == (theirs.bos_token_id, theirs.eos_token_id) and ours.eos_id is not None
    for text in [f"{bos}  hi", "a <|new|>b", "x<|im_end|>y", "<x1><x2> <pad>  z", *TEXTS]:
        for special in (True, False):
            ids = theirs.encode(text, add_special_tokens=special)
            assert ours.encode(text, special) == ids, (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip), (text, skip)
    assert ours.encode("x<|im_end|>", False)[-1] == ours.eos_id


@pytest.mark.parametrize("which", ["sp", "json"])
def test_split_special_tokens_encodes_them_as_text(which, sp_dir, json_dir, tmp_path):
    """`"split_special_tokens": true` (special tokens in user text must not act as control tokens) was
    ignored; as transformers, they are encoded as text, BOS is still added, and decoding is unchanged."""
    source = sp_dir if which == "sp" else json_dir
    shutil.copy(source / ("tokenizer.model" if which == "sp" else "tokenizer.json"), tmp_path)
    cfg = json.loads((source / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, split_special_tokens=True)))
    ours, theirs = Tokenizer.from_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(tmp_path)
    _assert_same(ours, theirs)
    bos, eos = cfg["bos_token"], cfg["eos_token"]
    for text in (f"{bos}hi{eos}", f"a {eos} b"):
        ids = ours.encode(text)
        assert ids == theirs.encode(text) and ids[0] == ours.bos_id and ours.eos_id not in ids and ids.count(ours.bos_id) == 1


@pytest.mark.parametrize("which", ["sp", "json"])
def test_chat_template_matches_transformers(which, sp_dir, json_dir):
    folder = sp_dir if which == "sp" else json_dir
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_dir(str(folder))
    for gen_prompt in (True, False):
        expected = theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=gen_prompt)
        assert ours.apply_chat_template(CHAT, add_generation_prompt=gen_prompt) == expected


def test_chat_template_from_jinja_file_and_errors(sp_dir, tmp_path):
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_dir(str(tmp_path)).apply_chat_template(CHAT)
    (tmp_path / "chat_template.jinja").write_text(LLAMA2_CHAT_TEMPLATE)
    tok = Tokenizer.from_dir(str(tmp_path))
    assert tok.apply_chat_template(CHAT[1:2]) == "<s>[INST] Hi there [/INST]"
    assert tok.apply_chat_template(CHAT[1:2], bos_token="") == "[INST] Hi there [/INST]"
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="alternate"):
        tok.apply_chat_template([CHAT[1], CHAT[1]])
    # The template's refusal is also the ValueError llmjax raises for bad input, its message unchanged.
    with pytest.raises(ValueError, match="^Conversation roles must alternate user/assistant/user/assistant/...$"):
        tok.apply_chat_template([CHAT[1], CHAT[1]])
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}")  # no endfor
    with pytest.raises(ValueError, match="chat template does not parse.*chat_template.jinja"):
        Tokenizer.from_dir(str(tmp_path)).apply_chat_template(CHAT)


def test_bad_tokenizer_files_name_the_file(tmp_path):
    assert Tokenizer.from_dir(str(tmp_path)) is None
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="tokenizer.model: not a sentencepiece model"):
        Tokenizer.from_dir(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer.json: cannot read tokenizer"):
        Tokenizer.from_dir(str(tmp_path))


@pytest.mark.parametrize("which", ["sp", "json"])
def test_text_with_a_lone_surrogate_is_refused_with_its_place(which, sp_dir, json_dir):
    ours = Tokenizer.from_dir(str(sp_dir if which == "sp" else json_dir))
    with pytest.raises(ValueError, match=r"'\\udc80' at index 3 is a lone surrogate"):
        ours.encode("abc\udc80")
    assert ours.decode(ours.encode("abc\U0001F600", add_special_tokens=False)) == "abc\U0001F600"


@pytest.mark.parametrize("which", ["sp", "json"])
def test_decode_refuses_what_is_not_a_token_id(which, sp_dir, json_dir):
    """Negative, float, bool or far-out ids decoded as nothing (or as another id) before; arrays of
    integers are taken as lists."""
    ours = Tokenizer.from_dir(str(sp_dir if which == "sp" else json_dir))
    ids = ours.encode("def f(x):", add_special_tokens=False)
    want = ours.decode(ids)
    assert ours.decode(np.asarray(ids)) == ours.decode(tuple(np.int64(i) for i in ids)) == want
    assert ours.decode(i for i in ids) == ours.decode([jnp.asarray(i) for i in ids]) == want
    assert ours.decode(range(5, 9)) == ours.decode([5, 6, 7, 8])
    for bad in ([-1], [2**40], [5.7], [True], [np.bool_(True)], [jnp.asarray(1.5)], [np.array([1, 2])]):
        with pytest.raises(ValueError, match="decode takes token ids, integers from 0 to 2..31 - 1"):
            ours.decode(bad)
    for bad in ("abc", 5, None, np.array([[5, 6]]), np.array([1.0])):
        with pytest.raises(TypeError, match="decode takes"):
            ours.decode(bad)


@pytest.mark.parametrize("which", ["sp", "json"])
def test_a_tokenizer_prints_what_it_is(which, sp_dir, json_dir):
    ours = Tokenizer.from_dir(str(sp_dir if which == "sp" else json_dir))
    kind = "sentencepiece" if which == "sp" else "tokenizers"
    assert repr(ours) == (f"Tokenizer({kind}, {ours.vocab_size} pieces, bos {ours.bos_token!r}, "
                          f"eos {ours.eos_token!r}, {'a' if ours.chat_template else 'no'} chat template)")
    assert "<s>" in repr(ours) or "<|begin_of_text|>" in repr(ours)


def _folder_with_template(json_dir, tmp_path, template, name="t", **files):
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(json_dir / "tokenizer.json", folder)
    cfg = json.loads((json_dir / "tokenizer_config.json").read_text())
    cfg.pop("chat_template")
    if template is not None:
        cfg["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    for path, text in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    return folder


def _both(folder, messages, **kwargs):
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_dir(str(folder))
    kwargs.setdefault("add_generation_prompt", False)
    expected = theirs.apply_chat_template(messages, tokenize=False, **kwargs)
    assert ours.apply_chat_template(messages, **kwargs) == expected
    ids = theirs.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)
    assert ours.apply_chat_template(messages, tokenize=True, **kwargs) == ids
    return expected


@pytest.mark.parametrize("template, kwargs", [
    # tojson's options (transformers' filter takes json.dumps' arguments)
    pytest.param("{{ {'b': 1, 'a': 'é'} | tojson(sort_keys=True) }}{{ messages[0] | tojson(indent=2) }}", {},
                 marks=_NEWER_TRANSFORMERS),
    ("{{ {'b': 1} | tojson(separators=(',', ':')) }}{{ 'é' | tojson(ensure_ascii=True) }}", {}),
    # tools and documents are None when not given: `is not none` is false
    ("{% if tools is not none %}TOOLS{% endif %}{% if documents is none %}NODOCS{% endif %}", {}),
    ("{% if tools is not none %}{{ tools | length }}{% endif %}", {"tools": [{"name": "f"}]}),
    # {% generation %} (assistant masks) renders its body
    ("{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}", {}),
    # keys whose value is None are dropped; reasoning is copied under reasoning_content and thinking
    pytest.param("{% for m in messages %}{{ m['content'] }}{% if 'name' in m %}!{% endif %}"
                 "{{ m.reasoning_content }}{{ m.thinking }};{% endfor %}", {}, marks=_NEWER_TRANSFORMERS),
    # continue_final_message leaves the last message open
    ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}",
     {"continue_final_message": True}),
])
def test_chat_template_features_match_transformers(json_dir, tmp_path, template, kwargs):
    messages = [{"role": "user", "content": "hi", "name": None},
                {"role": "assistant", "content": "The answer is ", "reasoning": "hmm"}]
    _both(_folder_with_template(json_dir, tmp_path, template), messages, **kwargs)


def test_chat_template_sees_plain_data_as_transformers(json_dir, tmp_path):
    """The template sees what transformers hands it: an np.bool_(False) is false (Qwen 3's
    `enable_thinking is false` missed it), a numpy integer an integer, a dataclass message a dict, and
    any other object only a placeholder naming its type (its methods out of the template's reach).
    Documents that are not dicts are refused."""
    import dataclasses

    @dataclasses.dataclass
    class Message:
        role: str
        content: str

    folder = _folder_with_template(json_dir, tmp_path, PLAIN_TEMPLATE)
    messages = [Message("user", "hi"), {"role": "assistant", "content": "yo"}, {"role": "user", "content": np.str_("x")}]
    kwargs = dict(think=np.bool_(False), n=np.int64(3), extra=[np.zeros(2), {1}, (np.float32(0.5),)])
    text = _ours_and_theirs_from(folder, messages, **kwargs)
    assert text == "<user>hi<assistant>yo<user>x<think></think>True['<ndarray>', '<set>', (0.5,)]"
    with pytest.raises(TypeError, match=r"documents\[1\] is a str; give each document as a dict"):
        Tokenizer.from_dir(str(folder)).apply_chat_template(messages, documents=[{"text": "a"}, "b"])
    with pytest.raises(TypeError, match="message 0 is a object"):
        Tokenizer.from_dir(str(folder)).apply_chat_template([object()])


def _ours_and_theirs_from(folder, messages, **kwargs):
    """llmjax's rendering, checked against transformers' where transformers takes message objects (5.24
    on: older ones refuse a message that is not a dict)."""
    text = Tokenizer.from_dir(str(folder)).apply_chat_template(messages, False, **kwargs)
    if tuple(int(x) for x in transformers.__version__.split(".")[:2]) >= (5, 24):
        assert _both(folder, messages, **kwargs) == text
    return text


PLAIN_TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% if 'tool_calls' in m %}!{% endif %}"
                  "{% endfor %}{% if think is false %}<think></think>{% endif %}{{ n is integer }}{{ extra }}")


def test_a_pydantic_message_is_a_dict_to_the_template_as_in_transformers(json_dir, tmp_path):
    """A pydantic message (the OpenAI SDK's) is its dict, keys whose value is None left out."""
    pydantic = pytest.importorskip("pydantic")

    class Reply(pydantic.BaseModel):
        role: str
        content: str | None
        tool_calls: list | None = None

    folder = _folder_with_template(json_dir, tmp_path, PLAIN_TEMPLATE)
    messages = [{"role": "user", "content": "hi"}, Reply(role="assistant", content="yo")]
    assert _ours_and_theirs_from(folder, messages, think=True, n=1.5, extra="") == "<user>hi<assistant>yoFalse"


def test_named_chat_templates_match_transformers(json_dir, tmp_path):
    named = [{"name": "default", "template": "D{{ messages | length }}"},
             {"name": "tool_use", "template": "T{{ tools | length }}"}, {"name": "rag", "template": "R"}]
    folder = _folder_with_template(json_dir, tmp_path, named)
    messages = [{"role": "user", "content": "hi"}]
    assert _both(folder, messages) == "D1"
    assert _both(folder, messages, tools=[{"name": "f"}]) == "T1"
    assert _both(folder, messages, chat_template="rag") == "R"
    assert _both(folder, messages, chat_template="L{{ messages[0].role }}") == "Luser"
    files = {"chat_template.jinja": "J", "additional_chat_templates/tool_use.jinja": "TJ"}
    folder = _folder_with_template(json_dir, tmp_path, "CONFIG", name="files", **files)
    assert _both(folder, messages) == "J" and _both(folder, messages, tools=[{"name": "f"}]) == "TJ"
    folder = _folder_with_template(json_dir, tmp_path, named[1:], name="nodefault")
    with pytest.raises(ValueError, match=r"none named 'default'.*\['rag', 'tool_use'\]"):
        Tokenizer.from_dir(str(folder)).apply_chat_template(messages)


def test_chat_template_bad_input_is_refused_clearly(json_dir, tmp_path):
    tok = Tokenizer.from_dir(str(_folder_with_template(
        json_dir, tmp_path, "{% for m in messages %}{{ '<' + m['role'] + '>' + m['content'] }}{% endfor %}{{ x + 1 }}")))
    for bad, error, match in [([], ValueError, "conversation is empty"), ("hi", TypeError, "list of dicts"),
                              ({"role": "user", "content": "hi"}, TypeError, "list of dicts"),
                              (["hi"], TypeError, "message 0 is a str"),
                              ([[{"role": "user", "content": "hi"}]], TypeError, "message 0 is a list"),
                              ([{"content": "hi"}], ValueError, "message 0 has no 'role'")]:
        with pytest.raises(error, match=match):
            tok.apply_chat_template(bad)
    with pytest.raises(ValueError, match=r"chat template failed at line 1 \(UndefinedError: 'x' is undefined"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    import jinja2

    with pytest.raises(jinja2.TemplateError):  # as transformers raises it, for code written against it
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match="do not go together"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], True, continue_final_message=True)
    with pytest.raises(TypeError, match="tools.0. is a builtin_function_or_method; give each tool as a JSON schema"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}], tools=[print])
    # transformers' options that change what it returns are refused, not handed to the template and ignored
    for option in ({"sanitize_control_tokens": True}, {"return_assistant_tokens_mask": True}, {"return_dict": True},
                   {"truncation": True, "max_length": 5}, {"return_tensors": "np"}, {"max_length": 0}):
        with pytest.raises(TypeError, match=f"does not take transformers' {'.*'.join(sorted(option))}"):
            tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, **option)
    # their defaults, given, change nothing
    tok.chat_template = "{{ messages[0].content }}"
    default = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=True, return_dict=False, padding=False,
                                   truncation=False, max_length=None, tokenizer_kwargs={}) == default
    import jinja2

    tok.chat_template = "{% set ns = namespace(_x=1) %}"
    with pytest.raises(jinja2.exceptions.SecurityError, match="underscore"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_without_bos_tokenizes_as_transformers(sp_dir, tmp_path):
    """tokenize=True encodes the text without adding BOS, as transformers: a template that writes no BOS
    gets none; and a tokenizer_config.json that names no special tokens gets Llama's <s>, </s>, <unk>."""
    shutil.copy(sp_dir / "tokenizer.model", tmp_path)
    cfg = json.loads((sp_dir / "tokenizer_config.json").read_text())
    for key in ("bos_token", "eos_token", "unk_token"):
        del cfg[key]
    cfg["chat_template"] = "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    _both(tmp_path, CHAT)
    cfg["chat_template"] = "[INST] {{ messages[0]['content'] }} [/INST]"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(str(tmp_path)).apply_chat_template(CHAT, tokenize=True)[0] != 1
    _both(tmp_path, CHAT)


@pytest.mark.parametrize("which", ["sp", "json"])
@pytest.mark.parametrize("decoder", [False, True])
def test_special_tokens_map_json_as_transformers_reads_it(which, decoder, sp_dir, json_dir, tmp_path):
    """A config without added_tokens_decoder (transformers' legacy path) takes its special tokens from
    special_tokens_map.json, over the config's own; with added_tokens_decoder that file is not read.
    A chat template's {{ bos_token }} renders as transformers renders it."""
    source = sp_dir if which == "sp" else json_dir
    for name in ("tokenizer.model", "tokenizer.json"):
        if (source / name).exists():
            shutil.copy(source / name, tmp_path)
    bos, eos = ("<s>", "</s>") if which == "sp" else ("<|begin_of_text|>", "<|end_of_text|>")
    cfg = json.loads((source / "tokenizer_config.json").read_text())
    cfg.update(bos_token=eos, chat_template="{{ bos_token }}[{{ pad_token }}]{% for m in messages %}{{ m['content'] }}{% endfor %}")
    if decoder:
        cfg["added_tokens_decoder"] = {}
    else:
        cfg.pop("eos_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": bos, "lstrip": False}, "eos_token": eos, "pad_token": bos}))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_dir(str(tmp_path))
    assert (ours.bos_token, ours.bos_id, ours.eos_token, ours.eos_id) == (
        theirs.bos_token, theirs.bos_token_id, theirs.eos_token, theirs.eos_token_id)
    text = _both(tmp_path, CHAT[1:2])
    assert text.startswith(eos if decoder else f"{bos}[{bos}]")


def test_a_chat_template_is_compiled_once(json_dir, tmp_path):
    from llmjax import tokenizer

    tok = Tokenizer.from_dir(str(_folder_with_template(json_dir, tmp_path, "{{ messages[0]['content'] }}!")))
    tokenizer._compiled.cache_clear()
    for text in ("a", "b", "c"):
        assert tok.apply_chat_template([{"role": "user", "content": text}]) == f"{text}!"
    assert tokenizer._compiled.cache_info().misses == 1 and tokenizer._compiled.cache_info().hits == 2
