import csv
import json
import subprocess
import sys
import threading
import time

import pytest
import typer
import uvicorn
from fastapi import FastAPI, Request
from typer.testing import CliRunner

from fake_openai import free_port
from fleetlm.errors import FleetError
from fleetlm.evals import humaneval
from fleetlm.evals.commands import register
from fleetlm.evals.harness import EvalError, split_of
from fleetlm.sandbox import sandbox_available

needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap cannot create namespaces here")


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so `eval` stays a subcommand as in the fleet CLI
    register(app)
    return app


@pytest.fixture(scope="module")
def canned_api():
    """An OpenAI-compatible API that answers HumanEval/0 and /1 with their canonical solutions, the rest
    with a wrong one; it records the requests it got."""
    problems = {p["prompt"]: p for p in humaneval.load_problems()}
    requests = []
    api = FastAPI()

    @api.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        requests.append(body)
        asked = body["messages"][-1]["content"]
        p = next(p for prompt, p in problems.items() if prompt in asked)
        if p["task_id"] in ("HumanEval/0", "HumanEval/1"):
            text = f"Here you are:\n```python\n{p['prompt']}{p['canonical_solution']}```\n"
        else:
            text = f"```python\ndef {p['entry_point']}(*args):\n    return None\n```"
        return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}}

    port = free_port()
    config = uvicorn.Config(api, host="127.0.0.1", port=port, log_level="error", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}/v1", requests
    server.should_exit = True
    thread.join(timeout=10)


