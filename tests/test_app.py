import json

import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Choice as GenChoice
from fleetlm.serve.backends import Delta, Embeddings, Generation, RouteDecision
from fleetlm.serve.errors import BackendError
from fleetlm.serve.store import UsageStore


class Scripted:
    """An in-process backend: answers `text`, or fails the way it is told to."""

    def __init__(self, name, text="hello world", fail=None):
        self.name, self.text, self.fail, self.calls = name, text, fail, 0

    def _maybe_fail(self):
        self.calls += 1
        if self.fail == "down":
            raise BackendError(f"{self.name} is down")
        if self.fail == "400":
            raise BackendError("context too long", retryable=False, upstream_status=400)

    async def chat(self, req):
        self._maybe_fail()
        return Generation([GenChoice(0, self.text, "stop")], prompt_tokens=1000, completion_tokens=500)

    async def complete(self, req):
        self._maybe_fail()
        return Generation([GenChoice(0, self.text, "length")], prompt_tokens=10, completion_tokens=2)

    async def stream_chat(self, req):
        self._maybe_fail()
        for w in self.text.split():
            yield Delta(0, w + " ")
        if self.fail == "midway":
            raise BackendError("died midway", retryable=False)
        yield Delta(0, None, "stop")
        yield Delta(usage=(1000, 500))

    async def stream_complete(self, req):
        self._maybe_fail()
        yield Delta(0, self.text, "length")
        yield Delta(usage=(10, 2))

    async def embed(self, req):
        self._maybe_fail()
        return Embeddings([[1.0, 0.0]] * len(req.texts()), prompt_tokens=4)

    async def aclose(self):
        pass


class FixedRouter:
    name = "auto"

    def route(self, request):
        return RouteDecision("cheap", "short prompt", predicted_quality=0.91)


CONFIG = {
    "models": {
        "cheap": {
            "remote": "http://127.0.0.1:9/v1",
            "price": {"input": 1.0, "output": 2.0},
            "aliases": ["c"],
        },
        "big": {
            "remote": "http://127.0.0.1:9/v1",
            "price": {"input": 10.0, "output": 30.0},
            "fallbacks": ["cheap"],
        },
        "down": {"remote": "http://127.0.0.1:9/v1", "fallbacks": ["big"]},
        "dead": {"remote": "http://127.0.0.1:9/v1"},
        "strict": {"remote": "http://127.0.0.1:9/v1"},
        "midway": {"remote": "http://127.0.0.1:9/v1"},
    },
    "router": {"name": "auto"},
    "max_body_bytes": 10_000,
}


@pytest.fixture
def gw(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path / 'g.db'}")
    backends = {
        "cheap": Scripted("cheap"),
        "big": Scripted("big", "big answer"),
        "down": Scripted("down", fail="down"),
        "dead": Scripted("dead", fail="down"),
        "strict": Scripted("strict", fail="400"),
        "midway": Scripted("midway", "a b c", fail="midway"),
    }
    app = create_app(parse_config(CONFIG), store, backends, router=FixedRouter())
    with TestClient(app) as client:
        yield client, store, backends


def post(client, body, path="/v1/chat/completions", **kw):
    return client.post(path, content=json.dumps(body) if not isinstance(body, bytes) else body, **kw)


def chat(model="cheap", **kw):
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **kw}


def test_health_and_models(gw):
    client, _, _ = gw
    assert client.get("/health").json()["status"] == "ok"
    ids = [m["id"] for m in client.get("/v1/models").json()["data"]]
    assert ids == ["cheap", "big", "down", "dead", "strict", "midway", "all-MiniLM-L6-v2", "auto"]
    assert client.get("/v1/models/c").json()["id"] == "cheap"
    assert client.get("/v1/models/nope").status_code == 404


