"""Test helper for /v1/responses: a scripted chat backend that answers text and/or tool calls, whole or
streamed in OpenAI's chunk shape, fails mid-stream on demand, or streams forever until it is closed."""

from __future__ import annotations

import asyncio
import io

from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Choice, Delta, Generation
from fleetlm.serve.errors import BackendError
from fleetlm.serve.store import UsageStore
from rag_fakes import bag_of_words

DOCS = {
    "cats.txt": "A cat purrs when it is content and sleeps on the sofa.",
    "tides.txt": "Tides rise and fall twice a day because of the moon.",
}


class ScriptBackend:
    """Answers `script`'s entries in turn ({"text": ..., "calls": [(name, arguments)]}), then "ok"."""

    name = "m"

    def __init__(self):
        self.script: list[dict] = []
        self.requests: list = []
        self.fail_after: int | None = None  # a stream raises after this many pieces
        self.endless = False  # a stream that never ends by itself
        self.closed = 0  # streams closed (by their end or by the gateway)

    def reset(self) -> None:
        self.script, self.requests, self.fail_after, self.endless, self.closed = [], [], None, False, 0

    def _next(self, req) -> tuple[str | None, list[tuple[str, str]]]:
        self.requests.append(req)
        entry = self.script.pop(0) if self.script else {"text": "ok"}
        return entry.get("text"), list(entry.get("calls", []))

    def messages(self, i: int = -1) -> list[dict]:
        return [m.model_dump(exclude_none=True) for m in self.requests[i].messages]

    async def chat(self, req):
        text, calls = self._next(req)
        tool_calls = [{"id": f"call_{k}", "type": "function", "function": {"name": n, "arguments": a}}
                      for k, (n, a) in enumerate(calls)] or None
        return Generation([Choice(0, text, "tool_calls" if calls else "stop", tool_calls)],
                          prompt_tokens=7, completion_tokens=2)

    async def stream_chat(self, req):
        text, calls = self._next(req)
        sent = 0
        try:
            while self.endless:
                await asyncio.sleep(0.01)
                yield Delta(0, "more ")
            for word in (text or "").split(" ") if text else []:
                if self.fail_after is not None and sent >= self.fail_after:
                    raise BackendError("m: the connection dropped", retryable=True)
                sent += 1
                yield Delta(0, word + " ")
            for k, (name, arguments) in enumerate(calls):
                yield Delta(0, tool_calls=[{"index": k, "id": f"call_{k}", "type": "function",
                                            "function": {"name": name, "arguments": ""}}])
                half = len(arguments) // 2
                for piece in (arguments[:half], arguments[half:]):
                    yield Delta(0, tool_calls=[{"index": k, "function": {"arguments": piece}}])
            yield Delta(0, None, "tool_calls" if calls else "stop")
            yield Delta(usage=(7, 2))
        finally:
            self.closed += 1

    async def aclose(self):
        pass


def make_app(root, backend, **extra):
    config = parse_config({
        "models": {"m": {"remote": "http://127.0.0.1:9/v1", "aliases": ["house"]}},
        "knowledge": {"files_dir": str(root / "blobs")},
        **extra,
    })
    app = create_app(config, UsageStore(f"sqlite:///{root / 'fleet.db'}"), {"m": backend})
    app.state.gateway.knowledge_embed = bag_of_words  # no MiniLM: the tests are about shapes
    return app


def connect(tc):
    import openai

    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)


def served_app(root, backend, **extra):
    """A TestClient on the app, with the two DOCS files in a vector store: (tc, client, vs, files)."""
    tc = TestClient(make_app(root, backend, **extra))
    tc.__enter__()
    client = connect(tc)
    files = {name: client.files.create(file=(name, io.BytesIO(text.encode())), purpose="assistants")
             for name, text in DOCS.items()}
    vs = client.vector_stores.create(name="kb")
    client.vector_stores.file_batches.create_and_poll(
        vector_store_id=vs.id, file_ids=[f.id for f in files.values()], poll_interval_ms=50
    )
    return tc, client, vs, files
