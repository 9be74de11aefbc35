"""The knowledge store: its interface (KnowledgeStore) and the embedded implementation on SQLite (apsw).

One SQLite file holds everything: file metadata, vector stores, their files and batches, the chunks, a
full-text index (FTS5, BM25) and each chunk's MiniLM vector (a float32 blob). The file is opened with apsw,
which brings its own recent SQLite with FTS5 and explicit transactions. Dense search is an exact scan: each
store's vectors are held in memory as one float16 matrix of unit vectors (and their norms), refreshed with
only the files that came or went when a trigger-maintained generation counter says the store's completed
chunks changed (in this process or another); a query is one matrix-vector product, and the few candidates
within float16's error of the k-th best are scored again exactly from their float32 blobs. BM25 ranks the
FTS5 index alone and checks only its best matches against the store (dense() and bm25() say why). The
uploaded bytes live beside the file, one blob per content hash (`<files_dir>/<sha256>`): the same bytes
uploaded twice are stored once.

Consistency (the reason everything shares one file): chunks are committed in batches, and a document is
marked completed in the same transaction that commits its last chunk, together with every vector store file
waiting on it. A process killed mid-document leaves the document `in_progress`; on start-up the ingest
worker re-queues those files and first deletes the half-written chunks, so a half-indexed file is never
reported `completed`. Chunks belong to a document, keyed by (content hash, chunking strategy): the same
bytes attached twice, with the same strategy, are chunked and embedded once.

The scale path (rag/milvus_store.py: Milvus through pymilvus, metadata in SQL) implements the same Protocol.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import apsw
import numpy as np

from fleetlm.errors import FleetError
from fleetlm.rag.chunking import Chunk, Strategy

BUSY_TIMEOUT_MS = 10_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS kb_files(
  n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, filename TEXT NOT NULL, purpose TEXT NOT NULL,
  bytes INTEGER NOT NULL, sha256 TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS kb_files_sha ON kb_files(sha256);
CREATE TABLE IF NOT EXISTS kb_docs(
  id INTEGER PRIMARY KEY, sha256 TEXT NOT NULL, chunking TEXT NOT NULL, status TEXT NOT NULL,
  error_code TEXT, error TEXT, chunks INTEGER NOT NULL DEFAULT 0, UNIQUE(sha256, chunking));
CREATE TABLE IF NOT EXISTS kb_chunks(
  id INTEGER PRIMARY KEY, doc_id INTEGER NOT NULL, seq INTEGER NOT NULL, tokens INTEGER NOT NULL,
  embedding BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS kb_chunks_doc ON kb_chunks(doc_id);
CREATE VIRTUAL TABLE IF NOT EXISTS kb_chunks_fts USING fts5(text, tokenize='porter unicode61');
CREATE TABLE IF NOT EXISTS kb_stores(
  n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, name TEXT, created_at INTEGER NOT NULL,
  last_active_at INTEGER NOT NULL, metadata TEXT NOT NULL DEFAULT '{}', expires_after TEXT);
CREATE TABLE IF NOT EXISTS kb_store_files(
  n INTEGER PRIMARY KEY, store_id TEXT NOT NULL, file_id TEXT NOT NULL, filename TEXT NOT NULL,
  sha256 TEXT NOT NULL, bytes INTEGER NOT NULL, doc_id INTEGER, status TEXT NOT NULL, error_code TEXT,
  error TEXT, attributes TEXT NOT NULL DEFAULT '{}', chunking TEXT NOT NULL, batch_id TEXT,
  created_at INTEGER NOT NULL, UNIQUE(store_id, file_id));
CREATE INDEX IF NOT EXISTS kb_store_files_doc ON kb_store_files(doc_id, store_id);
CREATE INDEX IF NOT EXISTS kb_store_files_status ON kb_store_files(status);
CREATE TABLE IF NOT EXISTS kb_batches(
  n INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, store_id TEXT NOT NULL, created_at INTEGER NOT NULL,
  cancelled INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS kb_generation(id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL);
INSERT OR IGNORE INTO kb_generation VALUES (1, 0);
CREATE TRIGGER IF NOT EXISTS kb_generation_on_status AFTER UPDATE OF status, doc_id ON kb_store_files
  BEGIN UPDATE kb_generation SET value = value + 1 WHERE id = 1; END;
CREATE TRIGGER IF NOT EXISTS kb_generation_on_delete AFTER DELETE ON kb_store_files
  BEGIN UPDATE kb_generation SET value = value + 1 WHERE id = 1; END;
"""

STATUSES = ("in_progress", "completed", "failed", "cancelled")
# BM25 ranks the whole FTS5 index's best matches first and checks only those against the store (bm25()).
BM25_FIRST_DEPTH = 100
BM25_MAX_DEPTH = 6400
# Dense search scans float16 unit vectors; a float16 score is within F16_ERROR x |q| x |v| of the exact one:
# rounding v and q (2^-11 each, relative), the float16 result (2^-11) and float32 sums, with room to spare.
F16_ERROR = 2.0**-9
NORMALIZE_ROWS = 4096


