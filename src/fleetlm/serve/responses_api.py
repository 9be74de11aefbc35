"""POST/GET/DELETE /v1/responses: OpenAI's Responses API over the fleet, with file_search and citations.

Non-streaming only (streaming and function tools are not built yet: they answer a 400 naming the param).
The file_search query is the user's last input text. Responses with `store` (the default) are kept in a
`fleet_responses` table of the fleet's SQLite file (files_api.index_path), so `previous_response_id` chains
survive a restart: a chain's conversation is rebuilt from the stored input and output items.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fleetlm.rag.filters import compile_filter
from fleetlm.rag.grounding import Source, cite, grounding_prompt, retrieve
from fleetlm.rag.store import new_id
from fleetlm.serve import assistants
from fleetlm.serve.errors import APIError, BadRequest
from fleetlm.serve.files_api import NotFound, api_errors, index_path, open_knowledge
from fleetlm.serve.protocol import ChatCompletionRequest, parse_request

ROLES = ("user", "assistant", "system", "developer")


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
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
    user: str | None = None
    parallel_tool_calls: bool | None = None


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

    def history(self, response_id: str) -> list[dict]:
        """The chain's items, oldest first: each stored response's input items, then its output items."""
        turns: list[list[dict]] = []
        seen: set[str] = set()
        current: str | None = response_id
        while current is not None and current not in seen:
            seen.add(current)
            found = self.get(current)
            if found is None:
                break
            response, items, current = found
            turns.append(items + response["output"])
        return [item for turn in reversed(turns) for item in turn]


def response_store(gw: Any) -> ResponseStore:
    store = getattr(gw, "responses", None)
    if store is None:
        store = ResponseStore(index_path(gw))
        gw.responses = store
    return store


# ------------------------------------------------------------------ input items -> chat messages


def _text_of(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("input_text", "output_text", "text"):
                raise BadRequest(
                    "only input_text and output_text content parts are supported", param=f"{param}[{i}].type"
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise BadRequest("content must be a string or a list of parts", param=param)


def normalise_input(value: str | list[dict]) -> list[dict]:
    """The request's input as message items (a string is one user message); a 400 for anything else."""
    if isinstance(value, str):
        if not value.strip():
            raise BadRequest("input must not be empty", param="input")
        return [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": value}]}]
    if not value:
        raise BadRequest("input must not be empty", param="input")
    items = []
    for i, item in enumerate(value):
        kind = item.get("type", "message")
        if kind == "function_call_output":
            raise BadRequest("function tools are not supported yet", param=f"input[{i}].type")
        if kind != "message":
            raise BadRequest(f"unsupported input item type {kind!r}", param=f"input[{i}].type")
        if item.get("role") not in ROLES:
            raise BadRequest(f"role must be one of {', '.join(ROLES)}", param=f"input[{i}].role")
        text = _text_of(item.get("content"), f"input[{i}].content")
        part = "output_text" if item["role"] == "assistant" else "input_text"
        items.append({"type": "message", "role": item["role"], "content": [{"type": part, "text": text}]})
    return items


def to_messages(items: list[dict]) -> list[dict]:
    messages = []
    for item in items:
        if item.get("type") == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _text_of(item["content"], "input")})
    return messages


def fit_context(messages: list[dict]) -> list[dict]:
    """The one place a chain's rebuilt conversation is fitted to the model's context: unchanged for now
    (fleetlm.memory.fit_context was not committed when this was written)."""
    return messages


# ------------------------------------------------------------------ tools


