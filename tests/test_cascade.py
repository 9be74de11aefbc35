"""The gateway's cascade with checks: the cheapest model answers, real checks judge it, or it escalates."""

import csv
import json

import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.errors import ConfigError
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Choice, Delta, Generation, build_backends
from fleetlm.serve.errors import BackendError
from fleetlm.serve.routing import build_router, prompt_text
from fleetlm.serve.store import UsageStore

APPLES = "Tom has 3 apples and buys 4 more. How many apples does he have?"
RIGHT = "He has 3 + 4 = 7 apples.\n#### 7"
SLIP = "He has 3 + 4 = 8 apples.\n#### 8"  # the calculator catches 3 + 4 = 8

CODE_PROMPT = '''def add_one(xs: list) -> list:
    """Add one to every element.
    >>> add_one([1, 2])
    [2, 3]
    >>> add_one([])
    []
    """
'''
GOOD_CODE = "```python\ndef add_one(xs: list) -> list:\n    return [x + 1 for x in xs]\n```"
BAD_CODE = "```python\ndef add_one(xs: list) -> list:\n    return [x + 2 for x in xs]\n```"


class Fake:
    """An in-process backend answering by a rule; it remembers how many answers each call asked for."""

    def __init__(self, name, answer):
        self.name, self.answer, self.asked = name, answer, []

    def _gen(self, req):
        self.asked.append(req.n)
        texts = self.answer(prompt_text(req), req.n)
        texts = texts if isinstance(texts, list) else [texts] * req.n
        return Generation([Choice(i, t, "stop") for i, t in enumerate(texts)], prompt_tokens=100,
                          completion_tokens=50 * len(texts))

    async def chat(self, req):
        return self._gen(req)

    async def complete(self, req):
        return self._gen(req)

    async def stream_chat(self, req):
        gen = self._gen(req)
        for word in (gen.choices[0].text or "").split(" "):
            yield Delta(0, word + " ")
        yield Delta(0, None, "stop")
        yield Delta(usage=(gen.prompt_tokens, gen.completion_tokens))

    stream_complete = stream_chat

    async def embed(self, req):
        raise AssertionError("not used")

    async def aclose(self):
        pass


PRICES = {"cheap": (1.0, 2.0), "mid": (3.0, 6.0), "strong": (10.0, 30.0)}


def gateway(tmp_path, answers, router, **models_extra):
    models = {name: {"remote": "http://127.0.0.1:9/v1", "price": {"input": i, "output": o}}
              for name, (i, o) in PRICES.items() if name in answers}
    models.update(models_extra)
    cfg = parse_config({"models": models, "router": {"name": "auto", "kind": "cascade", **router}})
    store = UsageStore(f"sqlite:///{tmp_path / 'u.db'}")
    backends = {name: Fake(name, fn) for name, fn in answers.items()}
    backends.update({k: v for k, v in build_backends(cfg).items() if k not in backends})
    client = TestClient(create_app(cfg, store, backends))
    return client, store, backends


def chat(client, content, **kw):
    body = {"model": "auto", "messages": [{"role": "user", "content": content}], **kw}
    return client.post("/v1/chat/completions", content=json.dumps(body))


def streamed_text(response) -> str:
    pieces = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    return "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p.get("choices"))


def cost(model, prompt=100, completion=50):
    i, o = PRICES[model]
    return (prompt * i + completion * o) / 1e6


