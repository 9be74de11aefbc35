"""The router as a virtual model: fitted routers loaded from `fleet route fit` dirs, decided per request."""

import json
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.errors import ConfigError
from fleetlm.route.data import RouteRow
from fleetlm.route.routers import make_router
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Choice, Delta, Generation
from fleetlm.serve.embeddings import shared_minilm
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest
from fleetlm.serve.routing import build_router, prompt_text
from fleetlm.serve.store import UsageStore

EASY = "Which king ruled {n} lands?"
HARD = "Solve x^2 + {n}x = {m} for x."
APPLES = "Tom has {a} apples and buys {b} more. How many apples does he have?"


def cheap_answer(prompt: str) -> str:
    """The cheap model's answer to an apples prompt: right unless a + b is a multiple of 3 (then a slip)."""
    words = prompt.split()
    a, b = int(words[2]), int(words[6])
    claimed = a + b + (2 if (a + b) % 3 == 0 else 0)
    return f"He has {a} + {b} = {claimed} apples.\n#### {claimed}"


class Model:
    """An in-process backend: answers by a rule, counts its calls."""

    def __init__(self, name, answer=None):
        self.name, self.answer, self.calls = name, answer or (lambda p: f"{name} says hi"), 0

    def _text(self, req):
        self.calls += 1
        return self.answer(prompt_text(req))

    async def chat(self, req):
        return Generation([Choice(0, self._text(req), "stop")], prompt_tokens=10, completion_tokens=5)

    async def complete(self, req):
        return Generation([Choice(0, self._text(req), "stop")], prompt_tokens=10, completion_tokens=5)

    async def stream_chat(self, req):
        for word in self._text(req).split(" "):
            yield Delta(0, word + " ")
        yield Delta(0, None, "stop")
        yield Delta(usage=(10, 5))

    stream_complete = stream_chat

    async def embed(self, req):
        raise AssertionError("not used")

    async def aclose(self):
        pass


MODELS = {
    "weak": {"remote": "http://127.0.0.1:9/v1", "price": {"input": 1.0, "output": 1.0}, "aliases": ["w"]},
    "strong": {"remote": "http://127.0.0.1:9/v1", "price": {"input": 10.0, "output": 30.0}},
}


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    import os

    os.environ["FLEETLM_EMBED_CACHE"] = str(tmp_path_factory.mktemp("emb"))  # fit never writes to ~/.cache
    return shared_minilm().load()


@pytest.fixture(scope="module")
def knn_dir(tmp_path_factory, embedder):
    """A knn router fit on prompts where both models solve the easy kind and only strong the hard one."""
    rows = []
    for i in range(20):
        rows.append(RouteRow(f"e{i}", EASY.format(n=i), {"weak": 1.0, "strong": 1.0}))
        rows.append(RouteRow(f"h{i}", HARD.format(n=i, m=3 * i), {"weak": 0.0, "strong": 1.0}))
    router = make_router("knn", k=5, prior=0.5)
    router.embedder = embedder
    return router.fit(rows).save(tmp_path_factory.mktemp("knn"))


@pytest.fixture(scope="module")
def cascade_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(120):
        a, b = int(rng.integers(2, 60)), int(rng.integers(2, 60))
        prompt = APPLES.format(a=a, b=b)
        answer = cheap_answer(prompt)
        rows.append(
            RouteRow(
                f"a{i}",
                prompt,
                {"weak": float((a + b) % 3 != 0), "strong": 1.0},
                responses={"weak": answer, "strong": f"#### {a + b}"},
            )
        )
    router = make_router("cascade", cheap="weak", use_embedding=False).fit(rows)
    return router.save(tmp_path_factory.mktemp("cascade"))


def gateway(tmp_path, router: dict, **models):
    cfg = parse_config({"models": MODELS, "router": router})
    backends = {"weak": Model("weak", models.get("weak")), "strong": Model("strong", models.get("strong"))}
    store = UsageStore(f"sqlite:///{tmp_path / 'u.db'}")
    return TestClient(create_app(cfg, store, backends)), store, backends


def ask(client, prompt, model="auto", **kw):
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], **kw}
    return client.post("/v1/chat/completions", json=body)


