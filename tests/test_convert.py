"""Conversion: sharded checkpoints, dtypes, and every error path naming its tensor or file."""

import collections
import dataclasses
import gc
import json
import math
import os
import re
import shutil
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import llmjax
from llmjax import checkpoint
from llmjax.cli import main as cli_main
from llmjax.convert import hf
from llmjax.params import default_dtype
from llmjax.quant import QuantScheme
from llmjax.quant.tree import to_storage
from llmjax.sharding import make_mesh

from conftest import hf_config, needs_devices, save_hf_model

TOKENS = [1, 5, 9, 200, 7, 3]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, sp_dir):
    folder = tmp_path_factory.mktemp("hf")
    save_hf_model(folder, hf_config(num_hidden_layers=2), tokenizer_dir=sp_dir)
    return folder


@pytest.fixture(scope="module")
def reference(hf_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ckpt"
    hf.convert(str(hf_dir), str(out), progress=False)
    return np.asarray(llmjax.logits(llmjax.load(out), TOKENS))


def _copy_with(src, dst, edit):
    """Copies a single-file HF folder, letting `edit` change its tensors dict."""
    dst.mkdir()
    for name in os.listdir(src):
        if name != "model.safetensors":
            (dst / name).write_bytes((src / name).read_bytes())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _convert_error(src, out):
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        hf.convert(str(src), str(out), progress=False)
    assert not out.exists()
    assert not [n for n in os.listdir(out.parent) if ".partial-" in n]
    return str(err.value)


def test_sharded_checkpoint_converts_like_a_single_file(tmp_path, hf_dir, reference):
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="150KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    hf.convert(str(tmp_path / "sharded"), str(tmp_path / "out"), progress=False)
    np.testing.assert_array_equal(np.asarray(llmjax.logits(llmjax.load(tmp_path / "out"), TOKENS)), reference)


def test_missing_shard_is_named(tmp_path, hf_dir):
    import transformers

    transformers.LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(tmp_path / "sh", max_shard_size="150KB")
    shard = sorted(n for n in os.listdir(tmp_path / "sh") if n.endswith(".safetensors"))[-1]
    data = (tmp_path / "sh" / shard).read_bytes()
    (tmp_path / "sh" / shard).write_bytes(data[: len(data) // 2])  # a damaged shard is named as such
    message = _convert_error(tmp_path / "sh", tmp_path / "out")
    assert f"{shard}: corrupt or unreadable safetensors file" in message and "index" not in message
    os.remove(tmp_path / "sh" / shard)
    assert shard in _convert_error(tmp_path / "sh", tmp_path / "out")


def test_an_index_that_does_not_match_its_shards_is_named(tmp_path, hf_dir):
    import transformers

    transformers.LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(tmp_path / "sh", max_shard_size="150KB")
    index_path = tmp_path / "sh" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[-1])
    right = index["weight_map"][name]
    index["weight_map"][name] = shards[0]  # a tensor said to be in a shard that lacks it
    index_path.write_text(json.dumps(index))
    assert (f"index.json does not match its shards (1 tensor(s), first {name!r}): it is in {shards[-1]}, but the "
            f"index puts it in {shards[0]}; download") in _convert_error(tmp_path / "sh", tmp_path / "out")
    # transformers reads every tensor of the listed shards: one the index leaves out, or puts in no shard
    index["weight_map"].pop(name)
    index_path.write_text(json.dumps(index))
    assert f"{name!r}): it is in {shards[-1]}, but the index does not list it" in _convert_error(
        tmp_path / "sh", tmp_path / "out")
    index["weight_map"].update({name: right, "model.layers.0.mlp.down_proj.bias": shards[0]})
    index_path.write_text(json.dumps(index))
    assert ("'model.layers.0.mlp.down_proj.bias'): it is in none of its shards, but the index puts it in "
            f"{shards[0]}") in _convert_error(tmp_path / "sh", tmp_path / "out")
    # a tensor in two shards: transformers reads the later one, whatever the index says
    del index["weight_map"]["model.layers.0.mlp.down_proj.bias"]
    index_path.write_text(json.dumps(index))
    first = load_file(tmp_path / "sh" / shards[0])
    save_file({**first, name: load_file(tmp_path / "sh" / right)[name] * 2}, tmp_path / "sh" / shards[0],
              metadata={"format": "pt"})
    assert (f"tensor {name!r} is in both {shards[0]} and {right} (the model.safetensors.index.json puts it in "
            f"{right}); the shards come from different saves") in _convert_error(tmp_path / "sh", tmp_path / "out")
    index["weight_map"][name] = 7
    index_path.write_text(json.dumps(index))
    assert "the file 7, not a file name" in _convert_error(tmp_path / "sh", tmp_path / "out2")


def test_two_copies_of_the_weights_read_as_transformers_reads_them(tmp_path, hf_dir):
    """model.safetensors beside an index of other shards: transformers reads the file and ignores the
    index, and so does llmjax (with a warning); with no index, a tensor in two files is refused."""
    import torch
    import transformers

    sharded = tmp_path / "sh"
    transformers.LlamaForCausalLM.from_pretrained(hf_dir).save_pretrained(sharded, max_shard_size="150KB")
    # another model's weights in model.safetensors beside the shards (a stale save, say)
    tensors = load_file(hf_dir / "model.safetensors")
    save_file({k: (v * 1.5 if k.endswith("norm.weight") else v) for k, v in tensors.items()},
              sharded / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        theirs = transformers.LlamaForCausalLM.from_pretrained(sharded, dtype=torch.float32)(
            torch.tensor([TOKENS])).logits[0].numpy()
    with pytest.warns(UserWarning, match="holds both model.safetensors and model.safetensors.index.json .*"
                                         "reading model.safetensors, as transformers does"):
        params = llmjax.load(sharded, dtype="float32")
    ours = np.asarray(llmjax.logits(params, TOKENS))[0]
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    assert np.abs(ours - np.asarray(llmjax.logits(llmjax.load(hf_dir, dtype="float32"), TOKENS))[0]).max() > 0.1
    with pytest.warns(UserWarning, match="reading model.safetensors"):
        hf.convert(str(sharded), str(tmp_path / "conv"), progress=False)
    np.testing.assert_allclose(np.asarray(llmjax.logits(llmjax.load(tmp_path / "conv", dtype="float32"), TOKENS))[0],
                               theirs, atol=1e-5)
    # the index is not read then, nor are its shards, as transformers reads none of them
    first = sorted(sharded.glob("model-*.safetensors"))[0]
    tensors_of_first = first.read_bytes()
    first.unlink()
    with pytest.warns(UserWarning, match="reading model.safetensors"):
        np.testing.assert_allclose(np.asarray(llmjax.logits(llmjax.load(sharded, dtype="float32"), TOKENS))[0],
                                   theirs, atol=1e-5)
    first.write_bytes(tensors_of_first)
    # an index that lists model.safetensors itself is one copy
    index = {"metadata": {}, "weight_map": {n: "model.safetensors" for n in tensors}}
    single = tmp_path / "single"
    shutil.copytree(hf_dir, single)
    (single / "model.safetensors.index.json").write_text(json.dumps(index))
    hf.convert(str(single), str(tmp_path / "out"), progress=False)
    # no index: a tensor in two files
    os.remove(sharded / "model.safetensors.index.json")
    message = _convert_error(sharded, tmp_path / "out2")
    assert "is in both model-0000" in message and "and model.safetensors, and no model.safetensors.index.json" in message


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path, hf_dir):
    msg = _convert_error(_copy_with(hf_dir, tmp_path / "e", lambda t: t.pop("model.embed_tokens.weight")),
                         tmp_path / "o0")
    assert "model.embed_tokens.weight" in msg and "missing" in msg
    name = "model.layers.1.mlp.up_proj.weight"
    msg = _convert_error(_copy_with(hf_dir, tmp_path / "a", lambda t: t.pop(name)), tmp_path / "o1")
    assert name in msg and "missing" in msg
    msg = _convert_error(_copy_with(hf_dir, tmp_path / "b", lambda t: t.update(extra=np.zeros(3, np.float32))),
                         tmp_path / "o2")
    assert "'extra'" in msg and "unexpected" in msg
    adapter = tmp_path / "with_adapter"
    shutil.copytree(hf_dir, adapter)
    save_file({"base_model.model.lora_A.weight": np.zeros((4, 96), np.float32)}, adapter / "adapter_model.safetensors")
    msg = _convert_error(adapter, tmp_path / "o4")  # a file of other tensors beside the model's: named
    assert ("with_adapter: adapter_model.safetensors holds none of the tensors config.json implies (only others, "
            "first ['base_model.model.lora_A.weight']): not part of the model") in msg and "move it out" in msg
    msg = _convert_error(_copy_with(hf_dir, tmp_path / "c", lambda t: t.update({name: t[name][:, :-1].copy()})),
                         tmp_path / "o3")
    assert name in msg and "(136, 95)" in msg and "(136, 96)" in msg


def test_int8_tensors_are_refused(tmp_path, hf_dir):
    name = "model.norm.weight"
    src = _copy_with(hf_dir, tmp_path / "a", lambda t: t.update({name: t[name].astype(np.int8)}))
    assert "stored as I8" in _convert_error(src, tmp_path / "out")


def test_corrupt_file_is_named(tmp_path, hf_dir):
    src = _copy_with(hf_dir, tmp_path / "a", lambda t: None)
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])
    msg = _convert_error(src, tmp_path / "out")
    assert "model.safetensors" in msg and "corrupt" in msg


