"""/v1/vector_stores in OpenAI's shapes: stores, their files and file batches, and search.

Attaching a file queues it for the ingest worker (rag/ingest.py) and answers at once with status
`in_progress`; clients poll the file, the batch or the store's `file_counts`. Search takes OpenAI's fields
plus fleet extensions, declared here and documented in docs/KNOWLEDGE.md: `fleet_retrieval`
("bm25" | "dense" | "hybrid", default hybrid), `fleet_fusion` ("convex" | "rrf", default convex),
`fleet_alpha` (the convex weight of the dense score, default 0.7), and reranking by a fleet model
(`ranking_options.ranker: "fleet:<model>"`, with `fleet_rerank_depth`, rag/rerank.py). A file deleted
from /v1/files stays searchable in the stores it was attached to until it is removed from them (OpenAI's
behaviour: deleting a file does not detach it); its results keep its id and filename.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from fleetlm.rag.chunking import ChunkingError, Strategy, parse_strategy
from fleetlm.rag.filters import FilterError, compile_filter
from fleetlm.rag.rerank import (
    DEFAULT_DEPTH,
    MAX_DEPTH,
    OPENAI_RANKERS,
    Judge,
    backend_judge,
    fleet_ranker,
    rerank,
)
from fleetlm.rag.search import DEFAULT_ALPHA, DEFAULT_FUSION, SearchRequest, search
from fleetlm.rag.store import STATUSES
from fleetlm.serve.errors import APIError, BackendError, BadRequest
from fleetlm.serve.files_api import KnowledgeBase, NotFound, api_errors, listing, open_knowledge, page_params

if TYPE_CHECKING:
    from fleetlm.serve.app import Gateway

MAX_PAIRS = 16
MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 512
MAX_NAME_CHARS = 256
MAX_BATCH_FILES = 500
MAX_QUERIES = 16
MAX_QUERY_CHARS = 4096
RANKERS = OPENAI_RANKERS
CREATE_FIELDS = {"name", "file_ids", "metadata", "expires_after", "chunking_strategy", "description"}
UPDATE_FIELDS = {"name", "metadata", "expires_after"}
SEARCH_FIELDS = {
    "query",
    "filters",
    "max_num_results",
    "ranking_options",
    "rewrite_query",
    "fleet_retrieval",
    "fleet_fusion",
    "fleet_alpha",
    "fleet_rerank_depth",
}


# ------------------------------------------------------------ bodies and checks


async def json_body(gw: Gateway, request: Request, allowed: set[str]) -> dict:
    raw = await gw.read_body(request)
    try:
        body = json.loads(raw) if raw else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    unknown = set(body) - allowed
    if unknown:
        raise BadRequest(f"unknown field {sorted(unknown)[0]!r}", param=sorted(unknown)[0])
    return body


def check_metadata(value: Any, param: str = "metadata") -> dict:
    """OpenAI's metadata: at most 16 string pairs, keys up to 64 and values up to 512 characters."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_PAIRS:
        raise BadRequest(f"{param} must be an object of at most {MAX_PAIRS} pairs", param=param)
    for k, v in value.items():
        if len(k) > MAX_KEY_CHARS or not isinstance(v, str) or len(v) > MAX_VALUE_CHARS:
            raise BadRequest(
                f"{param}[{k!r}]: keys up to {MAX_KEY_CHARS} characters, string values up to "
                f"{MAX_VALUE_CHARS}",
                param=param,
            )
    return value


