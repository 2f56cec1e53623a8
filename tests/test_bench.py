"""`llmjax bench` on CPU with the tiny preset: the figures it reports hang together, the CLI writes
JSON and a sweep plot, transformers is timed alongside, and bad options are refused."""

import dataclasses
import inspect
import json

import jax
import pytest

from llmjax import bench, cli
from llmjax.config import LlamaConfig

from conftest import needs_devices


@pytest.fixture(scope="module")
def result():
    return bench.bench("tiny", batch=2, prompt_len=5, gen_len=20, repeats=1, compare_hf=True)


@pytest.mark.parametrize("kernel", [0, 1, 2])  # float32 sum, bfloat16 row sums, GEMVs
def test_the_bandwidth_probe_reads_its_data_inside_the_loop(kernel):
    """XLA may hoist a loop-invariant read out of a loop (it did, for the row sums, before the
    barrier); the probe would then count bytes it never read. The compiled program's entry must hold
    nothing but the loop and its plumbing."""
    import re

    make, f = bench.probe_kernels(2**22, 1024, 4096, 2, passes=3)[kernel]
    text = f.lower(*make()).compile().as_text()
    entry = text[text.index("ENTRY"):]
    entry = entry[:entry.index("\n}")]
    ops = {re.search(r" ([a-z][a-z0-9-]*)\(", line.split("=", 1)[1]).group(1)
           for line in entry.splitlines()[1:] if "=" in line}
    assert "while" in ops
    assert ops <= {"parameter", "constant", "copy", "tuple", "while", "get-tuple-element", "bitcast"}, ops


def test_bytes_and_bound_follow_from_the_shapes(result):
    c = LlamaConfig.preset("tiny")
    params = c.vocab_size * c.hidden_size * 2 + c.num_layers * (
        2 * c.hidden_size + c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
        + 3 * c.hidden_size * c.intermediate_size) + c.hidden_size
    assert result.num_params == params
    embed = c.vocab_size * c.hidden_size * 2
    assert result.weight_bytes_per_step == params * 2 - embed + 2 * c.hidden_size * 2  # 2 rows read
    cache_len = 16 + 32  # prompt bucket + new-token bucket
    assert result.cache_bytes_per_step == 2 * c.num_layers * 2 * cache_len * c.num_kv_heads * c.head_dim * 2
    assert result.bound_tok_s == pytest.approx(result.bandwidth_gb_s * 1e9 / result.bytes_per_step)
    assert result.fraction_of_bound == pytest.approx(result.decode_tok_s / result.bound_tok_s)
    assert result.throughput_tok_s == pytest.approx(2 * result.decode_tok_s)
    assert result.decode_ms_per_step == pytest.approx(1e3 / result.decode_tok_s)
    assert result.prefill_ms > 0 and result.end_to_end_tok_s > 0 and result.bandwidth_gb_s > 0


def test_a_small_models_report_keeps_its_figures(result):
    """tiny reads well under a GB a step: the report prints MB and GB/s, not 0.000 GB and 0.00 TB/s."""
    import re

    report = result.report()
    read = float(re.search(r"read per step +([0-9.]+) MB", report).group(1))
    assert read == pytest.approx(result.bytes_per_step / 1e6, abs=1e-3) and read > 0
    bandwidth = float(re.search(r"bandwidth \(measured\) +([0-9.]+) (GB|TB)/s", report).group(1))
    assert bandwidth > 0 and f"bound {result.bound_tok_s:.1f} tok/s" in report


def test_a_short_run_is_timed_often_enough_and_an_untimeable_one_refused(monkeypatch):
    """Decode is the difference of two timings, a fraction of a millisecond for tiny: short runs are
    repeated until they fill `MIN_TIMED_S`, and a difference that is not positive is an error, not a
    figure (it once printed 15000000000.0 tok/s)."""
    calls = []
    real = bench._interleaved_medians
    monkeypatch.setattr(bench, "_interleaved_medians", lambda a, b, r: calls.append(r) or real(a, b, r))
    r = bench.bench("tiny", gen_len=12, repeats=1, bandwidth=1e11)
    assert calls[0] > 1 and 0 < r.decode_ms_per_step < 1e3 * bench.MIN_TIMED_S
    calls.clear()
    monkeypatch.setattr(bench, "_interleaved_medians", lambda a, b, r: calls.append(r) or (2e-3, 2e-3))
    with pytest.raises(ValueError, match=r"medians of (\d+) runs\), so decode cannot be timed") as e:
        bench.bench("tiny", gen_len=12, repeats=100, bandwidth=1e11)
    assert len(calls) == bench.MEASURES and calls[0] >= 100 and calls[1:] == [bench.MAX_REPEATS] * (bench.MEASURES - 1)
    assert f"medians of {calls[-1]} runs" in str(e.value)
    # a measurement stalled by a busy machine is taken again, more often, before decode is called unmeasurable
    timings = iter([(2e-3, 3e-3), (5e-3, 1e-3)])
    monkeypatch.setattr(bench, "_interleaved_medians", lambda a, b, r: next(timings))
    assert bench.bench("tiny", gen_len=12, repeats=1, bandwidth=1e11).decode_ms_per_step == pytest.approx(4 / 11)


