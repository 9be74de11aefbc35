"""bench/serve_real.py's pure parts: arguments, statistics, stream parsing, commands, the symlink helper."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from bench_scripts import bench_script


@pytest.fixture(scope="module")
def bench():
    with bench_script("serve_real") as module:
        yield module


def test_defaults_and_flags(bench):
    args = bench.parser().parse_args([])
    assert (args.streams, args.max_tokens, args.fleet_streams, args.threads) == (16, 128, 64, 2)
    assert args.peers == ["ours", "llama-server", "llama-cpp-python"]
    args = bench.parser().parse_args(["--streams", "4", "--max-tokens", "16", "--peers", "llama-server,ours",
                                      "--fleet-streams", "0"])
    assert (args.streams, args.max_tokens, args.fleet_streams) == (4, 16, 0)
    assert args.peers == ["ours", "llama-server"]  # always in the report's order
    assert args.dtype == ["bf16"] and bench.ours_name("bf16", args.dtype) == "ours"
    args = bench.parser().parse_args(["--dtype", "int8,bf16,int8"])
    assert args.dtype == ["int8", "bf16"]  # each width once, its own gateway
    assert [bench.ours_name(w, args.dtype) for w in args.dtype] == ["ours int8", "ours bf16"]


def test_bad_flags_are_one_clear_error(bench, capsys):
    for argv in (["--peers", "vllm"], ["--streams", "0"], ["--fleet-streams", "-1"], ["--dtype", "fp8"]):
        with pytest.raises(SystemExit) as exc:
            bench.parser().parse_args(argv)
        assert exc.value.code == 2
    assert "unknown peer(s) vllm" in capsys.readouterr().err
    assert bench.parse_peers("none") == []
    with pytest.raises(argparse.ArgumentTypeError):
        bench.parse_peers(",")


def test_percentile_matches_linear_interpolation(bench):
    xs = [4.0, 1.0, 3.0, 2.0, 5.0]
    assert bench.percentile(xs, 50) == 3.0
    assert bench.percentile(xs, 95) == pytest.approx(4.8)  # numpy.percentile([1..5], 95)
    assert bench.percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_summarize_counts_errors_and_excludes_them_from_latency(bench):
    R = bench.StreamResult
    results = [R("m", 10, 2.0, 0.5, "length"), R("m", 10, 4.0, 1.5, "length"), R("m", 6, 3.0, 1.0, "stop"),
               R("m", error="HTTP 500: boom")]
    st = bench.summarize(results, wall=5.0)
    assert (st.streams, st.errors, st.tokens, st.finished_by_length) == (4, 1, 26, 2)
    assert st.tokens_per_s == pytest.approx(26 / 5.0)
    assert (st.p50, st.ttft_p50) == (3.0, 1.0)
    assert st.p95 == pytest.approx(3.9)
    assert st.first_errors == ["HTTP 500: boom"]
    failed = bench.summarize([R("m", error="x")], wall=1.0)
    assert failed.tokens_per_s == 0 and failed.ttft_p50 is None


def test_best_round_prefers_clean_rounds(bench):
    R = bench.StreamResult
    fast_but_failed = bench.summarize([R("m", 100, 1.0, 0.1, "length"), R("m", error="x")], wall=1.0)
    clean = bench.summarize([R("m", 50, 1.0, 0.1, "length")], wall=1.0)
    cleaner = bench.summarize([R("m", 60, 1.0, 0.1, "length")], wall=1.0)
    assert bench.best([fast_but_failed, clean, cleaner]) is cleaner
    assert bench.best([fast_but_failed]) is fast_but_failed
    assert bench.ratio(30.0, 10.0) == "3.00x" and bench.ratio(1.0, 0.0) == "n/a"


def test_report_gives_each_width_its_ratios(bench):
    R = bench.StreamResult
    stats = {name: bench.summarize([R("m", tokens, 1.0, 0.1, "length")], wall=1.0)
             for name, tokens in (("ours bf16", 90), ("ours int8", 150), ("llama-server", 100),
                                  ("llama-cpp-python", 25))}
    args = bench.parser().parse_args(["--dtype", "bf16,int8"])
    text = "\n".join(bench.report_one(stats, args))
    assert "ours bf16 / llama-server" in text and "0.90x" in text
    assert "ours int8 / llama-server" in text and "1.50x" in text
    assert "ours int8 / llama-cpp-python" in text and "6.00x" in text


def test_stream_lines_parse_as_openai_sends_them(bench):
    assert bench.parse_sse("") is None and bench.parse_sse(": ping") is None
    assert bench.parse_sse("data: [DONE]") == "[DONE]"
    event = bench.parse_sse('data: {"choices": [{"delta": {"content": "hi"}, "finish_reason": null}]}')
    assert bench.event_text(event) == ("hi", None, None)
    usage = {"choices": [], "usage": {"completion_tokens": 12}}
    assert bench.event_text(usage) == ("", None, 12)
    last = {"choices": [{"delta": {}, "finish_reason": "length"}]}
    assert bench.event_text(last) == ("", "length", None)


def test_context_warm_sizes_and_jobs(bench):
    assert bench.context_per_stream(128, None) == 512
    assert bench.context_per_stream(300, None) == 768
    assert bench.context_per_stream(128, 1000) == 1000
    assert bench.warm_sizes(16) == [1, 2, 4, 8, 16]
    assert bench.warm_sizes(12) == [1, 2, 4, 8, 12]
    assert bench.warm_sizes(1) == [1]
    ts = bench.tasks(20)
    assert len(set(ts)) == 20  # every stream a distinct prompt
    cards = [{"id": "a", "owned_by": "fleetlm"}, {"id": "all-MiniLM-L6-v2", "owned_by": "fleetlm-builtin"},
             {"id": "b", "owned_by": "fleetlm"}, {"id": "auto", "owned_by": "fleetlm-router"}]
    assert bench.chat_models(cards) == ["auto", "a", "b"]
    jobs = bench.fleet_jobs(["auto", "a", "b"], 7)
    assert [m for m, _ in jobs] == ["auto", "a", "b", "auto", "a", "b", "auto"]


def test_server_commands(bench, tmp_path):
    cmd = bench.llama_server_cmd(Path("/x/llama-server"), Path("/m.gguf"), 8123, 16, 512, 2)
    assert cmd[0] == "/x/llama-server"
    text = " ".join(cmd)
    assert "--parallel 16" in text and "-c 8192" in text and "--cont-batching" in text and "-t 2" in text
    assert "--host 127.0.0.1" in text  # loopback only
    py = bench.llama_cpp_python_cmd(Path("/m.gguf"), 8124, 512, 2)
    assert py[1:3] == ["-m", "llama_cpp.server"] and "--interrupt_requests" in py
    assert bench.fleet_cmd(tmp_path / "f.yaml", 9)[-2:] == ["--config", str(tmp_path / "f.yaml")]
    assert "--config" not in bench.fleet_cmd(None, 9)


def test_ensure_symlinks_makes_the_manifests_links_once(bench, tmp_path):
    (tmp_path / "libllama.so.0.0.1").write_bytes(b"lib")
    (tmp_path / "_symlinks.json").write_text(json.dumps({"libllama.so.0": "libllama.so.0.0.1",
                                                         "libllama.so": "libllama.so.0"}))
    (tmp_path / "libllama.so").write_bytes(b"stale copy")  # a plain file where a link belongs is replaced
    assert bench.ensure_symlinks(tmp_path) == 2
    assert (tmp_path / "libllama.so").resolve() == (tmp_path / "libllama.so.0.0.1").resolve()
    assert (tmp_path / "libllama.so").read_bytes() == b"lib"
    assert bench.ensure_symlinks(tmp_path) == 0  # idempotent
    assert bench.ensure_symlinks(tmp_path / "missing") == 0