def check_attributes(value: Any, param: str = "attributes") -> dict:
    """OpenAI's file attributes: at most 16 keys; values strings (up to 512), numbers or booleans."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > MAX_PAIRS:
        raise BadRequest(f"{param} must be an object of at most {MAX_PAIRS} pairs", param=param)
    for k, v in value.items():
        if not 0 < len(k) <= MAX_KEY_CHARS or '"' in k:
            raise BadRequest(
                f"{param}: key {k!r} must be 1 to {MAX_KEY_CHARS} characters without quotes", param=param
            )
        ok = (
            isinstance(v, (bool, int))
            or (isinstance(v, float) and math.isfinite(v))
            or (isinstance(v, str) and len(v) <= MAX_VALUE_CHARS)
        )
        if not ok:
            raise BadRequest(
                f"{param}[{k!r}] must be a string (up to {MAX_VALUE_CHARS} characters), a number "
                "or a boolean",
                param=param,
            )
    return value


def strategy_of(raw: Any) -> Strategy:
    try:
        return parse_strategy(raw)
    except ChunkingError as exc:
        raise BadRequest(str(exc), param=exc.param) from None


def check_expires_after(value: Any) -> dict | None:
    if value is None:
        return None
    if (
        not isinstance(value, dict)
        or value.get("anchor") != "last_active_at"
        or type(value.get("days")) is not int
        or not 1 <= value["days"] <= 365
        or set(value) - {"anchor", "days"}
    ):
        raise BadRequest(
            "expires_after must be {anchor: 'last_active_at', days: 1..365}", param="expires_after"
        )
    return value


# ------------------------------------------------------------ objects


def store_object(row: dict) -> dict:
    counts = row["file_counts"]
    return {
        "id": row["id"],
        "object": "vector_store",
        "created_at": row["created_at"],
        "name": row["name"],
        "usage_bytes": row["usage_bytes"],
        "file_counts": counts,
        "status": "in_progress" if counts["in_progress"] else "completed",
        "expires_after": row["expires_after"],
        "expires_at": None,
        "last_active_at": row["last_active_at"],
        "metadata": row["metadata"],
    }


def store_file_object(row: dict) -> dict:
    error = {"code": row["error_code"], "message": row["error"]} if row["status"] == "failed" else None
    return {
        "id": row["file_id"],
        "object": "vector_store.file",
        "usage_bytes": row["bytes"] if row["status"] == "completed" else 0,
        "created_at": row["created_at"],
        "vector_store_id": row["store_id"],
        "status": row["status"],
        "last_error": error,
        "chunking_strategy": row["strategy"].as_openai(),
        "attributes": row["attributes"],
    }


def batch_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "vector_store.files_batch",
        "created_at": row["created_at"],
        "vector_store_id": row["store_id"],
        "status": row["status"],
        "file_counts": row["file_counts"],
    }


def fleet_judge(gw: Any, model: str | None, param: str = "ranking_options.ranker") -> Judge | None:
    """The judge of a `fleet:<model>` ranker (None without one); a model the fleet lacks is a 400."""
    if model is None:
        return None
    backend = gw.backends.get(model)
    if backend is None or model not in gw.config.models:
        raise BadRequest(
            f"{param}: fleet:{model} is not a chat model of this fleet "
            f"(models: {', '.join(sorted(gw.config.models)) or 'none'})",
            param=param,
        )
    return backend_judge(backend, model)


def search_request(body: dict) -> SearchRequest:
    """A search body, checked: every bad part is a 400 naming it (a fleet ranker's model is checked by the
    endpoint, which knows the fleet)."""
    query = body.get("query")
    queries = [query] if isinstance(query, str) else query
    if (
        not isinstance(queries, list)
        or not queries
        or len(queries) > MAX_QUERIES
        or not all(isinstance(q, str) and q.strip() and len(q) <= MAX_QUERY_CHARS for q in queries)
    ):
        raise BadRequest(
            f"query must be a non-empty string or a list of 1 to {MAX_QUERIES} non-empty strings "
            f"(up to {MAX_QUERY_CHARS} characters each)",
            param="query",
        )
    k = body.get("max_num_results", 10)
    if type(k) is not int or not 1 <= k <= 50:
        raise BadRequest(
            f"max_num_results must be an integer from 1 to 50, not {k!r}", param="max_num_results"
        )
    options = body.get("ranking_options") or {}
    if not isinstance(options, dict) or set(options) - {"ranker", "score_threshold"}:
        raise BadRequest("ranking_options takes `ranker` and `score_threshold`", param="ranking_options")
    ranker = options.get("ranker")
    if ranker is not None and ranker not in RANKERS and not fleet_ranker(ranker):
        raise BadRequest(
            f"ranking_options.ranker must be one of {', '.join(sorted(RANKERS))}, or fleet:<model>",
            param="ranking_options.ranker",
        )
    depth = body.get("fleet_rerank_depth", DEFAULT_DEPTH)
    if type(depth) is not int or not 1 <= depth <= MAX_DEPTH:
        raise BadRequest(
            f"fleet_rerank_depth must be an integer from 1 to {MAX_DEPTH}, not {depth!r}",
            param="fleet_rerank_depth",
        )
    threshold = options.get("score_threshold", 0.0)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise BadRequest(
            "ranking_options.score_threshold must be a number from 0 to 1",
            param="ranking_options.score_threshold",
        )
    if body.get("rewrite_query") not in (None, False, True):
        raise BadRequest("rewrite_query must be a boolean", param="rewrite_query")
    retrieval = body.get("fleet_retrieval", "hybrid")
    if retrieval not in ("bm25", "dense", "hybrid"):
        raise BadRequest("fleet_retrieval must be 'bm25', 'dense' or 'hybrid'", param="fleet_retrieval")
    fusion = body.get("fleet_fusion", DEFAULT_FUSION)
    if fusion not in ("rrf", "convex"):
        raise BadRequest("fleet_fusion must be 'rrf' or 'convex'", param="fleet_fusion")
    alpha = body.get("fleet_alpha", DEFAULT_ALPHA)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise BadRequest("fleet_alpha must be a number from 0 to 1", param="fleet_alpha")
    filters = body.get("filters")
    if filters is not None:
        try:
            compile_filter(filters, "attributes")
        except FilterError as exc:
            raise BadRequest(str(exc), param=exc.param) from None
    return SearchRequest(
        queries=queries,
        max_num_results=k,
        filters=filters,
        score_threshold=float(threshold),
        retrieval=retrieval,
        fusion=fusion,
        alpha=float(alpha),
        reranker=fleet_ranker(ranker),
        rerank_depth=depth,
    )


# ------------------------------------------------------------ endpoints


def install_vector_stores(app: FastAPI, gw: Gateway) -> None:
    """Add /v1/vector_stores (stores, files, file batches, search) to the gateway's app."""

    async def find_store(kb: KnowledgeBase, store_id: str) -> dict:
        row = await run_in_threadpool(kb.store.get_store, store_id)
        if row is None:
            raise NotFound(f"no vector store with id {store_id!r}", param="vector_store_id")
        return row

    async def find_files(kb: KnowledgeBase, file_ids: list[str]) -> list[dict]:
        files = []
        for file_id in file_ids:
            row = await run_in_threadpool(kb.store.get_file, file_id)
            if row is None:
                raise NotFound(f"no file with id {file_id!r}", param="file_id")
            files.append(row)
        return files

    def attach_all(
        kb: KnowledgeBase,
        store_id: str,
        items: list[tuple[dict, dict, Strategy]],
        batch_id: str | None = None,
    ) -> list[dict]:
        rows = []
        for file, attributes, strategy in items:
            row = kb.store.attach(store_id, file, attributes, strategy, batch_id)
            kb.ingestor.submit(row["n"])
            rows.append(row)
        return rows

    def file_ids_of(body: dict, param: str = "file_ids") -> list[str]:
        ids = body.get(param) or []
        if (
            not isinstance(ids, list)
            or not all(isinstance(i, str) for i in ids)
            or len(ids) > MAX_BATCH_FILES
        ):
            raise BadRequest(f"{param} must be a list of at most {MAX_BATCH_FILES} file ids", param=param)
        return list(dict.fromkeys(ids))

    @app.post("/v1/vector_stores")
    @api_errors
    async def create_store(request: Request) -> Response:
        kb = await open_knowledge(gw, request)
        body = await json_body(gw, request, CREATE_FIELDS)
        name = body.get("name")
        if name is not None and (not isinstance(name, str) or len(name) > MAX_NAME_CHARS):
            raise BadRequest(f"name must be a string of at most {MAX_NAME_CHARS} characters", param="name")
        metadata = check_metadata(body.get("metadata"))
        expires = check_expires_after(body.get("expires_after"))
        strategy = strategy_of(body.get("chunking_strategy"))
        files = await find_files(kb, file_ids_of(body))
        row = await run_in_threadpool(kb.store.create_store, name, metadata, expires)
        await run_in_threadpool(attach_all, kb, row["id"], [(f, {}, strategy) for f in files])
        return JSONResponse(store_object(await find_store(kb, row["id"])))

    @app.get("/v1/vector_stores")
    @api_errors
    async def list_stores(request: Request) -> Response:
        kb = await open_knowledge(gw, request)
        limit, order, after = page_params(request)
        rows, more = await run_in_threadpool(kb.store.list_stores, limit, order, after)
        return JSONResponse(listing([store_object(r) for r in rows], more))

    @app.get("/v1/vector_stores/{store_id}")
    @api_errors
    async def retrieve_store(request: Request, store_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        return JSONResponse(store_object(await find_store(kb, store_id)))

    @app.post("/v1/vector_stores/{store_id}")
    @api_errors
    async def update_store(request: Request, store_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        body = await json_body(gw, request, UPDATE_FIELDS)
        await find_store(kb, store_id)
        changes: dict[str, Any] = {}
        if "name" in body:
            if body["name"] is not None and (
                not isinstance(body["name"], str) or len(body["name"]) > MAX_NAME_CHARS
            ):
                raise BadRequest(
                    f"name must be a string of at most {MAX_NAME_CHARS} characters", param="name"
                )
            changes["name"] = body["name"]
        if "metadata" in body:
            changes["metadata"] = check_metadata(body["metadata"])
        if "expires_after" in body:
            changes["expires_after"] = check_expires_after(body["expires_after"])
        row = await run_in_threadpool(kb.store.update_store, store_id, changes)
        return JSONResponse(store_object(row))  # type: ignore[arg-type]

    @app.delete("/v1/vector_stores/{store_id}")
    @api_errors
    async def delete_store(request: Request, store_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        if not await run_in_threadpool(kb.store.delete_store, store_id):
            raise NotFound(f"no vector store with id {store_id!r}", param="vector_store_id")
        return JSONResponse({"id": store_id, "object": "vector_store.deleted", "deleted": True})

    # ---------------------------------------------------------------- files of a store

    @app.post("/v1/vector_stores/{store_id}/files")
    @api_errors
    async def attach_file(request: Request, store_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        body = await json_body(gw, request, {"file_id", "attributes", "chunking_strategy"})
        await find_store(kb, store_id)
        if not isinstance(body.get("file_id"), str):
            raise BadRequest("file_id is required", param="file_id")
        attributes = check_attributes(body.get("attributes"))
        strategy = strategy_of(body.get("chunking_strategy"))
        (file,) = await find_files(kb, [body["file_id"]])
        (row,) = await run_in_threadpool(attach_all, kb, store_id, [(file, attributes, strategy)])
        return JSONResponse(store_file_object(row))

    @app.get("/v1/vector_stores/{store_id}/files")
    @api_errors
    async def list_store_files(request: Request, store_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        return await files_page(kb, request, store_id, None)

    async def files_page(
        kb: KnowledgeBase, request: Request, store_id: str, batch_id: str | None
    ) -> Response:
        limit, order, after = page_params(request)
        status = request.query_params.get("filter")
        if status is not None and status not in STATUSES:
            raise BadRequest(f"filter must be one of {', '.join(STATUSES)}", param="filter")
        await find_store(kb, store_id)
        rows, more = await run_in_threadpool(
            kb.store.list_store_files, store_id, status, batch_id, limit, order, after
        )
        data = [store_file_object(r) for r in rows]
        return JSONResponse(listing(data, more))

    async def find_store_file(kb: KnowledgeBase, store_id: str, file_id: str) -> dict:
        await find_store(kb, store_id)
        row = await run_in_threadpool(kb.store.get_store_file, store_id, file_id)
        if row is None:
            raise NotFound(f"no file {file_id!r} in vector store {store_id!r}", param="file_id")
        return row

    @app.get("/v1/vector_stores/{store_id}/files/{file_id}")
    @api_errors
    async def retrieve_store_file(request: Request, store_id: str, file_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        return JSONResponse(store_file_object(await find_store_file(kb, store_id, file_id)))

    @app.post("/v1/vector_stores/{store_id}/files/{file_id}")
    @api_errors
    async def update_store_file(request: Request, store_id: str, file_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        body = await json_body(gw, request, {"attributes"})
        await find_store_file(kb, store_id, file_id)
        attributes = check_attributes(body.get("attributes"))
        row = await run_in_threadpool(kb.store.set_attributes, store_id, file_id, attributes)
        return JSONResponse(store_file_object(row))  # type: ignore[arg-type]

    @app.delete("/v1/vector_stores/{store_id}/files/{file_id}")
    @api_errors
    async def detach_file(request: Request, store_id: str, file_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        await find_store_file(kb, store_id, file_id)
        await run_in_threadpool(kb.store.detach, store_id, file_id)
        return JSONResponse({"id": file_id, "object": "vector_store.file.deleted", "deleted": True})

    @app.get("/v1/vector_stores/{store_id}/files/{file_id}/content")
    @api_errors
    async def store_file_content(request: Request, store_id: str, file_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        row = await find_store_file(kb, store_id, file_id)
        texts = (
            await run_in_threadpool(kb.store.chunk_texts, row["doc_id"])
            if row["status"] == "completed"
            else []
        )
        return JSONResponse(
            {
                "object": "vector_store.file_content.page",
                "data": [{"type": "text", "text": t} for t in texts],
                "has_more": False,
                "next_page": None,
            }
        )

    # ---------------------------------------------------------------- file batches

    @app.post("/v1/vector_stores/{store_id}/file_batches")
    @api_errors
    async def create_batch(request: Request, store_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        body = await json_body(gw, request, {"file_ids", "files", "attributes", "chunking_strategy"})
        await find_store(kb, store_id)
        attributes = check_attributes(body.get("attributes"))
        strategy = strategy_of(body.get("chunking_strategy"))
        if body.get("files") is not None:
            if body.get("file_ids"):
                raise BadRequest("give file_ids or files, not both", param="files")
            items = body["files"]
            if not isinstance(items, list) or not items or len(items) > MAX_BATCH_FILES:
                raise BadRequest(f"files must be a list of 1 to {MAX_BATCH_FILES} objects", param="files")
            specs = []
            for i, item in enumerate(items):
                if (
                    not isinstance(item, dict)
                    or not isinstance(item.get("file_id"), str)
                    or (set(item) - {"file_id", "attributes", "chunking_strategy"})
                ):
                    raise BadRequest(
                        f"files[{i}] must be {{file_id, attributes?, chunking_strategy?}}",
                        param=f"files[{i}]",
                    )
                own = check_attributes(item.get("attributes"), f"files[{i}].attributes")
                specs.append(
                    (
                        item["file_id"],
                        own or attributes,
                        strategy_of(item["chunking_strategy"]) if "chunking_strategy" in item else strategy,
                    )
                )
        else:
            ids = file_ids_of(body)
            if not ids:
                raise BadRequest("file_ids must name at least one file", param="file_ids")
            specs = [(i, attributes, strategy) for i in ids]
        files = await find_files(kb, [s[0] for s in specs])
        batch_id = await run_in_threadpool(kb.store.create_batch, store_id)
        await run_in_threadpool(
            attach_all, kb, store_id, [(f, a, s) for f, (_, a, s) in zip(files, specs, strict=True)], batch_id
        )
        row = await run_in_threadpool(kb.store.get_batch, store_id, batch_id)
        return JSONResponse(batch_object(row))  # type: ignore[arg-type]

    async def find_batch(kb: KnowledgeBase, store_id: str, batch_id: str) -> dict:
        await find_store(kb, store_id)
        row = await run_in_threadpool(kb.store.get_batch, store_id, batch_id)
        if row is None:
            raise NotFound(f"no file batch {batch_id!r} in vector store {store_id!r}", param="batch_id")
        return row

    @app.get("/v1/vector_stores/{store_id}/file_batches/{batch_id}")
    @api_errors
    async def retrieve_batch(request: Request, store_id: str, batch_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        return JSONResponse(batch_object(await find_batch(kb, store_id, batch_id)))

    @app.post("/v1/vector_stores/{store_id}/file_batches/{batch_id}/cancel")
    @api_errors
    async def cancel_batch(request: Request, store_id: str, batch_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        await find_batch(kb, store_id, batch_id)
        row = await run_in_threadpool(kb.store.cancel_batch, store_id, batch_id)
        return JSONResponse(batch_object(row))  # type: ignore[arg-type]

    @app.get("/v1/vector_stores/{store_id}/file_batches/{batch_id}/files")
    @api_errors
    async def batch_files(request: Request, store_id: str, batch_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        await find_batch(kb, store_id, batch_id)
        return await files_page(kb, request, store_id, batch_id)

    # ---------------------------------------------------------------- search

    @app.post("/v1/vector_stores/{store_id}/search")
    @api_errors
    async def search_store(request: Request, store_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        body = await json_body(gw, request, SEARCH_FIELDS)
        req = search_request(body)
        judge = fleet_judge(gw, req.reranker)
        await find_store(kb, store_id)
        if judge is None:
            hits = await run_in_threadpool(search, kb.store, store_id, req, kb.ingestor.embed)
        else:  # the fused candidates first (threshold left for the judged scores), then the judgement
            wide = replace(req, max_num_results=max(req.max_num_results, req.rerank_depth), score_threshold=0)
            hits = await run_in_threadpool(search, kb.store, store_id, wide, kb.ingestor.embed)
            try:
                hits = await rerank("\n".join(req.queries), hits, judge, req.rerank_depth)
            except APIError:
                raise
            except Exception as exc:  # noqa: BLE001 - an engine's failure is the ranker's, answered as a 502
                raise BackendError(f"ranker fleet:{req.reranker}: {type(exc).__name__}: {exc}") from None
            hits = [h for h in hits if h["score"] >= req.score_threshold][: req.max_num_results]
        await run_in_threadpool(kb.store.touch, store_id)
        data = [
            {
                "file_id": h["file_id"],
                "filename": h["filename"],
                "score": h["score"],
                "attributes": h["attributes"],
                "content": [{"type": "text", "text": h["text"]}],
            }
            for h in hits
        ]
        return JSONResponse(
            {
                "object": "vector_store.search_results.page",
                "search_query": req.queries,
                "data": data,
                "has_more": False,
                "next_page": None,
            }
        )
