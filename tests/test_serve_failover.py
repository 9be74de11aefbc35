"""Failover mid-stream: a backend that drops, stalls or is slow to start is continued by its fallback in one
uninterrupted stream, the switch logged and sent in a final chunk; abandoned streams pay for what was made."""

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Delta
from fleetlm.serve.errors import BackendError
from fleetlm.serve.store import UsageStore

ANSWER = "one two three four five six seven eight"


class Writer:
    """Streams ANSWER word by word, continuing an assistant-prefilled partial answer; fails as told."""

    def __init__(self, name, *, drop_after=None, stall_after=None, first_delay=0.0, delay=0.0):
        self.name, self.drop_after, self.stall_after = name, drop_after, stall_after
        self.first_delay, self.delay, self.requests = first_delay, delay, []

    async def stream_chat(self, req):
        self.requests.append(req)
        last = req.messages[-1]
        done = last.content.split() if last.role == "assistant" else []
        words = ANSWER.split()[len(done):]
        if self.first_delay:
            await asyncio.sleep(self.first_delay)
        for i, w in enumerate(words):
            if i == self.drop_after:
                raise BackendError(f"{self.name}: connection dropped", retryable=False)
            if i == self.stall_after:
                await asyncio.sleep(30)
            await asyncio.sleep(self.delay)
            yield Delta(0, w + " ")
        yield Delta(0, None, "stop")
        prompt = sum(len((m.content or "").split()) for m in req.messages)
        yield Delta(usage=(prompt, len(words)))

    async def aclose(self):
        pass


def config(**primary):
    return parse_config({"models": {
        "primary": {"remote": "http://127.0.0.1:9/v1", "price": {"input": 1.0, "output": 2.0},
                    "fallbacks": ["backup"], **primary},
        "backup": {"remote": "http://127.0.0.1:9/v1", "price": {"input": 3.0, "output": 5.0}},
    }})


def stream(client, **extra):
    body = {"model": "primary", "stream": True, "messages": [{"role": "user", "content": "count to eight"}],
            "stream_options": {"include_usage": True}, **extra}
    with client.stream("POST", "/v1/chat/completions", content=json.dumps(body)) as r:
        lines = [ln for ln in r.iter_lines() if ln]
        return r, lines


def run(tmp_path, primary, cfg=None):
    store = UsageStore(f"sqlite:///{tmp_path / 'f.db'}")
    backup = Writer("backup")
    app = create_app(cfg or config(), store, {"primary": primary, "backup": backup})
    with TestClient(app) as client:
        r, lines = stream(client)
    return r, lines, store, backup


def text_of(lines):
    events = [json.loads(ln[6:]) for ln in lines if ln != "data: [DONE]"]
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]), events


def test_dropped_stream_is_continued_by_the_fallback(tmp_path):
    r, lines, store, backup = run(tmp_path, Writer("primary", drop_after=3))
    assert r.headers["x-fleet-model"] == "primary"  # the stream had begun on the primary
    text, events = text_of(lines)
    assert text == ANSWER + " " and lines[-1] == "data: [DONE]"
    assert not any("error" in e for e in events)
    # the fallback was handed the partial answer as the start of its reply
    assert backup.requests[0].messages[-1].role == "assistant"
    assert backup.requests[0].messages[-1].content == "one two three "
    meta = events[-1]["fleet"]
    assert meta["failover"][0]["from"] == "primary" and meta["failover"][0]["to"] == "backup"
    assert meta["failover"][0]["after_tokens"] == 3 and "connection dropped" in meta["failover"][0]["error"]
    usage = events[-2]["usage"]
    (row,) = store.requests()
    assert row["status"] == 200 and row["model_used"] == "backup" and row["fallbacks"] == "primary"
    assert "failover primary->backup after 3 tokens" in row["route_reason"]
    assert usage["completion_tokens"] == 8 == row["completion_tokens"]
    # primary: bound on the prompt + 3 tokens at $1/$2; backup: 6 prompt words + 5 words at $3/$5
    from fleetlm.serve.limits import prompt_token_bound
    from fleetlm.serve.protocol import ChatCompletionRequest

    bound = prompt_token_bound(ChatCompletionRequest.model_validate(
        {"model": "primary", "messages": [{"role": "user", "content": "count to eight"}]}))
    expected = (bound * 1 + 3 * 2 + 6 * 3 + 5 * 5) / 1e6
    assert row["cost_usd"] == pytest.approx(expected)


