"""The task suite as a benchmark for chat models: the answer-format system turn, and its scoring."""

from __future__ import annotations

import json

from fleetlm.evals import tasks
from fleetlm.tasks.suite import generate


def _write(tmp_path, records):
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_every_item_asks_for_the_answer_alone_first(tmp_path):
    records = generate(n=3, seed=1)
    items = tasks.items(_write(tmp_path, records))
    assert len(items) == len(records)
    for item, record in zip(items, records, strict=True):
        assert item.messages[0] == {"role": "system", "content": tasks.ANSWER_ONLY}
        assert item.messages[1:] == [m for m in record["messages"] if m["role"] != "assistant"]
        assert item.messages[-1]["role"] == "user"


def test_a_record_with_its_own_system_turn_keeps_it():
    own = [{"role": "system", "content": "be terse"}, {"role": "user", "content": "2 + 2 ="}]
    assert tasks.answer_only(own) == own


def test_the_bare_answer_scores_and_an_explanation_does_not(tmp_path):
    record = next(r for r in generate(n=5, seed=2) if r["domain"] == "arithmetic")
    item = tasks.items(_write(tmp_path, [record]))[0]
    assert tasks.score(item, str(record["answer"]))[0] == 1.0
    assert tasks.score(item, f"The answer is {record['answer']} because I computed it.")[0] == 0.0
