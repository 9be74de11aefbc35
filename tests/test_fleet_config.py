import pytest

from fleetlm.config import load_config, parse_config, resolve_storage_url
from fleetlm.errors import ConfigError

GOOD = """
models:
  base:   {path: ./models/fleet-base, dtype: bf16, price: {input: 0.50, output: 1.50}, fallbacks: [gpt4]}
  micro:  {gguf: micro.gguf, price: {input: 0.05, output: 0.15}, aliases: [small, cheap]}
  gpt4:   {remote: "https://api.example.com/v1", api_key_env: EXAMPLE_KEY, timeout: 5, retries: 2,
           price: {input: 10, output: 30}}
router: {name: auto, kind: mlp, quality_floor: 0.9}
storage: sqlite:///x.db
"""


def write(tmp_path, text):
    p = tmp_path / "fleet.yaml"
    p.write_text(text)
    return p


def test_good_config_parses_with_kinds_aliases_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, GOOD))
    assert [cfg.models[n].kind for n in ("base", "micro", "gpt4")] == ["local", "gguf", "remote"]
    assert cfg.models["base"].path == str((tmp_path / "models/fleet-base").resolve())
    assert cfg.models["micro"].gguf == str((tmp_path / "micro.gguf").resolve())
    assert cfg.resolve("cheap") == "micro" and cfg.resolve("base") == "base" and cfg.resolve("auto") is None
    assert cfg.models["gpt4"].retries == 2 and cfg.models["gpt4"].timeout == 5
    assert cfg.router.quality_floor == 0.9
    assert cfg.strongest_model() == "gpt4"
    assert cfg.storage_url() == "sqlite:///x.db"
    # $1M of tokens at $10/$30 per million
    assert cfg.models["gpt4"].price.cost(1_000_000, 1_000_000) == pytest.approx(40.0)
    assert cfg.models["micro"].price.cost(2000, 1000) == pytest.approx((2000 * 0.05 + 1000 * 0.15) / 1e6)


@pytest.mark.parametrize(
    "text, fragment",
    [
        (
            "models:\n  a: {path: x, remote: 'http://h/v1'}\n",
            "models.a: give exactly one of path, gguf, catalog, remote",
        ),
        ("models:\n  a: {catalog: smollm2-135m-instruct, gguf: x.gguf}\n", "(got gguf, catalog)"),
        ("models:\n  a: {catalog: gpt-17}\n", "unknown catalog model 'gpt-17' (the catalog has: smollm2"),
        ("models:\n  a: {}\n", "got none"),
        ("models:\n  a: {remote: 'ftp://h'}\n", "http(s) URL"),
        ("models:\n  a: {path: x, price: {input: -1}}\n", "models.a.price.input"),
        ("models:\n  a: {path: x, fallbacks: [zzz]}\n", "unknown model 'zzz'"),
        ("models:\n  a: {path: x, colour: red}\n", "models.a.colour"),
        ("models:\n  a: {path: x, dtype: fp7}\n", "models.a.dtype"),
        ("models:\n  a: {path: x}\n  b: {path: y, aliases: [a]}\n", "used by both"),
        ("models:\n  a: {path: x}\nrouter: {name: a}\n", "clashes"),
        ("models: {}\n", "models"),
        ("- just a list\n", "expected a mapping"),
        ("models: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_configs_give_one_clear_line(tmp_path, text, fragment):
    with pytest.raises(ConfigError) as exc:
        load_config(write(tmp_path, text))
    msg = str(exc.value)
    assert fragment in msg and "\n" not in msg
    assert msg.startswith(str(tmp_path / "fleet.yaml"))


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_api_key_comes_from_the_environment(monkeypatch):
    cfg = parse_config({"models": {"r": {"remote": "http://127.0.0.1:1/v1", "api_key_env": "FLEET_T_KEY"}}})
    monkeypatch.delenv("FLEET_T_KEY", raising=False)
    with pytest.raises(ConfigError, match="FLEET_T_KEY"):
        cfg.models["r"].api_key()
    monkeypatch.setenv("FLEET_T_KEY", "sekret")
    assert cfg.models["r"].api_key() == "sekret"


def test_storage_url_falls_back_to_env_then_cwd(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLEET_DB_URL", "postgresql://u@localhost/fleet")
    assert resolve_storage_url(None) == "postgresql://u@localhost/fleet"
    assert resolve_storage_url("sqlite:///a.db") == "sqlite:///a.db"
    monkeypatch.delenv("FLEET_DB_URL")
    assert resolve_storage_url(None) == f"sqlite:///{tmp_path / 'fleet.db'}"


def test_a_catalog_model_is_served_like_gguf_from_its_installed_file(tmp_path, monkeypatch, smollm2_gguf):
    spec = parse_config({"models": {"smol": {"catalog": "smollm2-135m-instruct"}}}).models["smol"]
    assert spec.kind == "gguf" and spec.gguf is None
    assert spec.gguf_file() == str(smollm2_gguf)
    monkeypatch.setenv("FLEET_HOME", str(tmp_path / "empty-home"))
    with pytest.raises(ConfigError, match="not installed; run: fleet models pull smollm2-135m-instruct"):
        spec.gguf_file()
