"""Streamed /v1/responses: the chat path's deltas as OpenAI's Responses events, each with its sequence_number.

Order: `response.created`, `response.in_progress`; the items of the tools that ran before the answer: the
file_search_call (`output_item.added`, `file_search_call.in_progress/searching/completed`,
`output_item.done`), the MCP servers' `mcp_list_tools` and `mcp_call` items (with `mcp_list_tools.*`,
`mcp_call.*` and `mcp_call_arguments.done`); then the answer. Text opens a message item
(`output_item.added`, `content_part.added`) and goes out as `output_text.delta`s, its [n] markers removed as
they stream (chat_grounding.MarkerFilter) so the deltas add up to the cited text; the citations follow as
`output_text.annotation.added`, then `output_text.done`, `content_part.done`, `output_item.done`. A tool
call opens a function_call item as soon as its name is known (closing the message before it) and its
arguments go out as `function_call_arguments.delta`s, closed by `function_call_arguments.done` and
`output_item.done` at the end. Last comes `response.completed` with the whole response (stored, like an
unstreamed one), or `response.failed` with an error object when the backend fails mid-stream and no
fallback can continue it (serve/failover.py), or anything else breaks. A client that goes away closes the
stream, which closes the backend's stream: the model stops, and the request is logged as a 499.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import Response

from fleetlm.rag.grounding import cite
from fleetlm.rag.store import new_id
from fleetlm.serve import mcp_tools
from fleetlm.serve.backends import Delta, Generation, close_stream
from fleetlm.serve.chat_grounding import MarkerFilter
from fleetlm.serve.errors import BackendError
from fleetlm.serve.failover import ClosingStreamingResponse, resilient_stream
from fleetlm.serve.protocol import ChatCompletionRequest
from fleetlm.serve.responses_api import Prepared, keep, response_object, tool_items
from fleetlm.serve.responses_items import output_message


@dataclass
class _Message:
    item_id: str
    output_index: int
    cited: bool  # file_search ran: markers are removed and the text is cited
    raw: str = ""
    sent: str = ""
    opened: bool = False  # its output_item.added went out
    markers: MarkerFilter = field(default_factory=MarkerFilter)


@dataclass
class _Call:
    item_id: str
    call_id: str
    name: str = ""
    arguments: str = ""
    output_index: int = -1  # -1: not opened yet (its name has not come)

    def item(self, status: str) -> dict:
        return {"id": self.item_id, "type": "function_call", "status": status, "call_id": self.call_id,
                "name": self.name, "arguments": self.arguments}


class ResponseEvents:
    """One streamed response's events, built as the deltas come; `output` is its output items so far."""

    def __init__(self, p: Prepared, ran: list[dict]):
        self.p = p
        self.ran = ran  # the items of the tools the gateway ran before the answer (responses_api.tool_items)
        self.id, self.created = new_id("resp"), int(time.time())
        self.seq = 0
        self.output: list[dict] = []
        self.message: _Message | None = None  # the message item open now
        self.calls: dict[int, _Call] = {}

    def emit(self, kind: str, **fields: Any) -> str:
        data = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    def response(self, status: str, usage: tuple[int, int] | None = None, error: dict | None = None) -> dict:
        return response_object(self.p, self.id, self.created, list(self.output), usage, status, error)

    def start(self) -> list[str]:
        events = [self.emit("response.created", response=self.response("in_progress")),
                  self.emit("response.in_progress", response=self.response("in_progress"))]
        for item in self.ran:  # these tools ran before the stream began: their events say so, in order
            events += self._ran(item)
        return events

    def _ran(self, item: dict) -> list[str]:
        at, ids = len(self.output), {"output_index": len(self.output), "item_id": item["id"]}
        kind = item["type"]
        if kind == "file_search_call":
            opened = {**item, "status": "in_progress", "results": None}
            steps = [f"response.file_search_call.{s}" for s in ("in_progress", "searching", "completed")]
        elif kind == "mcp_list_tools":
            opened = {**item, "tools": []}
            steps = ["response.mcp_list_tools.in_progress", "response.mcp_list_tools.completed"]
        else:  # mcp_call
            opened = {**item, "status": "in_progress", "output": None, "error": None}
            end = "failed" if item["status"] == "failed" else "completed"
            steps = ["response.mcp_call.in_progress", f"response.mcp_call.{end}"]
        events = [self.emit("response.output_item.added", output_index=at, item=opened)]
        events.append(self.emit(steps[0], **ids))
        if kind == "mcp_call":
            events.append(self.emit("response.mcp_call_arguments.done", **ids, arguments=item["arguments"]))
        events += [self.emit(step, **ids) for step in steps[1:]]
        self.output.append(item)
        events.append(self.emit("response.output_item.done", output_index=at, item=item))
        return events

    # ---------------------------------------------------------------- the answer as it comes

    def delta(self, d: Delta) -> list[str]:
        if d.index != 0:  # a Responses request asks for one answer
            return []
        events: list[str] = []
        if d.text:
            events += self._text(d.text)
        for fragment in d.tool_calls or []:
            events += self._call(fragment)
        return events

    def _text(self, text: str) -> list[str]:
        m = self.message
        if m is None:
            m = self.message = _Message(new_id("msg"), -1, self.p.search_item is not None)
        m.raw += text
        piece = m.markers.feed(text) if m.cited else text
        return self._send(m, piece)

    def _send(self, m: _Message, piece: str) -> list[str]:
        if not piece:
            return []
        events = [] if m.opened else self._open_message(m)
        m.sent += piece
        events.append(self.emit("response.output_text.delta", item_id=m.item_id, output_index=m.output_index,
                                content_index=0, delta=piece, logprobs=[]))
        return events

    def _open_message(self, m: _Message) -> list[str]:
        m.opened, m.output_index = True, len(self.output)
        self.output.append(output_message("", [], "in_progress", m.item_id))
        part = {"type": "output_text", "text": "", "annotations": []}
        return [self.emit("response.output_item.added", output_index=m.output_index,
                          item=output_message("", [], "in_progress", m.item_id) | {"content": []}),
                self.emit("response.content_part.added", item_id=m.item_id, output_index=m.output_index,
                          content_index=0, part=part)]

    def _close_message(self) -> list[str]:
        m, self.message = self.message, None
        if m is None:
            return []
        events = self._send(m, m.markers.flush()) if m.cited else []
        if not m.opened:
            if m.raw.strip() == "" and self.calls:
                return events  # nothing to show before the calls
            events += self._open_message(m)
        text, annotations = cite(m.raw, self.p.sources) if m.cited else (m.raw, [])
        ids = {"item_id": m.item_id, "output_index": m.output_index, "content_index": 0}
        events += [self.emit("response.output_text.annotation.added", **ids, annotation_index=i, annotation=a)
                   for i, a in enumerate(annotations)]
        events.append(self.emit("response.output_text.done", **ids, text=text, logprobs=[]))
        part = {"type": "output_text", "text": text, "annotations": annotations}
        events.append(self.emit("response.content_part.done", **ids, part=part))
        item = self.output[m.output_index] = output_message(text, annotations, "completed", m.item_id)
        events.append(self.emit("response.output_item.done", output_index=m.output_index, item=item))
        return events

    def _call(self, fragment: dict) -> list[str]:
        index = fragment.get("index")
        index = index if isinstance(index, int) else len(self.calls)
        c = self.calls.get(index)
        if c is None:
            c = self.calls[index] = _Call(new_id("fc"), fragment.get("id") or new_id("call"))
        function = fragment.get("function") or {}
        c.name += function.get("name") or ""
        piece = function.get("arguments") or ""
        events: list[str] = []
        if c.output_index < 0 and c.name:  # the name is known: the item opens, the message before it closes
            events += self._close_message()
            c.output_index = len(self.output)
            self.output.append(c.item("in_progress"))
            events.append(self.emit("response.output_item.added", output_index=c.output_index,
                                    item=c.item("in_progress") | {"arguments": ""}))
            piece, c.arguments = c.arguments + piece, ""  # what came before the name goes out now
        c.arguments += piece
        if c.output_index >= 0 and piece:
            events.append(self.emit("response.function_call_arguments.delta", item_id=c.item_id,
                                    output_index=c.output_index, delta=piece))
        return events

    # ---------------------------------------------------------------- the end

    def finish(self) -> list[str]:
        """Close every open item, in output order; an answer with no text and no call is an empty message."""
        if self.message is None and not self.calls:
            self.message = _Message(new_id("msg"), -1, self.p.search_item is not None)
        events = self._close_message()
        for c in sorted(self.calls.values(), key=lambda c: c.output_index):
            if c.output_index < 0:
                continue  # a fragment that never named its function: nothing to call
            events.append(self.emit("response.function_call_arguments.done", item_id=c.item_id,
                                    output_index=c.output_index, name=c.name, arguments=c.arguments))
            item = self.output[c.output_index] = c.item("completed")
            events.append(self.emit("response.output_item.done", output_index=c.output_index, item=item))
        return events

    def fail(self) -> None:
        """The items cut short by a failure, as they stand, marked incomplete."""
        m = self.message
        if m is not None and m.opened:
            self.output[m.output_index] = output_message(m.sent, [], "incomplete", m.item_id)
        for c in self.calls.values():
            if c.output_index >= 0:
                self.output[c.output_index] = c.item("incomplete")


