"""Batch-1 decode under several XLA flag sets, one fresh process each (XLA reads its flags at start).

    PYTHONPATH=. python benchmarks/xla_flags.py --model llama2-7b --out DIR [--variants a,b] [--dtype D] [--dump]

Each variant runs `python -m llmjax bench --model MODEL --json DIR/<variant>.json` with `XLA_FLAGS`
set (and `LLMJAX_LOOP_GRAPH=off`, so that generate's loop takes the flags rather than its own
command-buffer setting), under its own time limit, so one flag XLA does not know (it aborts the process) costs only its
own row. The table compares decode tok/s and the fraction of each process's own measured bound.
`--dump` also writes the optimized HLO of the default variant and counts the kernels its decode loop
launches per step (fusions, library calls), which is what command buffers and fusion change.
"""

import argparse
import glob
import json
import os
import re
import subprocess
import sys

CMD_TYPES = "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"
VARIANTS = {
    "default": "",
    "no-command-buffers": "--xla_gpu_enable_command_buffer=",
    "command-buffers+while": f"--xla_gpu_enable_command_buffer={CMD_TYPES},WHILE,CONDITIONAL",
    "graph-min-size-1": "--xla_gpu_graph_min_graph_size=1",
    "no-triton-gemm": "--xla_gpu_enable_triton_gemm=false",
    "while-double-buffering": "--xla_gpu_enable_while_loop_double_buffering=true",
    # programmatic dependent launch (Hopper): a kernel may start while the one before it drains, and
    # waits (griddepcontrol.wait) before it reads what that one wrote
    "pdl": "--xla_gpu_enable_pdl=true",
    "pdl+launch": "--xla_gpu_enable_pdl=true --xla_gpu_enable_pdl_launch=true",
    "no-pdl": "--xla_gpu_enable_pdl=false --xla_gpu_enable_pdl_launch=false",
}


def run_variant(name: str, flags: str, args) -> dict:
    path = os.path.join(args.out, f"{name}.json")
    # LLMJAX_LOOP_GRAPH=off: generate's own command-buffer setting for its loop (llmjax.generate,
    # LOOP_COMMAND_BUFFERS) would override XLA_FLAGS' for that program, and every variant would time it
    env = dict(os.environ, XLA_FLAGS=flags, LLMJAX_LOOP_GRAPH="off")
    cmd = [sys.executable, "-m", "llmjax", "bench", "--model", args.model, "--batch", str(args.batch),
           "--repeats", str(args.repeats), "--json", path] + (["--dtype", args.dtype] if args.dtype else [])
    try:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"variant": name, "flags": flags, "error": f"timed out after {args.timeout} s"}
    if done.returncode != 0:
        return {"variant": name, "flags": flags, "error": done.stderr.strip().splitlines()[-3:]}
    with open(path) as f:
        result = json.load(f)  # one bench: one object
    return {"variant": name, "flags": flags, "tok_s": result["decode_tok_s"],
            "ms_per_step": result["decode_ms_per_step"], "of_bound": result["fraction_of_bound"],
            "bandwidth_gb_s": result["bandwidth_gb_s"]}


def count_kernels(dump_dir: str) -> dict:
    """Kernels per decode step: fusions and library calls inside the generate loop's while body."""
    files = glob.glob(os.path.join(dump_dir, "*generate_ids*after_optimizations.txt"))
    if not files:
        return {"error": f"no optimized HLO for _generate_ids in {dump_dir}"}
    text = open(max(files, key=os.path.getsize)).read()
    bodies = re.findall(r"body=(%?[\w.\-]+)", text)
    counts = {}
    for body in set(bodies):
        name = body.lstrip("%")
        block = re.search(r"\n%?" + re.escape(name) + r" .*?\n}\n", text, re.S)
        if block:
            lines = block.group(0).splitlines()
            counts[name] = {"fusion": sum(" fusion(" in l for l in lines),
                            "custom-call": sum(" custom-call(" in l for l in lines),
                            "instructions": len(lines) - 2}
    return counts


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama2-7b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dtype", default=None, help="passed to llmjax bench (bfloat16 or a quantization)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--timeout", type=int, default=150)
    p.add_argument("--dump", action="store_true")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.variants.split(","):
        flags = VARIANTS[name]
        if name == "default" and args.dump:
            dump = os.path.join("/tmp", "llmjax-xla-dump")
            flags = f"--xla_dump_to={dump} --xla_dump_hlo_as_text"
        rows.append(run_variant(name, flags, args))
        if name == "default" and args.dump:
            rows[-1]["kernels"] = count_kernels(dump)
        print(json.dumps(rows[-1]), flush=True)
    with open(os.path.join(args.out, "xla_flags.json"), "w") as f:
        json.dump(rows, f, indent=1)
    print("\n| variant | XLA_FLAGS | decode tok/s | ms per step | of own bound |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | `{r['flags']}` | failed: {r['error']} | | |")
        else:
            print(f"| {r['variant']} | `{r['flags']}` | {r['tok_s']:.1f} | {r['ms_per_step']:.3f} | "
                  f"{r['of_bound']:.1%} |")


if __name__ == "__main__":
    main()
