"""A small OpenAI-compatible upstream for tests, served by uvicorn in a thread on a loopback port.

Its behaviour depends on the model asked for: "broken" always answers 500, "flaky" fails its first
`flaky_failures` calls, "badreq" answers 400, "slow" sleeps `slow_seconds`, "midfail" breaks mid-stream,
"toolcall" answers (not streamed) with the message `tool_script(request body)` returns (content and/or
tool_calls), or without a script calls the request's first tool with no arguments; any other model echoes
the last user message. Token counts are word counts, so tests can check costs.
"scripted" answers what `Upstream.script(messages)` says for the conversation so far (text and/or tool
calls), whole or streamed as OpenAI streams it (tool calls as deltas): a planner for agent-loop tests.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class Upstream:
    port: int = 0
    calls: Counter = field(default_factory=Counter)
    payloads: list = field(default_factory=list)
    headers: list = field(default_factory=list)
    flaky_failures: int = 1
    slow_seconds: float = 2.0
    # "scripted": messages so far -> {"content": str | None, "tool_calls": [{"name", "arguments": dict}]}
    script: Callable[[list[dict]], dict] | None = None
    tool_script: Callable[[dict], dict] | None = None  # "toolcall": request body -> the assistant message

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def _words(text: str) -> int:
    return len(text.split())


def _text(content: str | list | None) -> str:
    """A message's text: a string, or the text parts of a list of content parts."""
    if isinstance(content, list):
        return " ".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return content or ""


