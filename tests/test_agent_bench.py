"""bench/agent.py through a scripted gateway: an oracle model replaying each task's solution, a lazy one."""

import json
import shutil

import pytest

from agent_fakes import ScriptedGateway, call, code
from bench_scripts import bench_script
from fleetlm.agent.bench_tasks import generate_tasks


@pytest.fixture(scope="module")
def bench():
    with bench_script("agent") as module:
        yield module


def _task_of(body, tasks):
    prompt = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return next(t for t in tasks if t.prompt == prompt)


def oracle(tasks):
    """Calls the task's reference tools one per step, then answers."""
    def reply(body):
        task = _task_of(body, tasks)
        done = sum(1 for m in body["messages"] if m["role"] == "tool")
        if done < len(task.solution):
            return call(*task.solution[done])
        return call("final_answer", {"answer": task.answer})
    return reply


def code_oracle(tasks):
    """Writes one program that makes the reference calls, then final_answer."""
    def reply(body):
        task = _task_of(body, tasks)
        lines = [f"print({name}(**{args!r}))" for name, args in task.solution]
        return code("\n".join([*lines, f"final_answer({task.answer!r})"]))
    return reply


@pytest.fixture
def gw():
    with ScriptedGateway() as g:
        yield g


def test_the_oracle_solves_every_family_and_the_lazy_model_none(bench, gw, capsys, tmp_path):
    tasks = generate_tasks(7)
    gw.script("oracle", *[oracle(tasks)] * 40)
    gw.script("lazy", *["0"] * 7)
    gw.prices["oracle"] = 2e-6
    out_file = tmp_path / "runs.json"
    argv = ["--url", gw.url, "--models", "oracle,lazy", "--limit", "7", "--out", str(out_file)]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert sum(line.startswith("ok   oracle ") for line in lines) == 7
    assert sum(line.startswith("FAIL lazy ") for line in lines) == 7
    success = next(line for line in lines if line.startswith("success"))
    assert success.split() == ["success", "7/7", "(100.0%)", "0/7", "(0.0%)"]
    runs = json.loads(out_file.read_text())
    assert len(runs) == 14 and all(r["passed"] == (r["config"] == "oracle") for r in runs)
    oracle_runs = [r for r in runs if r["config"] == "oracle"]
    assert all(r["requests"] == len(t.solution) + 1 for r, t in zip(oracle_runs, tasks, strict=True))
    assert all(r["cost_usd"] == pytest.approx(r["tokens"] * 2e-6, abs=1e-7) for r in oracle_runs)
    cost_row = next(line for line in lines if line.startswith("cost (USD, total)")).split()
    assert float(cost_row[3]) == pytest.approx(sum(r["cost_usd"] for r in oracle_runs), abs=1e-6)
    assert "  restock" in out and "import_csv" in out


def test_a_ladder_configuration_and_limit_2(bench, gw, capsys):
    tasks = generate_tasks(2)
    gw.script("weak", *['{"name": "broken'] * 10)
    gw.script("strong", *[oracle(tasks)] * 10)
    assert bench.main(["--url", gw.url, "--models", "weak>strong", "--limit", "2", "--max-steps", "12"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["ok", "ok"]  # weak fails each step, strong fixes it
    assert next(line for line in lines if line.startswith("error steps")).split()[-1] != "0"


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_the_code_agent_path(bench, gw, capsys):
    tasks = generate_tasks(2)
    gw.script("coder", *[code_oracle(tasks)] * 2)
    assert bench.main(["--url", gw.url, "--models", "coder", "--limit", "2", "--code"]) == 0
    lines = capsys.readouterr().out.splitlines()
    success = next(line for line in lines if line.startswith("success"))
    assert success.split() == ["success", "2/2", "(100.0%)"]


def test_bad_arguments_and_an_unreachable_gateway(bench, capsys):
    assert bench.main(["--models", "", "--limit", "1"]) == 2
    assert bench.main(["--families", "chess"]) == 2
    assert "unknown task families" in capsys.readouterr().err
    assert bench.main(["--url", "http://127.0.0.1:9/v1", "--models", "m", "--limit", "1"]) == 0
    assert "FAIL m " in capsys.readouterr().out  # a refused gateway fails the run, not the benchmark