class StoreError(FleetError):
    """The knowledge store cannot be opened or used."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}" if prefix == "file" else f"{prefix}_{secrets.token_hex(12)}"


class KnowledgeStore(Protocol):
    """What the API and the ingest worker need from a store; the embedded SQLite one and a scale path."""

    def add_file(self, filename: str, purpose: str, upload: Path, sha256: str, size: int) -> dict: ...
    def get_file(self, file_id: str) -> dict | None: ...
    def list_files(
        self, purpose: str | None, limit: int, order: str, after: str | None
    ) -> tuple[list[dict], bool]: ...
    def delete_file(self, file_id: str) -> bool: ...
    def blob_path(self, sha256: str) -> Path: ...

    def create_store(self, name: str | None, metadata: dict, expires_after: dict | None) -> dict: ...
    def get_store(self, store_id: str) -> dict | None: ...
    def list_stores(self, limit: int, order: str, after: str | None) -> tuple[list[dict], bool]: ...
    def update_store(self, store_id: str, changes: dict) -> dict | None: ...
    def delete_store(self, store_id: str) -> bool: ...

    def attach(
        self, store_id: str, file: dict, attributes: dict, strategy: Strategy, batch_id: str | None = None
    ) -> dict: ...
    def get_store_file(self, store_id: str, file_id: str) -> dict | None: ...
    def list_store_files(
        self,
        store_id: str,
        status: str | None,
        batch_id: str | None,
        limit: int,
        order: str,
        after: str | None,
    ) -> tuple[list[dict], bool]: ...
    def set_attributes(self, store_id: str, file_id: str, attributes: dict) -> dict | None: ...
    def detach(self, store_id: str, file_id: str) -> bool: ...
    def create_batch(self, store_id: str) -> str: ...
    def get_batch(self, store_id: str, batch_id: str) -> dict | None: ...
    def cancel_batch(self, store_id: str, batch_id: str) -> dict | None: ...

    def pending(self) -> list[int]: ...
    def job(self, n: int) -> dict | None: ...
    def settle_from_doc(self, n: int) -> bool: ...
    def start_doc(self, sha256: str, chunking: str) -> int: ...
    def doc_wanted(self, doc_id: int) -> bool: ...
    def add_chunks(self, doc_id: int, chunks: Sequence[Chunk], vectors: np.ndarray, final: bool) -> bool: ...
    def fail_doc(self, doc_id: int, code: str, message: str) -> None: ...
    def drop_doc(self, doc_id: int) -> None: ...
    def fail_file(self, n: int, code: str, message: str) -> None: ...
    def chunk_texts(self, doc_id: int) -> list[str]: ...

    def bm25(
        self, store_id: str, match: str, where: tuple[str, list], limit: int
    ) -> list[tuple[int, int, float]]: ...
    def dense(
        self, store_id: str, vector: np.ndarray, where: tuple[str, list], limit: int
    ) -> list[tuple[int, int, float]]: ...
    def similarities(self, chunk_ids: Sequence[int], vector: np.ndarray) -> dict[int, float]: ...
    def hits(self, pairs: Sequence[tuple[int, int]]) -> list[dict | None]: ...
    def close(self) -> None: ...


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class SqliteKnowledgeStore:
    """The embedded store: one SQLite file (apsw, FTS5), a matrix of vectors per store, a folder of blobs."""

    def __init__(self, index_path: str | Path, files_dir: str | Path):
        self.index_path = Path(index_path)
        self.files_dir = Path(files_dir)
        self.index_path.parent.mkdir(parents=True, exist_ok=True)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conns: list[Any] = []
        self._conns_lock = threading.Lock()
        # store id -> its completed chunks' vectors as one matrix (_StoreVectors), refreshed when the
        # generation (bumped by triggers on any change to a completed set, from any process) moves on.
        self._matrices: dict[str, _StoreVectors] = {}
        self._matrices_lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        with self._tx() as db:
            db.execute(SCHEMA)

    # ------------------------------------------------------------ connections

    def _db(self) -> Any:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = apsw.Connection(str(self.index_path))
            except apsw.Error as exc:
                raise StoreError(f"knowledge store: cannot open {self.index_path} ({exc})") from None
            db.set_busy_timeout(BUSY_TIMEOUT_MS)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # as the usage log: a commit survives a killed process
            self._local.db = db
            with self._conns_lock:
                self._conns.append(db)
        return db

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A write transaction (BEGIN IMMEDIATE: takes the write lock up front, so it never deadlocks)."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _rows(self, sql: str, params: Sequence = ()) -> list[dict]:
        cur = self._db().execute(sql, tuple(params))
        try:
            names = [d[0] for d in cur.get_description()]
        except apsw.ExecutionCompleteError:  # a statement that gave no rows has no description left
            return []
        return [dict(zip(names, row, strict=True)) for row in cur]

    def _one(self, sql: str, params: Sequence = ()) -> dict | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def close(self) -> None:
        with self._conns_lock:
            for db in self._conns:
                db.close()
            self._conns.clear()
        self._local = threading.local()

    def _page(
        self, table: str, where: str, params: list, limit: int, order: str, after: str | None
    ) -> tuple[list[dict], bool]:
        """Rows of `table` by insertion order, `limit` of them after the row whose id is `after`."""
        desc = order == "desc"
        if after is not None:
            anchor = self._one(f"SELECT n FROM {table} WHERE id = ?", [after])
            if anchor is None:
                return [], False
            where += f" AND n {'<' if desc else '>'} ?"
            params = [*params, anchor["n"]]
        rows = self._rows(
            f"SELECT * FROM {table} WHERE {where} ORDER BY n {'DESC' if desc else 'ASC'} LIMIT ?",
            [*params, limit + 1],
        )
        return rows[:limit], len(rows) > limit

    # ------------------------------------------------------------ files

    def blob_path(self, sha256: str) -> Path:
        return self.files_dir / sha256

    def add_file(self, filename: str, purpose: str, upload: Path, sha256: str, size: int) -> dict:
        """Record an upload; its bytes (already hashed) move to the blob of their hash unless it exists."""
        blob = self.blob_path(sha256)
        if blob.exists():
            upload.unlink(missing_ok=True)
        else:
            shutil.move(str(upload), blob)
        file_id = new_id("file")
        with self._tx() as db:
            db.execute(
                "INSERT INTO kb_files(id, filename, purpose, bytes, sha256, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (file_id, filename, purpose, size, sha256, int(time.time())),
            )
        return self.get_file(file_id)  # type: ignore[return-value]

    def get_file(self, file_id: str) -> dict | None:
        return self._one("SELECT * FROM kb_files WHERE id = ?", [file_id])

    def list_files(
        self, purpose: str | None, limit: int, order: str, after: str | None
    ) -> tuple[list[dict], bool]:
        if purpose is None:
            return self._page("kb_files", "1", [], limit, order, after)
        return self._page("kb_files", "purpose = ?", [purpose], limit, order, after)

    def delete_file(self, file_id: str) -> bool:
        """The file's record goes, and its bytes once no other file has them. Vector stores keep their chunks
        of it (searchable, under this file id) until the file is removed from them, as OpenAI does."""
        with self._tx() as db:
            row = self._one("SELECT sha256 FROM kb_files WHERE id = ?", [file_id])
            if row is None:
                return False
            db.execute("DELETE FROM kb_files WHERE id = ?", (file_id,))
            others = self._one("SELECT 1 AS x FROM kb_files WHERE sha256 = ? LIMIT 1", [row["sha256"]])
        if others is None:
            self.blob_path(row["sha256"]).unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------ vector stores

    def create_store(self, name: str | None, metadata: dict, expires_after: dict | None) -> dict:
        store_id, now = new_id("vs"), int(time.time())
        with self._tx() as db:
            db.execute(
                "INSERT INTO kb_stores(id, name, created_at, last_active_at, metadata, expires_after) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (store_id, name, now, now, _json(metadata), _json(expires_after) if expires_after else None),
            )
        return self.get_store(store_id)  # type: ignore[return-value]

    def _counts(self, where: str, params: Sequence) -> dict:
        counts = dict.fromkeys(STATUSES, 0)
        for row in self._rows(
            f"SELECT status, COUNT(*) AS c FROM kb_store_files WHERE {where} GROUP BY status", params
        ):
            counts[row["status"]] = row["c"]
        counts["total"] = sum(counts.values())
        return counts

    def _store(self, row: dict) -> dict:
        row["file_counts"] = self._counts("store_id = ?", [row["id"]])
        used = self._one(
            "SELECT COALESCE(SUM(bytes), 0) AS b FROM kb_store_files WHERE store_id = ? AND "
            "status = 'completed'",
            [row["id"]],
        )
        row["usage_bytes"] = used["b"] if used else 0
        row["metadata"] = json.loads(row["metadata"])
        row["expires_after"] = json.loads(row["expires_after"]) if row["expires_after"] else None
        return row

    def get_store(self, store_id: str) -> dict | None:
        row = self._one("SELECT * FROM kb_stores WHERE id = ?", [store_id])
        return None if row is None else self._store(row)

    def list_stores(self, limit: int, order: str, after: str | None) -> tuple[list[dict], bool]:
        rows, more = self._page("kb_stores", "1", [], limit, order, after)
        return [self._store(r) for r in rows], more

    def update_store(self, store_id: str, changes: dict) -> dict | None:
        sets, params = [], []
        for column in ("name", "metadata", "expires_after"):
            if column in changes:
                value = changes[column]
                sets.append(f"{column} = ?")
                params.append(value if column == "name" or value is None else _json(value))
        with self._tx() as db:
            if self._one("SELECT 1 AS x FROM kb_stores WHERE id = ?", [store_id]) is None:
                return None
            if sets:
                db.execute(f"UPDATE kb_stores SET {', '.join(sets)} WHERE id = ?", (*params, store_id))
        return self.get_store(store_id)

    def touch(self, store_id: str, every_s: int = 60) -> None:
        """Move last_active_at to now; at most once a minute, so that searches rarely write."""
        now = int(time.time())
        row = self._one("SELECT last_active_at AS t FROM kb_stores WHERE id = ?", [store_id])
        if row is not None and now - row["t"] >= every_s:
            with self._tx() as db:
                db.execute("UPDATE kb_stores SET last_active_at = ? WHERE id = ?", (now, store_id))

    def delete_store(self, store_id: str) -> bool:
        with self._tx() as db:
            if self._one("SELECT 1 AS x FROM kb_stores WHERE id = ?", [store_id]) is None:
                return False
            docs = [
                r["doc_id"]
                for r in self._rows(
                    "SELECT DISTINCT doc_id FROM kb_store_files WHERE store_id = ? AND doc_id IS NOT NULL",
                    [store_id],
                )
            ]
            db.execute("DELETE FROM kb_store_files WHERE store_id = ?", (store_id,))
            db.execute("DELETE FROM kb_batches WHERE store_id = ?", (store_id,))
            db.execute("DELETE FROM kb_stores WHERE id = ?", (store_id,))
            for doc_id in docs:
                self._drop_if_orphan(db, doc_id)
        return True

    # ------------------------------------------------------------ vector store files and batches

    def attach(
        self, store_id: str, file: dict, attributes: dict, strategy: Strategy, batch_id: str | None = None
    ) -> dict:
        """The file joins the store (in_progress, for the ingest worker); attaching it again does nothing."""
        with self._tx() as db:
            existing = self.get_store_file(store_id, file["id"])
            if existing is not None:
                return existing
            db.execute(
                "INSERT INTO kb_store_files(store_id, file_id, filename, sha256, bytes, status, attributes, "
                "chunking, batch_id, created_at) VALUES (?, ?, ?, ?, ?, 'in_progress', ?, ?, ?, ?)",
                (
                    store_id,
                    file["id"],
                    file["filename"],
                    file["sha256"],
                    file["bytes"],
                    _json(attributes),
                    _json({"max": strategy.max_tokens, "overlap": strategy.overlap_tokens}),
                    batch_id,
                    int(time.time()),
                ),
            )
        return self.get_store_file(store_id, file["id"])  # type: ignore[return-value]

    @staticmethod
    def _store_file(row: dict) -> dict:
        row["attributes"] = json.loads(row["attributes"])
        chunking = json.loads(row["chunking"])
        row["strategy"] = Strategy(chunking["max"], chunking["overlap"])
        return row

    def get_store_file(self, store_id: str, file_id: str) -> dict | None:
        row = self._one(
            "SELECT * FROM kb_store_files WHERE store_id = ? AND file_id = ?", [store_id, file_id]
        )
        return None if row is None else self._store_file(row)

    def list_store_files(
        self,
        store_id: str,
        status: str | None,
        batch_id: str | None,
        limit: int,
        order: str,
        after: str | None,
    ) -> tuple[list[dict], bool]:
        where, params = "store_id = ?", [store_id]
        if status is not None:
            where, params = where + " AND status = ?", [*params, status]
        if batch_id is not None:
            where, params = where + " AND batch_id = ?", [*params, batch_id]
        if after is not None:  # a store file's id is its file's id: page on it within the store
            anchor = self._one(
                "SELECT n FROM kb_store_files WHERE store_id = ? AND file_id = ?", [store_id, after]
            )
            if anchor is None:
                return [], False
            where += f" AND n {'<' if order == 'desc' else '>'} ?"
            params.append(anchor["n"])
        rows = self._rows(
            f"SELECT * FROM kb_store_files WHERE {where} ORDER BY n "
            f"{'DESC' if order == 'desc' else 'ASC'} LIMIT ?",
            [*params, limit + 1],
        )
        return [self._store_file(r) for r in rows[:limit]], len(rows) > limit

    def set_attributes(self, store_id: str, file_id: str, attributes: dict) -> dict | None:
        with self._tx() as db:
            db.execute(
                "UPDATE kb_store_files SET attributes = ? WHERE store_id = ? AND file_id = ?",
                (_json(attributes), store_id, file_id),
            )
        return self.get_store_file(store_id, file_id)

    def detach(self, store_id: str, file_id: str) -> bool:
        """The file leaves the store; its chunks go unless another store file uses the same document."""
        with self._tx() as db:
            row = self._one(
                "SELECT doc_id FROM kb_store_files WHERE store_id = ? AND file_id = ?", [store_id, file_id]
            )
            if row is None:
                return False
            db.execute("DELETE FROM kb_store_files WHERE store_id = ? AND file_id = ?", (store_id, file_id))
            if row["doc_id"] is not None:
                self._drop_if_orphan(db, row["doc_id"])
        return True

    def create_batch(self, store_id: str) -> str:
        batch_id = new_id("vsfb")
        with self._tx() as db:
            db.execute(
                "INSERT INTO kb_batches(id, store_id, created_at) VALUES (?, ?, ?)",
                (batch_id, store_id, int(time.time())),
            )
        return batch_id

    def get_batch(self, store_id: str, batch_id: str) -> dict | None:
        row = self._one("SELECT * FROM kb_batches WHERE id = ? AND store_id = ?", [batch_id, store_id])
        if row is None:
            return None
        counts = self._counts("store_id = ? AND batch_id = ?", [store_id, batch_id])
        if counts["in_progress"]:
            status = "in_progress"  # a cancelled batch is `cancelling` in OpenAI until its files stop
        elif row["cancelled"]:
            status = "cancelled"
        elif counts["total"] and counts["failed"] == counts["total"]:
            status = "failed"
        else:
            status = "completed"
        row["file_counts"], row["status"] = counts, status
        return row

    def cancel_batch(self, store_id: str, batch_id: str) -> dict | None:
        """The batch's files not yet ingested become cancelled; the worker skips or abandons them."""
        with self._tx() as db:
            if (
                self._one("SELECT 1 AS x FROM kb_batches WHERE id = ? AND store_id = ?", [batch_id, store_id])
                is None
            ):
                return None
            db.execute("UPDATE kb_batches SET cancelled = 1 WHERE id = ?", (batch_id,))
            db.execute(
                "UPDATE kb_store_files SET status = 'cancelled' WHERE batch_id = ? AND store_id = ? "
                "AND status = 'in_progress'",
                (batch_id, store_id),
            )
        return self.get_batch(store_id, batch_id)

    # ------------------------------------------------------------ ingestion

    def pending(self) -> list[int]:
        """Store files waiting for ingestion (after a restart: the ones a killed process left)."""
        return [
            r["n"] for r in self._rows("SELECT n FROM kb_store_files WHERE status = 'in_progress' ORDER BY n")
        ]

    def job(self, n: int) -> dict | None:
        row = self._one("SELECT * FROM kb_store_files WHERE n = ? AND status = 'in_progress'", [n])
        return None if row is None else self._store_file(row)

    def settle_from_doc(self, n: int) -> bool:
        """A store file whose document is already done takes its outcome; False when it must be ingested."""
        with self._tx() as db:
            job = self.job(n)
            if job is None:
                return True
            doc = self._one(
                "SELECT * FROM kb_docs WHERE sha256 = ? AND chunking = ?",
                [job["sha256"], job["strategy"].key],
            )
            if doc is None or doc["status"] == "in_progress":
                return False
            status = "completed" if doc["status"] == "completed" else "failed"
            db.execute(
                "UPDATE kb_store_files SET doc_id = ?, status = ?, error_code = ?, error = ? WHERE n = ?",
                (doc["id"], status, doc["error_code"], doc["error"], n),
            )
        return True

    def start_doc(self, sha256: str, chunking: str) -> int:
        """A fresh in_progress document for the content; chunks a killed process left of it are deleted, and
        every store file waiting on this content is linked to it."""
        with self._tx() as db:
            doc = self._one("SELECT id FROM kb_docs WHERE sha256 = ? AND chunking = ?", [sha256, chunking])
            if doc is not None:
                self._delete_chunks(db, doc["id"])
                db.execute(
                    "UPDATE kb_docs SET status = 'in_progress', error_code = NULL, error = NULL, "
                    "chunks = 0 WHERE id = ?",
                    (doc["id"],),
                )
                doc_id = doc["id"]
            else:
                db.execute(
                    "INSERT INTO kb_docs(sha256, chunking, status) VALUES (?, ?, 'in_progress')",
                    (sha256, chunking),
                )
                doc_id = db.last_insert_rowid()
            self._link_waiting(db, doc_id, sha256, chunking)
        return doc_id

    def _link_waiting(self, db: Any, doc_id: int, sha256: str, chunking: str) -> None:
        max_tokens, overlap = (int(x) for x in chunking.split("/"))
        db.execute(
            "UPDATE kb_store_files SET doc_id = ? WHERE sha256 = ? AND status = 'in_progress' AND "
            "chunking = ?",
            (doc_id, sha256, _json({"max": max_tokens, "overlap": overlap})),
        )

    def doc_wanted(self, doc_id: int) -> bool:
        return (
            self._one(
                "SELECT 1 AS x FROM kb_store_files WHERE doc_id = ? AND status = 'in_progress' LIMIT 1",
                [doc_id],
            )
            is not None
        )

    def add_chunks(self, doc_id: int, chunks: Sequence[Chunk], vectors: np.ndarray, final: bool) -> bool:
        """Commit a batch of chunks; with `final`, the document and its waiting files become completed in the
        same transaction. False (nothing written) when the document was dropped meanwhile (its last file
        was removed while it was being embedded)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self._tx() as db:
            if self._one("SELECT 1 AS x FROM kb_docs WHERE id = ?", [doc_id]) is None:
                return False
            for chunk, vec in zip(chunks, vectors, strict=True):
                db.execute(
                    "INSERT INTO kb_chunks(doc_id, seq, tokens, embedding) VALUES (?, ?, ?, ?)",
                    (doc_id, chunk.seq, chunk.tokens, vec.tobytes()),
                )
                db.execute(
                    "INSERT INTO kb_chunks_fts(rowid, text) VALUES (?, ?)",
                    (db.last_insert_rowid(), chunk.text),
                )
            db.execute("UPDATE kb_docs SET chunks = chunks + ? WHERE id = ?", (len(chunks), doc_id))
            if final:
                db.execute("UPDATE kb_docs SET status = 'completed' WHERE id = ?", (doc_id,))
                db.execute(
                    "UPDATE kb_store_files SET status = 'completed' WHERE doc_id = ? AND "
                    "status = 'in_progress'",
                    (doc_id,),
                )
        return True

    def fail_doc(self, doc_id: int, code: str, message: str) -> None:
        with self._tx() as db:
            self._delete_chunks(db, doc_id)
            db.execute(
                "UPDATE kb_docs SET status = 'failed', error_code = ?, error = ?, chunks = 0 WHERE id = ?",
                (code, message, doc_id),
            )
            db.execute(
                "UPDATE kb_store_files SET status = 'failed', error_code = ?, error = ? WHERE doc_id = ? "
                "AND status = 'in_progress'",
                (code, message, doc_id),
            )

    def fail_file(self, n: int, code: str, message: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE kb_store_files SET status = 'failed', error_code = ?, error = ? WHERE n = ? AND "
                "status = 'in_progress'",
                (code, message, n),
            )

    def drop_doc(self, doc_id: int) -> None:
        """A document no store file waits for any more (all cancelled or removed): its chunks go."""
        with self._tx() as db:
            self._delete_chunks(db, doc_id)
            db.execute("DELETE FROM kb_docs WHERE id = ?", (doc_id,))
            db.execute("UPDATE kb_store_files SET doc_id = NULL WHERE doc_id = ?", (doc_id,))

    def _delete_chunks(self, db: Any, doc_id: int) -> None:
        db.execute(
            "DELETE FROM kb_chunks_fts WHERE rowid IN (SELECT id FROM kb_chunks WHERE doc_id = ?)", (doc_id,)
        )
        db.execute("DELETE FROM kb_chunks WHERE doc_id = ?", (doc_id,))

    def _drop_if_orphan(self, db: Any, doc_id: int) -> None:
        if self._one("SELECT 1 AS x FROM kb_store_files WHERE doc_id = ? LIMIT 1", [doc_id]) is None:
            self._delete_chunks(db, doc_id)
            db.execute("DELETE FROM kb_docs WHERE id = ?", (doc_id,))

    def chunk_texts(self, doc_id: int) -> list[str]:
        """A document's chunks' text, in order."""
        return [
            r["text"]
            for r in self._rows(
                "SELECT f.text AS text FROM kb_chunks c JOIN kb_chunks_fts f ON f.rowid = c.id "
                "WHERE c.doc_id = ? ORDER BY c.seq",
                [doc_id],
            )
        ]

    def chunk_count(self) -> int:
        row = self._one("SELECT COUNT(*) AS c FROM kb_chunks")
        return row["c"] if row else 0

    # ------------------------------------------------------------ search

    _MEMBER = "JOIN kb_store_files sf ON sf.doc_id = c.doc_id AND sf.store_id = ? AND sf.status = 'completed'"

    @contextmanager
    def _snapshot(self) -> Iterator[Any]:
        """A read transaction: its statements all see one committed state (WAL: writers do not wait)."""
        db = self._db()
        db.execute("BEGIN")
        try:
            yield db
        finally:
            db.execute("COMMIT")

    def bm25(
        self, store_id: str, match: str, where: tuple[str, list], limit: int
    ) -> list[tuple[int, int, float]]:
        """(chunk id, store file n, BM25 score, higher is better) of the best `limit` matches among the
        store's completed chunks that pass the filter; ties go by chunk id, then n.

        FTS5 ranks the matches of the whole index on its own first (joining every match to its store file
        before ranking was most of the time at 100,000 chunks) and only the best `depth` are checked against
        the store and the filter. Such a prefix gives exactly the answer once it holds `limit` passing
        chunks or every match; if not, it grows, and past BM25_MAX_DEPTH (a store holding a small share of
        the index, or a narrow filter) the join ranks every match as before."""
        if limit <= 0:
            return []
        depth = max(BM25_FIRST_DEPTH, 2 * limit)
        with self._snapshot() as db:
            while depth <= BM25_MAX_DEPTH:
                ranked = db.execute(
                    "SELECT rowid, bm25(kb_chunks_fts) AS s FROM kb_chunks_fts WHERE kb_chunks_fts MATCH ? "
                    "ORDER BY s, rowid LIMIT ?",
                    (match, depth),
                ).fetchall()
                members: dict[int, list[int]] = {}
                for chunk_id, n in db.execute(  # CROSS JOIN: from the ranked ids, not from the store's files
                    "SELECT c.id, sf.n FROM json_each(?) j CROSS JOIN kb_chunks c ON c.id = j.value "
                    "CROSS JOIN kb_store_files sf ON sf.doc_id = c.doc_id AND sf.store_id = ? AND "
                    f"sf.status = 'completed' WHERE ({where[0]}) ORDER BY c.id, sf.n",
                    (json.dumps([r[0] for r in ranked]), store_id, *where[1]),
                ):
                    members.setdefault(chunk_id, []).append(n)
                out = [(cid, n, -float(s)) for cid, s in ranked for n in members.get(cid, ())]
                if len(out) >= limit or len(ranked) < depth:
                    return out[:limit]
                depth *= 4
            rows = db.execute(
                "SELECT c.id, sf.n, bm25(kb_chunks_fts) AS s FROM kb_chunks_fts "
                f"JOIN kb_chunks c ON c.id = kb_chunks_fts.rowid {self._MEMBER} "
                f"WHERE kb_chunks_fts MATCH ? AND ({where[0]}) ORDER BY s, c.id, sf.n LIMIT ?",
                (store_id, match, *where[1], limit),
            ).fetchall()
        return [(cid, n, -float(s)) for cid, n, s in rows]

    def _vectors(self, store_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Chunk ids, store file ns, unit vectors (float16, [n, dim]) and norms of the store's completed
        chunks, in (chunk id, n) order. Cached per store and refreshed when the generation (bumped by
        triggers whenever a set of completed store files changes, in any process) moves: only the files
        that came or went are read."""
        row = self._one("SELECT value FROM kb_generation WHERE id = 1")
        with self._matrices_lock:
            cached = self._matrices.get(store_id)
        if cached is None or row is None or cached.generation != row["value"]:
            with self._refresh_lock:  # one refresh at a time; who waited finds the matrix fresh
                cached = self._refreshed(store_id)
        return cached.view()

    def _refreshed(self, store_id: str) -> _StoreVectors:
        with self._matrices_lock:
            cached = self._matrices.get(store_id)
        with self._snapshot() as db:
            row = db.execute("SELECT value FROM kb_generation WHERE id = 1").fetchone()
            generation = row[0] if row else -1
            if cached is not None and cached.generation == generation:
                return cached
            members = dict(
                db.execute(
                    "SELECT n, doc_id FROM kb_store_files WHERE store_id = ? AND status = 'completed' AND "
                    "doc_id IS NOT NULL",
                    (store_id,),
                ).fetchall()
            )
            old = cached.members if cached is not None else {}
            gone = [n for n, doc in old.items() if members.get(n) != doc]
            came = {n: doc for n, doc in members.items() if old.get(n) != doc}
            if cached is None or (gone and len(gone) * 2 > len(old)):
                fresh = _read_vectors(db, members, spare=True)  # first build, or most of it changed
            else:
                fresh = cached.merged(gone, _read_vectors(db, came, spare=False))
        fresh = dataclasses.replace(fresh, generation=generation, members=members)
        with self._matrices_lock:
            self._matrices[store_id] = fresh
        return fresh

    def dense(
        self, store_id: str, vector: np.ndarray, where: tuple[str, list], limit: int
    ) -> list[tuple[int, int, float]]:
        """(chunk id, store file n, cosine similarity) of the `limit` nearest chunks of the store whose
        files pass the filter: an exact scan, best first, ties in (chunk id, n) order.

        The scan is one float16 matrix-vector product (torch: half the memory of float32 and, measured
        here, 3 to 4 times faster than numpy's float32 product at 100,000 chunks). Every float16 score is
        within F16_ERROR x |q| x |v| of the exact one, so the exact top `limit` are among the chunks
        whose float16 score is within twice that of the `limit`-th best; those few are scored again from
        their float32 vectors, and that exact score is what is ranked and returned."""
        ids, ns, units, norms = self._vectors(store_id)
        if not len(ids) or limit <= 0:
            return []
        q = np.asarray(vector, dtype=np.float32)
        q_norm = float(np.linalg.norm(q))
        approx = _f16_scores(units, q / q_norm) * (norms * q_norm) if q_norm > 0 else np.zeros(len(ids))
        if where[0] != "1":
            allowed = [
                r["n"]
                for r in self._rows(
                    "SELECT sf.n AS n FROM kb_store_files sf WHERE sf.store_id = ? "
                    f"AND sf.status = 'completed' AND ({where[0]})",
                    [store_id, *where[1]],
                )
            ]
            approx[~np.isin(ns, allowed)] = -np.inf
        k = min(limit, int(np.isfinite(approx).sum()))
        if k == 0:
            return []
        kth = np.partition(approx, len(approx) - k)[len(approx) - k]  # the k-th best float16 score
        margin = 2 * F16_ERROR * q_norm * float(norms.max())
        rows = np.flatnonzero(approx >= kth - margin)
        if q_norm == 0:  # every score is exactly 0: the first k in matrix order
            return [(int(ids[i]), int(ns[i]), 0.0) for i in rows[:k]]
        exact = self.similarities(ids[rows].tolist(), q)
        rows = np.array([i for i in rows if int(ids[i]) in exact], dtype=np.int64)  # (deleted meanwhile)
        if not len(rows):
            return []
        scores = np.array([exact[int(ids[i])] for i in rows], dtype=np.float64)
        best = np.lexsort((rows, -scores))[:k]  # best first; equal scores in matrix order
        return [(int(ids[rows[j]]), int(ns[rows[j]]), float(scores[j])) for j in best]

    def similarities(self, chunk_ids: Sequence[int], vector: np.ndarray) -> dict[int, float]:
        if not chunk_ids:
            return {}
        q = np.asarray(vector, dtype=np.float32)
        rows = self._db().execute(
            "SELECT id, embedding FROM kb_chunks WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(list(chunk_ids)),),
        )
        return {cid: float(np.frombuffer(blob, dtype=np.float32) @ q) for cid, blob in rows}

    def hits(self, pairs: Sequence[tuple[int, int]]) -> list[dict | None]:
        """Text, file and attributes of (chunk id, store file n) pairs, in the order given (None for a pair
        removed since it was ranked); two queries, whatever the number of pairs."""
        if not pairs:
            return []
        with self._snapshot() as db:
            texts = dict(
                db.execute(
                    "SELECT rowid, text FROM kb_chunks_fts WHERE rowid IN (SELECT value FROM json_each(?))",
                    (json.dumps([c for c, _ in pairs]),),
                ).fetchall()
            )
            files = {
                n: (file_id, filename, attributes)
                for n, file_id, filename, attributes in db.execute(
                    "SELECT n, file_id, filename, attributes FROM kb_store_files WHERE n IN "
                    "(SELECT value FROM json_each(?))",
                    (json.dumps([n for _, n in pairs]),),
                )
            }
        out: list[dict | None] = []
        for chunk_id, n in pairs:
            if chunk_id not in texts or n not in files:
                out.append(None)
                continue
            file_id, filename, attributes = files[n]
            out.append(
                {
                    "text": texts[chunk_id],
                    "file_id": file_id,
                    "filename": filename,
                    "attributes": json.loads(attributes),
                }
            )
        return out


