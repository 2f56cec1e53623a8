"""The llmjax checkpoint folder: orbax weights, the Hugging Face config, the tokenizer files.

```
OUT/
  llmjax.json          format marker, weight dtype, the weight groups in order, the quantization
                       scheme when the projections are quantized (`llmjax convert --quant`), the
                       conversion's id, which each group's orbax metadata repeats, and each stored
                       tensor's checksum (`checksums`: group -> tensor -> 32-bit sum)
  config.json          the source model's Hugging Face config (LlamaConfig.from_hf reads it)
  generation_config.json, tokenizer.model | tokenizer.json, tokenizer_config.json, ...
  weights/<group>/     one orbax checkpoint per top-level group: embed, layer_0 ... layer_{L-1},
                       final_norm, lm_head
```
One orbax item per group lets conversion write a layer at a time (memory bounded by the largest
layer, not the model) and restore read each tensor straight into the sharding it is asked for. Each
tensor is stored in zstd chunks of at most `CHUNK_BYTES`, which a restore decompresses on every core. A
quantized kernel is stored as a plain dict of its arrays (`values`, `scales`, `zeros`); its bits and
group size follow from the manifest's scheme and the model's declaration. The id makes a group
that another conversion wrote (copied in, or read while an `--overwrite` swaps the folder) an error
rather than weights of another model loaded without a word; the checksums make a data file whose
bytes changed after it was written (bit rot, a bad copy) an error rather than other weights.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from llmjax.files import read_json, signals_held
from llmjax.quant.tree import from_storage, to_storage

MANIFEST = "llmjax.json"
FORMAT = "llmjax-checkpoint"
VERSION = 1
STORED_DTYPES = ("float32", "float16", "bfloat16")  # the float weights' dtype a manifest names
WEIGHTS_DIR = "weights"
ID_KEY = "llmjax_checkpoint"  # each group's orbax custom metadata: the manifest's id
CHECKSUMS = "checksums"  # the manifest's {group: {tensor: checksum}}; absent in checkpoints from before them
# Each tensor is stored in zstd-compressed chunks of at most this many bytes (orbax's `chunk_byte_size`),
# which a restore decompresses in parallel: one chunk per tensor (orbax's default) made a load run at
# one core's decompression speed, ~1 GB/s (BENCHMARKS.md, forty-first session). None: orbax's default.
CHUNK_BYTES: int | None = 16 << 20


def is_checkpoint(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, MANIFEST))


def write_weights(root: str, groups, checkpoint_id: str) -> tuple[list[str], dict]:
    """Saves each `(key, subtree)` of `groups` (an iterable) under `root/weights/key`, marked with
    `checkpoint_id` (the manifest's `id`); returns the keys and each group's `checksums` (the
    manifest's)."""
    checkpointer = ocp.StandardCheckpointer()
    keys, sums = [], {}
    with _orbax_quiet():
        try:
            for key, tree in groups:  # (a Ctrl-C while the next group is read stops at once)
                stored = to_storage(tree)
                sums[key] = tensor_sums(stored)
                save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), stored)
                with signals_held(), _write_errors(root):
                    checkpointer.save(os.path.join(os.path.abspath(root), WEIGHTS_DIR, key), stored,
                                      save_args=save_args, custom_metadata={ID_KEY: checkpoint_id})
                keys.append(key)
        finally:
            # Saves run in the background; on failure too, none may still be writing when the caller
            # removes the partial folder. Neither a save nor this wait is cut short by a signal (held
            # till it is done): orbax's threads would go on writing into the removed folder.
            with signals_held(), _write_errors(root):
                checkpointer.close()
    return keys, sums


@jax.jit
def checksums(tree):
    """Each array's checksum: the sum of its bits' words (each as an unsigned integer of its dtype's
    width) times (2i + 1), i its row-major position, modulo 2**32. Integer arithmetic is exact in any
    order, so every mesh and device computes the same sum; the odd factor makes any change of one
    element, and most swaps of two, change it. On the stored dtype's bits, before any cast, where
    `restore_weights` reads them (one program per group, as many devices as the group spans)."""
    def checksum(w):
        words = jax.lax.bitcast_convert_type(w, jnp.dtype(f"uint{jnp.dtype(w.dtype).itemsize * 8}"))
        position = jnp.zeros(w.shape, jnp.uint32)
        stride = 1
        for axis in reversed(range(w.ndim)):
            position += jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(stride % 2**32)
            stride *= w.shape[axis]
        return jnp.sum(words.astype(jnp.uint32) * (2 * position + 1), dtype=jnp.uint32)
    return jax.tree.map(checksum, tree)