def _file_search(tools: list[dict] | None) -> dict | None:
    found = None
    for i, tool in enumerate(tools or []):
        kind = tool.get("type")
        if kind == "function":
            raise BadRequest("function tools are not supported yet", param=f"tools[{i}].type")
        if kind != "file_search":
            raise BadRequest(f"unsupported tool type {kind!r}", param=f"tools[{i}].type")
        ids = tool.get("vector_store_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(x, str) for x in ids):
            raise BadRequest(
                "vector_store_ids must be a non-empty list of ids", param=f"tools[{i}].vector_store_ids"
            )
        limit = tool.get("max_num_results", 10)
        if not isinstance(limit, int) or not 1 <= limit <= 50:
            raise BadRequest("max_num_results must be between 1 and 50", param=f"tools[{i}].max_num_results")
        if tool.get("filters") is not None:
            try:
                compile_filter(tool["filters"], "a")
            except Exception as exc:
                raise BadRequest(f"bad filters: {exc}", param=f"tools[{i}].filters") from None
        threshold = (tool.get("ranking_options") or {}).get("score_threshold", 0.0)
        if not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise BadRequest(
                "score_threshold must be between 0 and 1", param=f"tools[{i}].ranking_options.score_threshold"
            )
        found = {
            "vector_store_ids": ids,
            "max_num_results": limit,
            "filters": tool.get("filters"),
            "score_threshold": float(threshold),
        }
    return found


def _result(source: Source) -> dict:
    return {
        "file_id": source.file_id,
        "filename": source.filename,
        "score": source.score,
        "text": source.text,
        "attributes": source.attributes,
    }


# ------------------------------------------------------------------ the endpoint


async def create_response(gw: Any, request: Request) -> Response:
    from fleetlm.serve.app import _Call  # app.py imports this module

    call = _Call("responses")
    try:
        body = await gw.read_body(request)
        req = parse_request(ResponsesRequest, body)
        call.model_requested = req.model
        await gw.authorize(request, call)
        if req.stream:
            raise BadRequest("streaming responses are not supported yet", param="stream")
        for i, name in enumerate(req.include or []):
            if name != "file_search_call.results":
                raise BadRequest(f"unsupported include {name!r}", param=f"include[{i}]")
        return await _answer(gw, request, req, call)
    except APIError as exc:
        if call.model_requested != "?":
            await gw.log(call, exc.status, error=exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)


async def _answer(gw: Any, request: Request, req: ResponsesRequest, call: Any) -> Response:
    items = normalise_input(req.input)
    store = response_store(gw)
    history: list[dict] = []
    if req.previous_response_id is not None:
        if await run_in_threadpool(store.get, req.previous_response_id) is None:
            raise NotFound(f"no response {req.previous_response_id!r}", param="previous_response_id")
        history = await run_in_threadpool(store.history, req.previous_response_id)
    model, instructions, tools = req.model, [req.instructions] if req.instructions else [], req.tools
    assistant = assistants.find_assistant(gw.config, req.model)
    if assistant is not None:  # its instructions first, its stores as file_search, its model
        model = assistant.model
        instructions = [assistant.instructions or "", *instructions]
        if assistant.vector_store_ids and not any(t.get("type") == "file_search" for t in tools or []):
            tools = [
                *(tools or []),
                {
                    "type": "file_search",
                    "vector_store_ids": assistant.vector_store_ids,
                    "max_num_results": assistant.max_num_results,
                },
            ]
    search = _file_search(tools)
    output: list[dict] = []
    sources: list[Source] = []
    system = [i for i in instructions if i]
    if search is not None:
        kb = await open_knowledge(gw, request)
        for i, vs in enumerate(search["vector_store_ids"]):
            if kb.store.get_store(vs) is None:
                raise NotFound(f"no vector store {vs!r}", param=f"tools.vector_store_ids[{i}]")
        query = to_messages([m for m in items if m["role"] == "user"][-1:] or items)[-1]["content"]
        sources = await run_in_threadpool(
            retrieve,
            kb.store,
            search["vector_store_ids"],
            query,
            kb.ingestor.embed,
            max_num_results=search["max_num_results"],
            filters=search["filters"],
            score_threshold=search["score_threshold"],
        )
        include = "file_search_call.results" in (req.include or [])
        output.append(
            {
                "id": new_id("fs"),
                "type": "file_search_call",
                "status": "completed",
                "queries": [query],
                "results": [_result(s) for s in sources] if include else None,
            }
        )
        system.append(grounding_prompt(sources, max_chars=6000))
    messages = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    messages += fit_context(to_messages(history + items))
    chat = ChatCompletionRequest.model_validate(
        {
            "model": model,
            "messages": messages,
            "max_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
        }
    )
    chain = await gw.resolve(model, chat, call)
    if assistant is not None:
        call.model_requested, call.route = req.model, f"assistant>{call.route}"
    gen = await gw.first_success(chain, call, lambda b: b.chat(chat))
    text = (gen.choices[0].text or "") if gen.choices else ""
    annotations: list[dict] = []
    if search is not None:
        text, annotations = cite(text, sources)
    output.append(
        {
            "id": new_id("msg"),
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": annotations}],
        }
    )
    await gw.log(call, 200, gen.prompt_tokens, gen.completion_tokens)
    response = {
        "id": new_id("resp"),
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "model": call.served_as or call.model_used or model,
        "output": output,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "metadata": req.metadata or {},
        "tools": req.tools or [],
        "tool_choice": req.tool_choice or "auto",
        "parallel_tool_calls": True,
        "previous_response_id": req.previous_response_id,
        "store": req.store,
        "error": None,
        "incomplete_details": None,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "usage": {
            "input_tokens": gen.prompt_tokens,
            "output_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }
    if req.store:
        await run_in_threadpool(store.put, response, items, req.previous_response_id)
    return JSONResponse(response)


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
        items = [{"id": new_id("msg"), **item} for item in (await stored(request, response_id))[1]]
        return JSONResponse(
            {
                "object": "list",
                "data": items,
                "has_more": False,
                "first_id": items[0]["id"] if items else None,
                "last_id": items[-1]["id"] if items else None,
            }
        )

    @app.delete("/v1/responses/{response_id}")
    @api_errors
    async def delete(request: Request, response_id: str) -> Response:
        await stored(request, response_id)
        await run_in_threadpool(response_store(gw).delete, response_id)
        return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