def test_a_wrong_cheap_answer_escalates_and_both_attempts_are_shown_and_paid(tmp_path):
    client, store, backends = gateway(
        tmp_path, {"cheap": lambda p, n: SLIP, "strong": lambda p, n: RIGHT},
        {"checks": ["math"], "models": ["cheap", "strong"]},
    )
    with client:
        r = chat(client, APPLES)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == RIGHT
    route = r.headers["x-fleet-route"]
    assert route.startswith("router:cascade[math]: cheap rejected (math failed: arithmetic does not re-check")
    assert route.endswith("> strong kept (last, unchecked)")
    assert r.headers["x-fleet-model"] == "strong"
    attempts = r.json()["fleet"]["attempts"]
    assert [(a["model"], a["kept"]) for a in attempts] == [("cheap", False), ("strong", True)]
    assert attempts[0]["checks"][0]["name"] == "math" and attempts[0]["checks"][0]["passed"] is False
    row = store.requests()[-1]
    assert row["checks"] == attempts and row["route_reason"] == route
    assert row["cost_usd"] == pytest.approx(cost("cheap") + cost("strong"))  # the rejected answer is paid
    assert float(r.headers["x-fleet-cost-usd"]) == pytest.approx(cost("cheap") + cost("strong"))
    assert len(backends["cheap"].asked) == len(backends["strong"].asked) == 1


def test_a_right_cheap_answer_is_kept_without_asking_the_strong_model(tmp_path):
    client, store, backends = gateway(
        tmp_path, {"cheap": lambda p, n: RIGHT, "strong": lambda p, n: RIGHT}, {"checks": ["math"]}
    )
    with client:
        r = chat(client, APPLES)
    assert r.headers["x-fleet-model"] == "cheap" and backends["strong"].asked == []
    assert r.headers["x-fleet-route"] == (
        "router:cascade[math]: cheap kept (math passed: final 7 (marked); 1 equation re-checked)"
    )
    assert store.requests()[-1]["cost_usd"] == pytest.approx(cost("cheap"))


def test_a_three_model_ladder_climbs_step_by_step(tmp_path):
    client, store, backends = gateway(
        tmp_path,
        {"cheap": lambda p, n: "I do not know.", "mid": lambda p, n: RIGHT, "strong": lambda p, n: RIGHT},
        {"checks": ["math", "code"]},  # no models: the ladder goes by price
    )
    with client:
        r = chat(client, APPLES)
    assert r.headers["x-fleet-model"] == "mid" and backends["strong"].asked == []
    route = r.headers["x-fleet-route"]
    assert "cheap rejected (math failed: no final number) > mid kept (math passed" in route
    assert store.requests()[-1]["cost_usd"] == pytest.approx(cost("cheap") + cost("mid"))


def test_the_code_check_runs_the_prompts_examples(tmp_path):
    pytest.importorskip("fleetlm.sandbox")
    client, store, backends = gateway(
        tmp_path, {"cheap": lambda p, n: BAD_CODE, "strong": lambda p, n: GOOD_CODE}, {"checks": ["code"]}
    )
    with client:
        r = chat(client, CODE_PROMPT)
        assert r.headers["x-fleet-model"] == "strong"
        assert "cheap rejected (code failed: failed 1/2 prompt examples: add_one([1, 2]) gave [3, 4]" in (
            r.headers["x-fleet-route"])
        backends["cheap"].answer = lambda p, n: GOOD_CODE
        kept = chat(client, CODE_PROMPT)
    assert kept.headers["x-fleet-model"] == "cheap"
    assert "code passed: passed 2/2 prompt examples" in kept.headers["x-fleet-route"]
    seconds = store.requests()[-1]["checks"][0]["checks"][0]["seconds"]
    assert seconds > 0  # checks that run code report their own time (excluded from router overhead)


def test_json_answers_must_match_the_requested_schema(tmp_path):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    client, _, _ = gateway(
        tmp_path, {"cheap": lambda p, n: '{"n": "seven"}', "strong": lambda p, n: '{"n": 7}'},
        {"checks": ["json", "math"]},
    )
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": schema}}
    with client:
        r = chat(client, APPLES, response_format=fmt)
    assert r.json()["choices"][0]["message"]["content"] == '{"n": 7}'
    assert "cascade[json]: cheap rejected (json failed: n: 'seven' is not of type 'integer')" in (
        r.headers["x-fleet-route"])