def test_fitted_router_sends_hard_prompts_to_the_strong_model_and_logs_why(tmp_path, knn_dir):
    client, store, _ = gateway(tmp_path, {"kind": "knn", "path": str(knn_dir), "quality_floor": 0.9})
    with client:
        easy = ask(client, EASY.format(n=77))
        hard = ask(client, HARD.format(n=77, m=231))
        # a prompt in the system message does not count: the last user message is routed
        hard2 = client.post(
            "/v1/chat/completions",
            json={
                "model": "auto",
                "messages": [
                    {"role": "system", "content": EASY.format(n=1)},
                    {"role": "user", "content": HARD.format(n=78, m=234)},
                ],
            },
        )
    assert easy.status_code == hard.status_code == 200
    assert easy.headers["x-fleet-model"] == "weak" and hard.headers["x-fleet-model"] == "strong"
    assert hard2.headers["x-fleet-model"] == "strong"
    route = easy.headers["x-fleet-route"]
    assert route.startswith("router:knn: weak q=") and "floor 0.9" in route
    rows = store.requests()
    assert [r["model_used"] for r in rows] == ["weak", "strong", "strong"]
    assert all(r["model_requested"] == "auto" and 0 <= r["predicted_quality"] <= 1 for r in rows)
    assert rows[0]["route_reason"] == route
    # a completion is routed on its prompt
    with client:
        r = client.post("/v1/completions", json={"model": "auto", "prompt": HARD.format(n=79, m=237)})
    assert r.status_code == 200 and r.headers["x-fleet-model"] == "strong"


def test_calibrated_threshold_decides_when_its_floor_is_the_configured_one(tmp_path, knn_dir):
    cal_dir = tmp_path / "cal"
    shutil.copytree(knn_dir, cal_dir)
    cal = {"threshold": 0.3, "floor": 0.9, "confidence": 0.9, "strong": "strong", "weak": "weak"}
    (cal_dir / "calibration.json").write_text(json.dumps(cal))
    client, _, _ = gateway(tmp_path, {"kind": "knn", "path": str(cal_dir), "quality_floor": 0.9})
    with client:
        easy, hard = ask(client, EASY.format(n=55)), ask(client, HARD.format(n=55, m=165))
    assert (easy.headers["x-fleet-model"], hard.headers["x-fleet-model"]) == ("weak", "strong")
    assert "calibrated floor 0.9 at 90%" in hard.headers["x-fleet-route"]
    # a threshold no signal reaches keeps everything on the weak model
    (cal_dir / "calibration.json").write_text(json.dumps({**cal, "threshold": 5.0}))
    client, _, _ = gateway(tmp_path, {"kind": "knn", "path": str(cal_dir), "quality_floor": 0.9})
    with client:
        assert ask(client, HARD.format(n=55, m=165)).headers["x-fleet-model"] == "weak"
    # calibrated for another floor: not used, the plain floor rule decides
    client, _, _ = gateway(tmp_path, {"kind": "knn", "path": str(cal_dir), "quality_floor": 0.8})
    with client:
        r = ask(client, HARD.format(n=55, m=165))
    assert r.headers["x-fleet-model"] == "strong" and "calibrated" not in r.headers["x-fleet-route"]


