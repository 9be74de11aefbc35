"""/v1/files in OpenAI's shapes (upload, list, retrieve, content, delete), and the gateway's knowledge base.

An upload is counted as it arrives (413 past `knowledge.max_upload_bytes`), spooled by Starlette's multipart
parser (in memory up to 1 MB, on disk beyond), then copied in 1 MB blocks to the knowledge store's blob of
its SHA-256 (bytes uploaded twice are stored once). The knowledge base (store, ingest worker, embedder) is
opened on the first request that needs it, so a gateway that never uses it never touches its files; opening
it re-queues ingestion a killed process left unfinished.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from fleetlm.catalog.store import fleet_home
from fleetlm.rag.ingest import Ingestor
from fleetlm.rag.store import KnowledgeStore, SqliteKnowledgeStore, StoreError
from fleetlm.serve.errors import APIError, BadRequest
from fleetlm.serve.uploads import read_multipart

if TYPE_CHECKING:
    from fleetlm.serve.app import Gateway

PURPOSES = {"assistants", "batch", "fine-tune", "vision", "user_data", "evals"}
UPLOAD_FIELDS = {"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"}
COPY_BLOCK = 1024 * 1024
MAX_LIST = 10_000
MAX_FILENAME_CHARS = 512


class NotFound(APIError):
    status, type, code = 404, "invalid_request_error", "not_found"


class KnowledgeUnavailable(APIError):
    status, type, code = 503, "service_unavailable", "knowledge_store_unavailable"


@dataclass
class KnowledgeBase:
    store: KnowledgeStore
    ingestor: Ingestor


_open_lock = threading.Lock()


def _minilm_embed(texts: list[str]) -> np.ndarray:
    from fleetlm.serve.embeddings import shared_minilm

    return shared_minilm().encode(texts, truncate=True)[0]  # the gateway's one MiniLM, not a second copy


def index_path(gw: Gateway) -> Path:
    """knowledge.index_path, else the fleet's own SQLite file, else <fleet home>/knowledge.db."""
    configured = gw.config.knowledge.index_path
    if configured:
        return Path(configured).expanduser()
    url = gw.store.url
    if url.startswith("sqlite:///") and ":memory:" not in url:
        return Path(url.removeprefix("sqlite:///"))
    return fleet_home() / "knowledge.db"


def open_store(gw: Gateway, files_dir: Path) -> KnowledgeStore:
    """The store fleet.yaml's `knowledge.backend` names: the embedded SQLite one (default), or Milvus for the
    vectors with the metadata in the fleet's PostgreSQL storage when it has one, else in the index file."""
    settings = gw.config.knowledge
    if settings.backend == "sqlite":
        return SqliteKnowledgeStore(index_path(gw), files_dir)
    from fleetlm.rag.milvus_store import MilvusKnowledgeStore

    meta_url = settings.meta_url
    if meta_url is None:
        url = gw.store.url
        meta_url = url if url.startswith("postgresql") else f"sqlite:///{index_path(gw)}"
    uri = settings.milvus_uri or str(fleet_home() / "knowledge-milvus.db")
    return MilvusKnowledgeStore(
        meta_url,
        files_dir,
        uri,
        token=settings.milvus_token,
        collection=settings.milvus_collection,
        index_type=settings.milvus_index,
    )


def knowledge_base(gw: Gateway) -> KnowledgeBase:
    """The gateway's knowledge base, opened (and its unfinished ingestion re-queued) on first use."""
    kb = getattr(gw, "knowledge", None)
    if kb is not None:
        return kb
    with _open_lock:
        kb = getattr(gw, "knowledge", None)
        if kb is None:
            settings = gw.config.knowledge
            files_dir = (
                Path(settings.files_dir).expanduser() if settings.files_dir else fleet_home() / "files"
            )
            store = open_store(gw, files_dir)
            embed = getattr(gw, "knowledge_embed", None) or _minilm_embed
            kb = KnowledgeBase(store, Ingestor(store, embed, settings.embed_batch).start())
            gw.knowledge = kb  # type: ignore[attr-defined]
    return kb


async def open_knowledge(gw: Gateway, request: Request) -> KnowledgeBase:
    """Authorize the request and hand over the knowledge base (opened in a thread: it may recover)."""
    from fleetlm.serve.app import _Call  # app.py imports this module: a top-level import would be circular

    await gw.authorize(request, _Call("knowledge"))
    try:
        return await run_in_threadpool(knowledge_base, gw)
    except StoreError as exc:  # the store cannot be opened (Milvus unreachable, extra not installed, ...)
        raise KnowledgeUnavailable(str(exc)) from None


def store_failure(exc: Exception) -> KnowledgeUnavailable | None:
    """The 503 for an exception raised by the knowledge store's server in the middle of a request (Milvus
    gone, its metadata database unreachable), or None for anything else, which stays a 500: a bug."""
    if type(exc).__module__.startswith("pymilvus"):
        return KnowledgeUnavailable(f"the Milvus server failed during the request: {exc}")
    try:
        from sqlalchemy.exc import DisconnectionError, OperationalError
    except ImportError:
        return None
    if isinstance(exc, DisconnectionError | OperationalError):
        return KnowledgeUnavailable(f"the knowledge store's database is unreachable: {exc.orig or exc}")
    return None