NAN_NAME = "model.layers.1.mlp.down_proj.weight"
MESHES = [pytest.param(dict(tensor=2, data=4), marks=needs_devices(8), id="tensor2-data4"),
          pytest.param(dict(stage=2, tensor=2, data=2), marks=needs_devices(8), id="stage2-tensor2-data2")]


def _poison(tensors):
    tensors[NAN_NAME] = tensors[NAN_NAME].copy()
    tensors[NAN_NAME][3, 5] = np.nan
    tensors["model.norm.weight"] = np.full_like(tensors["model.norm.weight"], np.inf)


def _converted_unchecked(src, out, monkeypatch):
    """A checkpoint written without the NaN check (as an older llmjax did)."""
    with monkeypatch.context() as m:
        m.setattr(hf, "_finite_groups", lambda groups, folder, cast: groups)
        return hf.convert(str(src), str(out), progress=False)


LOAD_NAN = (r"2 weight\(s\) hold NaN or infinite values, first "
            r"\['final_norm/scale', 'layer_1/mlp/down/kernel'\]; the file is damaged")


def test_weights_holding_nan_or_infinity_are_refused_by_name(tmp_path, hf_dir, monkeypatch):
    src = _copy_with(hf_dir, tmp_path / "a", _poison)
    for dtype in ("auto", "bfloat16", "float16"):
        with pytest.raises(ValueError, match=r"1 weight\(s\) hold NaN or infinite values, first "
                           r"\['layer_1/mlp/down/kernel'\]; the file is damaged"):
            hf.convert(str(src), str(tmp_path / "refused"), dtype=dtype, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no checkpoint, no partial folder
    out = _converted_unchecked(src, tmp_path / "out", monkeypatch)  # `load` refuses it too
    for folder in (src, out):
        with pytest.raises(ValueError, match=LOAD_NAN):
            llmjax.load(folder)
    big = _copy_with(hf_dir, tmp_path / "big", lambda t: t["model.norm.weight"].__setitem__(0, 1e5))
    llmjax.load(big)  # finite in float32, but past float16's largest value
    with pytest.raises(ValueError, match=r"first \['final_norm/scale'\]; .*the cast to float16 overflowed"):
        llmjax.load(big, dtype="float16")
    with pytest.raises(ValueError, match=r"first \['final_norm/scale'\]; .*the cast to float16 overflowed"):
        hf.convert(str(big), str(tmp_path / "big16"), dtype="float16", progress=False)
    hf.convert(str(big), str(tmp_path / "big32"), dtype="float32", progress=False)


@pytest.mark.parametrize("mesh", MESHES)
def test_weights_holding_nan_or_infinity_are_refused_by_name_on_a_mesh(tmp_path, hf_dir, monkeypatch, mesh):
    out = _converted_unchecked(_copy_with(hf_dir, tmp_path / "a", _poison), tmp_path / "out", monkeypatch)
    with pytest.raises(ValueError, match=LOAD_NAN):
        llmjax.load(out, mesh=make_mesh(**mesh))


@pytest.mark.parametrize("mesh", [pytest.param(None, id="one-device"), *MESHES])
def test_the_finite_check_holds_no_more_than_a_weight_group_at_once(monkeypatch, mesh):
    """`load`'s NaN check once took half a bfloat16 model's bytes again on a CPU (one program over every
    weight), and under pipeline stages gathered every stage's layers onto every device."""
    from llmjax import params as params_module

    config = dataclasses.replace(llmjax.LlamaConfig.preset("tiny"), num_layers=8, num_heads=4)
    params = llmjax.init_random(config, dtype="bfloat16", mesh=mesh and make_mesh(**mesh))
    group_bytes = collections.Counter()  # a top-level group's (or a stage-stacked place's) bytes on one device
    for names, w in hf.named_leaves(params.weights):
        group_bytes[tuple(names[:2] if names[0] == "stages" else names[:1])] += w.addressable_shards[0].data.nbytes
    checked, temps = params_module._all_finite, []

    def measured(weights, stacked):
        temps.append(checked.lower(weights, stacked).compile().memory_analysis().temp_size_in_bytes)
        return checked(weights, stacked)

    monkeypatch.setattr(params_module, "_all_finite", measured)
    params_module._check_finite(params, "random", None)
    assert temps and max(temps) <= max(group_bytes.values())


def _nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def test_loading_a_hugging_face_folder_reads_a_group_only_once_the_last_is_placed(hf_dir, monkeypatch):
    """The folder was read whole into host memory before any of it went to the device (two copies)."""
    from llmjax import params as params_module

    read, pending = params_module.iter_weight_groups, []

    def watched(*args, **kwargs):
        start, yielded = _nbytes(jax.live_arrays()), 0
        for key, tree in read(*args, **kwargs):
            pending.append(yielded - (_nbytes(jax.live_arrays()) - start))  # read, not yet on the device
            yielded += _nbytes(tree)
            yield key, tree

    for module in (hf, params_module):
        monkeypatch.setattr(module, "iter_weight_groups", watched)
    gc.collect()  # (earlier tests' arrays in reference cycles, freed meanwhile, would count as placed)
    gc.disable()
    try:
        params = llmjax.load(hf_dir)
    finally:
        gc.enable()
    groups = [_nbytes(tree) for tree in params.weights.values()]
    assert len(pending) == len(groups) and max(pending) <= 0 < max(groups) < _nbytes(params.weights) / 2


def test_loading_a_checkpoint_in_another_dtype_casts_each_group_as_it_is_read(tmp_path, hf_dir, monkeypatch):
    """The checkpoint was restored whole in its stored dtype before any group was cast."""
    from llmjax import params as params_module

    out = hf.convert(str(hf_dir), str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    restore, cast, restored, held = checkpoint.restore_weights, params_module.cast_floats, [], []

    def watched_restore(*args):
        weights = restore(*args)
        restored.extend(weakref.ref(leaf) for leaf in jax.tree.leaves(weights))
        return weights

    def watched_cast(tree, dtype):
        held.append(sum(leaf().nbytes for leaf in restored if leaf() is not None))  # stored arrays alive
        return cast(tree, dtype)

    monkeypatch.setattr(checkpoint, "restore_weights", watched_restore)
    monkeypatch.setattr(params_module, "cast_floats", watched_cast)
    params = llmjax.load(out, dtype="float32")
    assert params.dtype == jnp.float32
    groups = [_nbytes(tree) // 2 for tree in params.weights.values()]  # each group's bytes in bfloat16
    assert len(held) == len(groups) and max(held) <= max(groups) < _nbytes(params.weights) // 4


def test_calls_in_threads_keep_their_order_and_stop_at_the_first_error():
    """`in_threads` (a tensor's pieces read): results in the items' order; on an error, the first
    item's is raised and the calls not begun by then never run."""
    import threading
    import time

    assert hf.in_threads(lambda i: i * i, list(range(20)), 3) == [i * i for i in range(20)]
    started, gate = [], threading.Event()

    def fn(i):
        started.append(i)
        if i == 3:
            gate.wait(5)  # the later item fails first
            raise ValueError("item 3")
        if i == 5:
            gate.set()
            raise ValueError("item 5")
        time.sleep(0.01)
        return i

    with pytest.raises(ValueError, match="item 3"):
        hf.in_threads(fn, list(range(200)), 3)
    assert 6 <= len(started) < 200


def _resident_bytes_of(paths) -> int:
    """This process's resident bytes of its mappings of `paths` (Linux's /proc/self/smaps)."""
    total, counting = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header: range, perms, offset, dev, inode[, path]
                counting = len(fields) > 5 and os.path.realpath(fields[5]) in paths
            elif counting and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads Linux's /proc/self/smaps")
def test_reading_a_folder_keeps_no_more_of_its_files_mapped_than_a_tensor(tmp_path):
    """Tensors were read through a handle per file kept for the whole read, which maps the file: every
    page read stayed in the process's memory (a 70B model's 140 GB) until the end."""
    save_hf_model(tmp_path, hf_config(num_hidden_layers=8), max_shard_size="1MB")
    source = hf.SafetensorsFolder(str(tmp_path))
    entries = hf.check_tensors(source, llmjax.LlamaConfig.from_hf(tmp_path))
    paths = {os.path.realpath(p) for p in source.files.values()}
    resident = [_resident_bytes_of(paths) for _ in hf.iter_weight_groups(source, entries, "float32", progress=False)]
    largest = max(math.prod(e.hf_shape) * 4 for e in entries)
    # (what the headers' reads map stays: a constant, not growing with the tensors read)
    assert len(paths) > 1 and len(resident) == 11 and max(resident) - min(resident) < largest < sum(os.path.getsize(p) for p in paths) / 2


def test_tensors_read_in_pieces_by_threads_land_where_the_name_map_puts_them(hf_dir, monkeypatch):
    """Pieces of 999 bytes (every run of a fused slot split across them), read by 3 threads: each
    weight equals the tensors as safetensors reads them, placed by the name map."""
    monkeypatch.setattr(hf, "READ_PIECE", 999)
    monkeypatch.setattr(hf, "READERS", 3)
    config = llmjax.LlamaConfig.from_hf(hf_dir)
    source = hf.SafetensorsFolder(str(hf_dir))
    stored = {}
    for path in set(source.files.values()):
        stored.update(load_file(path))
    expected: dict = {}
    for e in hf.check_tensors(source, config):
        tree = expected.setdefault(e.path[0], {})
        array = e.to_llmjax(stored[e.hf_name])
        if e.fused_shape is None:
            hf._set_path(tree, e.path[1:], array)
        else:
            if hf._get_path(tree, e.path[1:]) is None:
                hf._set_path(tree, e.path[1:], np.full(e.fused_shape, np.nan, array.dtype))
            hf._get_path(tree, e.path[1:])[e.index] = array
    got = dict(hf.iter_weight_groups(source, hf.check_tensors(source, config), "float32",
                                     progress=False))
    assert max(math.prod(e.hf_shape) * 4 for e in hf.check_tensors(source, config)) > 20 * 999
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for (names, a), (_, b) in zip(hf.named_leaves(got), hf.named_leaves(expected)):
        assert a.dtype == b.dtype and np.array_equal(a, b), names


def test_the_runs_a_slot_is_read_into_cover_its_bytes_in_order():
    """`read_into` fills a view of a fused weight through its contiguous runs: each run's bytes, at its
    offset in C order, land in the view, whatever the view's strides (the last axis strided too)."""
    base = np.zeros((3, 5, 4, 6), ml_dtypes.bfloat16)
    for index in [(), (slice(None), slice(1, 3)), (slice(None), slice(4, 5)), (1,),
                  (slice(None),) * 3 + (slice(None, None, 2),), (slice(None), 2, slice(None), slice(1, 2))]:
        base[...] = 0
        view = base[index]
        flat = np.arange(1, view.size + 1).astype(ml_dtypes.bfloat16).view(np.uint8)  # the file's bytes, in order
        for at, run in hf._runs(view):
            np.frombuffer(run, np.uint8)[:] = flat[at:at + len(run)]
        assert np.array_equal(view.reshape(-1).view(np.uint16), flat.view(np.uint16)), index
        assert np.count_nonzero(base) == view.size, index


def test_a_file_cut_short_after_its_header_was_read_is_named(tmp_path):
    """A shard truncated while it is read (a copy still under way): the tensor past its end is refused
    with the file's name, not read as zeros or garbage."""
    save_hf_model(tmp_path, hf_config())
    source = hf.SafetensorsFolder(str(tmp_path))
    path = os.path.join(tmp_path, "model.safetensors")
    layouts = source._layouts(path)
    last = max(layouts, key=lambda n: layouts[n][2][1])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(ValueError, match=f"{re.escape(path)}: cannot read tensor '{re.escape(last)}'.*corrupt or "
                       "truncated; download it again"):
        source.read(last)


def test_pickles_are_refused_with_the_way_out(tmp_path, hf_dir):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "config.json").write_text((hf_dir / "config.json").read_text())
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not really")
    msg = _convert_error(tmp_path / "p", tmp_path / "out")
    assert "pytorch_model.bin" in msg and "never unpickles" in msg and "save_pretrained" in msg


def test_unsupported_architecture_fails_before_any_work(tmp_path, hf_dir):
    src = _copy_with(hf_dir, tmp_path / "a", lambda t: None)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(cfg, model_type="mixtral")))
    assert "model_type='mixtral'" in _convert_error(src, tmp_path / "out")