def test_chat_answer_headers_cost_and_log(gw):
    client, store, _ = gw
    r = post(client, chat("c"))
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "c"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hello world"}
    assert body["usage"] == {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
    # 1000 prompt tokens at $1/M + 500 completion tokens at $2/M
    assert r.headers["x-fleet-model"] == "cheap" and float(r.headers["x-fleet-cost-usd"]) == pytest.approx(
        0.002
    )
    assert r.headers["x-fleet-route"] == "alias:c"
    (row,) = store.requests()
    assert row["model_requested"] == "c" and row["model_used"] == "cheap" and row["status"] == 200
    assert row["cost_usd"] == pytest.approx(0.002) and row["latency_ms"] > 0
    assert row["request_id"] == r.headers["x-request-id"]


def test_router_is_a_virtual_model(gw):
    client, store, _ = gw
    r = post(client, chat("auto"))
    assert r.headers["x-fleet-model"] == "cheap" and r.headers["x-fleet-route"] == "router:short prompt"
    assert store.requests()[-1]["predicted_quality"] == pytest.approx(0.91)


def test_fallback_answers_when_a_backend_fails_and_says_so(gw):
    client, store, backends = gw
    r = post(client, chat("down"))
    assert r.status_code == 200 and r.headers["x-fleet-model"] == "big"
    assert "fallback from down" in r.headers["x-fleet-route"]
    assert r.json()["choices"][0]["message"]["content"] == "big answer"
    assert store.requests()[-1]["fallbacks"] == "down"


def test_no_backend_left_is_503_and_client_errors_pass_through(gw):
    client, store, _ = gw
    r = post(client, chat("dead"))
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_backend_available"
    r = post(client, chat("strict"))
    assert r.status_code == 400 and "context too long" in r.json()["error"]["message"]
    assert [row["status"] for row in store.requests()] == [503, 400]


def test_streaming_chat_ends_with_done_and_usage(gw):
    client, store, _ = gw
    with client.stream(
        "POST",
        "/v1/chat/completions",
        content=json.dumps(chat(stream=True, stream_options={"include_usage": True})),
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert (
        "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "hello world "
    )
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == 1500
    row = store.requests()[-1]
    assert row["stream"] == 1 and row["status"] == 200 and row["ttft_ms"] is not None
    assert row["cost_usd"] == pytest.approx(0.002)


def test_streaming_falls_back_before_the_first_byte_and_reports_midway_errors(gw):
    client, store, _ = gw
    with client.stream("POST", "/v1/chat/completions", content=json.dumps(chat("down", stream=True))) as r:
        assert r.headers["x-fleet-model"] == "big"
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    with client.stream("POST", "/v1/chat/completions", content=json.dumps(chat("midway", stream=True))) as r:
        lines = [ln for ln in r.iter_lines() if ln]
    assert "died midway" in lines[-1] and json.loads(lines[-1][6:])["error"]["message"] == "died midway"
    assert store.requests()[-1]["status"] == 502


def test_completions_and_embeddings(gw):
    client, _, _ = gw
    r = post(client, {"model": "cheap", "prompt": "x"}, "/v1/completions")
    assert r.json()["choices"][0] == {"index": 0, "text": "hello world", "finish_reason": "length"}
    r = post(client, {"model": "cheap", "prompt": "x", "stream": True}, "/v1/completions")
    assert r.text.rstrip().endswith("data: [DONE]") and '"text_completion"' in r.text
    r = post(client, {"model": "cheap", "input": ["a", "b"]}, "/v1/embeddings")
    assert [d["embedding"] for d in r.json()["data"]] == [[1.0, 0.0], [1.0, 0.0]]
    assert float(r.headers["x-fleet-cost-usd"]) == pytest.approx(4 / 1e6)


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b"{nope", 400, "not valid JSON"),
        (b'{"model": "cheap", "messages": [{"role": "user", "content": "\xc3\x28"}]}', 400, "UTF-8"),
        (json.dumps(chat(max_tokens=-5)).encode(), 400, "max_tokens"),
        (json.dumps(chat(temperature="hot")).encode(), 400, "temperature"),
        (json.dumps(chat("gpt-17")).encode(), 404, "gpt-17"),
        (json.dumps(chat(messages=[{"role": "user", "content": "x" * 20_000}])).encode(), 413, "limit"),
    ],
)
def test_bad_requests_get_openai_errors(gw, body, status, fragment):
    client, _, _ = gw
    r = post(client, body)
    assert r.status_code == status
    err = r.json()["error"]
    assert fragment in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_chunked_huge_body_is_413(gw):
    client, _, _ = gw

    def chunks():
        for _ in range(20):
            yield b"x" * 1000

    r = client.post("/v1/chat/completions", content=chunks())
    assert r.status_code == 413


