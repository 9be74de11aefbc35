"""POST/GET/DELETE /v1/responses: OpenAI's Responses API over the fleet, with file_search, function and MCP
tools, citations and streaming.

A request becomes a chat request (items and tools: responses_items.py), answered through the gateway's own
chat path (routing and cascades, fallbacks, the MCP tool loop, the local models' constrained tool calls, the
conversation memory); a streamed one is turned into
Responses events by responses_stream.py. The file_search query is the user's last input text. Responses
with `store` (the default) are kept in a `fleet_responses` table of the fleet's SQLite file
(files_api.index_path), so `previous_response_id` chains survive a restart: a chain's conversation is rebuilt
from the stored input and output items. `model` in a response is the model the client asked for; the one
that answered is in x-fleet-model / x-fleet-route and the usage log, as for chat completions.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from fleetlm.rag.grounding import Source, cite, grounding_prompt, retrieve
from fleetlm.rag.rerank import DEFAULT_DEPTH, rerank
from fleetlm.rag.store import new_id
from fleetlm.serve import assistants, mcp_tools, vision
from fleetlm.serve.backends import Generation
from fleetlm.serve.conversation_memory import fit_conversation
from fleetlm.serve.errors import APIError, BackendError, BadRequest
from fleetlm.serve.files_api import NotFound, api_errors, index_path, listing, open_knowledge, page_params
from fleetlm.serve.protocol import ChatCompletionRequest, parse_request
from fleetlm.serve.responses_items import (
    ToolPlan,
    call_ids,
    function_call_item,
    mcp_items,
    normalise_input,
    output_message,
    plan_tools,
    text_format,
    text_of,
    to_messages,
)
from fleetlm.serve.vector_stores_api import fleet_judge

INCLUDES = ("file_search_call.results",)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    metadata: dict[str, str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    include: list[str] | None = None
    store: bool = True
    previous_response_id: str | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    parallel_tool_calls: bool | None = None
    # {"format": {"type": "text" | "json_object" | "json_schema", ...}}: the chat path's response_format,
    # so a JSON answer is held to its schema by constrained decoding on local models
    text: dict[str, Any] | None = None
    truncation: Literal["auto", "disabled"] | None = None  # echoed; conversations are fitted either way
    reasoning: dict[str, Any] | None = None  # accepted and ignored: the fleet's models do not reason apart
# ------------------------------------------------------------------ storage


class ResponseStore:
    """Stored responses, one JSON row each (the response object, and the input items it answered)."""

    def __init__(self, path: Path):
        self.path = path
        with self._db() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS fleet_responses (id TEXT PRIMARY KEY, created_at INTEGER,"
                " previous_id TEXT, input TEXT NOT NULL, response TEXT NOT NULL)"
            )

    def _db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def put(self, response: dict, input_items: list[dict], previous_id: str | None) -> None:
        db = self._db()
        try:
            with db:  # one transaction: the row is there whole or not at all
                db.execute(
                    "INSERT OR REPLACE INTO fleet_responses VALUES (?, ?, ?, ?, ?)",
                    (
                        response["id"],
                        response["created_at"],
                        previous_id,
                        json.dumps(input_items),
                        json.dumps(response),
                    ),
                )
        finally:
            db.close()

    def get(self, response_id: str) -> tuple[dict, list[dict], str | None] | None:
        db = self._db()
        try:
            row = db.execute(
                "SELECT response, input, previous_id FROM fleet_responses WHERE id = ?", (response_id,)
            ).fetchone()
        finally:
            db.close()
        return (json.loads(row[0]), json.loads(row[1]), row[2]) if row else None

    def delete(self, response_id: str) -> bool:
        db = self._db()
        try:
            with db:
                return db.execute("DELETE FROM fleet_responses WHERE id = ?", (response_id,)).rowcount > 0
        finally:
            db.close()

    def history(self, response_id: str) -> tuple[list[dict], str]:
        """The chain's items, oldest first (each stored response's input items, then its output items), and
        the id of its first response (the conversation's id)."""
        turns: list[list[dict]] = []
        seen: set[str] = set()
        current: str | None = response_id
        root = response_id
        while current is not None and current not in seen:
            seen.add(current)
            found = self.get(current)
            if found is None:
                break
            root = current
            response, items, current = found
            turns.append(items + response["output"])
        return [item for turn in reversed(turns) for item in turn], root


def response_store(gw: Any) -> ResponseStore:
    store = getattr(gw, "responses", None)
    if store is None:
        store = ResponseStore(index_path(gw))
        gw.responses = store
    return store


# ------------------------------------------------------------------ the request, prepared


def _plain(messages: list[dict]) -> bool:
    return all(isinstance(m.get("content"), str) and set(m) <= {"role", "content"} for m in messages)


@dataclass
class Prepared:
    """A request made ready to answer: what is stored, what the chat path is asked, what was retrieved."""

    req: ResponsesRequest
    items: list[dict]  # the input items, with their ids, as stored
    chat: ChatCompletionRequest
    chain: list[str]
    tools: ToolPlan
    sources: list[Source] = field(default_factory=list)
    search_item: dict | None = None  # the file_search_call output item, when file_search ran


def _with_assistant(config: Any, req: ResponsesRequest) -> tuple[str, list[str], list[dict], Any]:
    """(model, instructions, tools, assistant): an assistant's model, its instructions before the request's,
    its stores as a file_search tool (unless the request brings one) and its function tools after the
    request's; the request's own otherwise."""
    instructions = [req.instructions] if req.instructions else []
    tools = list(req.tools or [])
    assistant = assistants.find_assistant(config, req.model)
    if assistant is None:
        return req.model, instructions, tools, None
    if assistant.vector_store_ids and not any(t.get("type") == "file_search" for t in tools):
        tools.append({"type": "file_search", "vector_store_ids": assistant.vector_store_ids,
                      "max_num_results": assistant.max_num_results})
    tools += [{"type": "function", **t.function.model_dump(exclude_none=True)} for t in assistant.tools]
    return assistant.model, [assistant.instructions or "", *instructions], tools, assistant


async def _search(gw: Any, request: Request, search: dict, items: list[dict], include: bool
                  ) -> tuple[list[Source], dict]:
    """file_search for the conversation's last user text: the sources and the file_search_call item."""
    kb = await open_knowledge(gw, request)
    for i, vs in enumerate(search["vector_store_ids"]):
        if kb.store.get_store(vs) is None:
            raise NotFound(f"no vector store {vs!r}", param=f"tools.vector_store_ids[{i}]")
    users = [m for m in items if m.get("type") == "message" and m["role"] == "user"]
    query = text_of(users[-1]["content"], "input") if users else ""
    if not query.strip():
        raise BadRequest("file_search needs a user message with text to search for", param="input")
    judge = fleet_judge(gw, search["ranker"], "tools.ranking_options.ranker")
    if judge is None:
        sources = await run_in_threadpool(
            retrieve, kb.store, search["vector_store_ids"], query, kb.ingestor.embed,
            max_num_results=search["max_num_results"], filters=search["filters"],
            score_threshold=search["score_threshold"],
        )
    else:
        sources = await _reranked(kb, search, query, judge)
    item = {"id": new_id("fs"), "type": "file_search_call", "status": "completed", "queries": [query],
            "results": [_result(s) for s in sources] if include else None}
    return sources, item


async def _reranked(kb: Any, search: dict, query: str, judge: Any) -> list[Source]:
    """file_search with a `fleet:<model>` ranker: the fused candidates of every store (the rerank depth at
    least), judged by the model, then the threshold and the limit on the judged scores, renumbered."""
    wide = await run_in_threadpool(
        retrieve, kb.store, search["vector_store_ids"], query, kb.ingestor.embed,
        max_num_results=max(search["max_num_results"], DEFAULT_DEPTH), filters=search["filters"],
    )
    try:
        hits = await rerank(query, [{"text": s.text, "score": s.score, "source": s} for s in wide], judge)
    except APIError:
        raise
    except Exception as exc:  # noqa: BLE001 - an engine's failure is the ranker's, answered as a 502
        raise BackendError(f"ranker fleet:{search['ranker']}: {type(exc).__name__}: {exc}") from None
    kept = [h for h in hits if h["score"] >= search["score_threshold"]][: search["max_num_results"]]
    return [replace(h["source"], index=i, score=h["score"]) for i, h in enumerate(kept, start=1)]


async def prepare(gw: Any, request: Request, req: ResponsesRequest, call: Any) -> Prepared:
    """Validate the request, rebuild its chain, run file_search, fit the conversation to the context and
    resolve the model: every 400/404 is found here, before any answer or stream begins."""
    for i, name in enumerate(req.include or []):
        if name not in INCLUDES:
            raise BadRequest(f"unsupported include {name!r}", param=f"include[{i}]")
    store = response_store(gw)
    history: list[dict] = []
    conversation: str | None = None  # the chain's first response id (None: this one starts a chain)
    if req.previous_response_id is not None:
        if await run_in_threadpool(store.get, req.previous_response_id) is None:
            raise NotFound(f"no response {req.previous_response_id!r}", param="previous_response_id")
        history, conversation = await run_in_threadpool(store.history, req.previous_response_id)
    items = normalise_input(req.input, call_ids(history))
    model, instructions, tools, assistant = _with_assistant(gw.config, req)
    plan = plan_tools(tools, req.tool_choice)
    response_format = text_format(req.text)
    system = [i for i in instructions if i]
    sources: list[Source] = []
    search_item = None
    if plan.search is not None:
        include = "file_search_call.results" in (req.include or [])
        sources, search_item = await _search(gw, request, plan.search, history + items, include)
        system.append(grounding_prompt(sources, max_chars=6000))
    messages = ([{"role": "system", "content": "\n\n".join(system)}] if system else []) + to_messages(
        history + items)
    if _plain(messages):
        # A chain past the answering model's context is compacted (serve/conversation_memory.py: older turns
        # summarised by the cheapest capable model and archived, the ones matching the question recalled).
        # The conversation's id is the chain's first response. A conversation with tool calls passes as it
        # is: a call must stay next to its output, which the memory's text turns do not keep.
        messages = await fit_conversation(gw, model, messages, conversation, call=call, param="input",
                                          reserve_tokens=req.max_output_tokens)
    fields: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": req.max_output_tokens,
                              "temperature": req.temperature, "top_p": req.top_p, "user": req.user,
                              "stream": req.stream}
    if plan.functions or plan.mcp:
        fields.update(tools=plan.functions + plan.mcp, tool_choice=plan.chat_choice,
                      parallel_tool_calls=req.parallel_tool_calls)
    if response_format is not None:
        fields["response_format"] = response_format
    try:
        chat = ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:  # checked above already; a gap there is still the client's 400
        raise BadRequest(f"the request cannot be served: {exc.errors()[0]['msg']}") from None
    if vision.requested(chat):  # images become stage one's text (unless the model sees), before routing
        chat = await vision.prepare(gw, chat, call)
    if gw.config.log_content:  # the usage log keeps what the model was asked, as for chat completions
        call.prompt = json.dumps([m.model_dump(exclude_none=True) for m in chat.messages])
    chain = await gw.resolve(model, chat, call)
    if assistant is not None:
        call.model_requested, call.route = req.model, f"assistant>{call.route}"
    gw.reserve(chat, chain, call)
    if mcp_tools.requested(chat):  # mcp entries become their servers' tools (or a 400 / 424), as for chat
        chat = await mcp_tools.prepare(gw, chat, call)
    return Prepared(req, items, chat, chain, plan, sources, search_item)