def test_failure_midway_leaves_nothing(tmp_path, hf_dir, monkeypatch):
    reads, read_into = [], hf.SafetensorsFolder.read_into

    def failing_read(self, name, out):  # every tensor is read through it, a fused weight's slots too
        reads.append(name)
        if len(reads) == 12:
            raise ValueError(f"cannot read tensor {name!r}")
        return read_into(self, name, out)

    monkeypatch.setattr(hf.SafetensorsFolder, "read_into", failing_read)
    _convert_error(hf_dir, tmp_path / "out")
    assert len(reads) == 12


def test_an_error_of_a_save_in_an_except_block_is_not_taken_for_the_handled_one(tmp_path, hf_dir, monkeypatch):
    """convert called while the caller handles an OSError (a load that found no checkpoint): a save's
    own error is raised as it is, not as a write the system refused with the handled error's errno."""
    import orbax.checkpoint as ocp

    def failing(self, path, *args, **kwargs):
        raise ValueError("the save's own error")
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", failing)
    try:
        open(tmp_path / "missing")
    except FileNotFoundError:
        with pytest.raises(ValueError, match="the save's own error"):
            hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    assert os.listdir(tmp_path) == []


def test_a_ctrl_c_during_a_save_waits_for_it(tmp_path, hf_dir, monkeypatch):
    """A Ctrl-C (or the CLI's SIGTERM) that lands while orbax saves a weight group takes effect once
    the save is done: cut short, the save's writes went on in orbax's threads, into the partial
    folder after its removal, which they left behind with tracebacks on stderr."""
    import signal

    import orbax.checkpoint as ocp

    save, saved = ocp.StandardCheckpointer.save, []

    def interrupted(self, path, *args, **kwargs):
        if not saved:
            os.kill(os.getpid(), signal.SIGINT)  # lands in the first save
        save(self, path, *args, **kwargs)
        saved.append(os.path.basename(path))
    monkeypatch.setattr(ocp.StandardCheckpointer, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    assert saved == ["embed"] and os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_what_a_killed_conversion_left_is_named(tmp_path, hf_dir, reference):
    """A conversion killed without a chance to clean up (kill -9) leaves its hidden partial folder, as
    large as the model: the next conversion into the same folder, and a load of it, name it."""
    left = tmp_path / ".out.partial-0123456789ab"
    (left / "weights" / "embed").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=re.escape(f"{left} is left from a conversion into {tmp_path / 'out'} "
                                                          "that was killed") + ".*remove it; convert the model again"):
        llmjax.load(tmp_path / "out")
    with pytest.warns(UserWarning, match=re.escape(str(left)) + ".*not a checkpoint: once no conversion into it runs"):
        hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    assert sorted(os.listdir(tmp_path)) == [left.name, "out"]  # (it may be another conversion's, still running)
    np.testing.assert_array_equal(np.asarray(llmjax.logits(llmjax.load(tmp_path / "out"), TOKENS)), reference)


