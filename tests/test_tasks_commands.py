import json
import subprocess
import sys
import types

import pytest
import typer
from typer.testing import CliRunner

from fleetlm.evals.commands import register as register_eval
from fleetlm.tasks.base import TaskError
from fleetlm.tasks.commands import register


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    register(app)
    register_eval(app)  # `fleet eval --bench tasks` (the default bench) scores task records
    return app


def test_generate_writes_records(app, tmp_path):
    out = tmp_path / "t.jsonl"
    args = ["tasks", "generate", "--domains", "arithmetic,facts", "--seed", "3", "--n", "12",
            "--levels", "1-3", "--split", "dev", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert "wrote" in result.output and f"{len(recs)} records" in result.output
    assert {r["domain"] for r in recs} == {"arithmetic", "facts"} and {r["level"] for r in recs} <= {1, 2, 3}
    assert all(r["split"] == "dev" for r in recs)
    again = tmp_path / "again.jsonl"
    CliRunner().invoke(app, args[:-1] + [str(again)])
    assert again.read_text() == out.read_text()


def test_bad_input_is_a_typed_error(app, tmp_path):
    bad = ["tasks", "generate", "--domains", "poetry", "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(app, bad)
    assert isinstance(result.exception, TaskError) and "unknown domain" in str(result.exception)
    missing = ["eval", "--model", str(tmp_path), "--data", str(tmp_path / "none.jsonl")]  # data checked first
    result = CliRunner().invoke(app, missing)
    assert isinstance(result.exception, TaskError) and "data file not found" in str(result.exception)


def test_docs_command(app, tmp_path):
    result = CliRunner().invoke(app, ["tasks", "docs", "--out", str(tmp_path / "docs"), "--level", "1"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "docs" / "docs.jsonl").is_file() and list((tmp_path / "docs").glob("person-*.txt"))
    result = CliRunner().invoke(app, ["tasks", "docs", "--out", str(tmp_path), "--level", "9"])
    assert isinstance(result.exception, TaskError)


def test_eval_prints_table_and_writes_json(app, tmp_path, monkeypatch, tiny_llama):
    data = tmp_path / "d.jsonl"
    CliRunner().invoke(app, ["tasks", "generate", "--domains", "strings", "--n", "6", "--levels", "1,2",
                             "--out", str(data)])
    recs = [json.loads(line) for line in data.read_text().splitlines()]

    class Echo:  # answers every question right, in one token
        @classmethod
        def load(cls, path, dtype="bf16"):
            return cls()

        def generate(self, requests):
            for i, req in enumerate(requests):
                # the harness puts its answer-only system turn first (evals/tasks.py)
                answer = next(r["answer"] for r in recs if r["messages"] == req.messages[1:])
                yield types.SimpleNamespace(request_index=i, text=str(answer))

    monkeypatch.setattr("fleetlm.engine.Engine", Echo)
    summary, preds = tmp_path / "s.json", tmp_path / "p.jsonl"
    args = ["eval", "--model", str(tiny_llama), "--data", str(data), "--batch-size", "4",
            "--json", str(summary), "--predictions", str(preds)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "strings" in result.output and "100.0" in result.output
    got = json.loads(summary.read_text())
    assert got["n"] == 6 and got["accuracy"] == 1.0 and set(got["domains"]["strings"]["levels"]) == {"1", "2"}
    assert all(json.loads(line)["correct"] for line in preds.read_text().splitlines())


def test_fleet_cli_exits_2_on_bad_domain(tmp_path):
    out = subprocess.run([sys.executable, "-c", "from fleetlm.cli import main; main()", "tasks", "generate",
                          "--domains", "poetry", "--out", str(tmp_path / "x.jsonl")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("error: unknown domain 'poetry'")


def test_routing_joins_prediction_files(app, tmp_path):
    data = tmp_path / "d.jsonl"
    gen = ["tasks", "generate", "--domains", "classification", "--n", "4", "--out", str(data)]
    CliRunner().invoke(app, gen)
    recs = [json.loads(line) for line in data.read_text().splitlines()]
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    # Written in reverse order: rows are joined by id, not by position.
    good.write_text("".join(json.dumps({"id": r["id"], "prediction": r["answer"]}) + "\n"
                            for r in recs[::-1]))
    bad.write_text("".join(json.dumps({"id": r["id"], "prediction": "sports"}) + "\n" for r in recs))
    out = tmp_path / "route.jsonl"
    args = ["tasks", "routing", "--data", str(data), "--pred", f"big={good}", "--pred", f"small={bad}",
            "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in recs]
    assert all(r["scores"]["big"] == 1.0 for r in rows)
    assert [r["scores"]["small"] for r in rows] == [float(r["answer"] == "sports") for r in recs]
    bad.write_text(json.dumps({"id": recs[0]["id"], "prediction": "x"}) + "\n")
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, TaskError)
    assert "lacks predictions for 3 records" in str(result.exception)
    result = CliRunner().invoke(app, args[:4] + ["--pred", f"x={tmp_path / 'none'}", "--out", str(out)])
    assert isinstance(result.exception, TaskError) and "no such predictions file" in str(result.exception)
    result = CliRunner().invoke(app, args[:4] + ["--pred", "nofile", "--out", str(out)])
    assert isinstance(result.exception, TaskError) and "NAME=FILE" in str(result.exception)
