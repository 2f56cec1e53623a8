"""The `llmjax` command as a user runs it, and the example that makes a random model folder."""

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import llmjax
from llmjax import cli
from llmjax.cli import main as cli_main
from llmjax.convert.hf import to_hf_tensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "llmjax.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)


@pytest.mark.parametrize("command", [[], ["convert"], ["generate"]])
def test_help(command):
    out = _run(*command, "--help")
    assert out.returncode == 0 and "usage: llmjax" in out.stdout


def test_perplexity_help_says_what_it_prints_and_the_stride_bound():
    out = _run("perplexity", "--help")
    text = " ".join(out.stdout.split())
    assert "bits per byte" in text and "at most WINDOW - 1" in text and "BOS included" in text


def test_every_option_of_every_command_says_what_it_does():
    parser = cli._parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [f"{name} {action.option_strings[-1]}" for name, command in commands.items()
              for action in command._actions if action.option_strings and not action.help]
    assert not silent, f"options without help: {silent}"


def test_console_script_is_installed():
    import importlib.metadata
    import sysconfig

    try:
        importlib.metadata.distribution("llmjax")
    except importlib.metadata.PackageNotFoundError:  # a checkout run through PYTHONPATH (the GPU machine)
        pytest.skip("llmjax is not installed in this environment (pip install -e .)")
    script = os.path.join(sysconfig.get_path("scripts"), "llmjax")
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "convert" in out.stdout and "generate" in out.stdout


@pytest.fixture(scope="module")
def example_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example") / "hf"
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "random_model.py"), str(folder)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    return folder


