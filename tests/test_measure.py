"""fleetlm.fleet.measure: engine speeds measured and cached per machine, `engine: auto`, measured prices."""

from __future__ import annotations

import json

import pytest

from catalog_fixtures import tiny_gguf_bytes
from cli_runner import run_main
from fleetlm.compress.gguf import export_gguf
from fleetlm.config import DEFAULT_MACHINE_USD_PER_HOUR, parse_config
from fleetlm.fleet import measure as M
from fleetlm.model import SHIPPED_TINY_MODEL


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """The shipped tiny llama as a GGUF file (f32, with a chat template)."""
    return export_gguf(SHIPPED_TINY_MODEL, tmp_path_factory.mktemp("measure") / "tiny.gguf", "f32")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def fake(path, engine, decode, prompt=100.0, dtype="bf16") -> M.Measurement:
    """A measurement as measure() would save it, with made-up speeds."""
    m = M.Measurement(model=path.name, model_key=M.model_key(path), engine=engine,
                      dtype="gguf" if engine == "llama_cpp" else dtype, prompt_tokens_per_second=prompt,
                      decode_tokens_per_second=decode, prompt_tokens=64, new_tokens=32, threads=2,
                      load_seconds=0.1, machine={"id": M.machine_id()},
                      measured_at="2026-12-01T00:00:00+00:00")
    M.save(m, path)
    return m


def test_price_formula_is_hourly_price_over_tokens_per_hour():
    # $0.0844 an hour at 10 tok/s: 36,000 tokens an hour, so a million tokens cost 0.0844 x 1e6 / 36000
    assert M.price_per_million(10.0, 0.0844) == pytest.approx(2.344444, rel=1e-6)
    assert M.price_per_million(20.0, 0.0844) == pytest.approx(M.price_per_million(10.0, 0.0844) / 2)
    assert M.price_per_million(10.0, 0.1688) == pytest.approx(2 * M.price_per_million(10.0, 0.0844))
    with pytest.raises(M.MeasureError, match="positive speed"):
        M.price_per_million(0.0, 0.0844)


def test_a_measurement_prices_prompt_and_completion_apart(tiny_gguf, home):
    m = fake(tiny_gguf, "fleetlm", decode=25.0, prompt=400.0)
    price = m.price(0.09)
    assert price.input == pytest.approx(0.09 / (400 * 3600) * 1e6, abs=1e-6)
    assert price.output == pytest.approx(0.09 / (25 * 3600) * 1e6, abs=1e-6)
    default = M.price_per_million(25.0, DEFAULT_MACHINE_USD_PER_HOUR)
    assert m.price().output == pytest.approx(default, abs=1e-6)


def test_real_measurement_on_both_engines_is_saved_and_read_back(tiny_gguf, home):
    assert M.engines_for(tiny_gguf) == ["llama_cpp", "fleetlm"]
    for engine in ("llama_cpp", "fleetlm"):
        m = M.measure(tiny_gguf, engine, "f32", progress=False)
        assert m.prompt_tokens_per_second > 0 and m.decode_tokens_per_second > 0
        assert (m.prompt_tokens, m.new_tokens, m.threads) == (64, 32, 2)
        path = M.cache_path(tiny_gguf, engine, "f32")
        assert path.parent == home / "measure" and path.is_file()
        saved = json.loads(path.read_text())
        assert saved["machine"]["cores"] >= 1 and saved["machine"]["id"] == M.machine_id()
        assert M.cached(tiny_gguf, engine, "f32") == m
    assert M.cached(tiny_gguf, "fleetlm", "int8") is None  # another width is another measurement


def test_auto_picks_the_faster_decode_and_says_why(tiny_gguf, home):
    fake(tiny_gguf, "llama_cpp", decode=40.0)
    fake(tiny_gguf, "fleetlm", decode=55.5)
    choice = M.choose_engine(tiny_gguf, "bf16", measure_missing=False)
    assert choice.engine == "fleetlm"
    assert "fleetlm 55.5 tok/s vs llama_cpp 40.0" in choice.reason
    assert choice.to_json()["measured"]["llama_cpp"]["decode_tokens_per_second"] == 40.0
    fake(tiny_gguf, "fleetlm", decode=12.0)
    assert M.choose_engine(tiny_gguf, "bf16", measure_missing=False).engine == "llama_cpp"