def close_knowledge(gw: Gateway) -> None:
    kb = getattr(gw, "knowledge", None)
    if kb is not None:
        kb.ingestor.stop()
        kb.store.close()
        gw.knowledge = None  # type: ignore[attr-defined]


def api_errors(handler: Any) -> Any:
    """The endpoint's APIError as OpenAI's error JSON with its status."""

    @functools.wraps(handler)
    async def wrapped(*args: Any, **kwargs: Any) -> Response:
        try:
            return await handler(*args, **kwargs)
        except APIError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)

    return wrapped


def page_params(
    request: Request, default_limit: int = 20, max_limit: int = 100
) -> tuple[int, str, str | None]:
    """limit, order (default desc) and after of a list request, checked."""
    q = request.query_params
    raw = q.get("limit")
    try:
        limit = int(raw) if raw is not None else default_limit
    except ValueError:
        raise BadRequest(f"limit must be an integer, not {raw!r}", param="limit") from None
    if not 1 <= limit <= max_limit:
        raise BadRequest(f"limit must be from 1 to {max_limit}", param="limit")
    if q.get("before"):
        raise BadRequest("`before` is not supported here; page forward with `after`", param="before")
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("order must be 'asc' or 'desc'", param="order")
    return limit, order, q.get("after") or None


def listing(data: list[dict], has_more: bool) -> dict:
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def file_object(row: dict) -> dict:
    return {
        "id": row["id"],
        "object": "file",
        "bytes": row["bytes"],
        "created_at": row["created_at"],
        "filename": row["filename"],
        "purpose": row["purpose"],
        "status": "processed",
        "expires_at": None,
        "status_details": None,
    }


async def _read_form(gw: Gateway, request: Request) -> FormData:
    return await read_multipart(gw, request, limit=gw.config.knowledge.max_upload_bytes, max_fields=8,
                                how_to="upload files as multipart/form-data with a `file` part and a "
                                       "`purpose` field")


def _spool_to_store(kb: KnowledgeBase, upload: UploadFile, filename: str, purpose: str) -> dict:
    """Copy the spooled upload beside the blobs in blocks, hashing as it goes, and record it."""
    tmp = kb.store.files_dir / f".upload-{secrets.token_hex(8)}"
    digest, size = hashlib.sha256(), 0
    try:
        upload.file.seek(0)
        with tmp.open("wb") as out:
            while block := upload.file.read(COPY_BLOCK):
                digest.update(block)
                size += len(block)
                out.write(block)
        return kb.store.add_file(filename, purpose, tmp, digest.hexdigest(), size)
    finally:
        tmp.unlink(missing_ok=True)


def install_files(app: FastAPI, gw: Gateway) -> None:
    """Add /v1/files to the gateway's app (and close the knowledge base when the app shuts down)."""
    app.router.on_shutdown.append(lambda: close_knowledge(gw))

    @app.post("/v1/files")
    @api_errors
    async def upload(request: Request) -> Response:
        kb = await open_knowledge(gw, request)
        form = await _read_form(gw, request)
        try:
            for key in form.keys():
                if key not in UPLOAD_FIELDS:
                    raise BadRequest(f"unknown field {key!r}", param=key)
            part = form.get("file")
            if not isinstance(part, UploadFile):
                raise BadRequest("the `file` part is required, as a file", param="file")
            purpose = form.get("purpose")
            if not isinstance(purpose, str) or purpose not in PURPOSES:
                raise BadRequest(f"purpose must be one of {', '.join(sorted(PURPOSES))}", param="purpose")
            filename = Path(part.filename or "upload").name[:MAX_FILENAME_CHARS] or "upload"
            row = await run_in_threadpool(_spool_to_store, kb, part, filename, purpose)
        finally:
            await form.close()
        return JSONResponse(file_object(row))

    @app.get("/v1/files")
    @api_errors
    async def list_files(request: Request) -> Response:
        kb = await open_knowledge(gw, request)
        limit, order, after = page_params(request, default_limit=MAX_LIST, max_limit=MAX_LIST)
        purpose = request.query_params.get("purpose")
        rows, more = await run_in_threadpool(kb.store.list_files, purpose, limit, order, after)
        return JSONResponse(listing([file_object(r) for r in rows], more))

    async def find(kb: KnowledgeBase, file_id: str) -> dict:
        row = await run_in_threadpool(kb.store.get_file, file_id)
        if row is None:
            raise NotFound(f"no file with id {file_id!r}", param="file_id")
        return row

    @app.get("/v1/files/{file_id}")
    @api_errors
    async def retrieve(request: Request, file_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        return JSONResponse(file_object(await find(kb, file_id)))

    @app.get("/v1/files/{file_id}/content")
    @api_errors
    async def content(request: Request, file_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        row = await find(kb, file_id)
        return FileResponse(
            kb.store.blob_path(row["sha256"]), media_type="application/octet-stream", filename=row["filename"]
        )

    @app.delete("/v1/files/{file_id}")
    @api_errors
    async def delete(request: Request, file_id: str) -> Response:
        kb = await open_knowledge(gw, request)
        if not await run_in_threadpool(kb.store.delete_file, file_id):
            raise NotFound(f"no file with id {file_id!r}", param="file_id")
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})