def test_a_full_disk_is_named_in_one_line_and_leaves_nothing(tmp_path, hf_dir):
    """A write the system refuses (a full disk, a quota; here the file size limit, which any user may
    lower) is named with the fix, once: orbax logged it from each of its threads with tracebacks,
    then raised TensorStore's text naming the partial folder."""
    script = ("import resource, signal, sys\n"
              "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # (a write past the limit fails with EFBIG)\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
              "from llmjax import cli\n"
              "sys.exit(cli.main(['convert', sys.argv[1], sys.argv[2], '--quiet']))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(hf_dir), str(tmp_path / "out")], capture_output=True,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        f"llmjax convert: error: cannot write {tmp_path / 'out'}: File too large (the disk holding {tmp_path} is full, "
        "or this user's disk quota or file size limit is reached); what was written is removed: free space there, "
        "or choose an output folder on another disk"]
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path, hf_dir, reference):
    out = tmp_path / "out"
    out.mkdir()
    hf.convert(str(hf_dir), str(out), overwrite=True, progress=False)  # an empty folder is replaced
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf.convert(str(hf_dir), str(out), progress=False)
    hf.convert(str(hf_dir), str(out), overwrite=True, progress=False)  # so is an earlier conversion
    np.testing.assert_array_equal(np.asarray(llmjax.logits(llmjax.load(out), TOKENS)), reference)


