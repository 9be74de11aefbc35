"""fleetlm.fleet.default and `fleet serve` without a config: the installed catalog models, engine auto."""

from __future__ import annotations

import hashlib
import json
import shutil

import openai
import pytest
import yaml
from fastapi.testclient import TestClient

from catalog_fixtures import tiny_gguf_bytes
from cli_runner import run_main
from fleetlm.catalog import CatalogEntry, Package
from fleetlm.compress.gguf import export_gguf
from fleetlm.fleet import measure as M
from fleetlm.fleet.default import NoModelsInstalled, default_config, default_config_yaml
from fleetlm.model import SHIPPED_TINY_MODEL
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import build_backends
from fleetlm.serve.commands import startup_summary
from fleetlm.serve.embeddings import BUILTIN_EMBEDDING_MODEL
from fleetlm.serve.gguf_backend import LlamaCppBackend
from fleetlm.serve.store import UsageStore


@pytest.fixture(scope="module")
def chat_gguf(tmp_path_factory) -> bytes:
    """A tiny llama GGUF with a chat template (the shipped tiny model, exported)."""
    return export_gguf(SHIPPED_TINY_MODEL, tmp_path_factory.mktemp("dflt") / "t.gguf", "f32").read_bytes()


class FakeHome:
    """A FLEET_HOME and a $FLEET_CATALOG of fake entries; `install` puts a file where a pull would."""

    def __init__(self, root, monkeypatch):
        self.home, self.catalog_file, self.entries = root / "home", root / "catalog.json", []
        self.catalog_file.write_text("[]")
        monkeypatch.setenv("FLEET_HOME", str(self.home))
        monkeypatch.setenv("FLEET_CATALOG", str(self.catalog_file))

    def install(self, name: str, data: bytes, parameters: int, publish: bool = True) -> None:
        sha = hashlib.sha256(data).hexdigest()
        entry = CatalogEntry(name=name, packages=(Package(f"fake-{name}", "1.0", "x.bin"),),
                             file_name=f"{name}.gguf", size=len(data), sha256=sha, arch="llama", quant="F32",
                             license="MIT", upstream="tests", parameters=parameters)
        self.entries.append(entry.to_json())
        self.catalog_file.write_text(json.dumps(self.entries))
        if publish:
            folder = self.home / "models" / name
            folder.mkdir(parents=True)
            (folder / entry.file_name).write_bytes(data)
            (folder / "model.json").write_text(json.dumps({"name": name, "file": entry.file_name,
                                                           "size": len(data), "sha256": sha}))


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./fleet.yaml here
    return FakeHome(tmp_path, monkeypatch)


def test_no_installed_model_is_one_clear_error(fake_home, chat_gguf):
    fake_home.install("listed-only", chat_gguf, 10, publish=False)
    with pytest.raises(NoModelsInstalled, match="fleet models pull NAME") as err:
        default_config()
    assert "listed-only" in str(err.value) and "smollm2-135m-instruct" in str(err.value)


def test_one_installed_model_is_served_alone_with_auto_as_itself(fake_home, chat_gguf):
    fake_home.install("one", chat_gguf, 10)
    cfg = default_config()
    assert list(cfg.models) == ["one"]
    spec = cfg.models["one"]
    assert (spec.catalog, spec.engine, spec.kind) == ("one", "auto", "gguf")
    assert "price" not in spec.model_fields_set  # priced from measurement at start-up
    assert (cfg.router.name, cfg.router.kind) == ("auto", "cheapest")


def test_two_installed_models_make_a_checks_cascade_smallest_first(fake_home, chat_gguf, tmp_path):
    fake_home.install("big", chat_gguf, 2000)
    fake_home.install("small", chat_gguf, 100)
    fake_home.install("listed", chat_gguf, 50, publish=False)  # in the catalog, not installed
    fake_home.install("base-model", tiny_gguf_bytes(tmp_path), 10)  # no chat template: not a chat model
    cfg = default_config()
    assert list(cfg.models) == ["small", "big"]
    r = cfg.router
    assert (r.name, r.kind, r.models) == ("auto", "cascade", ["small", "big"])
    assert r.checks == ["code", "math", "json", "tool"]
    # --print-config's YAML is a fleet.yaml that parses back to the same fleet
    data = yaml.safe_load(default_config_yaml())
    assert data["models"]["small"] == {"catalog": "small", "engine": "auto", "dtype": "int8"}
    assert data["router"]["models"] == ["small", "big"]


def test_fleet_serve_with_nothing_installed_fails_with_one_line(fake_home, monkeypatch, capsys):
    code, out, err = run_main(monkeypatch, capsys, "serve", "--port", "0")
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert err.startswith("error: no catalog model is installed; run: fleet models pull")