def test_measuring_decode_again_keeps_the_repeats_asked_for(monkeypatch):
    """Decode's timings may be repeated more often than `repeats` (a short run, a measurement taken
    again), never less often; transformers' comparison runs the `repeats` asked for, not decode's."""
    calls, hf = [], []
    monkeypatch.setattr(bench, "_interleaved_medians", lambda a, b, r: calls.append(r) or (2e-3, 2e-3))
    with pytest.raises(ValueError, match=rf"medians of {bench.MAX_REPEATS + 50} runs"):
        bench.bench("tiny", gen_len=12, repeats=bench.MAX_REPEATS + 50, bandwidth=1e11)
    assert calls == [bench.MAX_REPEATS + 50] * bench.MEASURES
    monkeypatch.undo()
    monkeypatch.setattr(bench, "hf_tok_s", lambda config, dtype, prompts, gen_len, repeats: hf.append(repeats) or (1.0, "hf"))
    calls.clear()
    real = bench._interleaved_medians
    monkeypatch.setattr(bench, "_interleaved_medians", lambda a, b, r: calls.append(r) or real(a, b, r))
    bench.bench("tiny", gen_len=12, repeats=2, bandwidth=1e11, compare_hf=True)
    assert calls[0] > 2 and hf == [2]


def test_transformers_is_timed_in_the_same_run(result):
    assert result.hf_tok_s and result.hf_tok_s > 0 and result.hf_error is None
    assert "static cache" in result.hf_setup
    assert "transformers (" in result.report()


def test_report_names_every_figure(result):
    text = result.report()
    for needle in ("prefill", "tok/s per sequence", "ms per step", "MB", "GB/s", "bound",
                   "fraction of bound", f"{result.decode_tok_s:.1f}"):
        assert needle in text


@needs_devices(8)
def test_bench_on_a_mesh_counts_bytes_per_device(tmp_path):
    config = LlamaConfig.preset("tiny")
    import dataclasses

    config = dataclasses.replace(config, num_heads=8, num_kv_heads=4, intermediate_size=192, vocab_size=512)
    from llmjax.sharding import make_mesh

    one = bench.bench(config, gen_len=16, repeats=1)
    four = bench.bench(config, gen_len=16, repeats=1, mesh=make_mesh(tensor=4, data=2))
    assert four.cache_bytes_per_step * 4 == one.cache_bytes_per_step
    norms = (2 * config.num_layers + 1) * config.hidden_size * 2  # replicated on every device
    assert four.weight_bytes_per_step - norms == pytest.approx((one.weight_bytes_per_step - norms) / 4, rel=0.01)


def test_a_tied_lm_head_reads_the_whole_table_a_step():
    c = dataclasses.replace(LlamaConfig.preset("tiny"), tie_word_embeddings=True)
    params = bench.random_params(c, "bfloat16", 0)
    total = sum(w.nbytes for w in jax.tree.leaves(params.weights))
    weights, _ = bench._bytes_per_step(params, 2, 48)
    assert weights == total + 2 * c.hidden_size * 2  # every weight, the table as the head, and 2 rows looked up


def test_the_lm_head_can_be_quantized_too(capsys):
    """`--quant-lm-head` makes the LM head int4 as well: the step reads its packed codes and scales
    instead of its bfloat16 rows, and the report says so."""
    from llmjax.quant import QuantizedWeight

    c = LlamaConfig.preset("tiny")
    plain = bench.bench("tiny", dtype="int4-g32", gen_len=48, repeats=1, bandwidth=1e11)
    head = bench.bench("tiny", dtype="int4-g32", gen_len=48, repeats=1, bandwidth=1e11, quant_lm_head=True)
    packed = c.vocab_size * c.hidden_size // 2 + c.vocab_size * (c.hidden_size // 32) * 2  # codes + scales
    assert plain.weight_bytes_per_step - head.weight_bytes_per_step == c.vocab_size * c.hidden_size * 2 - packed
    assert head.quant_lm_head and not plain.quant_lm_head
    assert "int4-g32, LM head too" in head.report() and "LM head too" not in plain.report()
    params = bench.random_params(c, "int4-g32", 0, quant_lm_head=True)
    assert isinstance(params.weights["lm_head"]["kernel"], QuantizedWeight)
    assert cli.main(["bench", "--model", "tiny", "--dtype", "int4-g32", "--quant-lm-head", "--gen-len", "48",
                     "--repeats", "1"]) == 0
    assert "LM head too" in capsys.readouterr().out


