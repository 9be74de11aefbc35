"""The knowledge store's scale path: vectors and BM25 in Milvus (pymilvus), metadata in SQL (SQLAlchemy Core).

Same KnowledgeStore Protocol as the embedded SQLite store (rag/store.py), for deployments that outgrow one
file. What lives where:
- SQL (PostgreSQL when the fleet's storage is PostgreSQL, else a SQLite file): files, vector stores, store
  files, batches, documents, and each chunk's text, seq and token count. Tables are prefixed `kbm_` so they
  never collide with the embedded store's `kb_` tables in the same database file.
- Milvus (one collection): per chunk its id (the SQL chunk id), document id, text and vector, with a BM25
  function that turns the text into a sparse vector on insert. `MilvusClient("x.db")` drives the embedded
  milvus-lite (tests, laptops); `http://host:19530` a Milvus standalone or cluster.

Crash safety (a file is `completed` only once its last chunk is durable in both): a batch's chunk rows are
committed in SQL first (the document is still in_progress, so nothing of it is searchable), then its
vectors go to Milvus; with the last batch, Milvus is flushed (milvus-lite) and only then does one SQL
transaction mark the document and its waiting files completed. A process killed anywhere before that
leaves the document in_progress; on restart the ingest worker re-queues its files and `start_doc` deletes
its vectors and chunk rows first. Deleting chunks goes the other way: one SQL transaction removes the rows
and records the document in `kbm_purge`, then Milvus deletes its vectors and the mark goes; marks left by a
killed process are purged when the store opens. Search only asks Milvus for documents that SQL says are
completed members of the store, so a vector whose rows are gone is never returned, and document and chunk
ids are never reused (AUTOINCREMENT), so it is never mistaken for another's. As with the embedded store,
one process ingests (the gateway's one worker); others may read and write metadata.

Filters: search() compiles OpenAI's filter to a SQLite expression over `sf.attributes` (rag/filters.py).
That fragment is evaluated here over the store's completed files in an in-memory SQLite (apsw), whatever
the metadata database is, so the semantics are exactly the embedded store's; Milvus then receives the
allowed documents as `doc_id in [...]`.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import apsw
import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import (
    ArgumentError,
    IntegrityError,
    NoSuchModuleError,
    OperationalError,
    ProgrammingError,
)

from fleetlm.rag.chunking import Chunk, Strategy
from fleetlm.rag.store import STATUSES, StoreError

COLLECTION = "fleet_kb_chunks"
MAX_TEXT_BYTES = 65_535  # Milvus' longest VARCHAR; a longer chunk is indexed for BM25 by its first 64 KB
INSERT_BATCH = 512  # Milvus rows per insert call
QUOTED = re.compile(r'"((?:[^"]|"")*)"')

# 64-bit ids, sizes and times on PostgreSQL (a file may pass 2 GiB, unix time 2**31); on SQLite an INTEGER
# primary key is the rowid, 64-bit already, and only that spelling makes it one
BIG = BigInteger().with_variant(Integer, "sqlite")

metadata = MetaData()
files_t = Table(
    "kbm_files",
    metadata,
    Column("n", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("filename", Text, nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BIG, nullable=False),
    Column("sha256", String(64), nullable=False, index=True),
    Column("created_at", BIG, nullable=False),
)
docs_t = Table(
    "kbm_docs",
    metadata,
    Column("id", BIG, primary_key=True, autoincrement=True),
    Column("sha256", String(64), nullable=False),
    Column("chunking", String(32), nullable=False),
    Column("status", String(16), nullable=False),
    Column("error_code", String(64)),
    Column("error", Text),
    Column("chunks", Integer, nullable=False, default=0),
    UniqueConstraint("sha256", "chunking"),
    sqlite_autoincrement=True,  # ids are never reused: a stray vector cannot pass for a new document's
)
chunks_t = Table(
    "kbm_chunks",
    metadata,
    Column("id", BIG, primary_key=True, autoincrement=True),
    Column("doc_id", BIG, nullable=False, index=True),
    Column("seq", Integer, nullable=False),
    Column("tokens", Integer, nullable=False),
    Column("text", Text, nullable=False),
    sqlite_autoincrement=True,  # the Milvus primary key: never reused
)
stores_t = Table(
    "kbm_stores",
    metadata,
    Column("n", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("name", Text),
    Column("created_at", BIG, nullable=False),
    Column("last_active_at", BIG, nullable=False),
    Column("metadata", Text, nullable=False, default="{}"),
    Column("expires_after", Text),
)
store_files_t = Table(
    "kbm_store_files",
    metadata,
    Column("n", Integer, primary_key=True, autoincrement=True),
    Column("store_id", String(64), nullable=False),
    Column("file_id", String(64), nullable=False),
    Column("filename", Text, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("bytes", BIG, nullable=False),
    Column("doc_id", BIG),
    Column("status", String(16), nullable=False),
    Column("error_code", String(64)),
    Column("error", Text),
    Column("attributes", Text, nullable=False, default="{}"),
    Column("chunking", String(64), nullable=False),
    Column("batch_id", String(64)),
    Column("created_at", BIG, nullable=False),
    UniqueConstraint("store_id", "file_id"),
    Index("kbm_store_files_doc", "doc_id", "store_id"),
    Index("kbm_store_files_store", "store_id", "status"),
)
batches_t = Table(
    "kbm_batches",
    metadata,
    Column("n", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("store_id", String(64), nullable=False),
    Column("created_at", BIG, nullable=False),
    Column("cancelled", Integer, nullable=False, default=0),
)
purge_t = Table(  # documents whose rows are gone and whose vectors Milvus must still delete
    "kbm_purge", metadata, Column("doc_id", BIG, primary_key=True, autoincrement=False)
)


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}" if prefix == "file" else f"{prefix}_{secrets.token_hex(12)}"


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def fts_words(match: str) -> str:
    """The words of an FTS5 MATCH expression made by search.fts_query (`"a" OR "b"`), for Milvus' BM25."""
    return " ".join(w.replace('""', '"') for w in QUOTED.findall(match))