Opened = tuple[ChatCompletionRequest, AsyncIterator[Delta], Delta | None]


async def open_answer(gw: Any, p: Prepared, call: Any) -> Opened:
    """(the request the answer is for, its deltas, the first piece), as app.py's `_stream` opens them: the
    rounds of MCP calls run first; a cascade's checked answer is generated whole and replayed (or the last
    model of the ladder streams); else the chain's first model that starts streaming."""
    from fleetlm.serve.app import _replay

    def open_stream(b: Any) -> Awaitable[tuple[AsyncIterator[Delta], Delta | None]]:
        return gw._open_stream(b, p.chat, True)

    if call.mcp is not None:
        return await mcp_tools.stream_rounds(gw, p.chat, p.chain, call)
    if call.plan is not None:
        climbed = await gw._climb(p.chat, call, chat=True, stream=True)
        if not isinstance(climbed, Generation):
            return (p.chat, *climbed)
        gen = climbed
    elif call.cascade:
        gen = await gw.first_success(p.chain, call, lambda b: b.chat(p.chat))
        escalate = await gw._review(p.chat, gen, call)
        if escalate is not None:
            return (p.chat, *await gw.first_success(escalate, call, open_stream))
    else:
        return (p.chat, *await gw.first_success(p.chain, call, open_stream))
    deltas = _replay(gen)
    return p.chat, deltas, await anext(deltas, None)