def test_stall_between_tokens_fails_over(tmp_path):
    t0 = time.monotonic()
    r, lines, store, _ = run(tmp_path, Writer("primary", stall_after=2), config(stall_timeout=0.3))
    assert time.monotonic() - t0 < 10
    text, events = text_of(lines)
    assert text == ANSWER + " "
    assert "stall_timeout" in events[-1]["fleet"]["failover"][0]["error"]


def test_time_to_first_token_timeout_falls_back_before_sending(tmp_path):
    r, lines, store, _ = run(tmp_path, Writer("primary", first_delay=5), config(ttft_timeout=0.2))
    assert r.headers["x-fleet-model"] == "backup"
    text, events = text_of(lines)
    assert text == ANSWER + " " and "fleet" not in events[-1]
    (row,) = store.requests()
    assert row["fallbacks"] == "primary" and row["model_used"] == "backup" and row["status"] == 200


def test_no_fallback_left_ends_with_the_error(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path / 'n.db'}")
    app = create_app(config(), store, {"primary": Writer("primary", drop_after=2),
                                       "backup": Writer("backup", drop_after=0)})
    with TestClient(app) as client:
        _, lines = stream(client)
    assert "mid-stream; no fallback could continue" in json.loads(lines[-1][6:])["error"]["message"]
    assert store.requests()[-1]["status"] == 502


def test_abandoned_stream_pays_for_the_tokens_produced(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path / 'a.db'}")
    app = create_app(config(), store, {"primary": Writer("primary", delay=0.05), "backup": Writer("backup")})
    body = {"model": "primary", "stream": True, "messages": [{"role": "user", "content": "count to eight"}]}
    with TestClient(app) as client:
        with client.stream("POST", "/v1/chat/completions", content=json.dumps(body)) as r:
            got = 0
            for ln in r.iter_lines():
                if ln.startswith("data: {"):
                    got += 1
                if got == 3:
                    break
        deadline = time.monotonic() + 5
        while not store.requests() and time.monotonic() < deadline:
            time.sleep(0.05)
    (row,) = store.requests()
    assert row["status"] == 499 and 3 <= row["completion_tokens"] < 8
    assert row["cost_usd"] > 0


def test_abandoned_streams_over_real_sockets_all_leave_a_record(tmp_path):
    """uvicorn + httpx on loopback: 12 clients walk away after 2 pieces of a fast stream; every request
    still has its usage record, priced for what was produced (not $0)."""
    import threading

    import httpx
    import uvicorn

    from fake_openai import UpstreamServer, free_port
    from fleetlm.serve.backends import build_backends

    with UpstreamServer() as up:
        price = {"input": 1.0, "output": 2.0}
        cfg = parse_config({"models": {"echo": {"remote": up.base_url, "price": price}}})
        store = UsageStore(f"sqlite:///{tmp_path / 'r.db'}")
        app = create_app(cfg, store, build_backends(cfg))
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        text = " ".join(f"w{i}" for i in range(40))
        body = {"model": "echo", "stream": True, "messages": [{"role": "user", "content": text}]}

        async def walk_away(client):
            async with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                seen = 0
                async for line in r.aiter_lines():
                    seen += line.startswith("data: {")
                    if seen == 2:
                        break

        async def main():
            async with httpx.AsyncClient(timeout=20) as client:
                await asyncio.gather(*(walk_away(client) for _ in range(12)))

        try:
            asyncio.run(main())
            deadline = time.monotonic() + 10
            while len(store.requests()) < 12 and time.monotonic() < deadline:
                time.sleep(0.1)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
    rows = store.requests()
    assert len(rows) == 12
    assert all(r["completion_tokens"] >= 1 and r["cost_usd"] > 0 for r in rows)
