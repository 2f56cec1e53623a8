"""Checks `llmjax.convert.hf`'s reader on a large folder: every tensor of every weight group that
`iter_weight_groups` yields (read in pieces by `READERS` threads, fused slots read in place) is compared,
bit for bit, with the same tensor read by safetensors' own reader and placed by the name map.

    PYTHONPATH=. python -P benchmarks/hf_read_check.py FOLDER   (load_speed.py --keep leaves DIR/hf)
"""

from __future__ import annotations

import sys
import time

import numpy as np
from safetensors import safe_open

from llmjax.config import LlamaConfig
from llmjax.convert import hf


def main() -> None:
    folder = sys.argv[1]
    source = hf.SafetensorsFolder(folder)
    entries = hf.check_tensors(source, LlamaConfig.from_hf(folder))
    dtype = hf.resolve_dtype("auto", source)
    by_group: dict[str, list] = {}
    for e in entries:
        by_group.setdefault(e.path[0], []).append(e)
    start, differ = time.perf_counter(), []
    for key, tree in hf.iter_weight_groups(source, entries, dtype, progress=False):
        for e in by_group[key]:
            with safe_open(source.files[e.hf_name], "np") as f:
                want = e.to_llmjax(f.get_tensor(e.hf_name)).astype(hf.DTYPES[dtype])
            got = hf._get_path(tree, e.path[1:])
            got = got if e.fused_shape is None else got[e.index]
            bits = f"uint{8 * want.itemsize}"
            if not np.array_equal(got.view(bits), want.view(bits)):
                differ.append(e.hf_name)
    print(f"READERS {hf.READERS}: {len(entries)} tensors compared with safetensors' reader, {len(differ)} differ "
          f"{differ[:5]}, {time.perf_counter() - start:.1f} s")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
