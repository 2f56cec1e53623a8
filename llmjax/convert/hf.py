"""Hugging Face Llama folder -> llmjax weights, streamed tensor by tensor.

Reads safetensors only (one file, or shards listed in `model.safetensors.index.json`); pickled
`.bin`/`.pt` checkpoints are refused, since unpickling runs arbitrary code. Every name and shape is
checked against `config.json` from the file headers before any tensor is read, so a mismatch fails in
a second rather than after minutes of copying. `convert` writes into a temporary folder beside the
output and renames it at the end: a failure leaves nothing half-written. With `quant`, each layer's
projections are quantized as the layer streams through (`llmjax.quant`): the checkpoint holds codes
and scales, and loading it never quantizes again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import functools
import glob
import json
import os
import shutil
import sys
import uuid
import warnings
from collections import defaultdict
from typing import Any, Iterator

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy, which safetensors' numpy reader needs)
import numpy as np
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from llmjax import checkpoint
from llmjax.config import LlamaConfig
from llmjax.files import check_folder, not_permitted, read_json, remove_tree, resolve
from llmjax.kernels import dispatch
from llmjax.convert.names import Entry, is_ignorable, name_map
from llmjax.quant.tree import departures, quantize_tree
from llmjax.quant.weights import QuantScheme

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
_STORED = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_DTYPE_OF = {stored: DTYPES[name] for stored, name in _STORED.items()}
INDEX = "model.safetensors.index.json"
PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Files copied from the source folder into a converted checkpoint, when present.
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.model", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
              "chat_template.json")
SIDE_FOLDERS = ("additional_chat_templates",)  # named chat templates, NAME.jinja

# A tensor's bytes are read in pieces of READ_PIECE, by up to READERS threads at once
# (`SafetensorsFolder.read_into`). `llmjax.load` of Llama-2-7B's folder in bf16 from the page cache, on
# the H200 machine (16 cores): 4.45-4.54 s with 1 reader, 2.00-2.04 s with 8, 2.17 with 4, 2.20 with 16;
# safetensors' own reader took 14.9 s (benchmarks/load_speed.py --hf-only --readers 8,1,4,16).
READ_PIECE = 16 << 20
READERS = min(8, os.cpu_count() or 1)

HOW_TO_GET_SAFETENSORS = (
    "llmjax never unpickles checkpoints (unpickling runs arbitrary code). Get the safetensors "
    "release of the model, or, in an environment you trust, re-save it with transformers: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)")


class SafetensorsFolder:
    """The tensors of a Hugging Face folder, by name, read lazily from their files."""

    def __init__(self, folder: str):
        self.folder = folder
        self.files = _tensor_files(folder)  # tensor name -> file path
        self._offsets: dict[str, dict] = {}

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        path = self.files[name]
        if name not in self._layouts(path):
            raise ValueError(f"{path}: cannot read tensor {name!r} (its header does not list it); if the folder's "
                             f"{INDEX} puts it in this file, the index does not match the shards: download them again")
        dtype, shape, _ = self._layouts(path)[name]
        return tuple(shape), dtype

    def read(self, name: str) -> np.ndarray:
        """The tensor as a fresh array (`read_into`); one of a dtype llmjax does not read (a tied model's
        copy of its embedding, say), through safetensors' reader."""
        shape, dtype = self.shape_and_dtype(name)
        if dtype in _DTYPE_OF:
            out = np.empty(shape, _DTYPE_OF[dtype])
            self.read_into(name, out)
            return out
        try:
            with _safe_open(self.files[name]) as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{self.files[name]}: cannot read tensor {name!r} ({e}); the file is corrupt or "
                             "truncated; download it again") from e

    def read_into(self, name: str, out: np.ndarray) -> None:
        """Reads the tensor's bytes straight into `out`, an array of its stored dtype and size in any shape
        (a fused weight's slot, say), with `os.preadv`: one copy from the page cache, and nothing
        mapped. (safetensors' reader maps the whole file, and every page read through a map counts in
        this process's memory while it is open; its copy out of the map also ran at half the speed of a
        read.) The bytes of a large tensor are read by `READERS` threads, in pieces of `READ_PIECE`."""
        path = self.files[name]
        dtype, _, (start, stop) = self._layouts(path)[name]
        if out.dtype != _DTYPE_OF.get(dtype) or out.nbytes != stop - start:
            raise ValueError(f"{path}: tensor {name!r} holds {stop - start} bytes of {dtype}; it cannot be read into "
                             f"{out.dtype} {out.shape}")
        pieces = [(start + at + offset, run[offset:offset + READ_PIECE]) for at, run in _runs(out)
                  for offset in range(0, len(run), READ_PIECE)]
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                in_threads(lambda p: _read_piece(fd, *p), pieces, READERS)
            finally:
                os.close(fd)
        except (EOFError, OSError) as e:
            raise ValueError(f"{path}: cannot read tensor {name!r} ({e}); the file is corrupt or truncated; "
                             "download it again") from e

    def _layouts(self, path: str) -> dict[str, tuple[str, list, tuple[int, int]]]:
        """`{name: (dtype, shape, (start, stop))}` of a file's tensors, from its header (byte offsets in
        the file), read once. safetensors has checked the header when `_tensor_files` opened the file."""
        if path not in self._offsets:
            try:
                with open(path, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
                self._offsets[path] = {k: (v["dtype"], v["shape"], (8 + size + v["data_offsets"][0],
                                                                   8 + size + v["data_offsets"][1]))
                                       for k, v in header.items() if k != "__metadata__"}
            except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:  # (changed since)
                raise ValueError(f"{path}: corrupt or unreadable safetensors file ({e!r}); download it again") from e
        return self._offsets[path]


def _runs(out: np.ndarray) -> Iterator[tuple[int, memoryview]]:
    """`out`'s memory as contiguous runs of bytes, in C order: (where a run starts in that order, the run)."""
    if out.size == 0:
        return
    lead = 0  # the leading axes to step over, so that what is left is contiguous (a view: `...` keeps a
    while not out[(0,) * lead + (...,)].flags.c_contiguous:  # single element one, where a scalar would copy)
        lead += 1
    for i, index in enumerate(np.ndindex(out.shape[:lead])):
        run = out[index + (...,)]
        yield i * run.nbytes, memoryview(run.reshape(-1).view(np.uint8))


def _read_piece(fd: int, offset: int, piece: memoryview) -> None:
    """Fills `piece` with the file's bytes from `offset` on."""
    done = 0
    while done < len(piece):
        got = os.preadv(fd, [piece[done:]], offset + done)
        if got == 0:
            raise EOFError(f"the file ends {len(piece) - done} bytes short of the tensor's data")
        done += got


def in_threads(fn, items: list, threads: int) -> list:
    """`[fn(item) for item in items]`, run by a pool of `threads` threads, made once (a pool for each
    tensor started some 1,000 threads for a 7B model). The first item's error (in `items`' order) is
    raised once the calls under way have ended; calls not begun by then never run."""
    if threads <= 1 or len(items) <= 1:
        return [fn(item) for item in items]
    futures = [_pool(threads).submit(fn, item) for item in items]
    try:
        return [future.result() for future in futures]
    except BaseException:  # (a Ctrl-C too: the calls under way end, the rest are dropped)
        for future in futures:
            future.cancel()
        concurrent.futures.wait(futures)
        raise


@functools.cache
def _pool(threads: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="llmjax-reader")


def pickled_files(folder: str) -> list[str]:
    """The names of `folder`'s pickled weight files (`PICKLES`), which llmjax never reads."""
    return sorted(os.path.basename(p) for pattern in PICKLES for p in glob.glob(os.path.join(folder, pattern)))


def _tensor_files(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder; point at a Hugging Face model folder "
                                "holding config.json and *.safetensors")
    check_folder(folder, "Hugging Face model folder")
    index = os.path.join(folder, INDEX)
    if os.path.isfile(index):
        weight_map = _weight_map(index)
        single = os.path.join(folder, "model.safetensors")
        if os.path.isfile(single) and single not in {os.path.join(folder, fn) for fn in weight_map.values()}:
            # two copies of the weights (a repository that ships both, or a stale save): transformers
            # reads model.safetensors and ignores the index, and so does llmjax, to load the same model
            shards = sorted(set(weight_map.values()))
            warnings.warn(f"{folder} holds both model.safetensors and {INDEX} (shards {', '.join(shards[:3])}"
                          f"{', ...' if len(shards) > 3 else ''}): reading model.safetensors, as transformers does; "
                          "remove the copy that is not the model you mean", stacklevel=4)
            with _safe_open(single) as f:
                return {k: single for k in f.keys()}
        return _files_from_index(folder, weight_map)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        pickles = pickled_files(folder)
        if pickles:
            raise ValueError(f"{folder} holds only pickled weights ({', '.join(pickles)}). "
                             + HOW_TO_GET_SAFETENSORS)
        raise FileNotFoundError(f"{folder}: no *.safetensors files; a Hugging Face model folder "
                                "holds model.safetensors or shards with model.safetensors.index.json")
    names: dict[str, str] = {}
    for path in files:
        with _safe_open(path) as f:
            for k in f.keys():
                if k in names:  # which copy is meant? (a stale file beside the model's own)
                    raise ValueError(f"{folder}: tensor {k!r} is in both {os.path.basename(names[k])} and "
                                     f"{os.path.basename(path)}, and no {INDEX} says which to read; remove "
                                     "the file that does not belong to the model")
                names[k] = path
    return names


def _safe_open(path: str):
    """`safe_open(path)`, with errors that say what is wrong: safetensors reports a file this user may
    not read as missing, and a damaged one in its own terms."""
    if os.path.isfile(path) and not os.access(path, os.R_OK):
        raise PermissionError(not_permitted(path))
    if os.path.islink(path) and not os.path.exists(path):  # the hub cache's links into blobs/
        raise FileNotFoundError(f"{path} is a link to {os.readlink(path)}, which does not exist (a download cut "
                                "short, or a cache cleaned since): download the model again")
    try:
        return safe_open(path, framework="numpy")
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: corrupt or unreadable safetensors file ({e}); download it again") from e


def _weight_map(index: str) -> dict[str, str]:
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise ValueError(f"{index} has no 'weight_map'; download it again")
    bad = [name for name, fn in weight_map.items() if not isinstance(fn, str)]
    if bad:
        raise ValueError(f"{index}: weight_map gives {bad[0]!r} the file {weight_map[bad[0]]!r}, not a file name "
                         "in the folder; download the index again")
    return weight_map


def _files_from_index(folder: str, weight_map: dict[str, str]) -> dict[str, str]:
    missing = sorted({fn for fn in weight_map.values() if not os.path.isfile(os.path.join(folder, fn))})
    if missing:
        raise FileNotFoundError(f"{folder}: {INDEX} lists shards that are missing: {', '.join(missing)}; "
                                "download them")
    # transformers reads every tensor of the shards the index lists, wherever the index puts it: a
    # tensor in two shards, or in another shard than the index says, would load other weights there
    found: dict[str, str] = {}
    for fn in sorted(set(weight_map.values())):
        with _safe_open(os.path.join(folder, fn)) as f:
            for k in f.keys():
                if k in found:
                    said = f"puts it in {weight_map[k]}" if k in weight_map else "does not list it"
                    raise ValueError(f"{folder}: tensor {k!r} is in both {found[k]} and {fn} (the {INDEX} {said}); "
                                     "the shards come from different saves: download them again")
                found[k] = fn
    wrong = sorted(set(weight_map.items()) ^ set(found.items()))
    if wrong:
        names = sorted({name for name, _ in wrong})
        name = names[0]
        where = f"is in {found[name]}" if name in found else "is in none of its shards"
        said = f"puts it in {weight_map[name]}" if name in weight_map else "does not list it"
        raise ValueError(f"{folder}: {INDEX} does not match its shards ({len(names)} tensor(s), first {name!r}): it "
                         f"{where}, but the index {said}; download the index and the shards again")
    return {name: os.path.join(folder, fn) for name, fn in weight_map.items()}


def check_tensors(source: SafetensorsFolder, config: LlamaConfig) -> list[Entry]:
    """Checks names and shapes against the config (headers only); returns the entries to read."""
    entries = name_map(config)
    expected = {e.hf_name for e in entries}
    missing = [e.hf_name for e in entries if e.hf_name not in source.files]
    if missing:
        raise ValueError(f"{source.folder}: {len(missing)} tensor(s) that config.json implies are missing, "
                         f"first {missing[:5]}; the weights do not match config.json")
    unexpected = sorted(n for n in source.files if n not in expected and not is_ignorable(n, config))
    # Without an index every *.safetensors file is read: one holding none of the model's tensors (an
    # adapter saved beside it, say) is not part of the model, whatever config.json says.
    strays = sorted({source.files[n] for n in unexpected} - {source.files[n] for n in expected})
    if strays and not os.path.isfile(os.path.join(source.folder, INDEX)):
        names = [os.path.basename(f) for f in strays]
        raise ValueError(f"{source.folder}: {', '.join(names)} {'holds' if len(names) == 1 else 'hold'} none of the "
                         f"tensors config.json implies (only others, first {unexpected[:3]}): not part of the model (an "
                         "adapter, or another model's weights?); llmjax reads every *.safetensors file of a folder "
                         f"without {INDEX}: move {'it' if len(names) == 1 else 'them'} out of the folder")
    if unexpected:
        raise ValueError(f"{source.folder}: unexpected tensor(s) {unexpected[:5]}; config.json does not "
                         "describe them (a different architecture, or attention_bias/mlp_bias/"
                         "tie_word_embeddings set wrong?)")
    for e in entries:
        shape, dtype = source.shape_and_dtype(e.hf_name)
        if shape != e.hf_shape:
            raise ValueError(f"{source.files[e.hf_name]}: tensor {e.hf_name!r} has shape {shape}, but "
                             f"config.json implies {e.hf_shape}")
        if dtype not in _STORED:
            raise ValueError(f"{source.files[e.hf_name]}: tensor {e.hf_name!r} is stored as {dtype}; "
                             f"llmjax reads float32, float16 and bfloat16 checkpoints")
    _check_tied_head(source, config)
    return entries


def _check_tied_head(source: SafetensorsFolder, config: LlamaConfig) -> None:
    """A tied model's `lm_head.weight` must be a copy of the embedding: llmjax reads the embedding, but
    transformers (from 5.0) unties the two where they differ and reads the head, so the same folder
    would compute other logits in each."""
    if not config.tie_word_embeddings or "lm_head.weight" not in source.files:
        return
    head, embed = source.read("lm_head.weight"), source.read("model.embed_tokens.weight")
    if not np.array_equal(head, embed, equal_nan=True):
        raise ValueError(f"{source.folder}: config.json sets tie_word_embeddings true, but lm_head.weight is not a "
                         "copy of model.embed_tokens.weight (transformers 5 then reads lm_head.weight, earlier "
                         "versions the embedding); set tie_word_embeddings to false in config.json to use "
                         "lm_head.weight, or remove lm_head.weight from the checkpoint to tie them")


def resolve_dtype(dtype: str, source: SafetensorsFolder) -> str:
    """`auto` keeps the checkpoint's own dtype (that of its embedding table)."""
    if dtype == "auto":
        return _STORED[source.shape_and_dtype("model.embed_tokens.weight")[1]]
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose auto, {', '.join(DTYPES)}")
    return dtype


def iter_weight_groups(source: SafetensorsFolder, entries: list[Entry], dtype: str,
                       progress: bool = True) -> Iterator[tuple[str, dict]]:
    """Yields `(group, weights subtree)` in model order, reading each checked entry once; tensors
    that are slots of a fused weight (q/k/v, gate/up) are written into it in place."""
    groups: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        groups[e.path[0]].append(e)
    np_dtype = DTYPES[dtype]
    with tqdm(total=len(entries), desc="tensors", unit="tensor", disable=not progress) as bar:
        for key, group in groups.items():
            tree: dict = {}
            for e in group:
                fused = None if e.fused_shape is None else _get_path(tree, e.path[1:])
                if e.fused_shape is not None and fused is None:
                    fused = np.empty(e.fused_shape, np_dtype)
                    _set_path(tree, e.path[1:], fused)
                if fused is not None and _STORED.get(source.shape_and_dtype(e.hf_name)[1]) == dtype:
                    source.read_into(e.hf_name, fused[e.index])  # straight into its slot
                else:
                    with np.errstate(over="ignore"):  # an overflow is refused by name after the cast
                        array = e.to_llmjax(source.read(e.hf_name)).astype(np_dtype, copy=False)
                    if fused is None:
                        _set_path(tree, e.path[1:], np.ascontiguousarray(array))
                    else:
                        fused[e.index] = array
                bar.update()
            yield key, tree


def nonfinite_error(path: str, bad: list[str], cast: str | None) -> ValueError:
    """The error for weights (`bad`, by llmjax name) that hold NaN or infinity, read from `path`, where
    `cast` is the dtype the caller asked for (None or "auto": as stored)."""
    overflow = ("; or the cast to float16 overflowed (it turns values past +-65504 into infinity): use "
                "bfloat16 or float32" if cast == "float16" else "")
    return ValueError(f"{path}: {len(bad)} weight(s) hold NaN or infinite values, first {bad[:3]}; the file "
                      f"is damaged or was saved from a run that diverged: copy it again from a sound source{overflow}")


def named_leaves(tree) -> list[tuple[list[str], Any]]:
    """Each leaf of a weight tree with the names on its path (`["layer_1", "mlp", "down", "kernel"]`;
    a quantized kernel's arrays end in their field, `values`, `scales`, `zeros`)."""
    return [([str(getattr(k, "key", getattr(k, "name", k))) for k in path], leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _is_finite(array: np.ndarray) -> bool:
    """No NaN or infinity in a float array, from the exponent bits: numpy's `isfinite` on bfloat16 runs
    an element at a time."""
    info = ml_dtypes.finfo(array.dtype)
    mask = ((1 << info.nexp) - 1) << info.nmant  # all exponent bits set: infinity or NaN
    bits = np.ascontiguousarray(array).view(f"uint{8 * array.itemsize}")
    return not np.any((bits & bits.dtype.type(mask)) == mask)


def _finite_groups(groups, folder: str, cast: str) -> Iterator[tuple[str, dict]]:
    """`groups` (`iter_weight_groups`), each checked before it is passed on: `convert` refuses a model
    with NaN or infinite weights before its checkpoint exists, as `llmjax.load` would refuse that
    checkpoint (float16 overflow included)."""
    for key, tree in groups:
        bad = ["/".join([key, *names]) for names, array in named_leaves(tree) if not _is_finite(array)]
        if bad:  # named in the first group that has any: conversion stops there
            raise nonfinite_error(f"{folder} (weight group {key}, the first with any)", bad, cast)
        yield key, tree


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
    for key in path:
        if key not in tree:
            return None
        tree = tree[key]
    return tree


def to_hf_tensors(weights: dict, config: LlamaConfig) -> dict[str, np.ndarray]:
    """The inverse map: llmjax weights as Hugging Face tensors (for `safetensors.numpy.save_file`)."""
    tensors = {}
    for e in name_map(config):
        leaf = weights
        for key in e.path:
            leaf = leaf[key]
        tensors[e.hf_name] = np.ascontiguousarray(e.to_hf(np.asarray(leaf)[e.index]))
    return tensors


def save_hf(weights: dict, config: LlamaConfig, folder: str | os.PathLike,
            dtype: str = "bfloat16") -> None:
    """Writes weights as a Hugging Face Llama folder: `model.safetensors`, `config.json` and
    `generation_config.json` (tokenizer files are the caller's). `transformers` and `llmjax.load` read it.
    """
    from safetensors.numpy import save_file

    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.astype(DTYPES[dtype]) for k, v in to_hf_tensors(weights, config).items()}
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    hf = config.to_hf()
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(dict(hf, torch_dtype=dtype), f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": hf["bos_token_id"], "eos_token_id": hf["eos_token_id"]}, f, indent=2)


def _quantized(groups, config: LlamaConfig, dtype: str, quant: QuantScheme):
    """Each `(key, numpy tree)` group, with the kernels the model declares quantized quantized."""
    import jax.numpy as jnp

    from llmjax.models import llama

    like = llama.abstract_params(config, jnp.dtype(dtype), quant)
    for key, tree in groups:
        yield key, jax.tree.map(np.asarray, quantize_tree(tree, like[key]))


def _checked_output(hf_dir: str, out_dir: str, overwrite: bool) -> str:
    """`out_dir` as an absolute path, once it is known to be a folder `convert` may write: not the input
    folder nor one holding it (replacing it would delete the checkpoint being read), not the working
    folder nor one holding it, not a file, not under a file, and new unless `overwrite`, which replaces
    only what `convert` could have written (an empty folder, or an llmjax checkpoint holding nothing
    else): it never deletes a folder of the user's other files."""
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir).strip():
        raise ValueError(f"the output folder must be a path, got {out_dir!r}; name the folder to write the "
                         "checkpoint into")
    out_dir = os.path.abspath(os.path.expanduser(out_dir))  # (`~` as for the input: `resolve`)
    if os.path.islink(out_dir):
        raise ValueError(f"the output folder {out_dir} is a symbolic link; give the folder it points to, or "
                         "another path")
    real_out = os.path.realpath(out_dir)
    # the input folder and the files it holds (a cache's snapshot links into its blobs)
    inputs = [os.path.realpath(hf_dir)] + [os.path.realpath(os.path.join(hf_dir, n)) for n in os.listdir(hf_dir)]
    if any(os.path.commonpath([real_out, path]) == real_out for path in inputs):
        raise ValueError(f"the output folder {out_dir} is the input folder or holds it or its files ({hf_dir}); "
                         "writing it would replace the checkpoint being read; choose an output folder outside it")
    ancestor = out_dir
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"cannot write {out_dir}: {ancestor} is a file, not a folder; choose another "
                         "output folder")
    real_cwd = os.path.realpath(os.getcwd())
    if os.path.commonpath([real_out, real_cwd]) == real_out:
        raise ValueError(f"the output folder {out_dir} is the working folder or holds it; convert writes a "
                         "folder of its own: name a new one, such as ./llama2-7b")
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose another output folder, or pass "
                              "--overwrite (overwrite=True) to replace an earlier conversion there")
    if os.path.exists(out_dir):
        others = sorted(set(os.listdir(out_dir)) - {checkpoint.MANIFEST, checkpoint.WEIGHTS_DIR, *SIDE_FILES, *SIDE_FOLDERS})
        if others or (os.listdir(out_dir) and not checkpoint.is_checkpoint(out_dir)):
            what = (f"it holds {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}, which convert "
                    "does not write" if others else f"it is not an llmjax checkpoint (no {checkpoint.MANIFEST})")
            raise FileExistsError(f"{out_dir} already exists and --overwrite (overwrite=True) will not replace it: "
                                  f"{what}; it replaces only an empty folder or an earlier conversion. Choose "
                                  "another output folder, or move those files away yourself")
    return out_dir