def test_fleet_serve_print_config_prints_the_default_fleet(fake_home, chat_gguf, monkeypatch, capsys):
    fake_home.install("one", chat_gguf, 10)
    code, out, _ = run_main(monkeypatch, capsys, "serve", "--print-config")
    assert code == 0 and yaml.safe_load(out)["models"] == {"one": {"catalog": "one", "engine": "auto",
                                                                      "dtype": "int8"}}


def _measured(path, engine, decode, prompt):
    m = M.Measurement(model=path.name, model_key=M.model_key(path), engine=engine,
                      dtype="gguf" if engine == "llama_cpp" else "int8", prompt_tokens_per_second=prompt,
                      decode_tokens_per_second=decode, prompt_tokens=64, new_tokens=32, threads=2,
                      load_seconds=0.1, machine={"id": M.machine_id()},
                      measured_at="2026-12-01T00:00:00+00:00")
    M.save(m, path)


def test_the_default_fleet_over_real_smollm2_answers_through_the_openai_client(
        tmp_path, monkeypatch, smollm2_gguf):
    home = tmp_path / "home"
    monkeypatch.setenv("FLEET_HOME", str(home))
    monkeypatch.delenv("FLEET_CATALOG", raising=False)
    folder = home / "models" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / smollm2_gguf.name).symlink_to(smollm2_gguf)
    shutil.copy(smollm2_gguf.parent / "model.json", folder / "model.json")
    installed = folder / smollm2_gguf.name
    # measurements as a first start would have saved them (measuring for real takes minutes on 2 busy cores)
    _measured(installed, "llama_cpp", decode=40.0, prompt=400.0)
    _measured(installed, "fleetlm", decode=30.0, prompt=300.0)
    monkeypatch.setattr(M, "measure", lambda *a, **k: pytest.fail("the cached measurements are reused"))

    cfg = default_config()
    assert list(cfg.models) == ["smollm2-135m-instruct"]
    costs = M.price_local_models(cfg, progress=False)
    assert costs["smollm2-135m-instruct"].engine == "llama_cpp"
    price = cfg.models["smollm2-135m-instruct"].price
    assert price.output == pytest.approx(M.price_per_million(40.0, cfg.machine_usd_per_hour), abs=1e-6)
    summary = startup_summary(cfg, costs)
    assert summary[0].startswith("  smollm2-135m-instruct: llama_cpp (faster decode here: llama_cpp 40.0")
    assert f"${price.output:.4f} out per 1M tokens (measured: $0.0844/h" in summary[0]
    assert summary[1] == "  auto: router, cheapest"
    backends = build_backends(cfg)
    assert isinstance(backends["smollm2-135m-instruct"], LlamaCppBackend)
    store = UsageStore(f"sqlite:///{tmp_path / 'u.db'}")
    with TestClient(create_app(cfg, store, backends)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http,
                               max_retries=0)
        raw = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8, temperature=0)
        reply = raw.parse()
        assert raw.headers["x-fleet-model"] == "smollm2-135m-instruct"
        assert reply.choices[0].message.content.strip()
        assert 0 < reply.usage.completion_tokens <= 8
        assert float(raw.headers["x-fleet-cost-usd"]) == pytest.approx(
            price.cost(reply.usage.prompt_tokens, reply.usage.completion_tokens), abs=1e-8)
        cards = {c["id"]: c for c in http.get("/v1/models").json()["data"]}
        assert {"smollm2-135m-instruct", "auto", BUILTIN_EMBEDDING_MODEL} <= set(cards)
        fleet = cards["smollm2-135m-instruct"]["fleet"]
        assert fleet["engine"] == "llama_cpp" and "llama_cpp 40.0 tok/s vs fleetlm 30.0" in fleet["reason"]


def test_auto_takes_the_fitted_ladder_when_it_was_chosen_among_the_installed_models(fake_home, chat_gguf,
                                                                                    tmp_path, monkeypatch):
    import json

    fake_home.install("big", chat_gguf, 2000)
    fake_home.install("small", chat_gguf, 100)
    policy = tmp_path / "policy.json"
    monkeypatch.setattr("fleetlm.fleet.outcomes.POLICY_FILE", policy)
    policy.write_text(json.dumps({"default": {"ladder": ["big"], "chosen_among": ["small", "big"]}}))
    assert default_config().router.models == ["big"]  # the fit skipped the small model
    # a policy fitted on other models says nothing about these: every model, smallest first
    policy.write_text(json.dumps({"default": {"ladder": ["big"], "chosen_among": ["small", "big", "x"]}}))
    assert default_config().router.models == ["small", "big"]
