"""Smoke test of the decode benchmark's code path on a tiny model (not a timing test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from fleetlm.bench.bandwidth import read_bandwidth
from fleetlm.bench.decode import (
    TINY_SHAPE,
    BenchError,
    BenchOptions,
    build_checkpoint,
    format_table,
    run_benchmark,
    weight_bytes_per_token,
)
from fleetlm.engine.engine import our_kernels
from fleetlm.engine.quant import dynamic_int8_available


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared 2-core box: two OpenMP threads wait on each other
    yield
    torch.set_num_threads(old)


def _opts(tmp_path: Path, **kw) -> BenchOptions:
    base = dict(model_dir=tmp_path / "bench-tiny", shape=TINY_SHAPE, prompt_tokens=6, new_tokens=5,
                warmup_tokens=2, transformers=False, llama_cpp=False, threads=1, bandwidth_mb=32,
                agreement_tokens=8, engine_modes=("eager",))
    base.update(kw)
    return BenchOptions(**base)


def test_bandwidth_is_a_positive_rate() -> None:
    assert read_bandwidth(16, repeats=2, threads=1) > 0.1


def test_benchmark_table_has_a_row_per_width(tmp_path: Path) -> None:
    result = run_benchmark(_opts(tmp_path, profile=True), progress=False)
    assert [(r.runner, r.width) for r in result.rows] == [("fleetlm", w) for w in ("bf16", "int8", "int4")]
    for r in result.rows:
        assert r.tokens_per_second > 0 and r.decode_tokens == 4
        assert r.bandwidth_share is not None and r.bandwidth_share > 0
        assert r.vs_llama_cpp is None  # llama.cpp was skipped
    bf16, int8, int4 = result.rows
    assert int4.bytes_per_token < int8.bytes_per_token < bf16.bytes_per_token
    assert bf16.top1_agreement is None and 0.0 <= int8.top1_agreement <= 1.0
    table = format_table(result)
    lines = table.splitlines()
    assert lines[0].startswith("decode benchmark:") and "memory read bandwidth" in lines[1]
    assert [ln.split()[:2] for ln in lines[3:6]] == [["fleetlm", w] for w in ("bf16", "int8", "int4")]
    assert "profile of one decode step, fleetlm int8" in table
    int8_kernel = ("fleetlm_kernels::linear_int8" if our_kernels() else
                   "quantized::linear_dynamic" if dynamic_int8_available() else "_weight_int8pack_mm")
    assert int8_kernel in table
    data = json.loads(result.to_json())
    assert len(data["rows"]) == 3 and data["bandwidth_gbs"] > 0


def test_checkpoint_is_cached_and_bytes_per_token_skip_the_embedding(tmp_path: Path) -> None:
    from fleetlm.model import load_checkpoint

    path = build_checkpoint(tmp_path / "ck", TINY_SHAPE)
    stamp = (path / "config.json").stat().st_mtime_ns
    assert build_checkpoint(path, TINY_SHAPE) == path and (path / "config.json").stat().st_mtime_ns == stamp
    model = load_checkpoint(path, dtype=torch.bfloat16)
    total = sum(p.numel() * 2 for p in model.parameters())
    assert weight_bytes_per_token(model) == total - model.embed_tokens.weight.numel() * 2


def test_bad_width_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="unknown width"):
        run_benchmark(_opts(tmp_path, widths=("fp8",)), progress=False)


def test_bad_engine_mode_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="unknown engine mode"):
        run_benchmark(_opts(tmp_path, engine_modes=("jit",)), progress=False)


def test_compiled_engine_gets_its_own_row_with_its_warm_up_time(tmp_path: Path) -> None:
    result = run_benchmark(_opts(tmp_path, widths=("bf16",), engine_modes=("eager", "compiled"),
                                 agreement_tokens=0), progress=False)
    eager, compiled = result.rows
    assert (eager.runner, compiled.runner) == ("fleetlm", "fleetlm compiled")
    assert compiled.tokens_per_second > 0 and compiled.decode_tokens == 4
    # the compile happens at load (Engine.warm_up), reported apart; a warm Inductor cache can make the
    # compiled warm-up shorter than eager's, so the warm-up times are not compared
    assert compiled.compile_seconds > 0 and eager.compile_seconds == 0
    assert "fleetlm compiled  bf16" in format_table(result)


def test_cli_json(tmp_path: Path) -> None:
    from fleetlm.cli import app

    out = CliRunner().invoke(app, ["bench", "decode", "--tiny", "--model-dir", str(tmp_path / "m"),
                                   "--prompt-tokens", "4", "--new-tokens", "3", "--warmup-tokens", "1",
                                   "--widths", "bf16,int8", "--no-transformers", "--no-llama-cpp",
                                   "--threads", "1", "--bandwidth-mb", "16", "--agreement-tokens", "0",
                                   "--engine-modes", "eager", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert [r["width"] for r in data["rows"]] == ["bf16", "int8"]


def test_serve_needs_a_real_model(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="--serve"):
        run_benchmark(_opts(tmp_path, serve=True), progress=False)


def test_a_url_is_not_a_benchmark_model() -> None:
    from fleetlm.bench.real import RealModelError, resolve_gguf

    with pytest.raises(RealModelError, match="GGUF"):
        resolve_gguf("http://127.0.0.1:9/v1")


def test_real_model_rows_llama_cpp_on_its_file_and_a_file_made_from_it(smollm2_gguf, tmp_path, monkeypatch):
    """The real-model path on SmolLM2 (Q4_1): ours at int4, llama.cpp on the catalog file and on a Q4_0 file
    made from it (cached in the fleet home), and the ratios between them."""
    pytest.importorskip("llama_cpp")
    from fleetlm.bench.real import derived_dir

    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    result = run_benchmark(_opts(tmp_path, model=str(smollm2_gguf), widths=("int4",), llama_cpp=True,
                                 agreement_tokens=0, new_tokens=4), progress=False)
    assert [(r.runner, r.width, r.detail) for r in result.rows] == [
        ("fleetlm", "int4", ""), ("llama.cpp", "catalog", "Q4_1"), ("llama.cpp", "int4", "Q4_0")]
    ours, catalog, q4_0 = result.rows
    assert all(r.tokens_per_second > 0 and r.decode_tokens == 3 for r in result.rows)
    assert ours.vs_llama_cpp == pytest.approx(ours.tokens_per_second / q4_0.tokens_per_second)
    assert ours.vs_catalog == pytest.approx(ours.tokens_per_second / catalog.tokens_per_second)
    assert ours.ms_per_token == pytest.approx(1000 / ours.tokens_per_second)
    assert (derived_dir() / f"{smollm2_gguf.stem}.Q4_0.gguf").is_file()
    assert result.prompt_tokens > 10  # the chat template around the user message
    table = format_table(result)
    assert "SmolLM2" in table and "catalog (Q4_1)" in table and "vs catalog" in table