def test_an_output_made_while_converting_is_left_alone(tmp_path, hf_dir, reference, monkeypatch):
    """Without --overwrite, a folder that took the output's name while the conversion ran (a second
    conversion into it, started at the same time) is neither replaced nor moved aside."""
    out, write_manifest = tmp_path / "out", checkpoint.write_manifest

    def meanwhile(*args, **kwargs):
        monkeypatch.setattr(checkpoint, "write_manifest", write_manifest)
        with pytest.warns(UserWarning, match=r"\.out\.partial-.* or written by one still running"):  # (this one's)
            hf.convert(str(hf_dir), str(out), progress=False)  # the other conversion, finished first
        write_manifest(*args, **kwargs)
    monkeypatch.setattr(checkpoint, "write_manifest", meanwhile)
    with pytest.raises(FileExistsError, match=f"{out} appeared while this conversion ran.*--overwrite"):
        hf.convert(str(hf_dir), str(out), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    np.testing.assert_array_equal(np.asarray(llmjax.logits(llmjax.load(out), TOKENS)), reference)
    hf.convert(str(hf_dir), str(out), overwrite=True, progress=False)  # (asked to replace it, it does)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_overwrite_stopped_while_it_swaps_leaves_the_earlier_conversion(tmp_path, hf_dir, reference, monkeypatch):
    """The earlier conversion is moved aside, not deleted, until the new one is in place: stopped
    between the two moves, the earlier one is put back whole, and nothing else is left."""
    out = tmp_path / "out"
    hf.convert(str(hf_dir), str(out), progress=False)
    rename, moves = os.rename, []

    def stopped(src, dst):
        moves.append(dst)
        if len(moves) == 2:  # the new conversion into place
            raise KeyboardInterrupt
        rename(src, dst)
    monkeypatch.setattr(hf.os, "rename", stopped)
    with pytest.raises(KeyboardInterrupt):
        hf.convert(str(hf_dir), str(out), overwrite=True, progress=False)
    monkeypatch.setattr(hf.os, "rename", rename)
    assert sorted(os.listdir(tmp_path)) == ["out"]
    np.testing.assert_array_equal(np.asarray(llmjax.logits(llmjax.load(out), TOKENS)), reference)


def test_overwrite_never_deletes_the_users_other_files(tmp_path, hf_dir, monkeypatch):
    """--overwrite replaces an empty folder or an earlier conversion, nothing else: not a folder of
    other files, not a conversion someone added files to, not the working folder or one holding it,
    not an empty path (which is the working folder)."""
    mine = tmp_path / "home"
    (mine / "work").mkdir(parents=True)
    (mine / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match=r"it holds thesis.tex, work, which convert does not write.*move those"):
        hf.convert(str(hf_dir), str(mine), overwrite=True, progress=False)
    converted = tmp_path / "converted"
    hf.convert(str(hf_dir), str(converted), progress=False)
    (converted / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="it holds notes.txt"):
        hf.convert(str(hf_dir), str(converted), overwrite=True, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text("{}")  # a name convert writes, but no manifest
    with pytest.raises(FileExistsError, match="not an llmjax checkpoint"):
        hf.convert(str(hf_dir), str(tmp_path / "other"), overwrite=True, progress=False)
    monkeypatch.chdir(mine / "work")
    for out in ("", " ", ".", "..", str(mine)):
        with pytest.raises(ValueError, match="must be a path|is the working folder or holds it"):
            hf.convert(str(hf_dir), out, overwrite=True, progress=False)
    assert (mine / "thesis.tex").read_text() == "mine" and (converted / "notes.txt").read_text() == "mine"
    assert (mine / "work").is_dir() and (tmp_path / "other" / "config.json").read_text() == "{}"


def test_outputs_that_would_lose_data_or_cannot_be_written_are_refused(tmp_path, hf_dir):
    """The input folder itself, or a folder holding it, is never the output (--overwrite would delete
    the checkpoint being read); a file, or a path under one, is named; an llmjax checkpoint is not
    converted again; a tied LM head cannot be quantized, however asked; a quantization that is no scheme is
    named before any work."""
    (tmp_path / "models").mkdir()
    src = _copy_with(hf_dir, tmp_path / "models" / "src", lambda t: None)
    for out in (src, tmp_path / "models", tmp_path):
        with pytest.raises(ValueError, match="holds it"):
            hf.convert(str(src), str(out), overwrite=True, progress=False)
    assert (src / "model.safetensors").is_file()
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile", tmp_path / "afile" / "out"):
        with pytest.raises(ValueError, match="afile is a file"):
            hf.convert(str(src), str(out), overwrite=True, progress=False)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    with pytest.raises(ValueError, match="is a symbolic link"):
        hf.convert(str(src), str(tmp_path / "link"), overwrite=True, progress=False)
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot"  # a cache: the snapshot links into blobs
    blobs.mkdir(), snapshot.mkdir()
    for name in os.listdir(src):
        os.replace(src / name, blobs / name)
        os.symlink(blobs / name, snapshot / name)
    with pytest.raises(ValueError, match="holds it or its files"):
        hf.convert(str(snapshot), str(blobs), overwrite=True, progress=False)
    assert (blobs / "model.safetensors").is_file()
    before = os.umask(0o022)
    try:
        out = hf.convert(str(snapshot), str(tmp_path / "out"), progress=False)
    finally:
        os.umask(before)
    assert os.stat(out).st_mode & 0o777 == 0o755  # the umask's mode, not a private 0700
    with pytest.raises(ValueError, match="already an llmjax checkpoint; load it directly"):
        hf.convert(out, str(tmp_path / "again"), progress=False)
    tied = _copy_with(hf_dir, tmp_path / "tied", lambda t: t.pop("lm_head.weight", None))
    cfg = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps(dict(cfg, tie_word_embeddings=True)))
    with pytest.raises(ValueError, match="ties its LM head"):
        hf.convert(str(tied), str(tmp_path / "q"), quant="int8", quant_lm_head=True, progress=False)
    with pytest.raises(ValueError, match=r"^the QuantScheme's lm_head=True \(QuantScheme\(bits=8.*ties its LM head"):
        hf.convert(str(tied), str(tmp_path / "q"), quant=QuantScheme(8, lm_head=True), progress=False)
    with pytest.raises(ValueError, match="scheme must be a QuantScheme or one of its names.*got 4"):
        hf.convert(str(hf_dir), str(tmp_path / "q"), quant=4, progress=False)
    assert not (tmp_path / "q").exists()


def test_auto_dtype_keeps_the_stored_one_and_side_files_are_copied(tmp_path, hf_dir):
    bf16 = _copy_with(hf_dir, tmp_path / "bf16", lambda t: t.update(
        {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
    (bf16 / "additional_chat_templates").mkdir()  # named chat templates travel with the tokenizer
    (bf16 / "additional_chat_templates" / "tool_use.jinja").write_text("T{{ tools | length }}")
    out = hf.convert(str(bf16), str(tmp_path / "out"), progress=False)
    for name in ("config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                 "llmjax.json", "additional_chat_templates/tool_use.jinja"):
        assert os.path.isfile(os.path.join(out, name)), name
    tokenizer = llmjax.load(out).tokenizer
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tools=[{}, {}]) == "T2"
    hf.convert(str(bf16), str(out), progress=False, overwrite=True)  # an earlier conversion: replaced
    assert checkpoint.read_manifest(out)["dtype"] == "bfloat16"
    params = llmjax.load(out)
    assert params.dtype == np.dtype(default_dtype()) and params.tokenizer is not None  # a CPU widens
    assert str(llmjax.load(out, dtype="bfloat16").dtype) == "bfloat16"
    assert str(llmjax.load(out, dtype="float32").dtype) == "float32"
    assert str(llmjax.load(out, dtype=jnp.float16).dtype) == "float16"
    for bad in ("float8", "int8", 3):
        with pytest.raises(ValueError, match="is not supported"):
            llmjax.load(out, dtype=bad)


def test_rotary_buffers_and_tied_head_copies_are_skipped(tmp_path, hf_dir, reference):
    src = _copy_with(hf_dir, tmp_path / "a", lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    hf.convert(str(src), str(tmp_path / "out"), progress=False)
    np.testing.assert_array_equal(np.asarray(llmjax.logits(llmjax.load(tmp_path / "out"), TOKENS)), reference)


def test_a_tied_head_is_read_only_when_it_copies_the_embedding(tmp_path, hf_dir):
    """tie_word_embeddings true beside an lm_head.weight: a copy of the embedding is skipped; other values
    are refused, since transformers 5 then reads the head (untied) and earlier versions the embedding."""
    def tied(name, head):
        src = _copy_with(hf_dir, tmp_path / name, lambda t: t.update({"lm_head.weight": head(t)}))
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
        return src

    embed = lambda t: t["model.embed_tokens.weight"].copy()
    without = _copy_with(hf_dir, tmp_path / "none", lambda t: t.pop("lm_head.weight"))
    config = json.loads((without / "config.json").read_text())
    (without / "config.json").write_text(json.dumps(dict(config, tie_word_embeddings=True)))
    want = np.asarray(llmjax.logits(llmjax.load(without), TOKENS))
    np.testing.assert_array_equal(np.asarray(llmjax.logits(llmjax.load(tied("copy", embed)), TOKENS)), want)
    message = _convert_error(tied("other", lambda t: embed(t) * 0.5), tmp_path / "out")
    assert ("config.json sets tie_word_embeddings true, but lm_head.weight is not a copy of "
            "model.embed_tokens.weight" in message and "set tie_word_embeddings to false" in message)


def test_cli_reports_errors_in_one_line(tmp_path, capsys):
    assert cli_main(["convert", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmjax convert: error:") and "nowhere" in err and "\n" not in err


def test_load_errors_name_the_problem(tmp_path, hf_dir):
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        llmjax.load(tmp_path / "nowhere")
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="no weights") as error:
        llmjax.load(tmp_path / "cfg")
    assert "pickled" not in str(error.value)
    (tmp_path / "cfg" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match=r"only pickled weights \(pytorch_model.bin\).*never unpickles"):
        llmjax.load(tmp_path / "cfg")  # named, with how to get safetensors, and never opened
    with pytest.raises(ValueError, match=r"config.json is a file; pass the model folder that holds it \(.*cfg\)"):
        llmjax.load(tmp_path / "cfg" / "config.json")
    for dtype in ("bf16", "float8"):
        with pytest.raises(ValueError, match=f"dtype '{dtype}' is not supported; choose one of float32.*int4-g128"):
            llmjax.init_random("tiny", dtype=dtype)


def test_damaged_checkpoint_is_named(tmp_path, hf_dir, caplog):
    out = hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    import shutil

    shutil.rmtree(os.path.join(out, "weights", "layer_1"))
    with pytest.raises(ValueError, match="layer_1.*convert the model again"):
        llmjax.load(out)
    assert not [r for r in caplog.records if r.levelno >= 30]  # the error alone: not orbax's warnings before it


@pytest.mark.parametrize("mesh", [pytest.param(None, id="one-device"), MESHES[0]])
def test_a_checkpoint_whose_config_json_was_edited_is_refused(tmp_path, hf_dir, mesh):
    """Weight groups on disk that the config does not use (fewer layers, a tied head) would make
    another model, silently; so would a manifest naming a dtype llmjax never stores."""

    mesh = mesh and make_mesh(**mesh)
    out = hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    config_path, manifest_path = os.path.join(out, "config.json"), os.path.join(out, "llmjax.json")
    original, manifest = open(config_path).read(), open(manifest_path).read()
    for edit, unused in (({"num_hidden_layers": 1}, "layer_1"), ({"tie_word_embeddings": True}, "lm_head")):
        with open(config_path, "w") as f:
            json.dump({**json.loads(original), **edit}, f)
        with pytest.raises(ValueError, match=f"not used by the config \\['{unused}'\\]"):
            llmjax.load(out, mesh=mesh)
    with open(config_path, "w") as f:
        f.write(original)
    with open(manifest_path, "w") as f:
        json.dump({**json.loads(manifest), "dtype": "int8"}, f)
    with pytest.raises(ValueError, match="dtype 'int8' is not one llmjax stores"):
        llmjax.load(out, mesh=mesh)


def test_unreadable_files_are_named_as_such_not_as_damaged(tmp_path, hf_dir, monkeypatch):
    """A folder or file this user may not read (tested by faking `os.access` and `open`: CI runs as
    root, which reads anything) is not reported as corrupt or missing."""
    import builtins

    from llmjax.files import read_json

    real_access, real_open = os.access, builtins.open
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(hf_dir) else real_access(p, mode))
    with pytest.raises(PermissionError, match=f"{hf_dir}: permission denied"):
        llmjax.load(hf_dir)
    with pytest.raises(PermissionError, match="permission denied"):
        hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    monkeypatch.setattr(os, "access", real_access)

    def no_config(path, *args, **kwargs):
        if str(path).endswith("config.json"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_config)
    with pytest.raises(PermissionError, match="config.json: permission denied; this user may not read it"):
        read_json(hf_dir / "config.json")
    monkeypatch.setattr(builtins, "open", real_open)

    # a side file this user may not read, and an output folder they may not write
    assert (hf_dir / "tokenizer.model").is_file()
    real_copy, real_mkdir = shutil.copy2, os.mkdir

    def no_tokenizer(src, dst, **kwargs):
        if str(src).endswith("tokenizer.model"):
            raise PermissionError(13, "Permission denied", str(src))
        return real_copy(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copy2", no_tokenizer)
    with pytest.raises(PermissionError, match="tokenizer.model: permission denied; this user may not read it"):
        hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    assert not [name for name in os.listdir(tmp_path) if "out" in name]  # no partial folder left behind
    monkeypatch.setattr(shutil, "copy2", real_copy)
    read_only = tmp_path / "read-only"
    read_only.mkdir()

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(read_only)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", refuse)
    with pytest.raises(PermissionError, match=f"cannot write {read_only / 'out'}: this user may not write in "
                                              f"{read_only}; choose an output folder"):
        hf.convert(str(hf_dir), str(read_only / "out"), progress=False)
    nested = read_only / "a" / "b" / "out"  # the folders between are made first; the first mkdir is refused
    with pytest.raises(PermissionError, match=f"cannot write {nested}: this user may not write in {read_only};"):
        hf.convert(str(hf_dir), str(nested), progress=False)
    # a file system that takes no new folder (read-only, /proc): the output is named, not the temporary folder
    monkeypatch.setattr(os, "mkdir", lambda path, *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only file system", path)))
    with pytest.raises(OSError, match=rf"cannot write {tmp_path / 'out'}: making the folder \.out\.partial-\w+ in "
                                      rf"{tmp_path} \(where .*\) failed \(Read-only file system\); choose another"):
        hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)


def test_a_file_given_for_the_folder_is_named(tmp_path, hf_dir):
    for name in ("model.safetensors", "config.json"):
        message = _convert_error(hf_dir / name, tmp_path / "out")
        assert f"{name} is a file; pass the Hugging Face model folder that holds it ({hf_dir})" in message


def test_a_home_relative_path_means_the_home_folder(tmp_path, hf_dir, reference, monkeypatch):
    """`~` is the home folder, as in a shell (a quoted path, or one from a config file, is not
    expanded by one): never a folder named `~` made in the working folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert hf.convert(str(hf_dir), "~/out", progress=False) == str(tmp_path / "home" / "out")
    assert os.listdir(tmp_path / "work") == [] and checkpoint.is_checkpoint(tmp_path / "home" / "out")
    np.testing.assert_array_equal(np.asarray(llmjax.logits(llmjax.load("~/out"), TOKENS)), reference)


def _hub_cache(hf_dir, root, commits):
    """`hf_dir` as the Hugging Face hub cache keeps it: `snapshots/<commit>/` of relative links into `blobs`."""
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commits[-1])
    for commit in commits:
        snapshot = root / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name in os.listdir(hf_dir):
            blob = root / "blobs" / f"{commit[:8]}-{name}"
            blob.write_bytes((hf_dir / name).read_bytes())
            os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / name)
    return root / "snapshots" / commits[-1]


def test_a_hub_cache_snapshot_loads_and_its_model_folder_names_the_snapshot(tmp_path, hf_dir, reference):
    root = tmp_path / "models--org--tiny"
    snapshot = _hub_cache(hf_dir, root, ["f" * 40, "0" * 40])  # refs/main: not the last by name
    np.testing.assert_allclose(np.asarray(llmjax.logits(llmjax.load(snapshot), TOKENS)), reference, atol=1e-6)
    hf.convert(str(snapshot), str(tmp_path / "out"), progress=False)
    assert not os.path.islink(tmp_path / "out" / "config.json")
    np.testing.assert_allclose(np.asarray(llmjax.logits(llmjax.load(tmp_path / "out"), TOKENS)), reference, atol=1e-6)
    # the cache's model folder, or its snapshots: the error names the snapshot refs/main points at
    for wrong in (root, root / "snapshots"):
        hint = f"{root} is a Hugging Face hub cache folder: pass its snapshot folder, {snapshot} (it holds 2 snapshots"
        assert hint in _convert_error(wrong, tmp_path / "out2")
        with pytest.raises(FileNotFoundError, match=re.escape(hint)):
            llmjax.load(wrong)
    # no refs/main: the snapshot that took its config.json last, by the link's own time (the cache's
    # snapshots share one blob for a file that did not change; its time ties them)
    os.remove(root / "refs" / "main")
    shared = os.path.realpath(root / "snapshots" / ("0" * 40) / "config.json")
    for commit, when in (("0" * 40, 1.5e9), ("f" * 40, 2e9)):
        link = root / "snapshots" / commit / "config.json"
        os.remove(link)
        os.symlink(os.path.relpath(shared, link.parent), link)
        os.utime(link, (when, when), follow_symlinks=False)
    assert f"pass its snapshot folder, {root / 'snapshots' / ('f' * 40)} (it holds" in _convert_error(root, tmp_path / "out2")
    # a link whose blob is gone (a download cut short, a cache pruned)
    os.remove(os.path.realpath(snapshot / "model.safetensors"))
    message = _convert_error(snapshot, tmp_path / "out3")
    assert f"model.safetensors is a link to {os.path.join('..', '..', 'blobs')}" in message and "which does not exist" in message


def _weights_file(out, group):
    """The largest data file of a weight group (where its tensors' bytes lie)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(out, "weights", group)) for f in fs]
    return max(files, key=os.path.getsize)


def test_a_checkpoint_whose_tensors_do_not_match_its_files_is_refused_by_name(tmp_path, hf_dir):
    """A manifest or config.json edited over the stored tensors names each tensor, its stored and its
    expected shape and dtype: orbax cast another dtype without a word, and refused another shape with
    a hint to turn its check off."""
    out = hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    config_path, manifest_path = os.path.join(out, "config.json"), os.path.join(out, "llmjax.json")
    original, manifest = open(config_path).read(), json.loads(open(manifest_path).read())
    stored = manifest["dtype"]
    other = "float16" if stored != "float16" else "bfloat16"
    with open(manifest_path, "w") as f:
        json.dump({**manifest, "dtype": other}, f)
    with pytest.raises(ValueError, match=rf"weights/embed: weight group 'embed' does not match .*embedding is "
                                         rf"{stored}\[1003, 96\] where {other}\[1003, 96\] is expected.*convert"):
        llmjax.load(out)
    with open(manifest_path, "w") as f:
        json.dump({**manifest, "quant": QuantScheme.coerce("int8").to_json()}, f)
    with pytest.raises(ValueError, match=r"weight group 'layer_0' does not match .*missing attn/o/kernel/scales"):
        llmjax.load(out)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with open(config_path, "w") as f:
        json.dump({**json.loads(original), "intermediate_size": 68}, f)
    with pytest.raises(ValueError, match=rf"'layer_0' does not match .*mlp/down/kernel is {stored}\[96, 136\] "
                                         rf"where {stored}\[96, 68\] is expected") as error:
        llmjax.load(out)
    assert "strict" not in str(error.value)
    with open(config_path, "w") as f:
        json.dump({**json.loads(original), "attention_bias": True}, f)
    with pytest.raises(ValueError, match="'layer_0' does not match .*missing attn/o/bias; missing attn/qkv/bias"):
        llmjax.load(out)


def test_a_weight_group_from_another_conversion_is_refused(tmp_path, hf_dir, reference, monkeypatch):
    """Each group carries its conversion's id, as the manifest does: a group copied in from another
    checkpoint of the same shapes (or read while an --overwrite swaps the folder) is refused by name,
    not loaded as weights of another model (on meshes too, where the process has 8 devices). A
    checkpoint from before ids loads as it did."""
    import orbax.checkpoint as ocp

    hf.convert(str(hf_dir), str(tmp_path / "a"), progress=False)
    other = tmp_path / "other_hf"
    save_hf_model(other, hf_config(num_hidden_layers=2), seed=1)
    hf.convert(str(other), str(tmp_path / "b"), progress=False)
    shutil.rmtree(tmp_path / "a" / "weights" / "layer_1")
    shutil.copytree(tmp_path / "b" / "weights" / "layer_1", tmp_path / "a" / "weights" / "layer_1")
    meshes = (make_mesh(tensor=2, data=4), make_mesh(tensor=2, stage=2, data=2)) if jax.device_count() >= 8 else ()
    for mesh in (None, *meshes):
        with pytest.raises(ValueError, match=r"layer_1: weight group 'layer_1' was written by another conversion than "
                                             r"the checkpoint's llmjax.json .*convert the model again"):
            llmjax.load(tmp_path / "a", mesh=mesh)
    save, write_manifest = ocp.StandardCheckpointer.save, checkpoint.write_manifest
    monkeypatch.setattr(ocp.StandardCheckpointer, "save",
                        lambda self, path, item, custom_metadata=None, **kwargs: save(self, path, item, **kwargs))
    monkeypatch.setattr(checkpoint, "write_manifest", lambda *args: write_manifest(*args[:4]))
    hf.convert(str(hf_dir), str(tmp_path / "old"), progress=False)  # as llmjax wrote it before ids
    assert "id" not in json.loads((tmp_path / "old" / checkpoint.MANIFEST).read_text())
    np.testing.assert_array_equal(np.asarray(llmjax.logits(llmjax.load(tmp_path / "old"), TOKENS)), reference)


def _damage_silently(out, group, wanted) -> list[str]:
    """Flips a bit in the middle of one of the zstd frames that hold `group`'s chunks (the largest
    first) where the checkpoint, its checksums unchecked, still loads, as other values of tensors all
    `wanted` (a name's test); returns the changed tensors' names. The frames carry no checksums of
    their own: most flips decode to other values, a few fail to decode (named by the restore)."""
    manifest_path = os.path.join(out, checkpoint.MANIFEST)
    kept = open(manifest_path).read()
    with open(manifest_path, "w") as f:
        json.dump({k: v for k, v in json.loads(kept).items() if k != "checksums"}, f)

    def stored():
        weights = llmjax.load(out, dtype=json.loads(kept)["dtype"]).weights[group]
        return dict(checkpoint._named(jax.tree.map(np.asarray, to_storage(weights))))
    before, frames = stored(), []
    for root, _, files in os.walk(os.path.join(out, "weights", group)):
        for name in files:
            held = open(os.path.join(root, name), "rb").read()
            if held[:4] == b"\x28\xb5\x2f\xfd":  # chunks, not OCDBT's b-tree nodes (which have checksums)
                starts = [m.start() for m in re.finditer(re.escape(b"\x28\xb5\x2f\xfd"), held)] + [len(held)]
                frames += [(os.path.join(root, name), a, b) for a, b in zip(starts, starts[1:])]
    for path, a, b in sorted(frames, key=lambda f: f[1] - f[2]):
        for at in range((a + b) // 2, min((a + b) // 2 + 4, b)):
            held = bytearray(open(path, "rb").read())
            held[at] ^= 0x08
            open(path, "wb").write(held)
            try:
                changed = [name for name, w in stored().items() if not np.array_equal(w, before[name])]
            except ValueError:
                changed = []
            if changed and all(wanted(name) for name in changed):
                open(manifest_path, "w").write(kept)
                return changed
            held[at] ^= 0x08
            open(path, "wb").write(held)
    raise AssertionError(f"no flipped bit in {group}'s data files changed only tensors wanted")


@pytest.mark.parametrize("quant, meshes", [
    (None, [dict(tensor=2, data=4), dict(stage=2, tensor=2, data=2)]),
    ("int8", [dict(stage=2, tensor=2, data=2)]),
    ("int4-g32", [dict(stage=2, data=4)]),  # (tensor=2 would cut o's groups of 32)
])
def test_a_weight_file_damaged_after_conversion_is_refused_by_name(tmp_path, hf_dir, quant, meshes):
    """Each stored tensor's checksum is in the manifest and checked as it is read, on one device or
    any mesh: a flipped bit in a data file (a failing disk, a bad copy) loaded as other weights
    without a word. A manifest from before checksums loads as it did."""
    out = hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False, quant=quant)
    manifest_path = os.path.join(out, checkpoint.MANIFEST)
    manifest = json.loads(open(manifest_path).read())
    assert set(manifest["checksums"]) == set(manifest["groups"])
    meshes = [make_mesh(**m) for m in meshes] if jax.device_count() >= 8 else []
    for mesh in (None, *meshes):  # clean: the same sums on every mesh
        llmjax.load(out, mesh=mesh)
    # a quantized checkpoint's codes (int4: packed in uint32 words)
    changed = _damage_silently(out, "layer_1", lambda name: quant is None or name.endswith("/values"))
    for mesh in (None, *meshes):
        with pytest.raises(ValueError, match=rf"weights/layer_1: weight group 'layer_1' does not hold the bytes "
                                             rf"that were written: the checksum of {', '.join(changed)} differs from "
                                             r"the one in llmjax.json .*copy the checkpoint folder again from a good "
                                             r"copy, or convert the model again"):
            llmjax.load(out, mesh=mesh)
    with open(manifest_path, "w") as f:
        json.dump({k: v for k, v in manifest.items() if k != "checksums"}, f)
    llmjax.load(out)  # as before checksums: nothing to check against


def test_checksums_are_of_the_stored_bits_on_any_mesh():
    """Each array's checksum is the sum of its bit words times (2i + 1), modulo 2**32, whether the array
    lies on one device or is sharded over several."""
    rng = np.random.default_rng(0)
    arrays = {"f32": rng.standard_normal((6, 40)).astype(np.float32),
              "bf16": rng.standard_normal((4, 6, 10)).astype(ml_dtypes.bfloat16),
              "u32": rng.integers(0, 2**32, (8, 5), dtype=np.uint32), "i8": rng.integers(-128, 128, (16,), np.int8)}

    def expected(a):
        words = a.view(f"uint{a.itemsize * 8}").ravel().astype(np.uint64)
        return int((words * (2 * np.arange(a.size, dtype=np.uint64) + 1)).sum() % 2**32)
    want = {k: expected(a) for k, a in arrays.items()}
    assert {k: int(v) for k, v in checkpoint.checksums(arrays).items()} == want
    if jax.device_count() >= 8:
        mesh = jax.make_mesh((2, 4), ("a", "b"))
        specs = {"f32": ("a", "b"), "bf16": (None, "a"), "u32": ("b",), "i8": ("b",)}
        sharded = {k: jax.device_put(a, jax.NamedSharding(mesh, jax.P(*specs[k]))) for k, a in arrays.items()}
        assert {k: int(v) for k, v in checkpoint.checksums(sharded).items()} == want
    flipped = arrays["f32"].copy()
    flipped.view(np.uint32)[3, 7] ^= 1 << 31  # the sign bit (an even weight would have hidden it)
    assert int(checkpoint.checksums(flipped)) != want["f32"]


def test_a_quantized_checkpoint_read_as_float_is_refused_by_name(tmp_path, hf_dir):
    out = hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False, quant="int8")
    manifest_path = os.path.join(out, "llmjax.json")
    manifest = json.loads(open(manifest_path).read())
    with open(manifest_path, "w") as f:
        json.dump({k: v for k, v in manifest.items() if k != "quant"}, f)
    with pytest.raises(ValueError, match=r"'layer_0' does not match .*missing attn/o/kernel; .*unknown "
                                         r"attn/o/kernel/scales"):
        llmjax.load(out)


def _stored_chunks(out: str, group: str) -> dict:
    """{tensor: (shape, chunk shape, bytes an element)} as the group's zarr metadata records them."""
    import tensorstore as ts

    store = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{out}/weights/{group}"}).result()
    found = {}
    for key in store.list().result():
        name, _, leaf = key.decode().rpartition("/")
        if leaf in (".zarray", "zarr.json"):
            meta = json.loads(store.read(key).result().value)
            chunks = meta["chunks"] if leaf == ".zarray" else meta["chunk_grid"]["configuration"]["chunk_shape"]
            dtype = jnp.dtype(meta["dtype"] if leaf == ".zarray" else meta["data_type"])
            found[name] = (tuple(meta["shape"]), tuple(chunks), dtype.itemsize)
    return found


def test_each_tensor_is_stored_in_chunks_a_load_decompresses_in_parallel(tmp_path, hf_dir, monkeypatch):
    """Every stored tensor is cut into chunks of at most `checkpoint.CHUNK_BYTES` (a restore decompresses
    them on every core: a tensor stored as one chunk read at one core's speed, and Llama-2-7B loaded 3x
    slower), and the chunked checkpoint loads the same weights as one written a chunk a tensor."""
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", 4096)
    chunked = hf.convert(str(hf_dir), str(tmp_path / "chunked"), progress=False)
    monkeypatch.setattr(checkpoint, "CHUNK_BYTES", None)  # orbax's default
    whole = hf.convert(str(hf_dir), str(tmp_path / "whole"), progress=False)
    for group in ("embed", "layer_0"):
        stored, before = _stored_chunks(chunked, group), _stored_chunks(whole, group)
        assert stored.keys() == before.keys() and stored
        for name, (shape, chunks, itemsize) in stored.items():
            assert math.prod(chunks) * itemsize <= 4096, (group, name, shape, chunks)
        assert any(math.prod(shape) * itemsize > 4096 for shape, _, itemsize in stored.values())
        assert any(chunks == shape and math.prod(shape) * itemsize > 4096
                   for shape, chunks, itemsize in before.values())  # (what the old layout stored)
    a, b = llmjax.load(chunked), llmjax.load(whole)
    assert jax.tree.structure(a.weights) == jax.tree.structure(b.weights)
    for x, y in zip(jax.tree.leaves(a.weights), jax.tree.leaves(b.weights)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("fraction", [0, 0.01, 0.5, 0.9])
def test_truncated_weights_name_the_tensor(tmp_path, hf_dir, fraction):
    """The error names the tensor and the damage (TensorStore's own message), not orbax's wrapper,
    whose first 300 characters were a dump of the TensorStore spec. The cut takes at least a tenth of
    the file: a data file's last few hundred bytes may be a b-tree node the merged checkpoint no longer
    reads (written on many cores, one in about 40 such files loaded whole at 99%)."""
    out = hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    path = _weights_file(out, "layer_0")
    os.truncate(path, int(os.path.getsize(path) * fraction))
    with pytest.raises(ValueError, match=r"weights/layer_0: cannot restore weight group 'layer_0' \(ValueError: "
                                         r"\w+: Error reading \"[\w.]+/[\d.]+\".*convert the model again") as error:
        llmjax.load(out)
    assert "TensorStore(" not in str(error.value)


def test_a_damaged_group_is_named_when_loaded_while_handling_another_error(tmp_path, hf_dir):
    """The caller's own exception (load in an except block) is the context of every exception raised
    meanwhile: the error names the damage, not the caller's exception."""
    out = hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    group = os.path.join(out, "weights", "layer_0")
    shutil.rmtree(group)
    os.mkdir(group)
    try:
        raise KeyError("the caller's own")
    except KeyError:
        with pytest.raises(ValueError, match=r"cannot restore weight group 'layer_0' \(FileNotFoundError: .*"
                                             r"weights/layer_0/") as error:
            llmjax.load(out)
    assert "the caller's own" not in str(error.value)


def test_the_innermost_cause_is_one_python_would_show():
    def chain(inner, outer_from_none=False):
        try:
            raise inner
        except BaseException:
            try:
                if outer_from_none:
                    raise ValueError("the wrapper's message") from None
                raise ValueError("the wrapper's message")
            except ValueError as e:
                return e
    assert str(checkpoint._innermost(chain(OSError("the damage")))) == "the damage"
    assert str(checkpoint._innermost(chain(OSError("hidden"), outer_from_none=True))) == "the wrapper's message"
    assert str(checkpoint._innermost(chain(KeyboardInterrupt()))) == "the wrapper's message"
    cycle = chain(OSError("the damage"))
    cycle.__context__.__context__ = cycle
    assert str(checkpoint._innermost(cycle)) == "the damage"


def test_a_checkpoint_without_its_manifest_is_named(tmp_path, hf_dir):
    out = hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    os.remove(os.path.join(out, checkpoint.MANIFEST))
    with pytest.raises(FileNotFoundError, match=re.escape(f"{out} holds llmjax weights (weights/) but no llmjax.json") +
                       ".*copy it back from the checkpoint this folder came from, or convert the model again"):
        llmjax.load(out)


def test_a_damaged_manifest_is_named(tmp_path, hf_dir):
    out = hf.convert(str(hf_dir), str(tmp_path / "out"), progress=False)
    manifest_path = os.path.join(out, "llmjax.json")
    manifest = json.loads(open(manifest_path).read())
    for edit in ({"groups": [1, "x", None]}, {"groups": [{"a": 1}]}, {"groups": manifest["groups"] + ["embed"]},
                 {"version": True}):
        with open(manifest_path, "w") as f:
            json.dump({**manifest, **edit}, f)
        with pytest.raises(ValueError, match=r"llmjax.json: not an llmjax checkpoint of version 1"):
            llmjax.load(out)
    for sums in ([1], {"embed": {"embedding": "12"}}, {"embed": {"embedding": 2**32}}, {"layer_9": {}}):
        with open(manifest_path, "w") as f:
            json.dump({**manifest, "checksums": sums}, f)
        with pytest.raises(ValueError, match=r"llmjax.json: its 'checksums' are not a weight group's 32-bit checksums "
                                             r"by tensor name; the manifest is damaged; restore .* convert the model again"):
            llmjax.load(out)
    os.remove(manifest_path)
    os.mkdir(manifest_path)  # a manifest that is no file is named, not taken for a folder with no weights
    with pytest.raises(ValueError, match=r"llmjax.json is not valid JSON \(.*Is a directory.*\); convert the model "
                                         r"again with `llmjax convert`"):
        llmjax.load(out)
    os.rmdir(manifest_path)
    os.symlink(os.path.join("..", "gone.json"), manifest_path)  # a link whose file is gone is named as one
    with pytest.raises(FileNotFoundError, match=r"llmjax.json is a link to \.\./gone.json, which does not exist; "
                                                r"convert the model again"):
        llmjax.load(out)