def test_cli_default_generation_fits_the_models_context(tmp_path, capsys):
    """256 new tokens, or what the context leaves after the prompt: the tiny preset's context is 256."""
    assert cli.main(["bench", "--model", "tiny", "--repeats", "1"]) == 0
    assert "prompt 8, 248 new tokens" in capsys.readouterr().out
    assert cli.main(["bench", "--model", "tiny", "--repeats", "1", "--sweep", "prompt_len=8,64",
                     "--plot", str(tmp_path / "p.png")]) == 0
    assert "plot:" in capsys.readouterr().err  # both points ran: 192 new tokens fit after 64


def test_cli_json_and_sweep_plot(tmp_path, capsys):
    out = tmp_path / "one.json"
    assert cli.main(["bench", "--model", "tiny", "--random-weights", "--gen-len", "16", "--repeats", "1",
                     "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    assert row["model"] == "tiny" and row["batch"] == 1 and row["gen_len"] == 16 and row["decode_tok_s"] > 0
    assert "fraction of bound" in capsys.readouterr().out
    plot, rows = tmp_path / "sweep.png", tmp_path / "sweep.json"
    assert cli.main(["bench", "--model", "tiny", "--gen-len", "16", "--repeats", "1",
                     "--sweep", "batch=1,4", "--plot", str(plot), "--json", str(rows)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["batch"] for r in json.loads(rows.read_text())] == [1, 4]


@pytest.mark.parametrize("argv,match", [
    (["--dtype", "int3"], "int3"), (["--tensor", "3"], "devices"),
    pytest.param(["--stage", "8", "--gen-len", "16"], "stage=8 exceeds the model's 2 layers", marks=needs_devices(8)),
    (["--gen-len", "1"], "gen_len"), (["--batch", "0"], "batch"),
    (["--prompt-len", "250", "--gen-len", "10"], "context of 256 tokens; lower prompt_len (--prompt-len) or "
     "gen_len (--gen-len)"), (["--model", "llama9"], "llama9"),
    (["--sweep", "heads=1,2"], "sweep"), (["--sweep", "batch=1,x"], "integers"),
    (["--quant-lm-head", "--gen-len", "16"], "quantizes nothing"),
    (["--quant-lm-head", "--dtype", "int4-g32", "--throughput"], "--throughput keeps the LM head"),
    (["--gen-len", "0"], "gen_len must be an integer >= 1, got 0"),  # not read as the default
    (["--prompt-len", "0", "--gen-len", "16"], "prompt_len must be an integer >= 1, got 0"),
    (["--prompt-len", "0", "--throughput"], "prompt_len"),
    (["--json", "/nonexistent-folder/x.json"], "/nonexistent-folder does not exist"),  # before any work
    (["--sweep", "batch=1,2", "--plot", "/nonexistent-folder/x.png"], "does not exist"),
    (["--json", ""], "--json is empty; give a file path"), (["--json", "/"], "--json / is a folder"),
    (["--sweep", "batch=1,2", "--plot", "x.txt"], "--plot x.txt: matplotlib draws the plot as "),
    (["--sweep", "batch=1,2", "--plot", "results"], "matplotlib draws the plot as "),
    (["--plot", "x.png"], "this run draws none"),
    (["--throughput", "--no-mix", "--plot", "x.png"], "which --no-mix or --serving-requests 0 leaves out"),
    (["--prompt-len", "300"], "a prompt of 300 tokens leaves 0 of the model's context of 256 tokens"),
    (["--sweep", "prompt_len=8,255"], "a prompt of 255 tokens leaves 1 of the model's context"),
    (["--sweep", "batch=2,0", "--gen-len", "8"], "batch must be an integer >= 1, got 0"),
    # a flag the chosen mode would ignore is refused, not accepted and dropped
    (["--throughput", "--sweep", "batch=1,2"], "--sweep is for the decode bench, which --throughput replaces"),
    (["--throughput", "--batch", "4", "--repeats", "9"], "--batch, --repeats are for the decode bench"),
    (["--requests", "8"], "--requests is for --throughput; add --throughput"),
    (["--max-slots", "4", "--no-overlap", "--kv-dtype", "float32"], "--max-slots, --kv-dtype, --no-overlap are for"),
    (["--throughput", "--no-mix", "--rates", "1,2"], "--rates sets the serving curve's arrival rates"),
    (["--throughput", "--serving-requests", "0", "--rates", "1"], "--rates sets the serving curve's"),
    (["--throughput", "--no-mix", "--serving-requests", "9"], "which --no-mix leaves out"),
    (["--throughput", "--hf-batch", "8"], "--hf-batch sets what --compare-hf gives transformers"),
    (["--batch", "8", "--sweep", "batch=1,2"], "--batch 8 and --sweep batch=1,2 both set batch, and the sweep's"),
    (["--gen-len", "16", "--sweep", "gen_len=4,8"], "--gen-len 16 and --sweep gen_len=4,8 both set gen_len")])
def test_bad_options_are_refused_with_the_reason(argv, match, capsys):
    assert cli.main(["bench", "--model", "tiny", *argv]) == 2
    assert match in capsys.readouterr().err


def test_a_sweep_checks_every_value_before_it_runs_one(monkeypatch):
    monkeypatch.setattr(bench, "random_params", lambda *a, **kw: pytest.fail("weights made before the check"))
    for values, match in (("batch=2,0", "batch must be an integer >= 1, got 0"),
                          ("prompt_len=8,300", "prompt_len 300 \\+ gen_len 16 exceeds")):
        with pytest.raises(ValueError, match=match):
            bench.sweep(*bench.parse_sweep(values), model="tiny", gen_len=16)


def test_the_default_plot_file_is_checked_before_the_work(tmp_path, monkeypatch, capsys):
    """Without --plot, a sweep draws into bench-MODEL-DTYPE-KEY.png in the working folder (and
    --throughput into serving-MODEL-DTYPE.png): a path there that cannot be written is refused before
    the run, not after it, with the --json results lost."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(bench, "random_params", lambda *a, **kw: pytest.fail("weights made before the check"))
    (tmp_path / "bench-tiny-bfloat16-batch.png").mkdir()
    (tmp_path / "serving-tiny-bfloat16.png").mkdir()
    for argv in (["--sweep", "batch=1,2"], ["--throughput"]):
        assert cli.main(["bench", "--model", "tiny", *argv, "--json", str(tmp_path / "r.json")]) == 2
        assert "the plot's default file (set another with --plot)" in capsys.readouterr().err


def _canned(**changes):
    fields = {f.name: 1 for f in dataclasses.fields(bench.BenchResult)}
    fields.update(model="tiny", dtype="bfloat16", device="cpu", jax_version=jax.__version__, peak_memory_gib=None,
                  hf_tok_s=None, hf_setup=None, hf_error=None, quant_lm_head=False)
    return bench.BenchResult(**{**fields, **changes})


def test_a_sweep_into_a_closed_pipe_stops_quietly_and_keeps_its_json(tmp_path, monkeypatch, capsys):
    """`llmjax bench --sweep ... --json r.json | head -1`: the reader goes away while the sweep prints its
    reports; the command ends as SIGPIPE would (141), not with 'error: Broken pipe', and the JSON
    (written before the reports and the plot of a single run) is kept."""
    class Gone:
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return sink.fileno()

    monkeypatch.setattr(bench, "random_params", lambda *a, **kw: None)
    monkeypatch.setattr(bench, "measure_bandwidth", lambda *a, **kw: 1e9)
    def canned_bench(**kw):
        return _canned(batch=kw["batch"])
    canned_bench.__signature__ = inspect.signature(bench.bench)  # sweep reads the defaults from it
    monkeypatch.setattr(bench, "bench", canned_bench)
    with open(tmp_path / "sink", "w") as sink:
        monkeypatch.setattr("sys.stdout", Gone())
        assert cli.main(["bench", "--model", "tiny", "--gen-len", "8", "--sweep", "batch=1,2",
                         "--plot", str(tmp_path / "p.png"), "--json", str(tmp_path / "sweep.json")]) == 141
        assert cli.main(["bench", "--model", "tiny", "--gen-len", "8", "--json", str(tmp_path / "one.json")]) == 141
    assert "error" not in capsys.readouterr().err
    assert json.loads((tmp_path / "one.json").read_text())["model"] == "tiny"
    # the sweep's reader left at its first report: the sweep went on, and its JSON and plot hold every value
    assert [r["batch"] for r in json.loads((tmp_path / "sweep.json").read_text())] == [1, 2]
    assert (tmp_path / "p.png").stat().st_size > 0


def test_a_closed_stdout_is_refused_where_the_results_would_be_lost(tmp_path, monkeypatch, capsys):
    """`llmjax perplexity ... >&-` (and bench without --json) printed into nothing and exited 0."""
    monkeypatch.setattr("sys.stdout", None)
    monkeypatch.setattr(bench, "random_params", lambda *a, **kw: pytest.fail("weights made before the check"))
    (tmp_path / "t.txt").write_text("def f(x):\n    return x\n")
    assert cli.main(["perplexity", "--text", str(tmp_path / "t.txt")]) == 2
    assert "standard output is closed, so the perplexity would be lost" in capsys.readouterr().err
    assert cli.main(["bench", "--model", "tiny"]) == 2
    assert "standard output is closed, so the results (and no --json keeps them) would be lost" in \
        capsys.readouterr().err
