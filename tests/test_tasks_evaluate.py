import json
import sys
import types

import pytest

from fleetlm.tasks import suite
from fleetlm.tasks.base import TaskError
from fleetlm.tasks.evaluate import (
    EvalReport,
    evaluate_model,
    format_table,
    normalize,
    routing_records,
    score,
    score_records,
    write_routing_data,
)


@pytest.mark.parametrize("pred, gold, check", [
    ("3,000", "3000", "number"), (" 3000.0 ", "3000", "number"), ("0.50", "0.5", "number"),
    ("-12\nbecause ...", "-12", "number"), ("3e3", "3000", "number"), ("1.5.", "1.5", "number"),
    ("Positive.", "positive", "text"), ("  'Nafeta   Co' ", "Nafeta Co", "text"),
    ("abc", "abc", "text_cs"), ("\n\n edcba \n", "edcba", "text_cs"),
    ("Three Hundred and Forty Two", "three hundred forty-two", "words"),
])
def test_equivalent_answers_match(pred, gold, check):
    assert score(pred, gold, check)


@pytest.mark.parametrize("pred, gold, check", [
    ("ABC", "abc", "text_cs"), ("3001", "3000", "number"), ("3000 m", "3000", "number"),
    ("negative", "positive", "text"), ("", "0", "number"), ("forty two thousand", "forty-two", "words"),
    ("the answer is 9", "9", "number"),
])
def test_different_answers_do_not_match(pred, gold, check):
    assert not score(pred, gold, check)


def test_normalize_rejects_unknown_check():
    assert normalize("-0", "number") == "0"
    with pytest.raises(TaskError):
        normalize("x", "vibes")


def _records():
    return suite.generate(domains=["arithmetic", "classification"], n=6, seed=0, levels=[1, 2])


def test_score_records_counts_per_domain_and_level():
    recs = _records()
    preds = [r["answer"] if i % 2 == 0 else "wrong" for i, r in enumerate(recs)]
    report, marks = score_records(recs, preds)
    assert marks == [i % 2 == 0 for i in range(len(recs))]
    assert report.counts() == (sum(marks), len(recs))
    for d in ("arithmetic", "classification"):
        for lv in (1, 2):
            sub = [m for r, m in zip(recs, marks, strict=True) if r["domain"] == d and r["level"] == lv]
            assert report.counts(d, lv) == (sum(sub), len(sub))
    data = report.to_dict()
    assert data["n"] == len(recs) and data["accuracy"] == pytest.approx(sum(marks) / len(recs))
    assert data["domains"]["arithmetic"]["levels"]["1"]["n"] == 3
    json.dumps(data)
    with pytest.raises(TaskError, match="predictions for"):
        score_records(recs, preds[:-1])


def test_table_has_a_row_per_domain_and_a_column_per_level():
    report = EvalReport()
    for lv, ok in ((1, True), (1, False), (3, True)):
        report.add("arithmetic", lv, ok)
    report.add("facts", 2, False)
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["domain", "L1", "L2", "L3", "all", "n"]
    assert lines[2].split() == ["arithmetic", "50.0", "-", "100.0", "66.7", "3"]
    assert lines[3].split() == ["facts", "-", "0.0", "-", "0.0", "1"]
    assert lines[4].split() == ["all", "50.0", "0.0", "100.0", "50.0", "4"]


def test_routing_records(tmp_path):
    recs = _records()
    preds = {"big": [r["answer"] for r in recs], "small": ["0"] * len(recs)}
    rows = routing_records(recs, preds)
    assert len(rows) == len(recs)
    for row, rec in zip(rows, recs, strict=True):
        assert row["id"] == rec["id"] and row["prompt"] == rec["messages"][-1]["content"]
        assert row["scores"]["big"] == 1.0
        assert row["scores"]["small"] == float(rec["answer"] == "0")
        assert row["responses"]["small"] == "0" and row["domain"] == rec["domain"]
    path = write_routing_data(tmp_path / "r.jsonl", recs, preds)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    with pytest.raises(TaskError, match="model 'small'"):
        routing_records(recs, {"small": ["0"]})


def test_evaluate_model_batches_through_the_engine(monkeypatch):
    recs = _records()
    calls = []

    class FakeEngine:
        @classmethod
        def load(cls, path, dtype="bf16"):
            calls.append(("load", str(path), dtype))
            return cls()

        def chat(self, conversations, **sampling):
            calls.append(("chat", len(conversations), sampling["temperature"]))
            # Answer right when the prompt is short, to get a mixed score.
            return [next(r["answer"] for r in recs if r["messages"] == c) if len(c[-1]["content"]) < 12
                    else "?" for c in conversations]

    monkeypatch.setitem(sys.modules, "fleetlm.engine", types.SimpleNamespace(Engine=FakeEngine))
    # A training file (gold assistant turn included) is prompted without the answer.
    trained = [suite.with_answer(r) for r in recs]
    report, preds = evaluate_model("some/model", trained, dtype="f32", batch_size=5, progress=False)
    assert calls[0] == ("load", "some/model", "f32")
    assert [c[1] for c in calls[1:]] == [5, 5, 2] and all(c[2] == 0.0 for c in calls[1:])
    expected = sum(len(r["messages"][-1]["content"]) < 12 for r in recs)
    assert report.counts() == (expected, len(recs)) and len(preds) == len(recs)
    with pytest.raises(TaskError, match="batch size"):
        evaluate_model("some/model", recs, batch_size=0)


def test_real_engine_on_the_shipped_tiny_model():
    from fleetlm.model import SHIPPED_TINY_MODEL

    recs = suite.generate(n=2, seed=0, levels=[1, 2], split="test")
    report, preds = evaluate_model(SHIPPED_TINY_MODEL, recs, dtype="f32", batch_size=4, max_tokens=6,
                                   progress=False)
    # Random weights: accuracy is near zero, so check the bookkeeping, not the score.
    assert len(preds) == len(recs) and all(isinstance(p, str) for p in preds)
    assert report.counts()[1] == len(recs) == 10
    assert report.domains == sorted(suite.DOMAINS) and report.levels == [1, 2]
    for d in suite.DOMAINS:
        assert report.counts(d, 1)[1] == report.counts(d, 2)[1] == 1
    lines = format_table(report).splitlines()
    assert lines[0].split() == ["domain", "L1", "L2", "all", "n"] and len(lines) == 2 + len(suite.DOMAINS) + 1