def test_traffic_floor_uses_the_calibrated_price_weight_else_the_mean_quality_margin(tmp_path, knn_dir):
    spec = {"kind": "knn", "path": str(knn_dir), "quality_floor": 0.9, "floor_scope": "traffic"}
    # no tradeoff.json: the margin is (1 - 0.9) x strong's mean quality (1.0) = 0.1 of the best prediction
    client, _, _ = gateway(tmp_path, spec)
    with client:
        easy, hard = ask(client, EASY.format(n=55)), ask(client, HARD.format(n=55, m=165))
    assert (easy.headers["x-fleet-model"], hard.headers["x-fleet-model"]) == ("weak", "strong")
    assert "traffic floor 0.9: within 0.100" in hard.headers["x-fleet-route"]
    # a calibrated price weight: large enough that the price gap outweighs any quality gap -> weak
    weighted = tmp_path / "weighted"
    shutil.copytree(knn_dir, weighted)
    tradeoff = {"lam": 5.0, "floor": 0.9, "strongest": "strong", "quality": 0.9, "strongest_quality": 1.0,
                "cost_share": 0.1}
    (weighted / "tradeoff.json").write_text(json.dumps(tradeoff))
    client, _, _ = gateway(tmp_path, {**spec, "path": str(weighted)})
    with client:
        r = ask(client, HARD.format(n=55, m=165))
    assert r.headers["x-fleet-model"] == "weak" and "5.000 x relative price" in r.headers["x-fleet-route"]
    (weighted / "tradeoff.json").write_text(json.dumps({**tradeoff, "lam": 0.0}))
    client, _, _ = gateway(tmp_path, {**spec, "path": str(weighted)})
    with client:
        assert ask(client, HARD.format(n=55, m=165)).headers["x-fleet-model"] == "strong"
    # a router saved without mean qualities cannot keep a traffic floor: a clear startup error
    bare = tmp_path / "bare"
    shutil.copytree(knn_dir, bare)
    meta = json.loads((bare / "router.json").read_text())
    meta.pop("mean_quality")
    (bare / "router.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="mean quality"):
        build_router(parse_config({"models": MODELS, "router": {**spec, "path": str(bare)}}),
                     embedder=lambda t: None)


def test_cheapest_and_strongest_need_no_fitted_router(tmp_path):
    for kind, expected in (("cheapest", "weak"), ("strongest", "strong")):
        client, store, _ = gateway(tmp_path, {"kind": kind})
        with client:
            r = ask(client, "anything")
        assert (
            r.headers["x-fleet-model"] == expected
            and r.headers["x-fleet-route"] == f"router:{kind}: {expected}"
        )
        assert store.requests()[-1]["predicted_quality"] is None


def test_budget_keeps_the_average_spend_near_the_budget(knn_dir, embedder):
    spec = {"kind": "knn", "path": str(knn_dir), "budget_usd_per_1k": 3.0}
    router = build_router(parse_config({"models": MODELS, "router": spec}), embedder=embedder)
    req = ChatCompletionRequest(model="auto", messages=[{"role": "user", "content": HARD.format(n=9, m=27)}])
    costs = router.estimated_costs(req, prompt_text(req))
    picks = [router.route(req).model for _ in range(300)]
    spent = np.mean([costs[router.candidates.index(m)] for m in picks[100:]])
    # strong alone would cost ~2.6x the budget: lambda settles where the mix spends about the budget
    assert costs[router.candidates.index("strong")] > 2 * 3e-3 > 3e-3 > costs[router.candidates.index("weak")]
    assert {"weak", "strong"} <= set(picks[100:]) and 0.7 * 3e-3 < spent < 1.3 * 3e-3
    assert "budget $3/1k" in router.route(req).reason


def test_cascade_keeps_a_checked_answer_and_escalates_a_wrong_one(tmp_path, cascade_dir):
    client, store, backends = gateway(
        tmp_path,
        {"kind": "cascade", "path": str(cascade_dir), "quality_floor": 0.8},
        weak=cheap_answer,
        strong=lambda p: "#### the strong answer",
    )
    right, wrong = APPLES.format(a=10, b=12), APPLES.format(a=10, b=14)  # 22 and 24: the slip is on 24
    with client:
        kept = ask(client, right)
        escalated = ask(client, wrong)
    assert kept.headers["x-fleet-model"] == "weak" and "router:kept cascade" in kept.headers["x-fleet-route"]
    assert kept.json()["choices"][0]["message"]["content"] == cheap_answer(right)
    assert escalated.headers["x-fleet-model"] == "strong"
    assert escalated.headers["x-fleet-route"].startswith("router:escalated from weak: cascade")
    assert escalated.json()["choices"][0]["message"]["content"] == "#### the strong answer"
    assert (backends["weak"].calls, backends["strong"].calls) == (2, 1)
    # the rejected cheap answer is paid for too: 10 in + 5 out at weak's and at strong's prices
    weak_cost, strong_cost = (10 + 5) / 1e6, (10 * 10 + 5 * 30) / 1e6
    assert float(escalated.headers["x-fleet-cost-usd"]) == pytest.approx(weak_cost + strong_cost)
    rows = store.requests()
    assert (
        rows[-1]["cost_usd"] == pytest.approx(weak_cost + strong_cost) and rows[-1]["model_used"] == "strong"
    )
    assert rows[-1]["predicted_quality"] is not None and "escalated" in rows[-1]["route_reason"]


def test_cascade_does_not_review_a_fallbacks_answer(tmp_path, cascade_dir):
    from fleetlm.serve.errors import BackendError

    def down(prompt):
        raise BackendError("weak is down")

    models = {**MODELS, "weak": {**MODELS["weak"], "fallbacks": ["strong"]}}
    cfg = parse_config(
        {"models": models, "router": {"kind": "cascade", "path": str(cascade_dir), "quality_floor": 0.8}}
    )
    backends = {"weak": Model("weak", down), "strong": Model("strong", lambda p: "#### 7")}
    client = TestClient(create_app(cfg, UsageStore(f"sqlite:///{tmp_path / 'u.db'}"), backends))
    with client:
        r = ask(client, APPLES.format(a=3, b=4))
    assert r.status_code == 200 and r.headers["x-fleet-model"] == "strong"
    assert r.headers["x-fleet-route"] == "router:cascade: weak answers first; fallback from weak"
    assert backends["strong"].calls == 1  # answered once, not reviewed and escalated to itself


def test_cascade_streams_the_kept_or_the_escalated_answer(tmp_path, cascade_dir):
    client, _, _ = gateway(
        tmp_path,
        {"kind": "cascade", "path": str(cascade_dir), "quality_floor": 0.8},
        weak=cheap_answer,
        strong=lambda p: "strong streams this",
    )

    def stream(prompt):
        body = {
            "model": "auto",
            "messages": [{"role": "user", "content": prompt}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = [ln for ln in r.iter_lines() if ln]
            model = r.headers["x-fleet-model"]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(ln[6:]) for ln in lines[:-1]]
        text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert events[-1]["usage"]["total_tokens"] == 15
        return model, text

    with client:
        right, wrong = APPLES.format(a=3, b=4), APPLES.format(a=3, b=6)
        assert stream(right) == ("weak", cheap_answer(right))
        assert stream(wrong) == ("strong", "strong streams this ")


def test_router_refuses_embeddings_and_names_resolve_through_aliases(tmp_path, knn_dir):
    client, _, _ = gateway(
        tmp_path, {"kind": "knn", "path": str(knn_dir), "quality_floor": 0.9, "models": ["w", "strong"]}
    )
    with client:
        r = client.post("/v1/embeddings", json={"model": "auto", "input": "x"})
        assert r.status_code == 400 and "router" in r.json()["error"]["message"]
        assert ask(client, EASY.format(n=3)).headers["x-fleet-model"] == "weak"


def test_bad_router_configs_fail_at_startup(tmp_path, knn_dir):
    def build(router, models=MODELS):
        return build_router(parse_config({"models": models, "router": router}), embedder=lambda t: None)

    with pytest.raises(ConfigError, match="needs router.path"):
        build({"kind": "mlp"})
    assert build_router(parse_config({"models": MODELS, "router": {"kind": "mlp"}}), missing_ok=True) is None
    with pytest.raises(ConfigError, match="no router.json"):
        build({"kind": "knn", "path": str(tmp_path)})
    other = {"a": MODELS["weak"], "b": MODELS["strong"]}
    with pytest.raises(ConfigError, match="none of which is a candidate"):
        build({"kind": "knn", "path": str(knn_dir)}, other)
    (tmp_path / "calibration.json").write_text("{}")
    shutil.copy(knn_dir / "router.json", tmp_path)
    shutil.copy(knn_dir / "arrays.npz", tmp_path)
    with pytest.raises(ConfigError, match="calibration"):
        build({"kind": "knn", "path": str(tmp_path)})


def test_prompt_text_reads_the_last_user_message_or_the_prompt():
    chat = ChatCompletionRequest(
        model="auto",
        messages=[
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "reply"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
            {"role": "tool", "content": "tool output", "tool_call_id": "t"},
        ],
    )
    assert prompt_text(chat) == "second"
    assert prompt_text(CompletionRequest(model="auto", prompt=["p1", "p2"])) == "p1"


def test_an_agent_step_kind_goes_to_its_configured_model(tmp_path):
    spec = {"kind": "cheapest", "step_models": {"plan": "strong"}}
    client, _, _ = gateway(tmp_path, spec)
    with client:
        planned = client.post("/v1/chat/completions", json={
            "model": "auto", "fleet_step": "plan", "messages": [{"role": "user", "content": "a plan"}]})
        acted = client.post("/v1/chat/completions", json={
            "model": "auto", "fleet_step": "action", "messages": [{"role": "user", "content": "an action"}]})
    assert planned.headers["x-fleet-model"] == "strong"
    assert "plan step: strong" in planned.headers["x-fleet-route"]
    assert acted.headers["x-fleet-model"] == "weak"  # a kind with no rule: the router's own choice
    with pytest.raises(ConfigError, match="not a model of the fleet"):
        build_router(parse_config({"models": MODELS, "router": {"kind": "cheapest",
                                                                "step_models": {"plan": "nope"}}}))
