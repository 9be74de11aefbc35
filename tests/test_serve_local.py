import asyncio
import json
import threading

import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.model import SHIPPED_TINY_MODEL
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import build_backends
from fleetlm.serve.errors import BackendError
from fleetlm.serve.local import LocalBackend
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest
from fleetlm.serve.store import UsageStore


@pytest.fixture(scope="module")
def backend():
    cfg = parse_config({"models": {"tiny": {"path": str(SHIPPED_TINY_MODEL), "dtype": "f32"}}})
    b = build_backends(cfg)["tiny"]
    assert isinstance(b, LocalBackend)
    yield b
    asyncio.run(b.aclose())


def chat(content="hello", **kw):
    return ChatCompletionRequest(model="tiny", messages=[{"role": "user", "content": content}], **kw)


def test_whole_and_streamed_answers_agree(backend):
    gen = asyncio.run(backend.chat(chat(max_tokens=6, temperature=0)))
    (choice,) = gen.choices
    assert gen.prompt_tokens > 0 and 1 <= gen.completion_tokens <= 6
    assert choice.finish_reason in ("stop", "length")

    async def stream():
        return [d async for d in backend.stream_chat(chat(max_tokens=6, temperature=0))]

    deltas = asyncio.run(stream())
    assert "".join(d.text or "" for d in deltas) == choice.text
    assert deltas[-1].usage == (gen.prompt_tokens, gen.completion_tokens)


def test_concurrent_requests_are_decoded_in_one_batch(backend):
    sizes, gate = [], threading.Event()
    original = backend.engine.generate

    def gated(reqs):
        sizes.append(len(reqs))
        gate.wait(10)
        return original(reqs)

    backend.engine.generate = gated

    async def go():
        first = asyncio.create_task(
            backend.complete(CompletionRequest(model="tiny", prompt="a", max_tokens=3))
        )
        while not sizes:
            await asyncio.sleep(0.01)
        rest = [
            asyncio.create_task(
                backend.complete(CompletionRequest(model="tiny", prompt=f"p{i}", max_tokens=3))
            )
            for i in range(4)
        ]
        await asyncio.sleep(0.2)  # the four wait while the first batch is held
        gate.set()
        return await asyncio.gather(first, *rest)

    try:
        results = asyncio.run(go())
    finally:
        backend.engine.generate = original
    assert sizes == [1, 4]
    assert all(r.completion_tokens >= 1 for r in results)


def test_n_choices_and_seeded_sampling(backend):
    gen = asyncio.run(backend.chat(chat(max_tokens=5, n=2, temperature=1.0, seed=7)))
    assert [c.index for c in gen.choices] == [0, 1]
    again = asyncio.run(backend.chat(chat(max_tokens=5, n=2, temperature=1.0, seed=7)))
    assert [c.text for c in gen.choices] == [c.text for c in again.choices]


def test_a_prompt_too_long_fails_alone(backend):
    async def go():
        bad = backend.complete(CompletionRequest(model="tiny", prompt="x " * 3000, max_tokens=4))
        good = backend.complete(CompletionRequest(model="tiny", prompt="fine", max_tokens=4))
        return await asyncio.gather(bad, good, return_exceptions=True)

    bad, good = asyncio.run(go())
    assert isinstance(bad, BackendError) and bad.upstream_status == 400 and "context" in bad.message
    assert good.completion_tokens >= 1


def test_unsupported_features_are_client_errors(backend):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(BackendError, match="tools") as exc:
        asyncio.run(backend.chat(chat(tools=tools)))
    assert exc.value.upstream_status == 400


def test_gateway_serves_the_local_model(backend, tmp_path):
    cfg = parse_config(
        {"models": {"tiny": {"path": str(SHIPPED_TINY_MODEL), "price": {"input": 1, "output": 1}}}}
    )
    app = create_app(cfg, UsageStore(f"sqlite:///{tmp_path / 'l.db'}"), {"tiny": backend})
    with TestClient(app) as client:
        r = client.post(
            "/v1/chat/completions",
            content=json.dumps(
                {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
            ),
        )
        assert r.status_code == 200 and r.headers["x-fleet-model"] == "tiny"
        usage = r.json()["usage"]
        assert float(r.headers["x-fleet-cost-usd"]) == pytest.approx(usage["total_tokens"] / 1e6)
        r = client.post(
            "/v1/chat/completions",
            content=json.dumps(
                {
                    "model": "tiny",
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "stream": True,
                }
            ),
        )
        assert r.text.rstrip().endswith("data: [DONE]")