def test_a_streamed_cascade_buffers_the_checked_answer(tmp_path):
    client, store, _ = gateway(
        tmp_path, {"cheap": lambda p, n: RIGHT, "strong": lambda p, n: "strong answer #### 7"},
        {"checks": ["math"]},
    )
    with client:
        kept = chat(client, APPLES, stream=True)
        assert "cheap kept" in kept.headers["x-fleet-route"]
        assert streamed_text(kept) == RIGHT
    (tmp_path / "b").mkdir()
    client, store, _ = gateway(
        tmp_path / "b", {"cheap": lambda p, n: SLIP, "strong": lambda p, n: "strong answer #### 7"},
        {"checks": ["math"]},
    )
    with client:
        escalated = chat(client, APPLES, stream=True)
    assert escalated.headers["x-fleet-model"] == "strong"
    assert streamed_text(escalated) == "strong answer #### 7 " and "data: [DONE]" in escalated.text
    row = store.requests()[-1]
    assert row["stream"] == 1 and [a["model"] for a in row["checks"]] == ["cheap", "strong"]
    assert row["cost_usd"] == pytest.approx(cost("cheap") + cost("strong"))


def test_a_step_that_cannot_answer_passes_the_request_up_the_ladder(tmp_path):
    def down(p, n):
        raise BackendError("mid is down")

    client, store, _ = gateway(
        tmp_path, {"cheap": lambda p, n: SLIP, "mid": down, "strong": lambda p, n: RIGHT},
        {"checks": ["math"]},
    )
    with client:
        r = chat(client, APPLES)
    assert r.status_code == 200 and r.headers["x-fleet-model"] == "strong"
    assert "> mid failed (no model could serve the request: mid is down) > strong kept" in (
        r.headers["x-fleet-route"])
    assert [a["model"] for a in store.requests()[-1]["checks"]] == ["cheap", "mid", "strong"]


def test_no_applicable_check_keeps_or_escalates_as_configured(tmp_path):
    answers = {"cheap": lambda p, n: "a joke", "strong": lambda p, n: "a better joke"}
    client, store, _ = gateway(tmp_path, answers, {"checks": ["math"]})
    with client:
        r = chat(client, "Tell me a joke.")
    assert r.headers["x-fleet-model"] == "cheap"
    assert r.headers["x-fleet-route"] == "router:cascade: no configured check applies: cheap answers"
    assert store.requests()[-1]["checks"] is None
    (tmp_path / "b").mkdir()
    client, _, _ = gateway(tmp_path / "b", answers, {"checks": ["math"], "unchecked": "escalate"})
    with client:
        assert chat(client, "Tell me a joke.").headers["x-fleet-model"] == "strong"


def test_two_math_samples_must_agree_and_both_are_paid(tmp_path):
    client, store, backends = gateway(
        tmp_path,
        {"cheap": lambda p, n: ["3 + 4 = 7\n#### 7", "4 + 3 = 7 so\n#### 9"][:n],
         "strong": lambda p, n: RIGHT},
        {"checks": ["math"], "math_samples": 2},
    )
    with client:
        r = chat(client, APPLES)
    assert backends["cheap"].asked == [2] and backends["strong"].asked == [1]
    assert "samples disagree: 7 vs 9" in r.headers["x-fleet-route"]
    assert len(r.json()["choices"]) == 1
    assert store.requests()[-1]["cost_usd"] == pytest.approx(cost("cheap", 100, 100) + cost("strong"))


