import json
from collections import Counter

import pytest

from fleetlm.tasks import suite
from fleetlm.tasks.base import TaskError


def test_same_seed_same_records_other_seed_other_records():
    a = suite.generate(n=30, seed=5)
    assert a == suite.generate(n=30, seed=5)
    b = suite.generate(n=30, seed=6)
    assert [r["id"] for r in a] != [r["id"] for r in b]


def test_counts_spread_over_levels_and_every_record_is_well_formed():
    recs = suite.generate(n=24, seed=0)
    per = Counter((r["domain"], r["level"]) for r in recs)
    assert per[("arithmetic", 1)] == 4 and per[("classification", 3)] == 8
    assert Counter(r["domain"] for r in recs) == {d: 24 for d in suite.DOMAINS}
    for r in recs:
        assert set(r) >= {"id", "domain", "level", "split", "kind", "check", "messages", "answer"}
        assert r["split"] == "train" and r["messages"][-1]["role"] == "user" and r["answer"]
        assert r["id"] == suite.task_id(r["domain"], r["messages"][-1]["content"])
        json.dumps(r)


def test_splits_never_overlap_whatever_the_seed():
    questions = {}
    for split, seed in (("train", 1), ("dev", 2), ("test", 3)):
        recs = suite.generate(n=120, seed=seed, split=split)
        assert all(r["split"] == split for r in recs)
        questions[split] = {(r["domain"], r["messages"][-1]["content"]) for r in recs}
        assert len(questions[split]) == len(recs)  # unique within a split too
    assert not questions["train"] & questions["dev"]
    assert not questions["train"] & questions["test"]
    assert not questions["dev"] & questions["test"]


def test_split_shares_follow_the_hash():
    recs = suite.generate(n=600, seed=0, split="all", domains=["arithmetic", "strings"], levels=[5, 6])
    share = Counter(r["split"] for r in recs)
    assert 0.75 < share["train"] / len(recs) < 0.85
    assert 0.06 < share["test"] / len(recs) < 0.14
    assert all(suite.split_of(r["domain"], r["messages"][-1]["content"]) == r["split"] for r in recs)


def test_small_question_spaces_yield_fewer_records_not_a_hang():
    # 1-digit arithmetic has 300 questions, about 30 of them in test.
    recs = suite.generate(domains=["arithmetic"], levels=[1], n=200, split="test", max_tries=50)
    assert 10 < len(recs) < 60
    dup = suite.generate(domains=["arithmetic"], levels=[1], n=200, split="test", unique=False)
    assert len(dup) == 200


def test_levels_filter_system_message_and_errors():
    recs = suite.generate(domains=["strings", "classification"], levels=[2, 3], n=10,
                          system="Answer briefly.")
    assert {r["level"] for r in recs} == {2, 3}
    assert all(r["messages"][0] == {"role": "system", "content": "Answer briefly."} for r in recs)
    with pytest.raises(TaskError, match="unknown domain"):
        suite.generate(domains=["poetry"])
    with pytest.raises(TaskError, match="unknown split"):
        suite.generate(split="validation")
    with pytest.raises(TaskError, match="none of levels"):
        suite.generate(domains=["classification"], levels=[6])
    hard = suite.generate(levels=[5, 6], n=4)  # all domains: classification (levels 1-3) sits out
    assert {r["domain"] for r in hard} == set(suite.DOMAINS) - {"classification"}
    with pytest.raises(TaskError, match="no domain has levels"):
        suite.generate(levels=[9])
    assert suite.parse_levels("1,3-5") == [1, 3, 4, 5] and suite.parse_levels("") is None
    with pytest.raises(TaskError, match="bad --levels"):
        suite.parse_levels("one")


def test_jsonl_round_trip_and_bad_files(tmp_path):
    recs = suite.generate(n=5, seed=0)
    path = suite.write_jsonl(recs, tmp_path / "sub" / "t.jsonl")
    assert suite.read_jsonl(path) == recs
    with pytest.raises(TaskError, match="data file not found"):
        suite.read_jsonl(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(TaskError, match="lacks answer, domain"):
        suite.read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "bad2.jsonl").write_text("{nope\n")
    with pytest.raises(TaskError, match=":1: not valid JSON"):
        suite.read_jsonl(tmp_path / "bad2.jsonl")


def test_write_documents(tmp_path):
    path = suite.write_documents(tmp_path / "docs", world_seed=0, level=2)
    docs = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(docs) == len(list((tmp_path / "docs").glob("*.txt")))
    first = (tmp_path / "docs" / f"{docs[0]['id']}.txt").read_text()
    assert docs[0]["title"] in first and docs[0]["text"] in first


def test_answers_become_the_assistant_turn_and_are_stripped_for_prompting():
    plain = suite.generate(domains=["arithmetic"], n=4, seed=2)
    trained = suite.generate(domains=["arithmetic"], n=4, seed=2, answers=True)
    for p, t in zip(plain, trained, strict=True):
        assert t["messages"] == p["messages"] + [{"role": "assistant", "content": p["answer"]}]
        assert suite.prompt_messages(t) == p["messages"] and suite.prompt_messages(p) == p["messages"]
        assert suite.with_answer(t) == t  # idempotent