def test_a_missing_measurement_is_made_once_then_reused(tiny_gguf, home, monkeypatch):
    calls = []

    def measure(path, engine, dtype="bf16", **kw):
        calls.append(engine)
        return fake(path, engine, decode={"llama_cpp": 30.0, "fleetlm": 20.0}[engine])

    monkeypatch.setattr(M, "measure", measure)
    lines: list[str] = []
    first = M.choose_engine(tiny_gguf, "bf16", progress=False, log=lines.append)
    assert first.engine == "llama_cpp" and calls == ["llama_cpp", "fleetlm"]
    assert len(lines) == 2 and "measuring tiny.gguf on llama_cpp" in lines[0]
    again = M.choose_engine(tiny_gguf, "bf16", progress=False, log=lines.append)  # the second start
    assert again.engine == "llama_cpp" and calls == ["llama_cpp", "fleetlm"] and len(lines) == 2


def test_a_cache_from_another_machine_is_not_used(tiny_gguf, home, monkeypatch):
    fake(tiny_gguf, "llama_cpp", decode=30.0)
    monkeypatch.setattr(M, "machine_fingerprint", lambda: {"cpu": "other", "cores": 64, "flags": []})
    assert M.cached(tiny_gguf, "llama_cpp", "bf16") is None


def test_an_architecture_our_decoder_lacks_runs_on_llama_cpp_only(tmp_path, home):
    path = tmp_path / "g.gguf"
    path.write_bytes(tiny_gguf_bytes(tmp_path, arch="gemma3"))
    assert M.engines_for(path) == ["llama_cpp"]
    with pytest.raises(M.MeasureError, match="cannot run on fleetlm"):
        M.measure(path, "fleetlm")
    with pytest.raises(M.MeasureError, match="no such model file"):
        M.engines_for(tmp_path / "missing.gguf")


def test_models_without_a_price_get_the_measured_one_an_explicit_price_wins(tiny_gguf, home, monkeypatch):
    fake(tiny_gguf, "llama_cpp", decode=50.0, prompt=500.0)
    fake(tiny_gguf, "fleetlm", decode=10.0)
    cfg = parse_config({"machine_usd_per_hour": 0.18, "models": {
        "auto": {"gguf": str(tiny_gguf)},
        "mine": {"gguf": str(tiny_gguf), "price": {"input": 1.5, "output": 3.0}},
        "ours": {"gguf": str(tiny_gguf), "engine": "fleetlm"},
        "far": {"remote": "http://127.0.0.1:9/v1"},
    }})
    monkeypatch.setattr(M, "measure", lambda *a, **k: pytest.fail("everything needed is cached"))
    costs = M.price_local_models(cfg, progress=False)
    assert set(costs) == {"auto", "mine", "ours"}  # a remote model keeps its own (zero) price
    assert costs["auto"].engine == "llama_cpp" and "faster decode" in costs["auto"].reason
    assert cfg.models["auto"].price.output == pytest.approx(0.18 / (50 * 3600) * 1e6, abs=1e-6)
    assert cfg.models["auto"].price.input == pytest.approx(0.18 / (500 * 3600) * 1e6, abs=1e-6)
    assert "measured" in costs["auto"].price_source
    assert (cfg.models["mine"].price.input, cfg.models["mine"].price.output) == (1.5, 3.0)
    assert costs["mine"].price_source == "set in the config"
    assert costs["ours"].engine == "fleetlm"  # an explicit engine is priced by its own measurement
    assert cfg.models["ours"].price.output == pytest.approx(0.18 / (10 * 3600) * 1e6, abs=1e-6)


