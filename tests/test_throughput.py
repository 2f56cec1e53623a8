"""`llmjax bench --throughput` on CPU with the tiny preset: the engine serves every request, the
figures hang together, transformers is timed alongside, the serving curve is drawn, and bad options
are refused."""

import json

import numpy as np
import pytest

from llmjax import cli, throughput

TINY = ["bench", "--throughput", "--model", "tiny", "--dtype", "float32", "--max-slots", "8",
        "--prefill-tokens", "64", "--prefill-row", "16", "--decode-steps", "4"]


def test_cli_serves_every_request_and_writes_json_and_the_serving_curve(tmp_path, capsys):
    out, plot = tmp_path / "tp.json", tmp_path / "serving.png"
    assert cli.main(TINY + ["--requests", "24", "--prompt-len", "12", "--gen-len", "10", "--serving-requests",
                            "8", "--rates", "50,400", "--compare-hf", "--hf-requests", "4", "--hf-batch", "4",
                            "--json", str(out), "--plot", str(plot)]) == 0
    r = json.loads(out.read_text())
    fixed, mix = r["fixed"], r["mix"]
    assert fixed["requests"] == 24 and fixed["input_tokens"] == 24 * 12 and fixed["output_tokens"] == 24 * 10
    assert fixed["output_tok_s"] == pytest.approx(fixed["output_tokens"] / fixed["seconds"])
    assert fixed["requests_per_min"] == pytest.approx(60 * 24 / fixed["seconds"])
    assert 1 <= fixed["mean_rows"] <= 8 and fixed["calls"] >= 24 * 10 / (8 * 4)
    assert fixed["device_s"] > 0 and fixed["host_s"] > 0
    assert fixed["device_s"] + fixed["host_s"] <= fixed["seconds"]  # parts of the run's time
    assert mix["requests"] == 24 and mix["output_tok_s"] > 0 and mix["input_tokens"] != fixed["input_tokens"]
    assert [p["rate"] for p in r["serving"]] == [50, 400]
    for p in r["serving"]:
        assert p["requests"] == 8 and p["throughput_req_s"] > 0
        assert 0 < p["mean_normalized_latency"] <= p["mean_latency_s"]
    assert r["hf_tok_s"] > 0 and r["hf_requests"] == 4 and "batch 4" in r["hf_setup"]
    assert r["engine"]["max_slots"] == 8 and r["engine"]["max_seq_len"] >= 12 + 10
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = capsys.readouterr().out
    for needle in ("output tok/s", "requests/min", "normalized latency", "transformers (", "s in device calls"):
        assert needle in report


def test_mix_lengths_follow_the_documented_distribution():
    lengths = throughput.mix_lengths(np.random.default_rng(0), 20000, 128)
    assert lengths.min() == 16 and lengths.max() == 240 and abs(lengths.mean() - 128) < 1.5


@pytest.mark.parametrize("argv, match", [
    (["--requests", "0"], "requests must be"), (["--rates", "1,x"], "--rates"),
    (["--rates", "0"], "rates must be > 0"),
    (["--prompt-len", "200", "--gen-len", "100", "--no-mix"], "context of 256 tokens; lower prompt_len "
     "(--prompt-len) or gen_len (--gen-len)"),
    # the defaults' fixed requests fit tiny's 256 tokens, the mix's do not: the error says why and how
    ([], "(480 tokens) (the mix draws lengths up to 2L - L/8 around prompt_len 128 and gen_len 128) exceeds "
     "the model's context of 256 tokens; lower prompt_len (--prompt-len) or gen_len (--gen-len), or leave "
     "the mix out (mix=False, --no-mix)"),
    (["--prefill-tokens", "20", "--requests", "2", "--prompt-len", "4", "--gen-len", "2", "--no-mix"],
     "multiple of prefill_row")])
def test_bad_options_are_refused_with_the_reason(argv, match, capsys):
    assert cli.main(TINY + argv) == 2
    assert match in capsys.readouterr().err