def write_gpt4_recording(tmp_path):
    """A RouteLLM-style folder in which GPT-4 answered APPLES right."""
    folder = tmp_path / "rec"
    (folder / "gsm8k").mkdir(parents=True)
    with (folder / "gsm8k" / "gsm8k_responses.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "gpt-4-1106-preview", "gpt-4-1106-preview_response"])
        w.writerow([APPLES, "True", "3 + 4 = 7\n#### 7"])
    return folder


def test_a_recorded_frontier_model_as_the_top_of_the_ladder(tmp_path):
    folder = write_gpt4_recording(tmp_path)
    client, store, _ = gateway(
        tmp_path, {"cheap": lambda p, n: SLIP}, {"checks": ["math"], "models": ["cheap", "gpt4"]},
        gpt4={"replay": str(folder), "replay_model": "gpt-4-1106-preview"},
    )
    with client:
        r = chat(client, APPLES)
    body = r.json()
    assert body["model"] == "gpt-4-1106-preview@recorded" and body["fleet"]["recorded"]["correct"] is True
    route = r.headers["x-fleet-route"]
    assert route.endswith("gpt4 kept (last, unchecked); recorded: gpt-4-1106-preview@recorded")
    row = store.requests()[-1]
    assert row["recorded"] == 1 and row["checks"][1]["recorded"] is True


def test_a_recorded_top_rung_without_a_recording_is_left_out(tmp_path):
    folder = write_gpt4_recording(tmp_path)
    client, _, backends = gateway(
        tmp_path, {"cheap": lambda p, n: BAD_CODE, "strong": lambda p, n: GOOD_CODE},
        {"checks": ["code", "math"], "models": ["cheap", "strong", "gpt4"]},
        gpt4={"replay": str(folder), "replay_model": "gpt-4-1106-preview"},
    )
    with client:
        r = chat(client, CODE_PROMPT)  # GPT-4 holds no recording of it: strong is the top rung
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == GOOD_CODE
    route = r.headers["x-fleet-route"]
    assert "cheap rejected" in route and route.endswith("strong kept (last, unchecked)")
    assert "gpt4" not in route and backends["strong"].asked == [1]


def test_checks_need_a_cascade_and_no_fitted_path():
    models = {"a": {"remote": "http://h/v1"}}
    with pytest.raises(ConfigError, match="router.checks needs kind cascade"):
        parse_config({"models": models, "router": {"kind": "mlp", "checks": ["math"]}})
    with pytest.raises(ConfigError, match="either checks or a fitted router"):
        parse_config({"models": models, "router": {"kind": "cascade", "checks": ["math"], "path": "/r"}})
    with pytest.raises(ConfigError, match="checks is empty"):
        parse_config({"models": models, "router": {"kind": "cascade", "checks": []}})
    cfg = parse_config({"models": {"b": {"remote": "http://h/v1", "price": {"output": 5}},
                                   "a": {"remote": "http://h/v1", "price": {"output": 1}}},
                        "router": {"kind": "cascade", "checks": ["code"]}})
    assert build_router(cfg).ladder == ["a", "b"]


def test_a_real_small_model_answers_first_and_its_answer_is_checked(tmp_path, smollm2_gguf):
    """SmolLM2-135M through the llama.cpp backend, then a recorded GPT-4: whatever the small model says, the
    math check judges it and the gateway keeps or escalates accordingly."""
    pytest.importorskip("llama_cpp")
    folder = write_gpt4_recording(tmp_path)
    cfg = parse_config({
        "models": {
            "smol": {"gguf": str(smollm2_gguf), "engine": "llama_cpp",
                     "price": {"input": 0.01, "output": 0.02}},
            "gpt4": {"replay": str(folder), "replay_model": "gpt-4-1106-preview"},
        },
        "router": {"name": "auto", "kind": "cascade", "checks": ["math"], "models": ["smol", "gpt4"]},
    })
    store = UsageStore(f"sqlite:///{tmp_path / 'u.db'}")
    with TestClient(create_app(cfg, store, build_backends(cfg))) as client:
        r = chat(client, APPLES, max_tokens=40, temperature=0)
    assert r.status_code == 200
    first = r.json()["fleet"]["attempts"][0]
    assert first["model"] == "smol" and first["checks"][0]["name"] == "math"
    if first["kept"]:
        assert r.headers["x-fleet-model"] == "smol" and first["checks"][0]["passed"]
    else:
        assert r.headers["x-fleet-model"] == "gpt4"
        assert r.json()["choices"][0]["message"]["content"] == "3 + 4 = 7\n#### 7"
        assert store.requests()[-1]["cost_usd"] > first["cost_usd"] > 0
