"""The knowledge store: its interface (KnowledgeStore) and the embedded implementation on SQLite (apsw).

One SQLite file holds everything: file metadata, vector stores, their files and batches, the chunks, a
full-text index (FTS5, BM25) and each chunk's MiniLM vector (a float32 blob). The file is opened with apsw,
which brings its own recent SQLite with FTS5 and explicit transactions. Dense search is an exact scan: each
store's vectors are held as one numpy matrix, rebuilt when a trigger-maintained generation counter says the
store's completed chunks changed (in this process or another), so a query is one matrix product. The
uploaded bytes live beside the file, one blob per content hash (`<files_dir>/<sha256>`): the same bytes
uploaded twice are stored once.

Consistency (the reason everything shares one file): chunks are committed in batches, and a document is
marked completed in the same transaction that commits its last chunk, together with every vector store file
waiting on it. A process killed mid-document leaves the document `in_progress`; on start-up the ingest
worker re-queues those files and first deletes the half-written chunks, so a half-indexed file is never
reported `completed`. Chunks belong to a document, keyed by (content hash, chunking strategy): the same
bytes attached twice, with the same strategy, are chunked and embedded once.

A scale path (Milvus through pymilvus, a later session) implements the same Protocol.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
        # store id -> (generation, chunk ids, store file ns, vectors): each store's completed chunks' vectors
        # as one matrix, rebuilt when the generation (bumped by triggers on any change to the completed set,
        # from any process) moves on.
        self._matrices: dict[str, tuple[int, np.ndarray, np.ndarray, np.ndarray]] = {}
        self._matrices_lock = threading.Lock()
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

    def bm25(
        self, store_id: str, match: str, where: tuple[str, list], limit: int
    ) -> list[tuple[int, int, float]]:
        """(chunk id, store file n, BM25 score, higher is better) of the best `limit` matches."""
        sql = (
            "SELECT c.id AS id, sf.n AS n, -bm25(kb_chunks_fts) AS score FROM kb_chunks_fts "
            f"JOIN kb_chunks c ON c.id = kb_chunks_fts.rowid {self._MEMBER} "
            f"WHERE kb_chunks_fts MATCH ? AND ({where[0]}) ORDER BY bm25(kb_chunks_fts) LIMIT ?"
        )
        rows = self._rows(sql, [store_id, match, *where[1], limit])
        return [(r["id"], r["n"], float(r["score"])) for r in rows]

    def _matrix(self, store_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Chunk ids, store file ns and the vectors [n, 384] of the store's completed chunks (cached)."""
        row = self._one("SELECT value FROM kb_generation WHERE id = 1")
        generation = row["value"] if row else -1
        with self._matrices_lock:
            cached = self._matrices.get(store_id)
        if cached is not None and cached[0] == generation:
            return cached[1], cached[2], cached[3]
        rows = (
            self._db()
            .execute(
                f"SELECT c.id, sf.n, c.embedding FROM kb_chunks c {self._MEMBER} ORDER BY c.id", (store_id,)
            )
            .fetchall()
        )
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        ns = np.fromiter((r[1] for r in rows), dtype=np.int64, count=len(rows))
        dim = len(rows[0][2]) // 4 if rows else 0  # float32 blobs: the model's width, 384 for MiniLM
        vectors = np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        with self._matrices_lock:
            self._matrices[store_id] = (generation, ids, ns, vectors)
        return ids, ns, vectors

    def dense(
        self, store_id: str, vector: np.ndarray, where: tuple[str, list], limit: int
    ) -> list[tuple[int, int, float]]:
        """(chunk id, store file n, cosine similarity) of the `limit` nearest chunks: an exact scan (one
        matrix product) of the store's chunks whose files pass the filter."""
        ids, ns, vectors = self._matrix(store_id)
        if not len(ids):
            return []
        scores = vectors @ np.asarray(vector, dtype=np.float32)
        if where[0] != "1":
            allowed = [
                r["n"]
                for r in self._rows(
                    "SELECT sf.n AS n FROM kb_store_files sf WHERE sf.store_id = ? "
                    f"AND sf.status = 'completed' AND ({where[0]})",
                    [store_id, *where[1]],
                )
            ]
            scores = np.where(np.isin(ns, allowed), scores, -np.inf)
        k = min(limit, int(np.isfinite(scores).sum()))
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [(int(ids[i]), int(ns[i]), float(scores[i])) for i in top]

    def similarities(self, chunk_ids: Sequence[int], vector: np.ndarray) -> dict[int, float]:
        if not chunk_ids:
            return {}
        marks = ", ".join("?" * len(chunk_ids))
        rows = self._rows(f"SELECT id, embedding FROM kb_chunks WHERE id IN ({marks})", list(chunk_ids))
        q = np.asarray(vector, dtype=np.float32)
        return {r["id"]: float(np.frombuffer(r["embedding"], dtype=np.float32) @ q) for r in rows}

    def hits(self, pairs: Sequence[tuple[int, int]]) -> list[dict | None]:
        """Text, file and attributes of (chunk id, store file n) pairs, in the order given (None for a pair
        removed since it was ranked)."""
        out = []
        for chunk_id, n in pairs:
            row = self._one(
                "SELECT f.text AS text, sf.file_id AS file_id, sf.filename AS filename, "
                "sf.attributes AS attributes FROM kb_chunks_fts f, kb_store_files sf "
                "WHERE f.rowid = ? AND sf.n = ?",
                [chunk_id, n],
            )
            if row is not None:
                row["attributes"] = json.loads(row["attributes"])
            out.append(row)
        return out
