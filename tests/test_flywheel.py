"""The flywheel: the contacts domain, the gateway's content log, the from-usage data path, the expert's
training step, and the expert checkpoint loading and serving in the fleet."""

import json

import pytest
import yaml
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.errors import ConfigError
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Choice, Delta, Generation
from fleetlm.serve.store import UsageStore
from fleetlm.train import domain
from fleetlm.train.config import parse_config as parse_train_config
from fleetlm.train.flywheel import distill_from_usage, routing_rows, student_checkpoint
from fleetlm.train.usage import LoggedAnswer, chat_rows, domain_answers, usage_records

QUICK = dict(steps=8, batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1, progress=False, eval_interval=0)


class Teacher:
    """An in-process backend that answers each contacts prompt with its gold JSON (wrapped in a code fence,
    as a chat model often does), and anything else with a fixed sentence."""

    name = "teacher"

    def __init__(self, items):
        self.gold = {i.prompt: i.answer for i in items}

    def _answer(self, req) -> str:
        prompt = req.messages[-1].text()
        return f"```json\n{self.gold[prompt]}\n```" if prompt in self.gold else "I cannot help with that."

    async def chat(self, req):
        return Generation([Choice(0, self._answer(req), "stop")], prompt_tokens=60, completion_tokens=20)

    async def stream_chat(self, req):
        text = self._answer(req)
        for piece in (text[:5], text[5:]):
            yield Delta(0, piece)
        yield Delta(0, None, "stop")
        yield Delta(usage=(60, 20))

    async def aclose(self):
        pass


def serve_traffic(db, items, log_content=True, extra=()):
    """Send each item's prompt (and `extra` prompts) through the gateway to the teacher; the log's URL."""
    url = f"sqlite:///{db}"
    cfg = parse_config({"models": {"teacher": {"remote": "http://unused/v1"}}, "log_content": log_content,
                        "storage": url})
    app = create_app(cfg, UsageStore(url), {"teacher": Teacher(items)})
    with TestClient(app) as client:
        for n, prompt in enumerate([i.prompt for i in items] + list(extra)):
            body = {"model": "teacher", "messages": [{"role": "user", "content": prompt}], "stream": n == 1}
            resp = client.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200
    return db


def test_domain_items_are_seeded_and_splits_never_overlap():
    train, test = domain.generate("train", 40, seed=1), domain.generate("test", 40, seed=1)
    assert [i.message for i in train] == [i.message for i in domain.generate("train", 40, seed=1)]
    assert {i.message for i in train}.isdisjoint({i.message for i in test})
    assert all(domain.split_of(i.message) == "test" for i in test)
    # another seed draws other items, but a test message is still never a train one
    assert {i.message for i in domain.generate("train", 40, seed=2)}.isdisjoint({i.message for i in test})
    item = train[0]
    assert domain.matches(item.prompt) and domain.message_of(item.prompt) == item.message
    assert domain.parse(item.answer) == item.gold


def test_domain_parse_and_score():
    gold = {"name": "Ana Costa", "email": "ana.costa@mail.org", "city": "Lisbon"}
    fenced = '```json\n{"name": "Ana Costa", "email": "ana.costa@mail.org", "city": "Lisbon"}\n```'
    assert domain.score(fenced, gold) == 1.0
    assert domain.score(fenced.replace("Lisbon", "Porto"), gold) == 0.0
    assert domain.parse('{"name": "Ana", "email": "a@b.c"}') is None  # a field missing
    assert domain.parse("no json here") is None
    assert domain.score("{broken", gold) == 0.0
    assert domain.score(fenced, fenced) == 1.0  # against another model's answer text
    with pytest.raises(domain.DomainError):
        domain.domain_module("dates")


def test_gateway_logs_prompts_and_answers_only_when_asked(tmp_path):
    items = domain.generate("train", 3, seed=0)
    db = serve_traffic(tmp_path / "usage.db", items)
    rows = UsageStore(f"sqlite:///{db}").requests()
    assert [json.loads(r["prompt"])[-1]["content"] for r in rows] == [i.prompt for i in items]
    assert [domain.parse(r["response"]) for r in rows] == [i.gold for i in items]  # the streamed one too
    quiet = serve_traffic(tmp_path / "quiet.db", items, log_content=False)
    assert all(r["prompt"] is None and r["response"] is None
               for r in UsageStore(f"sqlite:///{quiet}").requests())
    with pytest.raises(ConfigError, match="log_content"):
        usage_records(quiet, domain)


def test_from_usage_keeps_the_domain_and_drops_held_out_prompts(tmp_path):
    items = domain.generate("train", 4, seed=0) + domain.generate("dev", 2, seed=0)
    held_out = domain.generate("test", 2, seed=0)
    db = serve_traffic(tmp_path / "usage.db", items + held_out, extra=["What is the capital of France?"])
    answers, skipped = usage_records(db, domain)
    assert sorted(a.split for a in answers) == ["dev"] * 2 + ["train"] * 4
    assert skipped["held-out (test split) prompt"] == 2 and skipped["another domain"] == 1
    rows = chat_rows(answers)
    assert all(r["messages"][-1]["role"] == "assistant" and domain.parse(r["messages"][-1]["content"])
               for r in rows)
    assert domain_answers(UsageStore(f"sqlite:///{db}").requests(), domain, model="other")[0] == []


