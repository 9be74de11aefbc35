"""bench/memory_recall.py end to end against a perfect reader: a backend that answers a question from
whatever statement about its person is in the prompt. Memory and the full conversation then recall every
fact, truncation and the bare question none: what the benchmark measures is the context, not the model."""

from __future__ import annotations

import json
import re

import openai
import pytest
from fastapi.testclient import TestClient

from bench_scripts import bench_script
from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Choice, Generation
from fleetlm.serve.store import UsageStore


@pytest.fixture(scope="module")
def bench():
    with bench_script("memory_recall") as module:
        yield module


class Reader:
    """Answers the last user question with the sentence naming its person, if the prompt holds one."""

    def __init__(self, name: str, names: list[str]):
        self.name, self.names = name, names

    async def chat(self, req):
        messages = [m.text() for m in req.messages]
        person = next((n for n in self.names if n in messages[-1]), None)
        earlier = "\n".join(messages[:-1])
        found = re.findall(rf"{person}[^.\n]*\.", earlier) if person else []
        return Generation([Choice(0, found[-1] if found else "I do not know.", "stop")], 50, 5)

    async def aclose(self):
        pass


def test_run_scores_the_arms_on_a_perfect_reader(bench, tmp_path, monkeypatch, capsys):
    def start_gateway(work, model, context):
        served = {"remote": "http://127.0.0.1:9/v1"}
        config = parse_config(
            {
                "models": {
                    "answer": {**served, "max_context": context},
                    "answer-truncate": {**served, "max_context": context},
                    "answer-none": {**served, "max_context": context},
                    "answer-full": {**served, "max_context": bench.FULL_CONTEXT},
                },
                "knowledge": {"files_dir": str(work / "blobs"), "index_path": str(work / "knowledge.db")},
                "memory": {"summarizer": "answer"},
            }
        )
        names = list(bench.NAMES)
        backends = {n: Reader(n, names) for n in ("answer", "answer-truncate", "answer-none", "answer-full")}
        app = create_app(config, UsageStore(f"sqlite:///{work / 'fleet.db'}"), backends)
        tc = TestClient(app)
        tc.__enter__()
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)
        return tc, client, app.state.gateway

    monkeypatch.setattr(bench, "start_gateway", start_gateway)
    assert bench.main(["--context", "1024", "--facts", "20", "--limit", "6", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["conversation_tokens"] >= 3 * 1024
    rows = {r["arm"]: r for r in results["rows"]}
    assert rows["memory"]["right"] == rows["full"]["right"] == 6
    assert rows["truncate"]["right"] == 0 and rows["none"]["right"] == 0
    assert rows["memory"]["mean_prompt_tokens"] == 50 and results["summary_calls"] >= 1
    assert (tmp_path / "memory_recall.png").stat().st_size > 1000
    assert "memory" in capsys.readouterr().out


def test_facts_are_seeded_distinct_and_asked_by_name(bench):
    facts = bench.plant(24, seed=3)
    assert facts == bench.plant(24, seed=3) and facts != bench.plant(24, seed=4)
    assert len({f.name for f in facts}) == 24
    for f in facts:
        assert f.value in f.statement and f.name in f.question and f.value not in f.question
    with pytest.raises(SystemExit):
        bench.main(["--facts", "5"])