async def stream_response(gw: Any, p: Prepared, call: Any) -> Response:
    """The answer's events. The backend's stream is opened first, so a fleet that cannot answer at all is
    a JSON error with its status (as for chat completions), not a stream."""
    chat, deltas, first = await open_answer(gw, p, call)
    deltas = resilient_stream(gw, chat, call, deltas, first, chat=True)
    events = ResponseEvents(p, tool_items(p, call))

    async def body() -> AsyncIterator[str]:
        usage: tuple[int, int] = (0, 0)
        status, error = 499, "client went away"
        try:
            for e in events.start():
                yield e
            while (d := await anext(deltas, None)) is not None:
                if d.usage is not None:
                    usage = d.usage
                if call.ttft_ms is None and (d.text or d.tool_calls):
                    call.ttft_ms = (time.perf_counter() - call.start) * 1000
                if gw.config.log_content and d.text and d.index == 0:
                    call.response = (call.response or "") + d.text
                for e in events.delta(d):
                    yield e
            for e in events.finish():
                yield e
            await gw.log(call, 200, *usage)
            status, error = 200, None
            if call.mcp is not None:  # the rounds of MCP calls were logged row by row: the client sees all
                usage = call.mcp.total(usage)
            response = events.response("completed", usage)
            await keep(gw, p, response)
            yield events.emit("response.completed", response=response)
        except Exception as exc:  # noqa: BLE001 - whatever broke, the client gets response.failed, not a cut
            status = 502 if isinstance(exc, BackendError) else 500
            message = exc.message if isinstance(exc, BackendError) else (
                f"internal error: {type(exc).__name__}")
            usage = call.tally.finish(gw, call) if call.tally is not None else usage
            await gw.log(call, status, *usage, error=message)
            events.fail()
            response = events.response("failed", usage, {"code": "server_error", "message": message})
            await keep(gw, p, response)
            yield events.emit("response.failed", response=response)
        finally:
            if status == 499:  # the client went away: stop the model, pay for what it produced
                if call.tally is not None:
                    usage = call.tally.finish(gw, call)
                rec = gw.record(call, 499, *usage, error=error)
                gw.store.log(rec)
                gw.settle(call, rec)
                await close_stream(deltas)

    headers = call.headers()
    headers["cache-control"] = "no-cache"
    return ClosingStreamingResponse(body(), media_type="text/event-stream", headers=headers)