def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
    # WAL and a busy timeout as the usage log; autocommit off in the driver so that `begin` below decides
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=10000")
    cur.close()


def _sqlite_begin(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")  # take the write lock up front: two writers never deadlock


def open_engine(url: str) -> Engine:
    """A SQLAlchemy engine for the metadata: `postgresql://...` (psycopg 3) or `sqlite:///path`."""
    try:
        if url.startswith("postgresql://"):
            url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
        engine = create_engine(url, pool_pre_ping=True)
    except (ArgumentError, NoSuchModuleError) as exc:
        raise StoreError(f"knowledge store: cannot use metadata database {url!r} ({exc})") from None
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    return engine


class MilvusKnowledgeStore:
    """Vectors and BM25 in one Milvus collection; metadata and chunk text in SQL; blobs in a folder."""

    def __init__(
        self,
        meta_url: str,
        files_dir: str | Path,
        milvus_uri: str,
        *,
        token: str | None = None,
        collection: str = COLLECTION,
        index_type: str = "FLAT",
    ):
        self.meta_url = meta_url
        self.files_dir = Path(files_dir)
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.milvus_uri = milvus_uri
        self.collection = collection
        self.index_type = index_type
        # milvus-lite keeps fresh inserts in a memtable it scans slowly: flush each completed document into
        # a segment. A Milvus server has its own WAL and seals segments itself (frequent flushes hurt it).
        self._flush = milvus_uri.endswith(".db")
        self.engine = open_engine(meta_url)
        try:
            metadata.create_all(self.engine)
        except (OperationalError, ProgrammingError) as exc:
            raise StoreError(f"knowledge store: cannot open metadata database ({exc.orig})") from None
        self.client = self._connect(milvus_uri, token)
        self._ready = self.client.has_collection(collection)
        if self._ready:
            self.client.load_collection(collection)  # a reopened collection starts released
        self._ready_lock = threading.Lock()
        self._filter_db = threading.local()
        self._purge_pending()

    @staticmethod
    def _connect(uri: str, token: str | None) -> Any:
        try:
            from pymilvus import MilvusClient
        except ImportError:
            raise StoreError(
                "knowledge.backend 'milvus' needs pymilvus and milvus-lite: pip install 'fleetlm[milvus]'"
            ) from None
        if uri.endswith(".db"):
            Path(uri).expanduser().parent.mkdir(parents=True, exist_ok=True)
        try:
            return MilvusClient(uri=uri, token=token or "")
        except Exception as exc:  # noqa: BLE001 - pymilvus raises several kinds; the cause goes in the message
            raise StoreError(f"knowledge store: cannot reach Milvus at {uri!r} ({exc})") from None

    def close(self) -> None:
        self.client.close()
        self.engine.dispose()

    # ------------------------------------------------------------ Milvus

    def _collection(self, dim: int) -> None:
        """Create the chunk collection on first use, with the width of the first vectors it gets."""
        if self._ready:
            return
        from pymilvus import DataType, Function, FunctionType, MilvusClient

        with self._ready_lock:
            if self._ready or self.client.has_collection(self.collection):
                self._ready = True
                return
            schema = MilvusClient.create_schema(auto_id=False)
            schema.add_field("id", DataType.INT64, is_primary=True)
            schema.add_field("doc_id", DataType.INT64)
            schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES, enable_analyzer=True)
            schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
            schema.add_field("sparse", DataType.SPARSE_FLOAT_VECTOR)
            schema.add_function(
                Function(
                    name="text_bm25",
                    function_type=FunctionType.BM25,
                    input_field_names=["text"],
                    output_field_names=["sparse"],
                )
            )
            index = self.client.prepare_index_params()
            # inner product on normalized vectors is their cosine, as the embedded store scores them
            index.add_index(field_name="vector", index_type=self.index_type, metric_type="IP")
            index.add_index(field_name="sparse", index_type="SPARSE_INVERTED_INDEX", metric_type="BM25")
            index.add_index(field_name="doc_id", index_type="INVERTED")
            # Strong: a search sees every insert acknowledged before it (Milvus' default is Bounded)
            self.client.create_collection(self.collection, schema=schema, consistency_level="Strong")
            # sync=False: pymilvus would poll each index of the empty collection every 0.5 s; load waits
            self.client.create_index(self.collection, index, sync=False)
            self.client.load_collection(self.collection)
            self._ready = True

    def _exists(self) -> bool:
        """Whether the collection exists, made by this instance or another (a replica, a restart)."""
        if not self._ready and self.client.has_collection(self.collection):
            self.client.load_collection(self.collection)
            self._ready = True
        return self._ready

    def _insert_vectors(self, ids: Sequence[int], doc_id: int, chunks: Sequence[Chunk], vectors: np.ndarray):
        self._collection(int(vectors.shape[1]))
        rows = [
            {
                "id": int(i),
                "doc_id": doc_id,
                "text": c.text.encode()[:MAX_TEXT_BYTES].decode(errors="ignore"),
                "vector": v.tolist(),
            }
            for i, c, v in zip(ids, chunks, vectors, strict=True)
        ]
        for start in range(0, len(rows), INSERT_BATCH):
            self.client.insert(self.collection, rows[start : start + INSERT_BATCH])

    def _delete_vectors(self, doc_ids: Sequence[int]) -> None:
        if doc_ids and self._exists():
            self.client.delete(self.collection, filter=f"doc_id in {[int(d) for d in doc_ids]}")

    def _purge_pending(self) -> None:
        """Delete the vectors of documents whose rows were deleted, then their marks."""
        with self.engine.connect() as conn:
            doc_ids = list(conn.execute(select(purge_t.c.doc_id)).scalars())
        if not doc_ids:
            return
        self._delete_vectors(doc_ids)
        with self.engine.begin() as conn:
            conn.execute(delete(purge_t).where(purge_t.c.doc_id.in_(doc_ids)))

    def vector_count(self) -> int:
        """Vectors in the collection (tests: deleting a file deletes its vectors)."""
        if not self._exists():
            return 0
        rows = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    # ------------------------------------------------------------ SQL helpers

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def _rows(self, query: Any, conn: Connection | None = None) -> list[dict]:
        if conn is not None:
            return [dict(r) for r in conn.execute(query).mappings()]
        with self.engine.connect() as c:
            return [dict(r) for r in c.execute(query).mappings()]

    def _one(self, query: Any, conn: Connection | None = None) -> dict | None:
        rows = self._rows(query.limit(1) if hasattr(query, "limit") else query, conn)
        return rows[0] if rows else None

    def _page(
        self, table: Table, conds: list, limit: int, order: str, after_n: int | None
    ) -> tuple[list[dict], bool]:
        desc = order == "desc"
        if after_n is not None:
            conds = [*conds, table.c.n < after_n if desc else table.c.n > after_n]
        q = select(table).where(*conds).order_by(table.c.n.desc() if desc else table.c.n).limit(limit + 1)
        rows = self._rows(q)
        return rows[:limit], len(rows) > limit

    def _anchor(self, table: Table, *conds: Any) -> int | None:
        row = self._one(select(table.c.n).where(*conds))
        return None if row is None else row["n"]

    # ------------------------------------------------------------ files

    def blob_path(self, sha256: str) -> Path:
        return self.files_dir / sha256

    def add_file(self, filename: str, purpose: str, upload: Path, sha256: str, size: int) -> dict:
        blob = self.blob_path(sha256)
        if blob.exists():
            upload.unlink(missing_ok=True)
        else:
            shutil.move(str(upload), blob)
        file_id = new_id("file")
        with self._tx() as conn:
            conn.execute(
                insert(files_t).values(
                    id=file_id,
                    filename=filename,
                    purpose=purpose,
                    bytes=size,
                    sha256=sha256,
                    created_at=int(time.time()),
                )
            )
        return self.get_file(file_id)  # type: ignore[return-value]

    def get_file(self, file_id: str) -> dict | None:
        return self._one(select(files_t).where(files_t.c.id == file_id))

    def list_files(
        self, purpose: str | None, limit: int, order: str, after: str | None
    ) -> tuple[list[dict], bool]:
        after_n = None
        if after is not None:
            after_n = self._anchor(files_t, files_t.c.id == after)
            if after_n is None:
                return [], False
        conds = [] if purpose is None else [files_t.c.purpose == purpose]
        return self._page(files_t, conds, limit, order, after_n)

    def delete_file(self, file_id: str) -> bool:
        """The record goes, and the bytes once no other file has them; stores keep their chunks (OpenAI)."""
        with self._tx() as conn:
            row = self._one(select(files_t.c.sha256).where(files_t.c.id == file_id), conn)
            if row is None:
                return False
            conn.execute(delete(files_t).where(files_t.c.id == file_id))
            others = self._one(select(files_t.c.n).where(files_t.c.sha256 == row["sha256"]), conn)
        if others is None:
            self.blob_path(row["sha256"]).unlink(missing_ok=True)
        return True

    # ------------------------------------------------------------ vector stores

    def create_store(self, name: str | None, metadata: dict, expires_after: dict | None) -> dict:
        store_id, now = new_id("vs"), int(time.time())
        with self._tx() as conn:
            conn.execute(
                insert(stores_t).values(
                    id=store_id,
                    name=name,
                    created_at=now,
                    last_active_at=now,
                    metadata=_json(metadata),
                    expires_after=_json(expires_after) if expires_after else None,
                )
            )
        return self.get_store(store_id)  # type: ignore[return-value]

    def _counts(self, *conds: Any) -> dict:
        counts = dict.fromkeys(STATUSES, 0)
        q = select(store_files_t.c.status, func.count().label("c")).where(*conds)
        for row in self._rows(q.group_by(store_files_t.c.status)):
            counts[row["status"]] = row["c"]
        counts["total"] = sum(counts.values())
        return counts

    def _store(self, row: dict) -> dict:
        sf = store_files_t.c
        row["file_counts"] = self._counts(sf.store_id == row["id"])
        used = self._one(
            select(func.coalesce(func.sum(sf.bytes), 0).label("b")).where(
                sf.store_id == row["id"], sf.status == "completed"
            )
        )
        row["usage_bytes"] = int(used["b"]) if used else 0
        row["metadata"] = json.loads(row["metadata"])
        row["expires_after"] = json.loads(row["expires_after"]) if row["expires_after"] else None
        return row

    def get_store(self, store_id: str) -> dict | None:
        row = self._one(select(stores_t).where(stores_t.c.id == store_id))
        return None if row is None else self._store(row)

    def list_stores(self, limit: int, order: str, after: str | None) -> tuple[list[dict], bool]:
        after_n = None
        if after is not None:
            after_n = self._anchor(stores_t, stores_t.c.id == after)
            if after_n is None:
                return [], False
        rows, more = self._page(stores_t, [], limit, order, after_n)
        return [self._store(r) for r in rows], more

    def update_store(self, store_id: str, changes: dict) -> dict | None:
        values = {}
        for column in ("name", "metadata", "expires_after"):
            if column in changes:
                value = changes[column]
                values[column] = value if column == "name" or value is None else _json(value)
        with self._tx() as conn:
            if self._one(select(stores_t.c.n).where(stores_t.c.id == store_id), conn) is None:
                return None
            if values:
                conn.execute(update(stores_t).where(stores_t.c.id == store_id).values(**values))
        return self.get_store(store_id)

    def touch(self, store_id: str, every_s: int = 60) -> None:
        """Move last_active_at to now; at most once a minute, so that searches rarely write."""
        now = int(time.time())
        row = self._one(select(stores_t.c.last_active_at).where(stores_t.c.id == store_id))
        if row is not None and now - row["last_active_at"] >= every_s:
            with self._tx() as conn:
                conn.execute(update(stores_t).where(stores_t.c.id == store_id).values(last_active_at=now))

    def delete_store(self, store_id: str) -> bool:
        sf = store_files_t.c
        with self._tx() as conn:
            if self._one(select(stores_t.c.n).where(stores_t.c.id == store_id), conn) is None:
                return False
            docs = list(
                conn.execute(
                    select(sf.doc_id).where(sf.store_id == store_id, sf.doc_id.is_not(None)).distinct()
                ).scalars()
            )
            conn.execute(delete(store_files_t).where(sf.store_id == store_id))
            conn.execute(delete(batches_t).where(batches_t.c.store_id == store_id))
            conn.execute(delete(stores_t).where(stores_t.c.id == store_id))
            purged = [d for d in docs if self._drop_if_orphan(conn, d)]
        self._finish_purge(purged)
        return True

    # ------------------------------------------------------------ vector store files and batches

    def attach(
        self, store_id: str, file: dict, attributes: dict, strategy: Strategy, batch_id: str | None = None
    ) -> dict:
        """The file joins the store (in_progress, for the ingest worker); attaching it again does nothing."""
        existing = self.get_store_file(store_id, file["id"])
        if existing is not None:
            return existing
        try:
            self._insert_store_file(store_id, file, attributes, strategy, batch_id)
        except (
            IntegrityError
        ):  # attached by a concurrent request meanwhile: the same answer as attaching again
            pass
        return self.get_store_file(store_id, file["id"])  # type: ignore[return-value]

    def _insert_store_file(
        self, store_id: str, file: dict, attributes: dict, strategy: Strategy, batch_id: str | None
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                insert(store_files_t).values(
                    store_id=store_id,
                    file_id=file["id"],
                    filename=file["filename"],
                    sha256=file["sha256"],
                    bytes=file["bytes"],
                    status="in_progress",
                    attributes=_json(attributes),
                    chunking=_json({"max": strategy.max_tokens, "overlap": strategy.overlap_tokens}),
                    batch_id=batch_id,
                    created_at=int(time.time()),
                )
            )

    @staticmethod
    def _store_file(row: dict) -> dict:
        row["attributes"] = json.loads(row["attributes"])
        chunking = json.loads(row["chunking"])
        row["strategy"] = Strategy(chunking["max"], chunking["overlap"])
        return row

    def get_store_file(self, store_id: str, file_id: str) -> dict | None:
        sf = store_files_t.c
        row = self._one(select(store_files_t).where(sf.store_id == store_id, sf.file_id == file_id))
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
        sf = store_files_t.c
        conds: list = [sf.store_id == store_id]
        if status is not None:
            conds.append(sf.status == status)
        if batch_id is not None:
            conds.append(sf.batch_id == batch_id)
        after_n = None
        if after is not None:  # a store file's id is its file's id: page on it within the store
            after_n = self._anchor(store_files_t, sf.store_id == store_id, sf.file_id == after)
            if after_n is None:
                return [], False
        rows, more = self._page(store_files_t, conds, limit, order, after_n)
        return [self._store_file(r) for r in rows], more

    def set_attributes(self, store_id: str, file_id: str, attributes: dict) -> dict | None:
        sf = store_files_t.c
        with self._tx() as conn:
            conn.execute(
                update(store_files_t)
                .where(sf.store_id == store_id, sf.file_id == file_id)
                .values(attributes=_json(attributes))
            )
        return self.get_store_file(store_id, file_id)

    def detach(self, store_id: str, file_id: str) -> bool:
        """The file leaves the store; its chunks go unless another store file uses the same document."""
        sf = store_files_t.c
        with self._tx() as conn:
            row = self._one(select(sf.doc_id).where(sf.store_id == store_id, sf.file_id == file_id), conn)
            if row is None:
                return False
            conn.execute(delete(store_files_t).where(sf.store_id == store_id, sf.file_id == file_id))
            purged = (
                [row["doc_id"]]
                if row["doc_id"] is not None and self._drop_if_orphan(conn, row["doc_id"])
                else []
            )
        self._finish_purge(purged)
        return True

    def create_batch(self, store_id: str) -> str:
        batch_id = new_id("vsfb")
        with self._tx() as conn:
            conn.execute(
                insert(batches_t).values(id=batch_id, store_id=store_id, created_at=int(time.time()))
            )
        return batch_id

    def get_batch(self, store_id: str, batch_id: str) -> dict | None:
        row = self._one(select(batches_t).where(batches_t.c.id == batch_id, batches_t.c.store_id == store_id))
        if row is None:
            return None
        sf = store_files_t.c
        counts = self._counts(sf.store_id == store_id, sf.batch_id == batch_id)
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
        sf = store_files_t.c
        with self._tx() as conn:
            found = self._one(
                select(batches_t.c.n).where(batches_t.c.id == batch_id, batches_t.c.store_id == store_id),
                conn,
            )
            if found is None:
                return None
            conn.execute(update(batches_t).where(batches_t.c.id == batch_id).values(cancelled=1))
            conn.execute(
                update(store_files_t)
                .where(sf.batch_id == batch_id, sf.store_id == store_id, sf.status == "in_progress")
                .values(status="cancelled")
            )
        return self.get_batch(store_id, batch_id)

    # ------------------------------------------------------------ ingestion

    def pending(self) -> list[int]:
        sf = store_files_t.c
        q = select(sf.n).where(sf.status == "in_progress").order_by(sf.n)
        with self.engine.connect() as conn:
            return list(conn.execute(q).scalars())

    def job(self, n: int) -> dict | None:
        sf = store_files_t.c
        row = self._one(select(store_files_t).where(sf.n == n, sf.status == "in_progress"))
        return None if row is None else self._store_file(row)

    def settle_from_doc(self, n: int) -> bool:
        """A store file whose document is already done takes its outcome; False when it must be ingested."""
        with self._tx() as conn:
            job = self._one(
                select(store_files_t).where(store_files_t.c.n == n, store_files_t.c.status == "in_progress"),
                conn,
            )
            if job is None:
                return True
            job = self._store_file(job)
            doc = self._one(
                select(docs_t).where(
                    docs_t.c.sha256 == job["sha256"], docs_t.c.chunking == job["strategy"].key
                ),
                conn,
            )
            if doc is None or doc["status"] == "in_progress":
                return False
            conn.execute(
                update(store_files_t)
                .where(store_files_t.c.n == n)
                .values(
                    doc_id=doc["id"],
                    status="completed" if doc["status"] == "completed" else "failed",
                    error_code=doc["error_code"],
                    error=doc["error"],
                )
            )
        return True

    def start_doc(self, sha256: str, chunking: str) -> int:
        """A fresh in_progress document for the content (what a killed process left of it is deleted, in
        Milvus first), and every store file waiting on this content linked to it."""
        doc = self._one(select(docs_t.c.id).where(docs_t.c.sha256 == sha256, docs_t.c.chunking == chunking))
        if doc is not None:
            self._delete_vectors([doc["id"]])
        with self._tx() as conn:
            doc = self._one(
                select(docs_t.c.id).where(docs_t.c.sha256 == sha256, docs_t.c.chunking == chunking), conn
            )
            if doc is not None:
                doc_id = doc["id"]
                conn.execute(delete(chunks_t).where(chunks_t.c.doc_id == doc_id))
                conn.execute(
                    update(docs_t)
                    .where(docs_t.c.id == doc_id)
                    .values(status="in_progress", error_code=None, error=None, chunks=0)
                )
            else:
                doc_id = conn.execute(
                    insert(docs_t).values(sha256=sha256, chunking=chunking, status="in_progress", chunks=0)
                ).inserted_primary_key[0]
            max_tokens, overlap = (int(x) for x in chunking.split("/"))
            sf = store_files_t.c
            conn.execute(
                update(store_files_t)
                .where(
                    sf.sha256 == sha256,
                    sf.status == "in_progress",
                    sf.chunking == _json({"max": max_tokens, "overlap": overlap}),
                )
                .values(doc_id=doc_id)
            )
        return int(doc_id)

    def doc_wanted(self, doc_id: int) -> bool:
        sf = store_files_t.c
        return self._one(select(sf.n).where(sf.doc_id == doc_id, sf.status == "in_progress")) is not None

    def add_chunks(self, doc_id: int, chunks: Sequence[Chunk], vectors: np.ndarray, final: bool) -> bool:
        """Chunk rows (SQL), then their vectors (Milvus); with `final`, a flush and then the SQL transaction
        that marks the document and its waiting files completed. False (and nothing of the document kept)
        when the document was dropped meanwhile."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if len(chunks) != len(vectors):
            raise StoreError(f"{len(chunks)} chunks but {len(vectors)} vectors")
        ids: list[int] = []
        with self._tx() as conn:
            gone = self._one(select(docs_t.c.id).where(docs_t.c.id == doc_id), conn) is None
            if not gone and chunks:
                result = conn.execute(
                    insert(chunks_t).returning(chunks_t.c.id, sort_by_parameter_order=True),
                    [{"doc_id": doc_id, "seq": c.seq, "tokens": c.tokens, "text": c.text} for c in chunks],
                )
                ids = list(result.scalars())
                conn.execute(
                    update(docs_t).where(docs_t.c.id == doc_id).values(chunks=docs_t.c.chunks + len(chunks))
                )
        if gone:  # dropped meanwhile: an earlier batch's vectors may have landed after the drop's purge
            self._delete_vectors([doc_id])
            return False
        if chunks:
            self._insert_vectors(ids, doc_id, chunks, vectors)
        if not final:
            return True
        if self._flush and self._ready:
            self.client.flush(self.collection)
        with self._tx() as conn:
            if self._one(select(docs_t.c.id).where(docs_t.c.id == doc_id), conn) is not None:
                conn.execute(update(docs_t).where(docs_t.c.id == doc_id).values(status="completed"))
                sf = store_files_t.c
                conn.execute(
                    update(store_files_t)
                    .where(sf.doc_id == doc_id, sf.status == "in_progress")
                    .values(status="completed")
                )
                return True
        self._delete_vectors([doc_id])  # dropped while its vectors were being written
        return False

    def fail_doc(self, doc_id: int, code: str, message: str) -> None:
        with self._tx() as conn:
            self._delete_rows(conn, doc_id)
            conn.execute(
                update(docs_t)
                .where(docs_t.c.id == doc_id)
                .values(status="failed", error_code=code, error=message, chunks=0)
            )
            sf = store_files_t.c
            conn.execute(
                update(store_files_t)
                .where(sf.doc_id == doc_id, sf.status == "in_progress")
                .values(status="failed", error_code=code, error=message)
            )
        self._finish_purge([doc_id])

    def fail_file(self, n: int, code: str, message: str) -> None:
        sf = store_files_t.c
        with self._tx() as conn:
            conn.execute(
                update(store_files_t)
                .where(sf.n == n, sf.status == "in_progress")
                .values(status="failed", error_code=code, error=message)
            )

    def drop_doc(self, doc_id: int) -> None:
        """A document no store file waits for any more: its rows go, then its vectors."""
        with self._tx() as conn:
            self._delete_rows(conn, doc_id)
            conn.execute(delete(docs_t).where(docs_t.c.id == doc_id))
            conn.execute(update(store_files_t).where(store_files_t.c.doc_id == doc_id).values(doc_id=None))
        self._finish_purge([doc_id])

    def _delete_rows(self, conn: Connection, doc_id: int) -> None:
        """The document's chunk rows go and a Milvus purge is marked, in the caller's transaction."""
        conn.execute(delete(chunks_t).where(chunks_t.c.doc_id == doc_id))
        if self._one(select(purge_t.c.doc_id).where(purge_t.c.doc_id == doc_id), conn) is None:
            conn.execute(insert(purge_t).values(doc_id=doc_id))

    def _drop_if_orphan(self, conn: Connection, doc_id: int) -> bool:
        if self._one(select(store_files_t.c.n).where(store_files_t.c.doc_id == doc_id), conn) is not None:
            return False
        self._delete_rows(conn, doc_id)
        conn.execute(delete(docs_t).where(docs_t.c.id == doc_id))
        return True

    def _finish_purge(self, doc_ids: Sequence[int]) -> None:
        """After the SQL commit: Milvus deletes the documents' vectors, then their purge marks go."""
        if not doc_ids:
            return
        self._delete_vectors(doc_ids)
        with self._tx() as conn:
            conn.execute(delete(purge_t).where(purge_t.c.doc_id.in_(list(doc_ids))))

    def chunk_texts(self, doc_id: int) -> list[str]:
        q = select(chunks_t.c.text).where(chunks_t.c.doc_id == doc_id).order_by(chunks_t.c.seq)
        with self.engine.connect() as conn:
            return list(conn.execute(q).scalars())

    def chunk_count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(chunks_t)).scalar_one())

    # ------------------------------------------------------------ search

    def _allowed(self, rows: list[dict], where: tuple[str, list]) -> list[dict]:
        """The rows (n, doc_id, attributes) whose attributes pass the compiled filter, evaluated by SQLite
        (filters.py's own dialect) over a temporary table, whatever the metadata database is."""
        if where[0] == "1" or not rows:
            return rows
        db = getattr(self._filter_db, "db", None)
        if db is None:
            db = self._filter_db.db = apsw.Connection(":memory:")
            db.execute("CREATE TEMP TABLE sf(n INTEGER PRIMARY KEY, attributes TEXT)")
        with db:
            db.execute("DELETE FROM sf")
            db.executemany("INSERT INTO sf VALUES (?, ?)", [(r["n"], r["attributes"]) for r in rows])
            keep = {n for (n,) in db.execute(f"SELECT sf.n FROM sf WHERE ({where[0]})", tuple(where[1]))}
            db.execute("DELETE FROM sf")
        return [r for r in rows if r["n"] in keep]

    def _members(self, store_id: str, where: tuple[str, list]) -> dict[int, list[int]]:
        """doc id -> the store file ns of the store's completed files that pass the filter."""
        sf = store_files_t.c
        q = select(sf.n, sf.doc_id, sf.attributes).where(
            sf.store_id == store_id, sf.status == "completed", sf.doc_id.is_not(None)
        )
        members: dict[int, list[int]] = {}
        for r in self._allowed(self._rows(q.order_by(sf.n)), where):
            members.setdefault(int(r["doc_id"]), []).append(int(r["n"]))
        return members

    def _search(
        self, store_id: str, data: Any, field: str, metric: str, where: tuple[str, list], limit: int
    ) -> list[tuple[int, int, float]]:
        if limit <= 0 or not self._exists():
            return []
        members = self._members(store_id, where)
        if not members:
            return []
        # The common case, one store holding every completed document and no attribute filter, needs no
        # `doc_id in [...]` list (milvus-lite evaluates it row by row: 25 ms at 200 documents): search
        # everything, drop what is not a member (vectors of documents still being ingested), and only when
        # that leaves the page short ask again with the list.
        everything = len(members) == self._completed_docs()
        listed = f"doc_id in {sorted(members)}"
        out, full = self._ask(data, field, metric, limit, "" if everything else listed, members)
        if everything and full and len(out) < limit:
            out, _ = self._ask(data, field, metric, limit, listed, members)
        return out[:limit]

    def _completed_docs(self) -> int:
        with self.engine.connect() as conn:
            q = select(func.count()).select_from(docs_t).where(docs_t.c.status == "completed")
            return int(conn.execute(q).scalar_one())

    def _ask(
        self, data: Any, field: str, metric: str, limit: int, expr: str, members: dict[int, list[int]]
    ) -> tuple[list[tuple[int, int, float]], bool]:
        """The members' hits among Milvus' best `limit`, and whether Milvus filled the page."""
        hits = self.client.search(
            self.collection,
            data=[data],
            anns_field=field,
            limit=limit,
            filter=expr,
            output_fields=["doc_id"],
            search_params={"metric_type": metric},
        )[0]
        out = []
        for hit in hits:
            # milvus-lite reports BM25 as a negated distance, a Milvus server as a positive score: |d| is
            # the score either way (BM25 is never negative)
            score = abs(float(hit["distance"])) if metric == "BM25" else float(hit["distance"])
            for n in members.get(int(hit["entity"]["doc_id"]), []):
                out.append((int(hit["id"]), n, score))
        return out, len(hits) >= limit

    def bm25(
        self, store_id: str, match: str, where: tuple[str, list], limit: int
    ) -> list[tuple[int, int, float]]:
        """(chunk id, store file n, BM25 score) by Milvus' BM25 over the words of the FTS5 expression."""
        words = fts_words(match)
        if not words:
            return []
        return self._search(store_id, words, "sparse", "BM25", where, limit)

    def dense(
        self, store_id: str, vector: np.ndarray, where: tuple[str, list], limit: int
    ) -> list[tuple[int, int, float]]:
        """(chunk id, store file n, inner product = cosine of normalized vectors), nearest first."""
        q = np.asarray(vector, dtype=np.float32).tolist()
        return self._search(store_id, q, "vector", "IP", where, limit)

    def similarities(self, chunk_ids: Sequence[int], vector: np.ndarray) -> dict[int, float]:
        if not chunk_ids or not self._exists():
            return {}
        rows = self.client.get(self.collection, ids=[int(c) for c in chunk_ids], output_fields=["vector"])
        q = np.asarray(vector, dtype=np.float32)
        return {int(r["id"]): float(np.asarray(r["vector"], dtype=np.float32) @ q) for r in rows}

    def hits(self, pairs: Sequence[tuple[int, int]]) -> list[dict | None]:
        """Text, file and attributes of (chunk id, store file n) pairs, in the order given (None for a pair
        removed since it was ranked)."""
        if not pairs:
            return []
        chunk_ids = sorted({c for c, _ in pairs})
        ns = sorted({n for _, n in pairs})
        with self.engine.connect() as conn:
            texts = dict(
                conn.execute(select(chunks_t.c.id, chunks_t.c.text).where(chunks_t.c.id.in_(chunk_ids))).all()
            )
            sf = store_files_t.c
            files = {
                r["n"]: r
                for r in conn.execute(
                    select(sf.n, sf.file_id, sf.filename, sf.attributes).where(sf.n.in_(ns))
                ).mappings()
            }
        out: list[dict | None] = []
        for chunk_id, n in pairs:
            if chunk_id not in texts or n not in files:
                out.append(None)
                continue
            f = files[n]
            out.append(
                {
                    "text": texts[chunk_id],
                    "file_id": f["file_id"],
                    "filename": f["filename"],
                    "attributes": json.loads(f["attributes"]),
                }
            )
        return out