def leftovers(out_dir: str) -> list[str]:
    """The folders a conversion into `out_dir` writes beside it and removes when it ends (`convert`):
    those one killed without a chance to clean up (kill -9, a crash, a power cut) left, or one still
    running writes."""
    out_dir = os.path.abspath(out_dir)
    name, parent = glob.escape(os.path.basename(out_dir)), glob.escape(os.path.dirname(out_dir))
    return sorted(p for pattern in (f".{name}.partial-*", f".{name}.replaced-*")
                  for p in glob.glob(os.path.join(parent, pattern)) if os.path.isdir(p))


def leftovers_note(out_dir: str) -> str:
    """The sentence naming `leftovers(out_dir)`, or ''."""
    out_dir, found = os.path.abspath(out_dir), leftovers(out_dir)
    if not found:
        return ""
    kept = (f" (a .replaced- one is an earlier conversion, whole: rename it to {os.path.basename(out_dir)} to keep it)"
            if any(".replaced-" in p for p in found) else "")
    return (f"{', '.join(found)} {'is' if len(found) == 1 else 'are'} left from a conversion into "
            f"{out_dir} that was killed before it finished (kill -9, a crash, a power cut), or written by one "
            f"still running; {'it is not' if len(found) == 1 else 'none is'} a checkpoint{kept}: once no conversion into "
            f"it runs, remove {'it' if len(found) == 1 else 'them'}")