def test_unknown_route_and_method_are_json_errors(gw):
    client, _, _ = gw
    assert client.get("/v1/nothing").json()["error"]["type"] == "not_found"
    assert client.get("/v1/chat/completions").status_code == 405


def test_keys_budgets_and_rpm(gw):
    client, store, _ = gw
    _, secret = store.create_key("t", budget_usd=0.003, rpm=3)
    assert post(client, chat()).status_code == 401  # a key exists, so keys are now required
    assert post(client, chat(), headers={"authorization": "Bearer wrong"}).status_code == 401
    auth = {"authorization": f"Bearer {secret}"}
    assert post(client, chat(), headers=auth).status_code == 200  # spends $0.002
    assert post(client, chat(), headers=auth).status_code == 200  # $0.004: over budget now
    r = post(client, chat(), headers=auth)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    r = post(client, chat(), headers=auth)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"  # 4th in a minute


def test_router_name_without_a_router_is_503(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path / 'g.db'}")
    app = create_app(parse_config(CONFIG), store, {n: Scripted(n) for n in CONFIG["models"]})
    with TestClient(app) as client:
        assert post(client, chat("auto")).status_code == 503


WEIRD = [None, -1, 0, 2**63, -1e308, 1e308, 0.5, "", "x" * 3000, "\ud800", [], {}, [1], [{}], {"a": 1}, True]
FIELDS = {
    "/v1/chat/completions": (
        chat(),
        [
            "model",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "n",
            "stop",
            "seed",
            "stream",
            "stream_options",
            "tools",
            "tool_choice",
            "response_format",
            "logprobs",
            "top_logprobs",
            "user",
        ],
    ),
    "/v1/completions": (
        {"model": "cheap", "prompt": "x"},
        ["model", "prompt", "max_tokens", "n", "logprobs", "echo", "stream", "stop", "suffix"],
    ),
    "/v1/embeddings": ({"model": "cheap", "input": "x"}, ["model", "input", "encoding_format", "dimensions"]),
}


@pytest.mark.parametrize("path", list(FIELDS))
def test_no_field_value_makes_a_500(gw, path):
    """A small deterministic fuzzer: every field gets every odd value (and goes missing); never a 5xx."""
    client, _, _ = gw
    base, fields = FIELDS[path]
    seen = set()
    for name in fields:
        for value in [*WEIRD, "DELETE"]:
            body = dict(base)
            if value == "DELETE":
                body.pop(name, None)
            else:
                body[name] = value
            if name == "messages" and isinstance(value, list) and value:
                body[name] = [{"role": "user", "content": v} for v in WEIRD]  # odd contents too
            r = client.post(path, content=json.dumps(body))
            assert r.status_code < 500, (name, value, r.status_code, r.text[:200])
            assert "error" in r.json() if r.status_code >= 400 else True
            seen.add(r.status_code)
    assert 200 in seen and 400 in seen


def test_a_client_that_leaves_a_whole_answer_cancels_it(tmp_path):
    import time

    import httpx

    from fake_openai import UpstreamServer, serving
    from fleetlm.serve.backends import build_backends

    with UpstreamServer() as upstream:
        upstream.slow_seconds = 3.0
        cfg = parse_config({"models": {"slow": {"remote": upstream.base_url, "remote_model": "slow",
                                                "retries": 0}}})
        store = UsageStore(f"sqlite:///{tmp_path / 'u.db'}")
        with serving(create_app(cfg, store, build_backends(cfg)), "gateway") as port:
            body = {"model": "slow", "messages": [{"role": "user", "content": "hi"}]}
            left = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
                httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=0.5)
            while not store.requests() and time.monotonic() - left < 2.5:
                time.sleep(0.05)
            seen = time.monotonic() - left
    (row,) = store.requests()
    # logged as 499 well before the upstream's 3 s answer: the gateway stopped waiting for it
    assert row["status"] == 499 and row["error"] == "client went away" and seen < 2.5