def test_routing_rows_score_the_expert_against_the_teachers_log():
    item = domain.generate("dev", 1, seed=0)[0]
    logged = LoggedAnswer("r1", [{"role": "user", "content": item.prompt}], item.answer, "teacher", "dev")
    right, wrong = routing_rows(domain, [logged, logged], [item.answer, '{"name": "x"}'], "teacher", "expert")
    assert right["scores"] == {"teacher": 1.0, "expert": 1.0}
    assert wrong["scores"] == {"teacher": 1.0, "expert": 0.0}
    assert right["prompt"] == item.prompt and right["domain"] == domain.DOMAIN


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_checkpoint_factory):
    """A tiny student distilled from a gateway log of 24 train and 4 dev prompts."""
    tmp = tmp_path_factory.mktemp("flywheel")
    items = domain.generate("train", 24, seed=0) + domain.generate("dev", 4, seed=0)
    db = serve_traffic(tmp / "usage.db", items)
    student = tiny_checkpoint_factory("llama")
    cfg = parse_train_config({"model": {"init": str(student)}, "data": {"train": "unused", "seq_len": 160},
                              "out_dir": str(tmp / "expert"), **QUICK})
    return distill_from_usage(db, domain, cfg, student=student, expert="tiny-contacts")


def test_training_on_the_log_lowers_the_loss_and_writes_the_expert(trained):
    losses = [h["loss"] for h in trained.train.history]
    assert trained.n_train == 24 and trained.n_dev == 4 and trained.teacher == "teacher"
    assert losses[-1] < losses[0]
    out = trained.expert_dir
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file()
    rows = [json.loads(line) for line in (out / "routing.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and all(set(r["scores"]) == {"teacher", "tiny-contacts"} for r in rows)
    report = json.loads((out / "flywheel.json").read_text())
    assert report["train_examples"] == 24 and report["dev_agreement"] == trained.dev_agreement


def test_the_expert_loads_and_serves_in_the_fleet(trained, tmp_path):
    from fleetlm.engine import Engine
    from fleetlm.serve.backends import build_backends

    engine = Engine.load(str(trained.expert_dir))
    assert engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])  # template came along
    entry = yaml.safe_load((trained.expert_dir / "fleet.yaml").read_text())
    cfg = parse_config({**entry, "storage": f"sqlite:///{tmp_path / 'u.db'}"})
    app = create_app(cfg, UsageStore(cfg.storage_url()), build_backends(cfg))
    with TestClient(app) as client:
        prompt = domain.generate("test", 1, seed=0)[0].prompt
        resp = client.post("/v1/chat/completions", json={
            "model": "tiny-contacts", "max_tokens": 8, "messages": [{"role": "user", "content": prompt}]})
    assert resp.status_code == 200 and resp.headers["x-fleet-model"] == "tiny-contacts"
    assert resp.json()["usage"]["completion_tokens"] > 0


def test_a_gguf_student_becomes_a_checkpoint_with_its_chat_template(smollm2_gguf, tmp_path):
    from fleetlm.model.checkpoint import read_config
    from fleetlm.model.tokenizer import Tokenizer

    out = student_checkpoint(smollm2_gguf, tmp_path)
    assert read_config(out).num_layers == 30
    tok = Tokenizer.from_dir(out)
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert student_checkpoint(smollm2_gguf, tmp_path) == out  # dequantized once


def test_fleet_distill_from_usage_is_one_command(tiny_checkpoint_factory, tmp_path, monkeypatch, capsys):
    from cli_runner import run_main

    items = domain.generate("train", 8, seed=3) + domain.generate("dev", 2, seed=3)
    db = serve_traffic(tmp_path / "usage.db", items)
    student = tiny_checkpoint_factory("llama")
    code, out, err = run_main(monkeypatch, capsys, "distill", "--from-usage", str(db), "--domain", "contacts",
                              "--student", str(student), "--out", str(tmp_path / "exp"), "--steps", "2",
                              "--batch-size", "2", "--seq-len", "160")
    assert code == 0, err
    assert "8 logged answers of teacher" in out and "dev agreement" in out
    assert all((tmp_path / "exp" / name).is_file() for name in ("model.safetensors", "routing.jsonl"))
    code, _, err = run_main(monkeypatch, capsys, "distill", "--from-usage", str(db), "--domain", "dates",
                            "--student", str(student))
    assert code != 0 and "unknown flywheel domain" in err and "Traceback" not in err


def test_a_conversation_logged_twice_trains_once(tmp_path):
    items = domain.generate("train", 3, seed=4)
    db = serve_traffic(tmp_path / "usage.db", items + items[:1])
    answers, skipped = usage_records(db, domain)
    assert len(answers) == 3 and skipped["repeated conversation (the latest answer kept)"] == 1