def test_engine_is_checked_and_defaults_to_auto(tiny_gguf):
    assert parse_config({"models": {"g": {"gguf": str(tiny_gguf)}}}).models["g"].engine == "auto"
    with pytest.raises(Exception, match="engine"):
        parse_config({"models": {"g": {"gguf": str(tiny_gguf), "engine": "vllm"}}})
    with pytest.raises(Exception, match="machine_usd_per_hour"):
        parse_config({"machine_usd_per_hour": 0, "models": {"g": {"gguf": str(tiny_gguf)}}})


def test_fleet_models_measure_prints_speeds_choice_and_prices(tiny_gguf, home, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "models", "measure", str(tiny_gguf), "--engines",
                              "llama_cpp", "--dtype", "f32", "-q")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith(str(tiny_gguf)[:30]))
    assert "llama_cpp" in row and "auto -> llama_cpp: only llama_cpp was measured" in out
    assert M.cached(tiny_gguf, "llama_cpp", "f32") is not None
    code, out, err = run_main(monkeypatch, capsys, "models", "measure", str(tiny_gguf), "--engines", "vllm")
    assert code == 2 and err.count("\n") == 1 and "--engines: unknown vllm" in err


def test_fleet_models_info_prints_the_measurements_the_choice_and_the_price(tiny_gguf, home, monkeypatch,
                                                                            capsys):
    code, out, _ = run_main(monkeypatch, capsys, "models", "info", str(tiny_gguf))
    assert code == 0 and f"not measured on llama_cpp, fleetlm; run: fleet models measure {tiny_gguf}" in out
    fake(tiny_gguf, "llama_cpp", decode=20.0, prompt=200.0)
    fake(tiny_gguf, "fleetlm", decode=30.0, prompt=300.0)
    code, out, _ = run_main(monkeypatch, capsys, "models", "info", str(tiny_gguf))
    want = M.price_per_million(30.0, DEFAULT_MACHINE_USD_PER_HOUR)
    assert code == 0 and "engine auto: fleetlm (faster decode here: fleetlm 30.0 tok/s vs llama_cpp 20" in out
    assert "fleetlm bf16: prompt 300.0 tok/s, decode 30.0 tok/s" in out and f"${want:.4f} out per 1M" in out


def test_a_model_the_gateway_compiles_is_measured_compiled(tiny_gguf, home, monkeypatch):
    eager = M.cache_path(tiny_gguf, "fleetlm", "bf16")
    monkeypatch.setattr(M, "serves_compiled", lambda path: True)
    compiled = M.cache_path(tiny_gguf, "fleetlm", "bf16")
    build = M.engine_build_id("fleetlm")
    assert eager.name.endswith(f"-fleetlm-bf16-{M.machine_id()}-{build}.json")
    assert compiled.name.endswith(f"-fleetlm-bf16-compiled-{M.machine_id()}-{build}.json")
    saved = fake(tiny_gguf, "fleetlm", decode=9.0, dtype=M._mode("fleetlm", "bf16", tiny_gguf))
    assert saved.dtype == "bf16-compiled" and M.cached(tiny_gguf, "fleetlm", "bf16") == saved
    assert [p.name for p in (home / "measure").iterdir()] == [compiled.name]
    llama = M.cache_path(tiny_gguf, "llama_cpp", "bf16")
    assert llama.name.endswith(f"-llama_cpp-gguf-{M.machine_id()}-{M.engine_build_id('llama_cpp')}.json")


def test_a_rebuilt_kernel_is_measured_anew(tiny_gguf, home, monkeypatch):
    """A measurement times one build of the kernels: new sources (or flags, or torch) make a new build folder,
    and the old figure must not stand for it (a serial kernel once timed at half the speed)."""
    from fleetlm.engine import kernels

    saved = fake(tiny_gguf, "fleetlm", decode=9.0)
    assert M.cached(tiny_gguf, "fleetlm", "bf16") == saved
    before = M.engine_build_id("fleetlm")
    rebuilt = home / "kernels" / "2.13.0-0123456789ab"
    monkeypatch.setattr(kernels, "build_dir", lambda: rebuilt)
    assert M.engine_build_id("fleetlm") != before
    assert M.cached(tiny_gguf, "fleetlm", "bf16") is None
    assert M.engine_build_id("llama_cpp") == M.engine_build_id("llama_cpp")  # stable between calls