def convert(hf_dir: str, out_dir: str, dtype: str = "auto", overwrite: bool = False,
            progress: bool = True, quant: str | QuantScheme | None = None, quant_lm_head: bool = False) -> str:
    """Converts a Hugging Face Llama folder (or a bundled model, by name: `"tiny-stdlib"`) into an
    llmjax checkpoint at `out_dir`; returns out_dir.

    `quant` (`int4-g128`, `int4-g64`, `int4-g32`, optionally `-asym`, or `int8`) quantizes the
    projections (q/k/v, o, gate/up, down; also an untied LM head with `quant_lm_head`) as they stream
    through; `dtype` then applies to the other weights (embedding, norms, biases).
    """
    if quant is not None:
        quant = QuantScheme.coerce(quant)
        if quant_lm_head:
            quant = dataclasses.replace(quant, lm_head=True)
        dispatch.refuse_context_mesh(None)  # it quantizes on one device
    elif quant_lm_head:
        raise ValueError("quant_lm_head (--quant-lm-head) needs a quantization (--quant)")
    hf_dir = resolve(hf_dir)
    check_folder(hf_dir, "Hugging Face model folder")
    if checkpoint.is_checkpoint(hf_dir):
        raise ValueError(f"{hf_dir} is already an llmjax checkpoint; load it directly (llmjax.load, or "
                         "--model with the CLI) rather than converting it again")
    config = LlamaConfig.from_hf(hf_dir)  # refuses unsupported architectures before any work
    if quant is not None and quant.lm_head and config.tie_word_embeddings:
        asked = "quant_lm_head (--quant-lm-head)" if quant_lm_head else f"the QuantScheme's lm_head=True ({quant!r})"
        raise ValueError(f"{asked}: this model ties its LM head to the embedding table, which stays in "
                         "floating point; leave it off")
    source = SafetensorsFolder(hf_dir)
    entries = check_tensors(source, config)
    resolved = resolve_dtype(dtype, source)
    out_dir = _checked_output(hf_dir, out_dir, overwrite)
    note = leftovers_note(out_dir)
    if note:  # (each can hold a whole model's size of disk)
        warnings.warn(note, stacklevel=2)
    parent = os.path.dirname(out_dir)
    tmp = os.path.join(parent, f".{os.path.basename(out_dir)}.partial-{uuid.uuid4().hex[:12]}")
    aside = None  # where an earlier conversion waits while the new one takes its place
    try:
        os.makedirs(parent, exist_ok=True)
        os.mkdir(tmp)  # with the user's umask, as any folder they make (mkdtemp's would be private)
    except PermissionError as e:
        where = os.path.dirname(e.filename) if e.filename else parent  # the folder that refused the mkdir
        raise PermissionError(f"cannot write {out_dir}: this user may not write in {where}; choose an output "
                              "folder this user may write, or fix its permissions") from None
    except OSError as e:  # a folder that takes no new entries (/proc, a read-only mount): not the temporary name
        raise OSError(f"cannot write {out_dir}: making the folder {os.path.basename(tmp)} in {parent} (where the "
                      f"conversion is written before it takes its name) failed ({e.strerror}); choose another "
                      "output folder") from None
    try:
        for name in SIDE_FILES:
            side = os.path.join(hf_dir, name)
            if os.path.isfile(side):
                try:
                    shutil.copy2(side, os.path.join(tmp, name))
                except PermissionError as e:
                    if e.filename != side:  # writing the copy, not reading the original
                        raise
                    raise PermissionError(not_permitted(side)) from None
        for name in SIDE_FOLDERS:
            side = os.path.join(hf_dir, name)
            if os.path.isdir(side):  # (copytree follows the hub cache's links: files, not links, are written)
                shutil.copytree(side, os.path.join(tmp, name))
        groups = _finite_groups(iter_weight_groups(source, entries, resolved, progress), hf_dir, dtype)
        if quant is not None:
            for line in departures(config, quant) if progress else ():
                print(f"{quant.name}: {line}", file=sys.stderr)
            groups = _quantized(groups, config, resolved, quant)
        checkpoint_id = uuid.uuid4().hex
        keys, sums = checkpoint.write_weights(tmp, groups, checkpoint_id)
        checkpoint.write_manifest(tmp, keys, resolved, quant, checkpoint_id, sums)
        # An earlier conversion is moved aside, not deleted, until the new one is in its place: an
        # interrupt then leaves one whole checkpoint at out_dir, the old or the new.
        if os.path.lexists(out_dir) and not overwrite:  # made meanwhile (another conversion into it, say)
            raise FileExistsError(f"{out_dir} appeared while this conversion ran (another conversion into it, "
                                  "or another program); it was left as it is: choose another output folder, or "
                                  "pass --overwrite (overwrite=True) to replace it")
        if os.path.exists(out_dir):
            aside = os.path.join(parent, f".{os.path.basename(out_dir)}.replaced-{uuid.uuid4().hex[:12]}")
            os.rename(out_dir, aside)
        os.rename(tmp, out_dir)
    except BaseException as e:
        if aside is not None and os.path.exists(aside) and not os.path.exists(out_dir):
            os.rename(aside, out_dir)  # the earlier conversion back in its place
        remove_tree(tmp)  # (a second Ctrl-C waits for it)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG):
            error = OSError(f"cannot write {out_dir}: {os.strerror(e.errno)} (the disk holding {parent} is full, or "
                            "this user's disk quota or file size limit is reached); what was written is removed: "
                            "free space there, or choose an output folder on another disk")
            error.errno = e.errno
            raise error from e
        raise
    if aside is not None:
        remove_tree(aside)
    return out_dir