def tensor_sums(tree) -> dict[str, int]:
    """`checksums` of a group's stored tree, by tensor name (`a/b/c`), as the manifest holds them."""
    return {name: int(s) for name, s in _named(jax.device_get(checksums(tree)))}


@contextlib.contextmanager
def _write_errors(root: str):
    """orbax's error for a write the system refused (TensorStore's text, with its `os_error_code`: a
    full disk, a quota) as the OSError of that errno, naming `root`; other errors as they are."""
    handled = sys.exc_info()[1]  # a caller's own exception (convert called in an except block): no cause of ours
    try:
        yield
    except Exception as e:
        cause = _innermost(e, handled)
        code = cause.errno if isinstance(cause, OSError) else None
        found = re.search(r"os_error_code='?(\d+)", str(cause))
        code = code or (int(found.group(1)) if found else None)
        if not code:
            raise
        error = OSError(f"writing the weights into {root} failed: {os.strerror(code)}")
        error.errno = code
        raise error from e


class _OrbaxErrorsOff(logging.Filter):
    def filter(self, record):
        return "orbax" not in record.pathname


@contextlib.contextmanager
def _orbax_quiet():
    """orbax logs a failed write (a full disk) from each of its threads, with tracebacks, and a group
    it cannot read, before raising it: `write_weights` and `restore_weights` raise it once, with what
    it means."""
    logger, quiet = logging.getLogger("absl"), _OrbaxErrorsOff()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def write_manifest(root: str, keys: list[str], dtype: str, quant=None, checkpoint_id: str | None = None,
                   sums: dict | None = None) -> None:
    """`quant`: the `QuantScheme` of the projections, or None (all weights in `dtype`); `checkpoint_id`
    and `sums`: the id `write_weights` marked the groups with, and the checksums it returned."""
    manifest = {"format": FORMAT, "version": VERSION, "dtype": dtype, "groups": keys}
    if checkpoint_id is not None:
        manifest["id"] = checkpoint_id
    if sums is not None:
        manifest[CHECKSUMS] = sums
    if quant is not None:
        manifest["quant"] = quant.to_json()
    with open(os.path.join(root, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)


def read_manifest(root: str) -> dict[str, Any]:
    path = os.path.join(root, MANIFEST)
    manifest = read_json(path, fix="convert the model again with `llmjax convert`")
    groups = manifest.get("groups")
    if (manifest.get("format") != FORMAT or manifest.get("version") != VERSION
            or isinstance(manifest.get("version"), bool) or not isinstance(groups, list)
            or not all(isinstance(g, str) for g in groups) or len(set(groups)) != len(groups)
            or "dtype" not in manifest or not isinstance(manifest.get("id", ""), str)):
        raise ValueError(f"{path}: not an llmjax checkpoint of version {VERSION} ({manifest!r}); "
                         "convert the model again with this version of `llmjax convert`")
    sums = manifest.get(CHECKSUMS, {})
    if not (isinstance(sums, dict) and (not sums or set(sums) == set(groups)) and all(
            isinstance(group, dict) and all(type(s) is int and 0 <= s < 2**32 for s in group.values())
            for group in sums.values())):
        raise ValueError(f"{path}: its {CHECKSUMS!r} are not a weight group's 32-bit checksums by tensor name; the "
                         "manifest is damaged; restore the files written with it, or convert the model again")
    if manifest["dtype"] not in STORED_DTYPES:
        raise ValueError(f"{path}: dtype {manifest['dtype']!r} is not one llmjax stores ({', '.join(STORED_DTYPES)}); "
                         "the manifest is damaged; convert the model again")
    return manifest


def check_groups(root: str, manifest: dict, keys) -> None:
    """The weight groups of `manifest` (`read_manifest(root)`) are exactly `keys`, the ones the
    checkpoint's config.json implies: a group missing, or one on disk that the config does not use (its
    config.json edited to fewer layers, or to a tied LM head), would make another model than the one
    converted. Checked once per load, before `restore_weights`."""
    stored = set(manifest["groups"])
    missing, unused = sorted(set(keys) - stored), sorted(stored - set(keys))
    if missing or unused:
        raise ValueError(f"{root}: the checkpoint's weight groups do not match its config.json ("
                         + "; ".join(([f"missing {missing}"] if missing else [])
                                     + ([f"not used by the config {unused}"] if unused else []))
                         + "); restore the config.json written with it, or convert the model again")


def restore_weights(root: str, target: dict, manifest: dict) -> dict:
    """Restores every group of `target` (a tree of `jax.ShapeDtypeStruct` with shardings; quantized
    kernels as `QuantizedWeight`s of them), groups that `check_groups` found in `manifest`
    (`read_manifest(root)`, read once per load: each group must carry its id)."""
    checkpointer = ocp.StandardCheckpointer()
    handled = sys.exc_info()[1]  # a caller's own exception (load called in an except block): no cause of ours
    weights = {}
    with _orbax_quiet():  # (its warnings on a damaged group come before the error below, which names it)
        for key, group_target in target.items():
            path = os.path.join(os.path.abspath(root), WEIGHTS_DIR, key)
            storage = to_storage(group_target)
            check_stored(checkpointer, path, key, storage, manifest.get("id"))
            try:
                stored = checkpointer.restore(path, storage)
            except Exception as e:  # orbax raises many types; all mean the same to a user
                cause = _innermost(e, handled)  # orbax wraps TensorStore's error (naming the tensor) in a spec dump
                detail = " ".join(str(cause).split())[:300]  # orbax's messages span lines (TensorStore reprs)
                raise ValueError(f"{path}: cannot restore weight group {key!r} ({type(cause).__name__}: {detail}); "
                                 "the checkpoint is damaged or does not match its config.json; convert the "
                                 "model again") from e
            if CHECKSUMS in manifest:
                check_sums(path, key, stored, manifest[CHECKSUMS].get(key, {}))
            weights[key] = from_storage(stored, group_target)
    return weights


def check_sums(path: str, key: str, stored: dict, want: dict) -> None:
    """Refuses a group whose restored tensors (`stored`, in the stored dtype) are not the ones written:
    their `checksums` differ from the manifest's (`want`), or the manifest has none for one of them."""
    have = tensor_sums(stored)
    bad = [name for name in have if want.get(name) != have[name]]
    if bad:
        raise ValueError(f"{path}: weight group {key!r} does not hold the bytes that were written: the checksum of "
                         f"{', '.join(bad)} differs from the one in {MANIFEST} (its files were damaged after "
                         "conversion: a failing disk, an interrupted or bad copy); copy the checkpoint folder again "
                         "from a good copy, or convert the model again")


def check_stored(checkpointer, path: str, key: str, target: dict, checkpoint_id: str | None = None) -> None:
    """Refuses a group that another conversion wrote than the manifest's (`checkpoint_id`; None for a
    checkpoint from before ids, whose groups have none), and one whose stored tensors are not the ones
    `target` (its storage tree) asks for: missing, unknown, or of another shape or dtype, by name.
    Orbax would refuse a shape with a hint to turn its check off, and cast another dtype without a
    word (a manifest edited to float16 over bfloat16 weights). A group whose metadata cannot be read
    (none at all: a damaged or missing group) is left to the restore to report."""
    try:
        stored = checkpointer.metadata(path)
        written_by = (getattr(stored, "custom_metadata", None) or {}).get(ID_KEY)
        stored = getattr(stored, "item_metadata", stored)
        stored = dict(_named(getattr(stored, "tree", stored)))
    except Exception:
        return
    if not stored:
        return
    if written_by != checkpoint_id:
        raise ValueError(f"{path}: weight group {key!r} was written by another conversion than the checkpoint's "
                         f"{MANIFEST} (a folder copied in from another checkpoint, or the checkpoint replaced while "
                         "it was read); restore the files written with it, or convert the model again")
    wanted = dict(_named(target))
    problems = [f"missing {name}" for name in wanted if name not in stored]
    problems += [f"unknown {name}" for name in stored if name not in wanted]
    for name, want in wanted.items():
        have = stored.get(name)
        if have is not None and (tuple(have.shape), str(have.dtype)) != (tuple(want.shape), str(want.dtype)):
            problems.append(f"{name} is {str(have.dtype)}{list(have.shape)} where {str(want.dtype)}"
                            f"{list(want.shape)} is expected")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        raise ValueError(f"{path}: weight group {key!r} does not match the checkpoint's config.json and "
                         f"{MANIFEST} ({shown}); restore the files written with it, or convert the model again")


def _named(tree) -> list:
    """`(a/b/c, leaf)` for each leaf of a nested dict."""
    return [("/".join(str(getattr(k, "key", k)) for k in keys), leaf)
            for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _innermost(error: BaseException, handled: BaseException | None = None) -> BaseException:
    """The exception at the bottom of `error`'s chain of causes, following a context only where Python
    would show it (not after `raise ... from None`), and stopping at `handled` (the exception the caller
    was handling, which every exception raised meanwhile takes as its context) and at an interrupt."""
    seen = {id(error)}
    while True:
        below = error.__cause__ if error.__cause__ is not None or error.__suppress_context__ else error.__context__
        if below is None or below is handled or id(below) in seen or not isinstance(below, Exception):
            return error
        error = below
        seen.add(id(error))


def default_target(abstract: dict, sharding: jax.sharding.Sharding | None = None) -> dict:
    """Gives each abstract leaf a sharding (by default the first local device)."""
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
