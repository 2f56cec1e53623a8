"""`llmjax bench` with the engine's paged-attention tuning set for one page dtype.

    PYTHONPATH=. python benchmarks/paged_tuning.py DTYPE 'JSON' -- LLMJAX-BENCH-ARGS...
    PYTHONPATH=. python benchmarks/paged_tuning.py DTYPE @DIR/attention-pool.json:PAGE -- LLMJAX-BENCH-ARGS...
    PYTHONPATH=. python benchmarks/paged_tuning.py float8_e4m3fn '{"compute_dtype": "float16", "block_k": 32}' -- \\
        --throughput --model llama2-7b --max-slots 384 --prefill-tokens 4096 --no-mix --kv-dtype float8_e4m3fn

Sets `llmjax.kernels.paged_attention.TUNING[DTYPE]` (the keywords of `paged_attention`: block_k,
num_warps, num_stages, splits, compute_dtype), then runs `llmjax bench` with the rest of
the arguments in this process, so a variant that `benchmarks/attention.py --only pool` found fast on
the pool shapes can be measured in the engine before it becomes a default. `@FILE:PAGE` takes the
fastest row of that file for DTYPE, pages of PAGE tokens and the engine's 384 rows among those within
1e-2 of the reference.
"""

import json
import sys

from llmjax.cli import main as llmjax_main
from llmjax.kernels import paged_attention


KEYWORDS = ("block_k", "num_warps", "num_stages", "splits", "compute_dtype")


def fastest(dtype: str, where: str) -> dict:
    path, page = where.rsplit(":", 1)
    with open(path) as f:
        rows = [r for r in json.load(f)["rows"] if r.get("section") == "pool" and r["dtype"] == dtype
                and r["page"] == int(page) and r.get("rows", 384) == 384 and r["error"] < 1e-2]
    if not rows:
        raise SystemExit(f"{path} has no correct pool row for {dtype} at page {page}")
    best = min(rows, key=lambda r: r["us"])
    print(f"fastest in {path} for {dtype}, page {page}: {best['us']:.1f} us, {best['tb_s']:.2f} TB/s", flush=True)
    return {k: best[k] for k in KEYWORDS if k in best}


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[2] != "--":
        print(__doc__, file=sys.stderr)
        return 2
    dtype, tuning = argv[0], (fastest(argv[0], argv[1][1:]) if argv[1].startswith("@") else json.loads(argv[1]))
    paged_attention.TUNING[dtype] = tuning
    print(f"paged_attention.TUNING[{dtype!r}] = {tuning}", flush=True)
    return llmjax_main(["bench", *argv[3:]])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
