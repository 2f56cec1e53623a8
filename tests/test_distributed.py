"""Two processes x 4 CPU devices on loopback run `generate` as one program and get the tokens one
process gets alone, with data parallelism and with pipeline stages across the processes."""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

import llmjax

from conftest import hf_config, save_hf_model

PROMPTS = [[1, 17, 300, 5, 9], [1, 800], [1, 4, 4, 4, 900, 12, 33]]

WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import numpy as np
    import llmjax, llmjax.distributed
    from llmjax.sharding import make_mesh
    port, rank, folder, prompts = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    llmjax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=rank)
    assert jax.device_count() == 8 and jax.local_device_count() == 4
    params = llmjax.load(folder, mesh=make_mesh(tensor=4, data=2))  # data across the processes
    tokens = llmjax.generate(params, prompts, max_new_tokens=10)
    logits = np.asarray(llmjax.logits(params, [prompts[0]]))
    # Stages across the processes (stage 0 on process 0's devices): activations go from one process
    # to the other. init_random makes each stage's layers in the process that holds them.
    staged = llmjax.init_random(llmjax.LlamaConfig.from_hf(folder), dtype="float32",
                                mesh=make_mesh(tensor=4, stage=2))
    print("RESULT " + json.dumps({"tokens": tokens, "logits": logits[0, -1, :8].tolist(),
                                  "staged": llmjax.generate(staged, prompts, max_new_tokens=10)}), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_workers(folder, logs) -> list:
    """Each worker's (exit status, stdout, stderr). The coordinator's port is free when picked, but a
    socket of another test running alongside may take it before rank 0 binds it: rank 0 then fails at
    once, and the pair starts again on another port. A worker that fails ends the other, which would
    wait minutes for it (and outlive the test)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    for attempt in range(3):
        port, procs, files = _free_port(), [], []
        for rank in range(2):
            out, err = logs / f"{attempt}-{rank}.out", logs / f"{attempt}-{rank}.err"
            with open(out, "w") as o, open(err, "w") as e:  # files, not pipes: nothing blocks on a full pipe
                procs.append(subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(rank), str(folder),
                                               json.dumps(PROMPTS)], stdout=o, stderr=e, env=env))
            files.append((out, err))
        deadline = time.monotonic() + 300
        try:
            while (any(p.poll() is None for p in procs) and not any(p.returncode for p in procs)
                   and time.monotonic() < deadline):
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        results = [(p.returncode, out.read_text(), err.read_text()) for p, (out, err) in zip(procs, files)]
        if "Failed to start RPC server" not in results[0][2]:
            break
    return results


@pytest.mark.slow
def test_two_processes_generate_what_one_does(tmp_path):
    folder = tmp_path / "model"
    save_hf_model(folder, hf_config(vocab_size=1024, num_attention_heads=8, num_key_value_heads=2,
                                    max_position_embeddings=64), seed=4)
    alone = llmjax.load(folder)
    want_tokens = llmjax.generate(alone, PROMPTS, max_new_tokens=10)
    want_logits = llmjax.logits(alone, [PROMPTS[0]])[0, -1, :8].tolist()
    # init_random on the stage mesh makes the one-device model (its kv heads repeated for tensor=4)
    config = llmjax.LlamaConfig.from_hf(folder)
    want_staged = llmjax.generate(llmjax.init_random(config, dtype="float32"), PROMPTS, max_new_tokens=10)

    results = _run_workers(folder, tmp_path)
    for status, out, err in results:
        assert status == 0, err[-3000:]
    for _, out, _ in results:
        result = json.loads(out.split("RESULT ", 1)[1])
        assert result["tokens"] == want_tokens
        assert result["logits"] == pytest.approx(want_logits, abs=1e-5)
        assert result["staged"] == want_staged


@pytest.mark.parametrize("kwargs,match", [
    (dict(coordinator_address="127.0.0.1:1"), "together"),
    (dict(coordinator_address="x", num_processes=2, process_id=0), "host:port"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=2), "process_id"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=0, process_id=0), "num_processes"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=True, process_id=0), "num_processes"),
    (dict(coordinator_address="127.0.0.1:1", num_processes=2, process_id=False), "process_id")])
def test_initialize_refuses_incomplete_or_bad_arguments(kwargs, match):
    import llmjax.distributed

    with pytest.raises(ValueError, match=match):
        llmjax.distributed.initialize(**kwargs)