def _result(source: Source) -> dict:
    return {"file_id": source.file_id, "filename": source.filename, "score": source.score,
            "text": source.text, "attributes": source.attributes}


def tool_items(p: Prepared, call: Any) -> list[dict]:
    """The items of the tools the gateway ran before the answer: the file_search_call, the MCP servers'
    listings and calls."""
    out = [p.search_item] if p.search_item is not None else []
    return out + (mcp_items(call.mcp) if call.mcp is not None else [])


def answer_items(p: Prepared, call: Any, text: str | None, tool_calls: list[dict] | None) -> list[dict]:
    """The output items of one answer: the tools' items, the message (cited; left out when the model only
    called functions), then one function_call per call."""
    text, annotations = text or "", []
    if p.search_item is not None:
        text, annotations = cite(text, p.sources)
    out = tool_items(p, call)
    if text or not tool_calls:
        out.append(output_message(text, annotations))
    return out + [function_call_item(c) for c in tool_calls or []]


def response_object(p: Prepared, response_id: str, created: int, output: list[dict],
                    usage: tuple[int, int] | None, status: str = "completed",
                    error: dict | None = None) -> dict:
    req = p.req
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": req.model,  # what the client asked for; x-fleet-model says which model answered
        "output": output,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "metadata": req.metadata or {},
        "tools": req.tools or [],
        "tool_choice": req.tool_choice or "auto",
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "previous_response_id": req.previous_response_id,
        "store": req.store,
        "user": req.user,
        "error": error,
        "incomplete_details": None,
        "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
        "truncation": req.truncation or "disabled",
        "usage": None if usage is None else {
            "input_tokens": usage[0],
            "output_tokens": usage[1],
            "total_tokens": usage[0] + usage[1],
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


async def keep(gw: Any, p: Prepared, response: dict) -> None:
    if p.req.store:
        await run_in_threadpool(response_store(gw).put, response, p.items, p.req.previous_response_id)


# ------------------------------------------------------------------ the endpoint


async def create_response(gw: Any, request: Request) -> Response:
    from fleetlm.serve.app import _Call  # app.py imports this module
    from fleetlm.serve.responses_stream import stream_response

    call = _Call("responses")
    try:
        body = await gw.read_body(request)
        req = parse_request(ResponsesRequest, body)
        call.model_requested, call.user, call.stream = req.model, req.user, req.stream
        await gw.authorize(request, call)
        p = await prepare(gw, request, req, call)
        if req.stream:
            return await stream_response(gw, p, call)
        return await gw._unless_client_leaves(request, call, _whole(gw, p, call))
    except APIError as exc:
        if call.model_requested != "?":
            await gw.log(call, exc.status, error=exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=call.headers())


async def whole_answer(gw: Any, p: Prepared, call: Any) -> Generation:
    """The chat path's whole answer, as app.py's `_whole` gets it: a cascade with checks is climbed, a
    reviewed cascade reviewed, else the chain's first model that answers."""
    def attempt(b: Any) -> Awaitable[Generation]:
        return b.chat(p.chat)

    if call.mcp is not None:  # rounds of MCP calls, then the answer (serve/mcp_tools.py)
        return (await mcp_tools.whole_rounds(gw, p.chat, p.chain, call))[1]
    if call.plan is not None:
        gen = await gw._climb(p.chat, call, chat=True)
    else:
        gen = await gw.first_success(p.chain, call, attempt)
    if call.cascade:
        escalate = await gw._review(p.chat, gen, call)
        if escalate is not None:
            gen = await gw.first_success(escalate, call, attempt)
    return gen


async def _whole(gw: Any, p: Prepared, call: Any) -> Response:
    gen = await whole_answer(gw, p, call)
    choice = gen.choices[0] if gen.choices else None
    output = answer_items(p, call, choice.text if choice else "", choice.tool_calls if choice else None)
    if gw.config.log_content and choice is not None:
        call.response = choice.text or ""
    cost = await gw.log(call, 200, gen.prompt_tokens, gen.completion_tokens)
    usage = (gen.prompt_tokens, gen.completion_tokens)
    if call.mcp is not None:  # the rounds of MCP calls were logged (and paid) row by row: added here
        usage, cost = call.mcp.total(usage), cost + call.mcp.cost_usd
    response = response_object(p, new_id("resp"), int(time.time()), output, usage)
    await keep(gw, p, response)
    return JSONResponse(response, headers=call.headers(cost))


# ------------------------------------------------------------------ input_items


def _with_ids(response_id: str, items: list[dict]) -> list[dict]:
    """Stored items with their ids; rows stored before items had ids get one derived from the response's
    id and the item's place, the same on every read."""
    out = []
    for i, item in enumerate(items):
        if not item.get("id"):
            digest = hashlib.sha256(f"{response_id}:{i}".encode()).hexdigest()[:24]
            item = {"id": f"msg_{digest}", **item}
        out.append(item)
    return out


def page_items(items: list[dict], limit: int, order: str, after: str | None) -> dict:
    ordered = items if order == "asc" else items[::-1]
    if after is not None:
        at = next((i for i, item in enumerate(ordered) if item["id"] == after), None)
        if at is None:
            raise BadRequest(f"no input item {after!r} in this response", param="after")
        ordered = ordered[at + 1:]
    return listing(ordered[:limit], len(ordered) > limit)


def install_responses(app: FastAPI, gw: Any) -> None:
    async def stored(request: Request, response_id: str) -> tuple[dict, list[dict], str | None]:
        from fleetlm.serve.app import _Call

        await gw.authorize(request, _Call("responses"))
        found = await run_in_threadpool(response_store(gw).get, response_id)
        if found is None:
            raise NotFound(f"no response {response_id!r}", param="response_id")
        return found

    @app.post("/v1/responses")
    async def create(request: Request) -> Response:
        return await create_response(gw, request)

    @app.get("/v1/responses/{response_id}")
    @api_errors
    async def get(request: Request, response_id: str) -> Response:
        return JSONResponse((await stored(request, response_id))[0])

    @app.get("/v1/responses/{response_id}/input_items")
    @api_errors
    async def input_items(request: Request, response_id: str) -> Response:
        limit, order, after = page_params(request)  # OpenAI's defaults: 20, newest first
        items = _with_ids(response_id, (await stored(request, response_id))[1])
        return JSONResponse(page_items(items, limit, order, after))

    @app.delete("/v1/responses/{response_id}")
    @api_errors
    async def delete(request: Request, response_id: str) -> Response:
        await stored(request, response_id)
        await run_in_threadpool(response_store(gw).delete, response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