def test_the_example_refuses_a_bad_preset_before_it_writes_anything(tmp_path):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "random_model.py"), str(tmp_path / "hf"),
                          "--preset", "llama9"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 2 and "unknown preset 'llama9'" in out.stderr
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
def test_convert_then_generate_from_the_command_line(example_model, tmp_path):
    out = _run("convert", str(example_model), str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr
    assert "wrote" in out.stderr and "tensors" in out.stderr  # the progress bar
    gen = _run("generate", "--model", str(tmp_path / "ckpt"), "--prompt", "def fibonacci(n):",
               "--max-new-tokens", "12")
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("def fibonacci(n):") and len(gen.stdout) > len("def fibonacci(n):\n")
    assert "[prefill]" in gen.stderr and "[decode] 12 tokens" in gen.stderr
    expected = llmjax.generate(llmjax.load(tmp_path / "ckpt"), "def fibonacci(n):", max_new_tokens=12)
    assert gen.stdout == "def fibonacci(n):" + expected + "\n"
    half = _run("generate", "--model", str(tmp_path / "ckpt"), "--prompt", "def fibonacci(n):",
                "--max-new-tokens", "12", "--dtype", "bfloat16")
    assert half.returncode == 0, half.stderr
    expected = llmjax.generate(llmjax.load(tmp_path / "ckpt", dtype="bfloat16"), "def fibonacci(n):", max_new_tokens=12)
    assert half.stdout == "def fibonacci(n):" + expected + "\n"


def test_generate_errors_are_one_line(example_model, capsys):
    assert cli_main(["generate", "--model", str(example_model), "--prompt", "x", "--top-p", "1.5"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmjax generate: error: --top-p 1.5: top_p must be") and "\n" not in err
    assert cli_main(["generate", "--model", str(example_model), "--prompt", "x " * 300]) == 2
    assert "context of 256 tokens" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--temperature", "-1"), ("--temperature", "nan"), ("--top-k", "0"),
                                         ("--top-p", "0"), ("--min-p", "2"), ("--seed", str(2**63))])
def test_generate_refuses_a_sampling_flag_by_name_before_loading_the_model(flag, value, capsys, monkeypatch):
    monkeypatch.setattr(llmjax, "load", lambda *a, **k: pytest.fail("loaded the model before checking " + flag))
    assert cli_main(["generate", "--prompt", "x", flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"llmjax generate: error: {flag} {value}") and "must be" in err and "\n" not in err



@pytest.mark.parametrize("command", [["generate", "--prompt", "x", "--max-new-tokens", "0"],
                                     ["generate", "--prompt", "x", "--max-new-tokens", "-5"],
                                     ["perplexity", "--text", "README.md", "--window", "1"],
                                     ["perplexity", "--text", "README.md", "--stride", "0"]])
def test_a_count_out_of_range_is_refused_by_its_flag_before_loading_the_model(command, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(llmjax, "load", lambda *a, **k: pytest.fail("loaded the model before checking " + command[-2]))
    assert cli_main(command) == 2
    err = capsys.readouterr().err.strip()
    least = 2 if command[-2] == "--window" else 1
    assert err == f"llmjax {command[0]}: error: {command[-2]} takes an integer >= {least}, got {command[-1]}"


def test_generate_refuses_a_bad_setting_before_it_echoes_the_prompt(capsys, monkeypatch):
    monkeypatch.setenv("LLMJAX_ATTENTION", "fast")
    monkeypatch.setattr(llmjax, "load", lambda *a, **k: pytest.fail("loaded the model before checking LLMJAX_*"))
    assert cli_main(["generate", "--prompt", "x"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == ("llmjax generate: error: LLMJAX_ATTENTION must be one of auto, off, "
                                         "interpret, got 'fast'\n")


def test_generate_refuses_sampling_flags_that_greedy_decoding_ignores(capsys, monkeypatch):
    monkeypatch.setattr(llmjax, "load", lambda *a, **k: pytest.fail("loaded the model before checking the flags"))
    assert cli_main(["generate", "--prompt", "x", "--top-p", "0.9"]) == 2
    assert capsys.readouterr().err == ("llmjax generate: error: --top-p shapes sampling, and --temperature 0 (the "
                                       "default) is greedy, which ignores it; add --temperature (such as 0.8), "
                                       "or leave it out\n")
    assert cli_main(["generate", "--prompt", "x", "--top-k", "5", "--seed", "3", "--temperature", "0"]) == 2
    assert "error: --top-k, --seed shape sampling, and --temperature 0" in capsys.readouterr().err

def test_generate_refuses_what_would_lose_or_garble_text(example_model, capsys, monkeypatch):
    """A prompt or stop string that is not UTF-8 (Python keeps its bytes as lone surrogates) is named as
    such; a closed stdout is refused before any work rather than losing the text; a device call out of
    memory is one line."""
    for flags in (["--prompt", "a\udcff"], ["--prompt", "a", "--stop", "\udcfe"]):
        assert cli_main(["generate", "--model", str(example_model), *flags]) == 2
        err = capsys.readouterr().err
        assert f"{flags[-2]} is not valid UTF-8 (byte b'\\x{flags[-1][-1].encode('utf-8', 'surrogateescape')[0]:x}'" \
            in err and "surrogate" not in err
    monkeypatch.setattr(sys, "stdout", None)
    assert cli_main(["generate", "--model", str(example_model), "--prompt", "x"]) == 2
    assert "standard output is closed, so the generated text would be lost" in capsys.readouterr().err
    monkeypatch.undo()

    def out_of_memory(*args, **kwargs):
        raise MemoryError("the engine's device call ran out of memory")
    monkeypatch.setattr(llmjax, "load", out_of_memory)
    assert cli_main(["generate", "--model", str(example_model), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == "llmjax generate: error: the engine's device call ran out of memory\n"

    def broken(*args, **kwargs):  # a broken pipe that is not standard output's: an error, not a quiet end
        raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(llmjax, "load", broken)
    assert cli_main(["generate", "--model", str(example_model), "--prompt", "x"]) == 2
    assert "llmjax generate: error: [Errno 32] Broken pipe" in capsys.readouterr().err
    assert cli_main(["generate", "--model", str(example_model), "--prompt", "a\ud800"]) == 2
    assert "--prompt is not valid UTF-8 (the lone surrogate '\\ud800' at character 1)" in capsys.readouterr().err


def test_generate_into_a_closed_pipe_stops_quietly(example_model):
    """`llmjax generate ... | head -c 1`: the reader goes away, and the command ends as SIGPIPE would
    end it (141), without a traceback or an error line."""
    proc = subprocess.Popen([sys.executable, "-m", "llmjax.cli", "generate", "--model", str(example_model),
                             "--prompt", "def f(x):", "--max-new-tokens", "64"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.read(1) == b"d"  # the prompt's echo, written before any token is generated
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=600) == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err and "error" not in err


INTERRUPTED_COMPILE = """
import os, signal, sys, threading
from jax._src import compiler
from llmjax import cli
real = compiler.backend_compile_and_load
def compile_and_load(backend, module, *args, **kwargs):  # a Ctrl-C 0.2 s into the first program's compile
    if "first_tokens" in str(module.operation.attributes["sym_name"]):
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
    return real(backend, module, *args, **kwargs)
compiler.backend_compile_and_load = compile_and_load
sys.argv = ["llmjax", "generate", "--prompt", "def f(x):", "--max-new-tokens", "4"]
sys.exit(cli.main())
"""


def test_a_ctrl_c_during_a_compile_ends_the_command_with_130():
    """A Ctrl-C interrupts the wait for an XLA compile, not the compile: the process then ends without
    Python's teardown, which crashed under jaxlib's compiling thread (a segmentation fault, 139)."""
    proc = subprocess.run([sys.executable, "-c", INTERRUPTED_COMPILE], capture_output=True, text=True, cwd=ROOT,
                          timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 130, proc.stderr
    assert proc.stdout == "def f(x):" and "Traceback" not in proc.stderr


def test_generate_with_stderr_closed_writes_only_the_text_to_stdout():
    """`2>&-`: Python's stderr is None, and print(file=None) writes to stdout; the speed line would end
    up in the generated text."""
    proc = subprocess.run(["sh", "-c", 'exec "$0" "$@" 2>&-', sys.executable, "-m", "llmjax.cli", "generate",
                           "--prompt", "def f(x):", "--max-new-tokens", "2"], stdout=subprocess.PIPE, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 0
    assert proc.stdout.decode().startswith("def f(x):") and "[prefill]" not in proc.stdout.decode()


def test_perplexity_and_generate_name_what_is_wrong(example_model, tmp_path, capsys):
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe not utf-8")
    assert cli_main(["perplexity", "--model", str(example_model), "--text", str(tmp_path / "bin.txt")]) == 2
    assert f"--text {tmp_path / 'bin.txt'} is not UTF-8 text" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "good.txt").write_text("def f(x):\n    return x\n")
    for path, problem in ((tmp_path / "empty.txt", " is empty, so it has nothing to score; leave it out"),
                          (tmp_path / "missing.txt", ": No such file or directory; give a UTF-8 text file"),
                          (tmp_path, ": Is a directory; give a UTF-8 text file")):
        assert cli_main(["perplexity", "--model", str(example_model), "--text", str(tmp_path / "good.txt"),
                         "--text", str(path)]) == 2
        assert capsys.readouterr().err == f"llmjax perplexity: error: --text {path}{problem}\n"
    assert cli_main(["generate", "--model", str(example_model), "--prompt", "x", "--max-new-tokens", "1"]) == 0
    err = capsys.readouterr().err
    assert "[decode] 1 tokens |" in err and "nan" not in err  # one token: no decode step to time
    for value in ("-1", "inf"):
        assert cli_main(["bench", "--model", "tiny", "--throughput", "--kv-memory", value]) == 2
        assert f"--kv-memory takes GiB of device memory for the page pool, > 0; got {float(value)}" in \
            capsys.readouterr().err
    assert cli_main(["generate", "--model", str(example_model), "--prompt", "x", "--tensor", "3"]) == 2
    assert "--data 1 x --stage 1 x --tensor 3 = 3, but there are" in capsys.readouterr().err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(example_model):
        if not name.startswith("tokenizer"):
            (bare / name).write_bytes((example_model / name).read_bytes())
    for command in (["generate", "--prompt", "x"], ["perplexity", "--text", str(tmp_path / "good.txt")]):
        assert cli_main([command[0], "--model", str(bare), *command[1:]]) == 2
        assert "has no tokenizer (tokenizer.model or tokenizer.json), and the command line works on text" in \
            capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # no model at all: load's message, not the tokenizer's
    assert cli_main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"]) == 2
    assert "no config.json" in capsys.readouterr().err


SLOW_CONVERT = """
import sys, time
from llmjax import cli
from llmjax.convert import hf
read, held = hf.SafetensorsFolder.read, []
def held_read(self, name):  # the first read waits for the test's signal, however late a busy machine sends it
    if not held:
        held.append(name)
        try:
            time.sleep(60)
        except (SystemExit, KeyboardInterrupt):
            if SWALLOW:  # as a finalizer or a library's callback would, where the handler happened to run
                pass
            else:
                raise
    return read(self, name)
hf.SafetensorsFolder.read = held_read
sys.exit(cli.main(["convert", sys.argv[1], sys.argv[2], "--quiet"]))
"""


@pytest.mark.parametrize("swallowed", [False, True], ids=["unwinds", "exit-swallowed"])
@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_conversion_stopped_by_a_signal_leaves_nothing(example_model, tmp_path, swallowed, stop):
    """A SIGTERM or a Ctrl-C unwinds the conversion; where the handler's exit is swallowed (it runs
    wherever the main thread is: jax's garbage-collection callback swallows a Ctrl-C), the conversion
    goes on and its output is removed at the end."""
    import glob
    import signal
    import time

    partial = str(tmp_path / ".out.partial-*")
    script = f"SWALLOW = {swallowed}\n" + SLOW_CONVERT
    proc = subprocess.Popen([sys.executable, "-c", script, str(example_model), str(tmp_path / "out")],
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline = time.monotonic() + 120
    while not glob.glob(partial) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert glob.glob(partial), proc.stderr.read() if proc.poll() is not None else "no partial folder appeared"
    proc.send_signal(getattr(signal, stop))
    try:
        assert proc.wait(180) == (128 + signal.SIGTERM if stop == "SIGTERM" else 130)  # (a loaded CI machine: slow)
    finally:
        proc.kill()
    assert not glob.glob(partial) and not (tmp_path / "out").exists()


def test_a_second_ctrl_c_does_not_cut_a_cleanup_short(tmp_path, monkeypatch):
    """`files.remove_tree`, which removes a stopped conversion's folders: a Ctrl-C during it is ignored
    (it would leave a half removed folder), and Ctrl-C is Python's again afterwards."""
    import shutil
    import signal

    from llmjax import files

    folder = tmp_path / "partial"
    (folder / "a" / "b").mkdir(parents=True)
    real = shutil.rmtree

    def interrupted(path, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C, part way
        real(path, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    files.remove_tree(str(folder))
    assert not folder.exists() and signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_example_folder_round_trips_through_conversion(example_model):
    params = llmjax.load(example_model)
    assert json.loads((example_model / "config.json").read_text())["num_hidden_layers"] == 2
    tensors = to_hf_tensors(params.weights, params.config)
    from safetensors.numpy import load_file

    stored = load_file(example_model / "model.safetensors")
    assert set(tensors) == set(stored)
    for name, value in stored.items():
        np.testing.assert_array_equal(tensors[name], value)


def test_chat_errors_are_one_line(example_model, tmp_path, capsys):
    import shutil

    assert cli_main(["generate", "--model", str(example_model), "--prompt", "hi", "--chat"]) == 2
    err = capsys.readouterr().err
    assert "has no chat template" in err and "leave out --chat" in err
    folder = tmp_path / "m"
    shutil.copytree(example_model, folder)
    (folder / "chat_template.jinja").write_text("{{ raise_exception('only system messages') }}")
    assert cli_main(["generate", "--model", str(folder), "--prompt", "hi", "--chat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "llmjax generate: error: only system messages"
    # An error in the template's own logic is one line too, with the template's line.
    (folder / "chat_template.jinja").write_text("{% for m in messages %}\n{{ m['content'] + 1 }}{% endfor %}")
    assert cli_main(["generate", "--model", str(folder), "--prompt", "hi", "--chat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("llmjax generate: error: the chat template failed at line 2 (TypeError: ") and "\n" not in err


def test_chat_prompt_is_the_templates_ids(example_model, tmp_path, capsys):
    """--chat encodes the rendered template as transformers' apply_chat_template(tokenize=True) does:
    no BOS added where the template writes none."""
    import shutil

    import transformers

    folder = tmp_path / "m"
    shutil.copytree(example_model, folder)
    (folder / "chat_template.jinja").write_text("[INST] {{ messages[0]['content'] }} [/INST]")
    assert cli_main(["generate", "--model", str(folder), "--prompt", "hi", "--chat", "--max-new-tokens", "1"]) == 0
    want = transformers.AutoTokenizer.from_pretrained(folder).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=True, return_dict=False, add_generation_prompt=True)
    assert f"[prefill] {len(want)} tokens" in capsys.readouterr().err


def test_the_quantizations_the_help_offers_are_the_ones_accepted(capsys):
    """`--quant` and `bench --dtype` show int4's `-asym` and not int8's, which is refused."""
    import itertools
    import re

    from llmjax.cli import QUANT_METAVAR
    from llmjax.quant.weights import QuantScheme

    int4, rest = re.fullmatch(r"\{(.*)\}\[-asym\]\|(.*)", QUANT_METAVAR).groups()
    offered = [a + b for a, b in itertools.product(int4.split(","), ("", "-asym"))] + rest.split("|")
    assert "int8" in offered and "int4-g128-asym" in offered
    for name in offered:
        QuantScheme.parse(name)
    with pytest.raises(ValueError, match="int4 also takes -asym"):
        QuantScheme.parse("int8-asym")
    for command in (["convert", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit):
            cli_main(command)
        assert QUANT_METAVAR in capsys.readouterr().out.replace("\n", "").replace(" ", "")