def rows_of(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@needs_sandbox
def test_humaneval_against_an_openai_endpoint(app, canned_api, tmp_path):
    url, requests = canned_api
    out, summary = tmp_path / "he.jsonl", tmp_path / "he.json"
    result = CliRunner().invoke(app, ["eval", "--bench", "humaneval", "--model", f"{url}#coder", "--limit",
                                      "3", "--out", str(out), "--json", str(summary), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    assert [r["id"] for r in rows] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert [r["scores"]["coder"] for r in rows] == [1.0, 1.0, 0.0]
    first = rows[0]
    assert set(first) >= {"id", "prompt", "domain", "responses", "scores", "tokens", "latency_s"}
    assert first["domain"] == "code" and first["prompt"].startswith("from typing import List")
    assert first["tokens"]["coder"] == {"prompt": 10, "completion": 20}
    assert first["split"] == split_of(first["id"])
    got = json.loads(summary.read_text())
    assert got["n"] == 3 and got["correct"] == 2 and abs(got["accuracy"] - 2 / 3) < 1e-9
    assert got["engine"] == "api"
    assert "66.7" in result.output and "code" in result.output
    assert {r["model"] for r in requests} == {"coder"} and all(r["temperature"] == 0.0 for r in requests)
    assert all(r["stop"] == humaneval.CHAT_STOP for r in requests)


def write_gsm8k(folder):
    folder.mkdir()
    with (folder / "gsm8k_responses.csv").open("w", newline="") as f:
        csv.writer(f).writerows([["prompt", "m", "m_response"],
                                 ["What is 2 + 2?", "True", "2 + 2 = 4\n#### 4"],
                                 ["What is 3 * 3?", "True", "#### 9"],
                                 ["What is 5 - 1?", "True", "#### 4"]])
    return folder


def test_gsm8k_and_humaneval_on_the_tiny_local_model(app, tiny_llama, tmp_path):
    data = write_gsm8k(tmp_path / "gsm")
    out = tmp_path / "g.jsonl"
    args = ["eval", "--bench", "gsm8k", "--data", str(data), "--model", str(tiny_llama), "--dtype", "f32",
            "--limit", "2", "--max-tokens", "4", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    name = tiny_llama.name
    assert len(rows) == 2 and all(set(r["responses"]) == {name} and r["domain"] == "math" for r in rows)
    assert all(r["scores"][name] in (0.0, 1.0) and r["tokens"][name]["completion"] <= 4 for r in rows)
    he = tmp_path / "h.jsonl"
    result = CliRunner().invoke(app, ["eval", "--bench", "humaneval", "--model", str(tiny_llama), "--dtype",
                                      "f32", "--limit", "2", "--max-tokens", "4", "--out", str(he),
                                      "--no-progress"])
    if sandbox_available():
        assert result.exit_code == 0, result.output
        assert [r["scores"][name] for r in rows_of(he)] == [0.0, 0.0]  # four random tokens solve nothing
        complete = ["eval", "--bench", "humaneval", "--model", str(tiny_llama), "--mode", "complete",
                    "--limit", "1", "--max-tokens", "4", "--out", str(he), "--no-progress"]
        result = CliRunner().invoke(app, complete)
        assert result.exit_code == 0, result.output
        assert rows_of(he)[0]["tokens"][name]["completion"] <= 4


def test_splits_never_mix_and_limit_is_deterministic(app, tiny_llama, tmp_path):
    from fleetlm.evals.harness import select

    items = humaneval.items()
    train, test = select(items, "train"), select(items, "test")
    assert {i.id for i in train}.isdisjoint({i.id for i in test}) and len(train) + len(test) == 164
    assert 0.7 < len(train) / 164 < 0.9
    assert [i.id for i in select(items, "test", limit=5)] == [i.id for i in test[:5]]
    assert [i.id for i in select(items, limit=4, seed=1)] == [i.id for i in select(items, limit=4, seed=1)]
    assert split_of("HumanEval/0") == split_of("HumanEval/0")


def test_the_smollm2_catalog_model_by_name(app, smollm2_gguf, tmp_path):
    out = tmp_path / "s.jsonl"
    data = write_gsm8k(tmp_path / "gsm")
    result = CliRunner().invoke(app, ["eval", "--bench", "gsm8k", "--data", str(data), "--model",
                                      "smollm2-135m-instruct", "--engine", "llama_cpp", "--limit", "2",
                                      "--max-tokens", "48", "--out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    rows = rows_of(out)
    model = "smollm2-135m-instruct@llama.cpp"
    assert len(rows) == 2 and all(r["responses"][model].strip() for r in rows)
    assert all(r["tokens"][model]["completion"] > 0 for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--bench", "mmlu", "--model", "x"], "unknown --bench 'mmlu'"),
    (["--bench", "gsm8k", "--model", "no-such-model"], "unknown model 'no-such-model'"),
    (["--bench", "gsm8k", "--model", "http://127.0.0.1:9/v1"], "cannot reach http://127.0.0.1:9/v1"),
    (["--bench", "gsm8k", "--data", "/nonexistent/gsm", "--model", "x"], "no GSM8K data"),
    (["--bench", "tasks", "--model", "x"], "--bench tasks needs --data"),
    (["--bench", "gsm8k", "--model", "x", "--split", "dev"], "unknown --split 'dev'"),
    (["--bench", "gsm8k", "--model", "x", "--engine", "vllm"], "unknown --engine 'vllm'"),
])
def test_bad_input_is_a_clear_error(app, tmp_path, args, message):
    if "gsm8k" in args and "--data" not in args:
        args = [*args, "--data", str(write_gsm8k(tmp_path / "gsm"))]
    result = CliRunner().invoke(app, ["eval", *args, "--no-progress"])
    assert isinstance(result.exception, FleetError), result.output
    assert message in str(result.exception)


def test_fleet_cli_prints_one_line_and_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-c", "from fleetlm.cli import main; main()", "eval", "--bench",
                          "humaneval", "--model", "http://127.0.0.1:9/v1#m", "--limit", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot reach http://127.0.0.1:9/v1") and "Traceback" not in out.stderr
    assert isinstance(EvalError("x"), FleetError)


def test_a_flaky_endpoint_is_retried_and_a_broken_one_is_a_clear_error(app, tmp_path):
    from fake_openai import UpstreamServer

    data = write_gsm8k(tmp_path / "gsm")
    with UpstreamServer() as up:
        up.flaky_failures = 1
        out = tmp_path / "f.jsonl"
        args = ["eval", "--bench", "gsm8k", "--data", str(data), "--limit", "1", "--no-progress"]
        result = CliRunner().invoke(app, [*args, "--model", f"{up.base_url}#flaky", "--out", str(out)])
        assert result.exit_code == 0, result.output
        assert up.calls["flaky"] == 2
        assert rows_of(out)[0]["responses"]["flaky"].startswith("echo: What is 2 + 2?")
        result = CliRunner().invoke(app, [*args, "--model", f"{up.base_url}#broken"])
        assert isinstance(result.exception, EvalError)
        assert "answered 500: upstream exploded" in str(result.exception)
        assert up.calls["broken"] == 3