def _app(up: Upstream) -> FastAPI:
    app = FastAPI()

    async def gate(request: Request) -> tuple[dict, JSONResponse | None]:
        body = await request.json()
        model = body.get("model", "")
        up.calls[model] += 1
        up.payloads.append(body)
        up.headers.append(dict(request.headers))
        if model == "broken" or (model == "flaky" and up.calls[model] <= up.flaky_failures):
            return body, JSONResponse(
                {"error": {"message": "upstream exploded", "type": "server_error"}}, 500
            )
        if model == "badreq":
            return body, JSONResponse(
                {"error": {"message": "context too long", "type": "invalid_request_error"}}, 400
            )
        if model == "slow":
            await asyncio.sleep(up.slow_seconds)
        return body, None

    def chat_reply(body: dict) -> tuple[str, int]:
        msgs = body.get("messages", [])
        last = next((m.get("content") or "" for m in reversed(msgs) if m.get("role") == "user"), "")
        prompt_tokens = sum(_words(m.get("content") or "") for m in msgs)
        return f"echo: {last}", prompt_tokens

    def sse(events: list[dict], fail_midway: bool) -> StreamingResponse:
        async def gen():
            for i, e in enumerate(events):
                if fail_midway and i == 2:
                    yield 'data: {"error": {"message": "died mid-stream"}}\n\n'
                    return
                yield f"data: {json.dumps(e)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    def tool_message(body: dict) -> dict:
        if up.tool_script is not None:
            return {"role": "assistant", "content": None, **up.tool_script(body)}
        tools = body.get("tools") or []
        if not tools:
            return {"role": "assistant", "content": "no tools to call"}
        call = {"id": "call_1", "type": "function",
                "function": {"name": tools[0]["function"]["name"], "arguments": "{}"}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}

    def scripted(body: dict) -> dict | StreamingResponse:
        assert up.script is not None, 'the "scripted" model needs Upstream.script'
        msgs = body.get("messages", [])
        step = up.script(msgs)
        content = step.get("content")
        n = up.calls["scripted"]
        calls = [
            {"id": f"call_{n}_{i}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"])}}
            for i, c in enumerate(step.get("tool_calls") or [])
        ]
        finish = "tool_calls" if calls else "stop"
        pt = sum(_words(_text(m.get("content"))) for m in msgs)
        ct = _words(content or "") + sum(_words(c["function"]["arguments"]) for c in calls)
        usage = {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}
        base = {"id": f"up-s{n}", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            message = {"role": "assistant", "content": content, **({"tool_calls": calls} if calls else {})}
            return {**base, "object": "chat.completion", "usage": usage,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}]}

        def chunk(delta: dict, finish_reason: str | None = None) -> dict:
            return {**base, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}

        # As OpenAI streams: the role first, text in pieces, then per call its id and name, then its
        # arguments in fragments under the call's index; the finish reason; usage when asked.
        events = [chunk({"role": "assistant", "content": "" if content else None})]
        events += [chunk({"content": content[i:i + 7]}) for i in range(0, len(content or ""), 7)]
        for i, c in enumerate(calls):
            head = {"index": i, "id": c["id"], "type": "function",
                    "function": {"name": c["function"]["name"], "arguments": ""}}
            events.append(chunk({"tool_calls": [head]}))
            args = c["function"]["arguments"]
            events += [chunk({"tool_calls": [{"index": i, "function": {"arguments": args[j:j + 7]}}]})
                       for j in range(0, len(args), 7)]
        events.append(chunk({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        return sse(events, False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body, err = await gate(request)
        if err:
            return err
        if body["model"] == "toolcall":
            message = tool_message(body)
            pt = sum(_words(m.get("content") or "") for m in body.get("messages", []))
            ct = _words(message.get("content") or "") + _words(json.dumps(message.get("tool_calls") or []))
            return {
                "id": "up-3",
                "created": int(time.time()),
                "model": body["model"],
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": message,
                     "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}
                ],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
            }
        if body["model"] == "scripted":
            return scripted(body)
        text, pt = chat_reply(body)
        ct = _words(text)
        base = {"id": "up-1", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            return {
                **base,
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
            }
        events = [
            {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
            }
        ]
        for w in text.split(" "):
            events.append(
                {
                    **base,
                    "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": w + " "}}],
                }
            )
        events.append(
            {
                **base,
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            }
        )
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append(
                {
                    **base,
                    "object": "chat.completion.chunk",
                    "choices": [],
                    "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
                }
            )
        return sse(events, body["model"] == "midfail")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, err = await gate(request)
        if err:
            return err
        prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][0]
        text = f" completed: {prompt}"
        pt, ct = _words(prompt), _words(text)
        base = {
            "id": "up-2",
            "created": int(time.time()),
            "model": body["model"],
            "object": "text_completion",
        }
        if not body.get("stream"):
            return {
                **base,
                "choices": [{"index": 0, "text": text, "finish_reason": "length"}],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
            }
        events = [
            {**base, "choices": [{"index": 0, "text": w, "finish_reason": None}]} for w in text.split(" ")
        ]
        events.append({**base, "choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
        events.append(
            {
                **base,
                "choices": [],
                "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
            }
        )
        return sse(events, False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        body, err = await gate(request)
        if err:
            return err
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [
            {"object": "embedding", "index": i, "embedding": [float(len(t)), 1.0, 0.0]}
            for i, t in enumerate(texts)
        ]
        n = sum(_words(t) for t in texts)
        return {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    return app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(app: Any, what: str = "server", ready_s: float = 30.0) -> Iterator[int]:
    """Runs an ASGI app (the gateway, say) with uvicorn in a thread on a free loopback port until exit;
    yields the port. It must start within `ready_s` seconds."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + ready_s
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class UpstreamServer:
    """Context manager: runs the fake upstream until exit."""

    def __init__(self) -> None:
        self.upstream = Upstream(port=free_port())
        config = uvicorn.Config(
            _app(self.upstream), host="127.0.0.1", port=self.upstream.port, log_level="error", lifespan="off"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Upstream:
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("fake upstream did not start")
            time.sleep(0.02)
        return self.upstream

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


# ---------------------------------------------------------------- the agent-framework interop tests


@contextmanager
def interop_gateway(tmp: Any) -> Iterator[tuple[str, Upstream, Any]]:
    """The gateway over "scripted" (this fake upstream, remote) and "tiny" (the shipped tiny model, local),
    logging content to a usage store in the folder `tmp`; yields (its /v1 URL, the upstream, the store)."""
    from fleetlm.config import parse_config
    from fleetlm.model import SHIPPED_TINY_MODEL
    from fleetlm.serve.app import create_app
    from fleetlm.serve.backends import build_backends
    from fleetlm.serve.store import UsageStore

    with UpstreamServer() as upstream:
        cfg = parse_config({"log_content": True, "models": {
            "scripted": {"remote": upstream.base_url, "remote_model": "scripted"},
            "tiny": {"path": str(SHIPPED_TINY_MODEL), "dtype": "f32"},
        }})
        store = UsageStore(f"sqlite:///{tmp / 'usage.db'}")
        with serving(create_app(cfg, store, build_backends(cfg)), "gateway") as port:
            yield f"http://127.0.0.1:{port}/v1", upstream, store


SHOP_QUANTITY = 3  # units in the shop's order


def shop(price_type: type = str) -> dict:
    """Two plain functions over a made-up order whose SKU and price are new each call (nothing can guess
    them), for a framework's tool decorator: get_order(order_id) -> the order as JSON, and
    unit_price(sku) -> the price as `price_type`; with the SKU, the price and the calls they received."""
    import secrets

    sku, price, seen = f"SKU-{secrets.token_hex(3)}", round(1 + secrets.randbelow(9000) / 100, 2), []

    def get_order(order_id: int) -> str:
        """Looks an order up.

        Args:
            order_id: the order's number
        """
        seen.append(("get_order", order_id))
        return json.dumps({"order_id": order_id, "sku": sku, "quantity": SHOP_QUANTITY})

    def unit_price(sku: str) -> str:
        """The price of one unit of a product.

        Args:
            sku: the product's SKU
        """
        seen.append(("unit_price", sku))
        return price_type(price)

    unit_price.__annotations__["return"] = price_type
    return {"sku": sku, "price": price, "functions": [get_order, unit_price], "seen": seen}


def plan_shop(results: list[str], answer: Callable[[dict, float], dict]) -> dict:
    """A "scripted" planner's next step over the shop's tool results so far: look order 42 up, price its
    SKU with what the lookup returned, then `answer(order, total)`."""
    if not results:
        return {"tool_calls": [{"name": "get_order", "arguments": {"order_id": 42}}]}
    order = json.loads(results[0])
    if len(results) == 1:
        return {"tool_calls": [{"name": "unit_price", "arguments": {"sku": order["sku"]}}]}
    return answer(order, round(order["quantity"] * float(results[1]), 2))
