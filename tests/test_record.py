import csv
import json

import pytest

from fleetlm.evals.harness import Reply, split_of
from fleetlm.fleet.record import (
    BatchRunner,
    RecordError,
    RecordPlan,
    done_keys,
    meta_path,
    raw_path,
    read_jsonl_any,
    record,
    run_checks,
    task_records,
)

GPT4, MIXTRAL = "gpt-4-1106-preview", "mistralai/Mixtral-8x7B-Instruct-v0.1"


class FakeRunner:
    """Answers every question with "The answer is 7", in reverse order (as a batcher may finish them)."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def run(self, conversations, max_tokens, stop=()):
        for i in reversed(range(len(conversations))):
            self.asked.append(conversations[i][-1]["content"])
            yield i, Reply("3 + 4 = 7\nThe answer is 7", 11, 9, 0.5)


@pytest.fixture
def routellm(tmp_path):
    """A RouteLLM-style folder with 12 GSM8K questions: GPT-4 right on all, Mixtral on the even ones;
    gold is 7 for the first six, 8 for the rest."""
    folder = tmp_path / "routellm" / "gsm8k"
    folder.mkdir(parents=True)
    with (folder / "gsm8k_responses.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", MIXTRAL, GPT4, f"{MIXTRAL}_response", f"{GPT4}_response"])
        for i in range(12):
            gold = 7 if i < 6 else 8
            question = f"Tom has {i} apples and {gold} pears. How many pears does Tom have?"
            w.writerow([question, i % 2 == 0, True, f"#### {gold if i % 2 == 0 else 99}",
                        f"He has {gold} pears.\n#### {gold}"])
    return folder


def test_record_merges_local_and_replayed_outcomes_with_check_verdicts_and_resumes(tmp_path, routellm):
    out = tmp_path / "rec" / "o.jsonl.gz"
    plan = RecordPlan(models=["m1"], benches=["gsm8k"], test_limit=None, train_limit=3, seed=1,
                      gsm8k_data=str(routellm))
    runners = []

    def factory(location, p):
        runners.append(FakeRunner())
        return runners[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("fleetlm.fleet.record.resolve_locations",
                   lambda models: {m: f"/models/{m}" for m in models})
        summary = record(plan, out, log=lambda _: None, runner_factory=factory)
        rows = read_jsonl_any(out)
        n_test = sum(split_of(r["id"]) == "test" for r in rows)
        assert summary["rows"] == len(rows) == n_test + 3
        assert {r["split"] for r in rows} <= {"train", "test"}
        assert all(r["split"] == split_of(r["id"]) for r in rows)
        for r in rows:
            assert set(r["scores"]) == {"m1", "gpt-4-1106-preview@recorded",
                                        "Mixtral-8x7B-Instruct-v0.1@recorded"}
            gold = 7 if int(r["prompt"].split()[2]) < 6 else 8
            assert r["scores"]["m1"] == (1.0 if gold == 7 else 0.0)
            assert r["scores"]["gpt-4-1106-preview@recorded"] == 1.0
            assert r["applicable_checks"] == ["math"]
            assert r["checks"]["m1"][0]["passed"] is True  # 3 + 4 = 7 re-checks, a final number is there
            assert r["tokens"]["m1"] == {"prompt": 11, "completion": 9}
            # the replayed answer's tokens are counted as the replay backend counts them (cl100k)
            assert r["tokens"]["gpt-4-1106-preview@recorded"]["completion"] > 0
        meta = json.loads(meta_path(out).read_text())
        assert meta["prices_usd_per_1m"]["gpt-4-1106-preview@recorded"]["output"] == 30.0
        assert meta["runs"][-1]["train_limit"] == 3
        # a second run finds everything in the raw log: no model is loaded, nothing is asked again
        again = record(plan, out, log=lambda _: None, runner_factory=factory)
        assert again["written"] == 0 and len(runners) == 2  # one per phase in the first run
        # a torn raw log (a killed run) loses only its last line, which is asked again
        raw = raw_path(out)
        lines = raw.read_text().splitlines()
        raw.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
        assert len(done_keys(raw)) == len(lines) - 1
        third = record(plan, out, log=lambda _: None, runner_factory=factory)
        assert third["written"] == 1 and third["rows"] == len(rows)
        assert len(json.loads(meta_path(out).read_text())["runs"]) == 3
        # a later run on another bench merges the whole raw log: GSM8K rows keep the replayed models
        record(RecordPlan(models=["m1"], benches=["tasks"], test_limit=1, train_limit=0, tasks_per_domain=5,
                          gsm8k_data=str(routellm)), out, log=lambda _: None, runner_factory=factory)
        merged = read_jsonl_any(out)
        gsm = [r for r in merged if r["bench"] == "gsm8k"]
        assert len(gsm) == len(rows) and len(merged) == len(rows) + 1
        assert all("gpt-4-1106-preview@recorded" in r["scores"] for r in gsm)


def test_task_records_keep_only_items_both_split_schemes_agree_on():
    records = task_records(30, seed=0)
    assert records
    for r in records:
        assert (r["split"] == "train") == (split_of(r["id"]) == "train")


def test_run_checks_applies_the_code_check_to_a_function_prompt():
    prompt = ("Complete the following Python function.\n```python\ndef add(a, b):\n"
              "    \"\"\"\n    >>> add(2, 3)\n    5\n    \"\"\"\n```\n")
    names, verdicts = run_checks(prompt, "```python\ndef add(a, b):\n    return a - b\n```")
    assert names == ["code"]
    assert verdicts[0]["name"] == "code"
    # the sandbox may be unavailable here; either way a wrong function never passes
    assert verdicts[0]["passed"] is False


def test_unknown_bench_is_one_clear_error(tmp_path):
    with pytest.raises(RecordError, match="unknown nope"):
        record(RecordPlan(models=["m"], benches=["nope"]), tmp_path / "o.jsonl", log=lambda _: None)


def test_batch_runner_answers_every_conversation_once_with_its_token_counts(tiny_llama):
    from fleetlm.engine.generate import GenerationRequest, encode_request

    runner = BatchRunner.load(str(tiny_llama), dtype="f32", batch=2)
    convs = [[{"role": "user", "content": f"Say {w}"}] for w in ("a", "bb", "ccc")]
    got = dict(runner.run(convs, max_tokens=5))
    assert sorted(got) == [0, 1, 2]
    for i, reply in got.items():
        ids = encode_request(runner.engine.tokenizer, GenerationRequest(messages=convs[i], max_tokens=5))
        assert reply.prompt_tokens == len(ids)
        assert 1 <= reply.completion_tokens <= 5
        assert reply.seconds >= 0


def test_a_usage_log_becomes_a_bench_scored_against_the_logged_answers(tmp_path, monkeypatch):
    from fleetlm.fleet.record import usage_benchmark

    monkeypatch.setattr("fleetlm.fleet.record.resolve_locations", lambda models: {m: m for m in models})
    def logged(i, question, answer, status=200, endpoint="chat"):
        return {"request_id": f"r{i}", "endpoint": endpoint, "status": status, "model_used": "big",
                "prompt": json.dumps([{"role": "user", "content": question}]), "response": answer}

    log = tmp_path / "usage.jsonl"
    rows = [logged(0, "Tom has 3 apples and buys 4 more. How many apples does he have in total?", "7 apples"),
            logged(1, "Say hello", "Hello!"),
            logged(2, "Say hello", "Hello there!"),  # the same conversation again: its latest answer counts
            logged(3, "Say bye", "Bye", status=500),  # failed requests are not traffic to learn from
            {**logged(4, "x", "y"), "prompt": None}]  # content not logged
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = usage_benchmark(log)
    assert sorted(it.domain for it in bench.items) == ["general", "math"]
    by_domain = {it.domain: it for it in bench.items}
    assert by_domain["general"].data["reference"] == "Hello there!"
    assert bench.score(by_domain["math"], "3 + 4 = 7\nThe answer is 7", False)[0] == 1.0
    assert bench.score(by_domain["math"], "The answer is 8", False)[0] == 0.0
    assert bench.score(by_domain["general"], "hello   THERE!", False)[0] == 1.0
    # record takes it as one more bench, each item in the harness's split of its id
    out = tmp_path / "u.jsonl"
    summary = record(RecordPlan(models=["m1"], benches=["usage"], train_limit=None, usage_log=str(log)), out,
                     log=lambda _: None, runner_factory=lambda loc, p: FakeRunner())
    got = read_jsonl_any(out)
    assert summary["rows"] == 2 and {r["bench"] for r in got} == {"usage"}
    assert all(r["split"] == split_of(r["id"]) for r in got)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(logged(9, "x", "y", status=500)) + "\n")
    with pytest.raises(RecordError, match="log_content"):
        usage_benchmark(empty)
