"""A scripted OpenAI-compatible chat endpoint for the agent tests, served by uvicorn in a thread.

Each model answers from its own script, in order: a string is the assistant's text, a dict is the whole
assistant message (`call(...)` builds one with tool calls), a callable gets the request body and returns
either. Like the gateway it sets `x-fleet-model` and `x-fleet-cost-usd` (tokens x the model's price).
Token counts are word counts. A model with no reply left answers 500, so a test's script mistakes show.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from fake_openai import free_port

_ids = itertools.count(1)


def call(name: str, arguments: Any = None, *more: tuple[str, Any], raw: str | None = None) -> dict:
    """An assistant message calling `name(arguments)` (and then each (name, arguments) in `more`)."""
    calls = [(name, arguments), *more]
    return {"content": None, "tool_calls": [
        {"id": f"call_{next(_ids)}", "type": "function",
         "function": {"name": n, "arguments": raw if raw is not None and i == 0 else json.dumps(a or {})}}
        for i, (n, a) in enumerate(calls)]}


def code(source: str, thought: str = "I will run code.") -> str:
    return f"{thought}\n```python\n{source}\n```"


@dataclass
class Delay:
    """A reply that comes after `seconds`."""

    seconds: float
    reply: Any = "late"


@dataclass
class ScriptedGateway:
    scripts: dict[str, list] = field(default_factory=dict)
    prices: dict[str, float] = field(default_factory=dict)  # USD per token; default 1e-6
    requests: list[dict] = field(default_factory=list)
    answered_as: dict[str, str] = field(default_factory=dict)  # model asked -> x-fleet-model (e.g. auto)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, model: str, *replies: str | dict | Callable | Delay) -> None:
        self.scripts[model] = list(replies)

    def bodies(self, model: str | None = None) -> list[dict]:
        return [b for b in self.requests if model is None or b["model"] == model]

    def _app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.requests.append(body)
            model = body.get("model", "")
            if model not in self.scripts:
                return JSONResponse({"error": {"message": f"model {model!r} not found",
                                               "type": "invalid_request_error"}}, 404)
            if not self.scripts[model]:
                return JSONResponse({"error": {"message": f"no scripted reply left for {model}"}}, 500)
            reply = self.scripts[model].pop(0)
            if isinstance(reply, Delay):
                await asyncio.sleep(reply.seconds)
                reply = reply.reply
            if callable(reply):
                reply = reply(body)
            message = {"role": "assistant", "content": reply} if isinstance(reply, str) else \
                {"role": "assistant", **reply}
            pt = sum(len(str(m.get("content") or "").split()) for m in body.get("messages", []))
            ct = len(str(message.get("content") or "").split()) + \
                len(json.dumps(message.get("tool_calls") or []).split())
            cost = (pt + ct) * self.prices.get(model, 1e-6)
            data = {"id": "chatcmpl-1", "object": "chat.completion", "created": int(time.time()),
                    "model": model, "choices": [{"index": 0, "message": message,
                                 "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
                    "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}}
            headers = {"x-fleet-model": self.answered_as.get(model, model), "x-fleet-cost-usd": f"{cost:.8f}"}
            return JSONResponse(data, headers=headers)

        return app

    def __enter__(self) -> ScriptedGateway:
        self.port = free_port()
        config = uvicorn.Config(self._app(), host="127.0.0.1", port=self.port, log_level="error",
                                lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._thread.start()
        deadline = time.time() + 20
        while not self._server.started:
            if time.time() > deadline or not self._thread.is_alive():
                raise RuntimeError("scripted gateway did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def reset(self) -> None:
        self.scripts.clear()
        self.prices.clear()
        self.requests.clear()
        self.answered_as.clear()
