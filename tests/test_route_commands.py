import json

import typer
from typer.testing import CliRunner

from fleetlm.route.commands import register
from fleetlm.route.data import RouteDataError
from route_synth import STRONG, make_routellm_folder

runner = CliRunner()
app = typer.Typer()
register(app)  # the same registration that `fleet` does, without the other capabilities


def test_cli_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEETLM_EMBED_CACHE", str(tmp_path / "emb"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    src = make_routellm_folder(tmp_path / "src", per_subject=50)
    data = tmp_path / "mmlu.jsonl"
    res = runner.invoke(
        app, ["route", "import-routellm", str(src), "--benchmark", "mmlu", "--out", str(data)]
    )
    assert res.exit_code == 0, res.output
    assert "wrote 149 rows" in res.output
    rdir = tmp_path / "router"
    res = runner.invoke(
        app, ["route", "fit", "--data", str(data), "--router", "knn", "--out", str(rdir), "--set", "k=10"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((rdir / "router.json").read_text())["settings"]["k"] == 10
    scores = tmp_path / "scores.jsonl"
    res = runner.invoke(
        app, ["route", "score", "--router", str(rdir), "--data", str(data), "--out", str(scores)]
    )
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in scores.read_text().splitlines()]
    assert len(lines) == 149 and STRONG in lines[0]["scores"]
    res = runner.invoke(app, ["route", "eval", "--router", str(rdir), "--data", str(data)])
    assert res.exit_code == 0, res.output
    assert "APGR" in res.output and "CPT(50%)" in res.output and "CPT(80%)" in res.output
    assert "vs always-strong" in res.output and "vs random" in res.output
    assert (rdir / "eval.png").read_bytes()[:4] == b"\x89PNG"
    res = runner.invoke(
        app, ["route", "calibrate", "--router", str(rdir), "--data", str(data), "--floor", "0.9"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads((rdir / "calibration.json").read_text())["floor"] == 0.9


def test_cli_errors_are_typed(tmp_path):
    res = runner.invoke(
        app, ["route", "fit", "--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]
    )
    assert isinstance(res.exception, RouteDataError)  # fleet's main prints it as one line, exit code 2
    assert "routing data not found" in str(res.exception)
