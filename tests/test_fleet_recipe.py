"""The reduced recipe (`ci`) runs every step of the toy fleet's build: the recipe stays an honest check."""

import json

import pytest
import yaml

from fleetlm.config import load_config
from fleetlm.errors import ConfigError
from fleetlm.fleet import built_config
from fleetlm.fleet.recipe import RECIPES, build_fleet, params_of, price_of, upsample_cells


def test_ci_recipe_builds_every_model_and_the_router(ci_fleet):
    out, summary = ci_fleet
    recipe = RECIPES["ci"]
    models = [s.name for s in recipe.generalists] + [e.name for e in recipe.experts]
    for name in models:
        assert (out / name / "config.json").is_file() and (out / name / "tokenizer.json").is_file()
    assert [t["model"] for t in summary["training"]][-1] == recipe.experts[0].name
    assert all(t["tokens_per_s"] > 0 for t in summary["training"])
    # Each generalist is bigger than the one before: the family differs in capacity.
    sizes = [summary["params"][s.name] for s in recipe.generalists]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert (out / "router").is_dir()
    tradeoff = json.loads((out / "router" / "tradeoff.json").read_text())
    assert tradeoff["floor"] == recipe.quality_floor and tradeoff["lam"] >= 0
    assert tradeoff["quality"] >= recipe.quality_floor * tradeoff["strongest_quality"] - 1e-9
    assert set(json.loads((out / "router" / "router.json").read_text())["mean_quality"]) == set(models)


def test_routing_data_holds_every_models_outcome(ci_fleet):
    out, _ = ci_fleet
    rows = [json.loads(line) for line in (out / "routing.jsonl").read_text().splitlines()]
    recipe = RECIPES["ci"]
    assert len(rows) == recipe.n_route * len(recipe.domains)
    names = {s.name for s in recipe.generalists} | {e.name for e in recipe.experts}
    for row in rows:
        assert set(row["scores"]) == names and set(row["responses"]) == names
        assert all(v in (0.0, 1.0) for v in row["scores"].values())


def test_eval_and_fleet_yaml(ci_fleet):
    out, _ = ci_fleet
    report = json.loads((out / "eval.json").read_text())
    for r in report.values():
        assert r["n"] == RECIPES["ci"].n_test * len(RECIPES["ci"].domains)
        assert 0.0 <= r["accuracy"] <= 1.0
    config = load_config(out / "fleet.yaml")
    assert set(config.models) == set(report)
    assert config.router is not None and config.router.name == "auto"
    prices = {n: s.price.output for n, s in config.models.items()}
    assert prices == {n: price_of(params_of(out / n))["output"] for n in prices}
    assert config.strongest_model() == "ci-small"
    assert yaml.safe_load((out / "fleet.yaml").read_text())["router"]["path"] == "router"


def test_reuse_keeps_the_trained_models(ci_fleet):
    out, _ = ci_fleet
    before = (out / "ci-nano" / "model.safetensors").stat().st_mtime_ns
    summary = build_fleet(out, RECIPES["ci"], log=lambda _: None, reuse=True)
    assert summary["training"] == []
    assert (out / "ci-nano" / "model.safetensors").stat().st_mtime_ns == before


def test_info_of_a_folder_without_a_fleet_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="fleet fleet build"):
        built_config(tmp_path)


def test_info_reads_a_built_fleet(ci_fleet):
    out, _ = ci_fleet
    assert set(built_config(out).models) == set(json.loads((out / "eval.json").read_text()))


def test_small_cells_are_repeated_up_to_the_floor_and_big_ones_kept():
    rows = [{"id": f"a{i}", "domain": "arithmetic", "level": 1} for i in range(3)]
    rows += [{"id": f"s{i}", "domain": "strings", "level": 2} for i in range(10)]
    out = upsample_cells(rows, 7)
    assert out[: len(rows)] == rows  # the original order first
    ids = [r["id"] for r in out]
    assert sum(i.startswith("a") for i in ids) == 7 and sum(i.startswith("s") for i in ids) == 10
    assert ids[13:] == ["a0", "a1", "a2", "a0"]  # cycled in order
    assert upsample_cells(rows, 0) == rows
