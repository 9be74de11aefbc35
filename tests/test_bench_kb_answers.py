"""bench/kb_answers.py's parts: the answer judge on real labelled questions, the seeded spread sample, the
arguments, and scoring / printing / plotting of kept arms (no model, no corpus)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench_scripts import bench_script
from fleetlm.rag.labelled import Question, load_questions


@pytest.fixture(scope="module")
def bench():
    with bench_script("kb_answers", on_path=True) as module:
        yield module


@pytest.fixture(scope="module")
def questions() -> dict[str, Question]:
    return {q.id: q for q in load_questions()}


@pytest.mark.parametrize(("qid", "reply", "correct"), [
    ("q025", "Use `copy.deepcopy(obj)` to copy nested lists.", True),  # the key identifier, qualified
    ("q025", "Call deepcopy() from the copy module.", True),  # its last part alone is distinctive
    ("q025", "Use copy.copy(obj), a shallow copy.", False),
    ("q031", "Pass `frozen = True` to the @dataclass decorator.", True),  # spaces around '=' do not matter
    ("q031", "Pass frozen=False.", False),
    ("q075", "The argument is sort_keys.", True),  # a keyword argument with _ counts by its name
    ("q075", "Pass sort_keys=False.", False),
    ("q075", "Pass sort_keys=True.", True),
    ("q011", "collections.ChainMap groups several mappings.", True),
    ("q011", "a chainmap", False),  # a capitalised key matches case-sensitively
    ("q083", "Call logger.exception('failed') inside the except block.", True),
    ("q083", "Log an exception with logger.error(msg, exc_info=True).", False),  # the question says except
    ("q215", "Use zip(questions, answers) in the for loop.", True),
    ("q215", "Zip them together.", False),  # a short name counts only when written as code
    ("q119", "Pass re.I as the flags argument.", True),  # an alternative of 're.IGNORECASE / re.I'
    ("q119", "I would pass a flag.", False),  # a one-letter key needs its qualified form
    ("q117", "random.normalvariate(mu, sigma) is the one", True),
    ("q117", "random.gauss(mu, sigma)", False),  # an alternative the question itself names
    ("q177", "It is monotonic: the clock cannot go backwards.", True),  # phrase: its content words
    ("q177", "It returns seconds as a float.", False),
    ("q195", "Use the ** operator, e.g. 2 ** 10.", True),
    ("q195", "Use the **pow** function.", False),  # markdown bold is not the operator
    ("q225", "Put an __init__.py file in the directory.", True),
    ("q225", "Add a setup.py.", False),
    ("q065", "The smallest element is the root of the heap.", False),  # 'heap' is only the question's word
    ("q065", "It is heap[0].", True),
])
def test_judge_on_labelled_questions(bench, questions, qid, reply, correct):
    verdict = bench.judge(questions[qid], reply)
    assert verdict.correct is correct, verdict.rule


def test_key_identifiers_and_alternatives(bench):
    keys = {k.name: k for k in bench.key_identifiers("os.path.getmtime()", "When was the file last changed?")}
    assert list(keys) == ["getmtime"] and not keys["getmtime"].strict
    (auto,) = bench.key_identifiers("enum.auto", "Which enum helper assigns values automatically?")
    assert auto.strict and auto.full == "enum.auto"
    assert bench.key_identifiers("it cannot go backwards", "Why use monotonic()?") == []
    assert bench.alternatives("'>' (or '!')") == [">", "!"]
    assert bench.alternatives("re.VERBOSE / re.X") == ["re.VERBOSE", "re.X"]
    assert bench.flatten("“x”  `a = b` **bold**") == '"x" a=b bold'


def test_sample_is_spread_seeded_and_stable(bench, questions):
    qs = list(questions.values())
    a = bench.sample_questions(qs, 100, seed=0)
    assert len(a) == 100 and len({q.id for q in a}) == 100
    assert [q.id for q in a] == [q.id for q in bench.sample_questions(qs, 100, seed=0)]  # deterministic
    b = bench.sample_questions(qs, 100, seed=1)
    assert [q.id for q in a] != [q.id for q in b]
    # evenly spread: one question per stride of len/n, so consecutive picks are at most two strides apart
    positions = [qs.index(q) for q in a]
    gaps = [y - x for x, y in zip(positions, positions[1:], strict=False)]
    assert positions == sorted(positions) and max(gaps) <= 6
    assert 30 <= sum(q.lexical for q in a) <= 70
    assert bench.sample_questions(qs, 10_000, seed=0) == qs


def test_arguments_and_their_errors(bench):
    args = bench.parse_args([])
    assert args.arms == list(bench.DEFAULT_ARMS) and args.limit == 100 and args.k == 3
    assert bench.parse_args(["--arms", "1.5b+fs,1.5b+fs,0.5b"]).arms == ["1.5b+fs", "0.5b"]
    for bad in (["--arms", "7b"], ["--arms", ","], ["--limit", "0"], ["--k", "0"], ["--k", "11"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def _kept(arm: str, fs: bool, answers: list[dict]) -> dict:
    return {"arm": arm, "model": f"model-{arm}", "file_search": fs, "answers": answers}


def test_scoring_table_and_plot(bench, questions, tmp_path, capsys):
    q1, q2 = questions["q025"], questions["q011"]
    with_fs = _kept("0.5b+fs", True, [
        {"id": q1.id, "reply": "copy.deepcopy()", "cited": [q1.passage_id], "retrieved": [q1.passage_id],
         "seconds": 1.0, "input_tokens": 900, "output_tokens": 10, "cost_usd": 0.0005},
        {"id": q2.id, "reply": "ChainMap", "cited": ["other#x"], "retrieved": ["other#x", q2.passage_id],
         "seconds": 3.0, "input_tokens": 800, "output_tokens": 12, "cost_usd": 0.0015}])
    without = _kept("1.5b", False, [
        {"id": q1.id, "reply": "Use copy.copy", "seconds": 2.0, "input_tokens": 40, "output_tokens": 30,
         "cost_usd": 0.004},
        {"id": q2.id, "error": "APITimeoutError: timed out", "seconds": 600.0, "cost_usd": 0.0}])
    rows = [bench.score_arm(k, questions) for k in (with_fs, without)]
    fs, no = rows
    assert fs["accuracy"] == 1.0 and fs["gold_cited_of_correct"] == 0.5 and fs["gold_retrieved"] == 1.0
    assert fs["cost_per_answer_usd"] == pytest.approx(0.001) and fs["latency_p50_s"] == 2.0
    assert no["accuracy"] == 0.0 and no["errors"] == 1 and no["gold_cited_of_correct"] is None
    assert no["verdicts"]["q011"] == [False, "error"]
    bench.print_table(rows)
    bench.print_claim(rows)
    out = capsys.readouterr().out
    assert "0.5b+fs vs 1.5b: +100.0 points, cost ratio 0.50" in out and "50.0%" in out
    bench.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 1000


class FakeClient:
    """Answers /v1/responses like the gateway (a file_search_call, then a message citing a file); the
    usage log is a list it appends to."""

    def __init__(self, log: list[dict], fail: str = ""):
        self.log, self.fail, self.asked = log, fail, []
        self.responses = SimpleNamespace(create=self.create)

    def create(self, *, model, input, tools=None, **_):
        self.asked.append((model, input, bool(tools)))
        if input == self.fail:
            raise TimeoutError("timed out")
        self.log.append({"endpoint": "responses", "model_used": model, "status": 200, "cost_usd": 0.25})
        note = SimpleNamespace(type="file_citation", file_id="file-gold")
        message = SimpleNamespace(type="message", content=[SimpleNamespace(text="copy.deepcopy()",
                                                                           annotations=[note])])
        search = SimpleNamespace(type="file_search_call", results=[SimpleNamespace(file_id="file-gold")])
        return SimpleNamespace(output=[search, message] if tools else [message],
                               usage=SimpleNamespace(input_tokens=100, output_tokens=5))


def test_ask_arms_take_turns_save_and_resume(bench, questions):
    log: list[dict] = []
    usage = SimpleNamespace(requests=lambda since: log)
    sample = [questions[f"q{n:03d}"] for n in range(1, 13)]
    order = bench.ask_order(sample)
    assert [q.id for q in order[:3]] == ["q001", "q005", "q009"]
    assert sorted(order, key=lambda q: q.id) == sample
    manifest = {"store_id": "vs_1", "by_file": {"file-gold": questions["q025"].passage_id}}
    args = bench.parse_args([])
    saved: list[tuple[str, int]] = []
    warm_up = [(bench.MEDIUM, bench.WARM_UP.question, True), (bench.LARGE, bench.WARM_UP.question, False)]
    client = FakeClient(log, fail=questions["q005"].question)
    arms = [{"arm": "0.5b+fs", "answers": []}, {"arm": "1.5b", "answers": []}]
    bench.ask_arms(client, usage, arms, sample[:6], manifest, args,
                   lambda k: saved.append((k["arm"], len(k["answers"]))), block=2)
    assert saved == [("0.5b+fs", 2), ("1.5b", 2), ("0.5b+fs", 4), ("1.5b", 4), ("0.5b+fs", 6), ("1.5b", 6)]
    assert client.asked[:2] == warm_up  # one untimed request per arm first, not kept
    turns = [(m, fs) for m, _, fs in client.asked[2:6]]
    assert turns == [(bench.MEDIUM, True)] * 2 + [(bench.LARGE, False)] * 2
    by_id = {a["id"]: a for a in arms[0]["answers"]}
    assert by_id["q001"]["retrieved"] == [questions["q025"].passage_id] and by_id["q001"]["cost_usd"] == 0.25
    assert "TimeoutError" in by_id["q005"]["error"] and by_id["q005"]["cost_usd"] == 0.0
    assert "retrieved" in arms[1]["answers"][0] and arms[1]["answers"][0]["retrieved"] == []
    client.asked.clear()
    bench.ask_arms(client, usage, arms[:1], sample, manifest, args, lambda k: None)  # only the new ones
    assert len(client.asked) == 1 + 6 and len(arms[0]["answers"]) == 12
    kept = {**arms[0], "model": bench.MEDIUM, "file_search": True}
    row = bench.score_arm(kept, questions, {"q001", "q025"})
    assert row["n"] == 1 and row["errors"] == 0