@dataclass(frozen=True)
class _StoreVectors:
    """One store's completed chunks as arrays in (chunk id, store file n) order, the vectors as float16 unit
    vectors and float32 norms: rows [:size] of buffers that may have spare rows, so the chunks of newly
    completed files are usually written in place. A reader holding an older view sees only rows below its
    own size, which nothing writes again."""

    generation: int
    members: dict[int, int]  # completed store file n -> its document
    ids: np.ndarray
    ns: np.ndarray
    units: np.ndarray
    norms: np.ndarray
    size: int

    def view(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        n = self.size
        return self.ids[:n], self.ns[:n], self.units[:n], self.norms[:n]

    def merged(self, gone: Sequence[int], came: _StoreVectors) -> _StoreVectors:
        """These rows without those of the store files `gone`, with `came`'s rows, in order."""
        ids, ns, units, norms = self.view()
        new_ids, new_ns, new_units, new_norms = came.view()
        if len(ids) and len(new_ids) and units.shape[1] != new_units.shape[1]:
            raise StoreError(
                f"a vector store holds vectors of {units.shape[1]} and {new_units.shape[1]} dimensions"
            )
        if not gone and (not len(ids) or not len(new_ids) or new_ids[0] > ids[-1]):
            if not len(new_ids):
                return self
            if len(ids) and self.size + len(new_ids) <= len(self.ids):  # room left: append in place
                end = self.size + len(new_ids)
                self.ids[self.size : end], self.ns[self.size : end] = new_ids, new_ns
                self.units[self.size : end], self.norms[self.size : end] = new_units, new_norms
                return dataclasses.replace(self, size=end)
        keep = ~np.isin(ns, list(gone)) if gone else np.ones(len(ids), dtype=bool)
        total = int(keep.sum()) + len(new_ids)
        out = _empty(_capacity(total), units.shape[1] if len(ids) else new_units.shape[1])
        kept = total - len(new_ids)
        out.ids[:kept], out.ns[:kept], out.units[:kept], out.norms[:kept] = (
            ids[keep],
            ns[keep],
            units[keep],
            norms[keep],
        )
        if len(new_ids):
            out.ids[kept:total], out.ns[kept:total] = new_ids, new_ns
            out.units[kept:total], out.norms[kept:total] = new_units, new_norms
        out = dataclasses.replace(out, size=total)
        if kept and len(new_ids) and new_ids[0] <= out.ids[kept - 1]:
            out.sort()
        return out

    def sort(self) -> None:
        """Rows into (chunk id, n) order, in place."""
        n = self.size
        order = np.lexsort((self.ns[:n], self.ids[:n]))
        self.ids[:n], self.ns[:n] = self.ids[:n][order], self.ns[:n][order]
        self.units[:n], self.norms[:n] = self.units[:n][order], self.norms[:n][order]


def _empty(rows: int, dim: int) -> _StoreVectors:
    ids, ns = np.empty(rows, dtype=np.int64), np.empty(rows, dtype=np.int64)
    units, norms = np.empty((rows, dim), dtype=np.float16), np.empty(rows, dtype=np.float32)
    return _StoreVectors(-1, {}, ids, ns, units, norms, 0)


def _capacity(rows: int) -> int:
    """Rows to allocate for `rows`: a quarter spare, so that a store being filled is rarely copied."""
    return rows + rows // 4 + 64


def _f16_scores(units: np.ndarray, q: np.ndarray) -> np.ndarray:
    """units @ q in float16 (torch's kernel sums in float32), as float32."""
    import torch

    product = torch.mv(torch.from_numpy(units), torch.from_numpy(q.astype(np.float16)))
    return product.float().numpy()


def _read_vectors(db: Any, members: dict[int, int], spare: bool) -> _StoreVectors:
    """The chunks of the documents of store files `members` (n -> document), one row per (chunk, n), in
    (chunk id, n) order, written straight into the arrays (no list of blobs held beside them)."""
    by_doc: dict[int, list[int]] = {}
    for n, doc in sorted(members.items()):
        by_doc.setdefault(doc, []).append(n)
    docs = json.dumps(list(by_doc))
    counts = db.execute(
        "SELECT doc_id, COUNT(*) FROM kb_chunks WHERE doc_id IN (SELECT value FROM json_each(?)) "
        "GROUP BY doc_id",
        (docs,),
    ).fetchall()
    total = sum(c * len(by_doc[doc]) for doc, c in counts)
    if total == 0:
        return _empty(0, 0)
    first = db.execute(
        "SELECT length(embedding) FROM kb_chunks WHERE doc_id IN (SELECT value FROM json_each(?)) LIMIT 1",
        (docs,),
    ).fetchone()
    dim = first[0] // 4  # float32 blobs: the embedder's width, 384 for MiniLM
    out = _empty(_capacity(total) if spare else total, dim)
    block = np.empty((min(total, NORMALIZE_ROWS), dim), dtype=np.float32)
    i = held = 0

    def flush() -> None:  # normalize a block of rows at once (one numpy call, not one per row)
        norms = np.linalg.norm(block[:held], axis=1)
        out.norms[i - held : i] = norms
        out.units[i - held : i] = block[:held] / np.where(norms > 0, norms, 1)[:, None]

    for chunk_id, doc, blob in db.execute(  # no ORDER BY: SQLite would sort the blobs too
        "SELECT id, doc_id, embedding FROM kb_chunks WHERE doc_id IN (SELECT value FROM json_each(?))",
        (docs,),
    ):
        if len(blob) != 4 * dim:
            raise StoreError(f"a vector store holds vectors of {dim} and {len(blob) // 4} dimensions")
        row = np.frombuffer(blob, dtype=np.float32)
        for n in by_doc[doc]:
            out.ids[i], out.ns[i], block[held] = chunk_id, n, row
            i, held = i + 1, held + 1
            if held == len(block):
                flush()
                held = 0
    if held:
        flush()
    out = dataclasses.replace(out, size=i)
    if i > 1 and (np.diff(out.ids[:i]) < 0).any():  # (equal ids come in n order already)
        out.sort()
    return out
