"""Whether quantizing on this device divides by the scale it stores: random weights quantized with
`llmjax.quant.weights`, each code checked against the weight it stands for.

- int8: the largest |dequantized - weight| over half the stored scale; 1.0 is rounding to the stored
  grid, more means the codes came from another scale than the stored one.
- int4 (symmetric, group 128): the groups whose squared error exceeds that of the plain grid
  max|w| / 7 with the stored scale, which the scale search never does when it measures with the
  stored scale.
- `--demo`: the demo model converted with each scheme (`llmjax.convert`, float32), and a digest of
  its codes, scales and zero points: a GPU and a CPU write the same bytes when the digests agree.
  `--save FILE.npz` keeps them; `--compare FILE.npz` (saved on another device) counts the values
  that differ, and for the int8 codes of layer 0's down kernel how far each differing weight lies
  from a rounding tie.

    PYTHONPATH=. python -P benchmarks/quant_rounding.py [--rows 4096 --cols 4096] [--demo [--save F] [--compare F]]
"""

import argparse
import hashlib
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import llmjax
from llmjax.quant.weights import (SCALE_DTYPE, dequantize_int4, dequantize_int8, is_quantized, quantize_int4,
                                  quantize_int8)


def demo_digests(save: str | None, compare: str | None) -> None:
    arrays = {}
    for scheme in ("int8", "int4-g128", "int4-g32-asym"):
        with tempfile.TemporaryDirectory() as tmp:
            folder = llmjax.convert("tiny-stdlib", os.path.join(tmp, "model"), dtype="float32", quant=scheme,
                                    progress=False)
            weights = llmjax.load(folder, dtype="float32").weights
        if scheme == "int8":
            arrays["float"] = np.asarray(llmjax.load("tiny-stdlib", dtype="float32").weights["layer_0"]["mlp"]["down"]["kernel"])
        digest = hashlib.sha256()
        for path, leaf in jax.tree_util.tree_flatten_with_path(weights, is_leaf=is_quantized)[0]:
            if is_quantized(leaf):
                for part in ("values", "scales", "zeros"):
                    array = getattr(leaf, part)
                    if array is not None:
                        stored = np.asarray(array)  # bfloat16 scales as float32 (exact), which .npz keeps
                        arrays[f"{scheme}{jax.tree_util.keystr(path)}.{part}"] = (
                            stored if stored.dtype.kind in "iu" else stored.astype(np.float32))
                        digest.update(stored.tobytes())
        print(f"{jax.devices()[0].device_kind}: the demo model as {scheme}, digest {digest.hexdigest()[:16]}")
    if save:
        np.savez_compressed(save, **{k.replace("/", "|"): v for k, v in arrays.items()})
    if compare:
        other = {k.replace("|", "/"): v for k, v in np.load(compare).items()}
        for scheme in ("int8", "int4-g128", "int4-g32-asym"):
            keys = [k for k in arrays if k.startswith(scheme + "[")]
            differ = sum(int((arrays[k] != other[k]).sum()) for k in keys)
            total = sum(arrays[k].size for k in keys)
            print(f"{scheme}: {differ} of {total} stored values differ from {compare}'s")
        key = next(k for k in arrays if k.startswith("int8[") and "'down'" in k and "layer_0" in k and k.endswith("values"))
        scale = arrays[key.replace("values", "scales")].astype(np.float32)[:, None]
        where = arrays[key] != other[key]
        ratio = arrays["float"].reshape(scale.shape[0], -1) / scale  # layer_0's down kernel, [out, in] as stored
        print(f"int8 layer_0 down: {where.sum()} codes differ; their |w / scale| lies "
              f"{np.abs(np.abs(ratio[where] % 1) - 0.5).max() if where.any() else 0:.2e} at most from a tie")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--demo", action="store_true", help="also the demo model's digests")
    parser.add_argument("--save", help="with --demo: keep the stored values in this .npz")
    parser.add_argument("--compare", help="with --demo: count the values that differ from this .npz")
    args = parser.parse_args()
    if (args.save or args.compare) and not args.demo:
        parser.error("--save and --compare go with --demo")
    w = jax.random.normal(jax.random.key(0), (args.rows, args.cols), jnp.float32)
    host = np.asarray(w)

    q8 = quantize_int8(w, num_out_dims=1)
    scale8 = np.asarray(q8.scales, np.float32)[:, None]
    ratio8 = np.abs(np.asarray(dequantize_int8(q8)) - host) / (scale8 / 2)
    print(f"{jax.devices()[0].device_kind}: int8, largest |error| / (stored scale / 2) = {ratio8.max():.4f}, "
          f"weights past 1.0001: {(ratio8 > 1.0001).sum()} of {ratio8.size}")

    q4 = quantize_int4(w, num_out_dims=1, group_size=args.group)
    groups = host.reshape(args.rows, -1, args.group)
    err = ((np.asarray(dequantize_int4(q4)).reshape(groups.shape) - groups) ** 2).sum(-1)
    plain_s = np.asarray(jnp.asarray(np.abs(groups).max(-1) / 7, SCALE_DTYPE), np.float32)[..., None]
    plain = ((np.clip(np.round(groups / plain_s), -8, 7) * plain_s - groups) ** 2).sum(-1)
    worse = err > plain * (1 + 1e-6)
    print(f"{jax.devices()[0].device_kind}: int4-g{args.group}, groups worse than the plain grid: "
          f"{worse.sum()} of {worse.size} (squared error {err.sum():.2f} against {plain.sum():.2f})")
    if args.demo:
        demo_digests(args.save, args.compare)


if __name__ == "__main__":
    main()
