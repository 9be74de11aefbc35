"""The KnowledgeStore contract, run against the embedded SQLite store and the Milvus scale path (milvus-lite
with SQLite metadata, and with PostgreSQL metadata where a throwaway server can be started)."""

import hashlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from fleetlm.rag.chunking import Chunk, Strategy
from fleetlm.rag.config import KnowledgeSettings
from fleetlm.rag.ingest import Ingestor
from fleetlm.rag.search import SearchRequest, search
from fleetlm.rag.store import SqliteKnowledgeStore
from rag_fakes import bag_of_words, index_text

pymilvus = pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from fleetlm.rag.milvus_store import MilvusKnowledgeStore, fts_words  # noqa: E402

BACKENDS = ["sqlite", "milvus+sqlite", "milvus+postgres"]


@pytest.fixture(scope="module")
def pg_server():
    """One throwaway PostgreSQL server for the module (the usage store's fixture); each test gets a fresh
    database in it."""
    from test_store import _pg_cluster

    gen = _pg_cluster()
    try:
        url = next(gen)
    except StopIteration:  # pragma: no cover - the generator skips instead
        pytest.skip("no PostgreSQL")
    yield url
    gen.close()


def _fresh_pg_database(server_url: str) -> str:
    import psycopg

    name = "kb_" + uuid.uuid4().hex[:12]
    with psycopg.connect(server_url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server_url.rsplit("/", 1)[0] + "/" + name


class Opener:
    """Opens the backend under test on the same files again and again (a restart, a second replica)."""

    def __init__(self, kind: str, root: Path, request):
        self.kind, self.root, self.opened = kind, root, []
        self.meta = f"sqlite:///{root / 'meta.db'}"
        if kind == "milvus+postgres":
            self.meta = _fresh_pg_database(request.getfixturevalue("pg_server"))

    def __call__(self):
        if self.kind == "sqlite":
            store = SqliteKnowledgeStore(self.root / "kb.db", self.root / "files")
        else:
            store = MilvusKnowledgeStore(self.meta, self.root / "files", str(self.root / "vectors.db"))
        self.opened.append(store)
        return store

    def restart(self, store):
        """Close everything, as a killed process would leave it, and open anew."""
        store.close()
        self.release()
        return self()

    def release(self):
        if self.kind != "sqlite":  # the embedded milvus-lite server lives until released (or exit)
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(str(self.root / "vectors.db"))


@pytest.fixture(params=BACKENDS)
def opener(request, tmp_path):
    op = Opener(request.param, tmp_path, request)
    yield op
    for s in op.opened:
        try:
            s.close()
        except Exception:  # noqa: BLE001 - already closed by the test
            pass
    op.release()


@pytest.fixture
def store(opener):
    return opener()


def vectors(store) -> int | None:
    """Vectors held in Milvus (None for the embedded store, whose vectors are its chunk rows)."""
    return store.vector_count() if isinstance(store, MilvusKnowledgeStore) else None


def upload(store, tmp_path, name: str, data: bytes, purpose: str = "assistants") -> dict:
    tmp = tmp_path / f"up-{name}"
    tmp.write_bytes(data)
    return store.add_file(name, purpose, tmp, hashlib.sha256(data).hexdigest(), len(data))


def index(store, n: int, texts: list[str]) -> int:
    job = store.job(n)
    doc = store.start_doc(job["sha256"], job["strategy"].key)
    chunks = [Chunk(i, t, len(t.split())) for i, t in enumerate(texts)]
    store.add_chunks(doc, chunks, bag_of_words(texts), final=True)
    return doc


def test_files_are_stored_once_listed_and_deleted(store, tmp_path):
    a = upload(store, tmp_path, "a.txt", b"same bytes")
    b = upload(store, tmp_path, "b.txt", b"same bytes", "batch")
    assert a["sha256"] == b["sha256"] and len(list((tmp_path / "files").iterdir())) == 1
    page, more = store.list_files(None, 1, "asc", None)
    assert [r["id"] for r in page] == [a["id"]] and more
    assert [r["id"] for r in store.list_files("batch", 10, "desc", None)[0]] == [b["id"]]
    assert store.list_files(None, 10, "asc", "file-nope") == ([], False)
    assert store.delete_file(a["id"]) and store.blob_path(a["sha256"]).exists()
    assert store.delete_file(b["id"]) and not store.blob_path(a["sha256"]).exists()
    assert not store.delete_file(b["id"]) and store.get_file(b["id"]) is None


def test_stores_update_list_and_count(store, tmp_path):
    vs = store.create_store("one", {"team": "a"}, {"anchor": "last_active_at", "days": 2})
    assert vs["metadata"] == {"team": "a"} and vs["expires_after"]["days"] == 2 and vs["usage_bytes"] == 0
    changed = store.update_store(vs["id"], {"name": "two", "expires_after": None})
    assert changed["name"] == "two" and changed["expires_after"] is None
    assert store.update_store("vs_nope", {"name": "x"}) is None
    other = store.create_store(None, {}, None)
    assert [s["id"] for s in store.list_stores(10, "desc", None)[0]] == [other["id"], vs["id"]]
    f = upload(store, tmp_path, "a.txt", b"abc")
    index(store, store.attach(vs["id"], f, {}, Strategy())["n"], ["alpha"])
    assert store.get_store(vs["id"])["usage_bytes"] == 3
    assert store.get_store(vs["id"])["file_counts"]["completed"] == 1
    store.touch(vs["id"], every_s=0)
    assert store.delete_store(other["id"]) and not store.delete_store(other["id"])


def test_chunks_are_searchable_only_once_completed_and_go_with_the_last_user(store, tmp_path):
    f = upload(store, tmp_path, "a.txt", b"x")
    vs1, vs2 = store.create_store("one", {}, None)["id"], store.create_store("two", {}, None)["id"]
    n1 = store.attach(vs1, f, {"k": 1}, Strategy())["n"]
    n2 = store.attach(vs2, f, {}, Strategy())["n"]
    assert store.attach(vs1, f, {}, Strategy())["n"] == n1  # attaching again does nothing
    job = store.job(n1)
    doc = store.start_doc(job["sha256"], job["strategy"].key)
    texts = ["the cat sat on the mat", "dogs bark at night"]
    store.add_chunks(doc, [Chunk(0, texts[0], 6)], bag_of_words(texts[:1]), final=False)
    assert store.bm25(vs1, '"cat"', ("1", []), 10) == []  # half-indexed: not searchable, not completed
    assert store.dense(vs1, bag_of_words(texts[:1])[0], ("1", []), 10) == []
    assert store.get_store_file(vs1, f["id"])["status"] == "in_progress"
    store.add_chunks(doc, [Chunk(1, texts[1], 4)], bag_of_words(texts[1:]), final=True)
    assert store.get_store_file(vs1, f["id"])["status"] == store.get_store_file(vs2, f["id"])["status"]
    assert store.get_store_file(vs2, f["id"])["status"] == "completed"
    assert store.settle_from_doc(n2) and store.chunk_count() == 2 and vectors(store) in (None, 2)
    hits = store.bm25(vs1, '"cat"', ("1", []), 10)
    assert len(hits) == 1 and hits[0][1] == n1 and hits[0][2] > 0
    (near,) = store.dense(vs2, bag_of_words(["dogs bark"])[0], ("1", []), 1)
    assert store.hits([near[:2]])[0]["text"] == "dogs bark at night"
    assert store.chunk_texts(doc) == texts
    assert store.detach(vs1, f["id"]) and store.chunk_count() == 2  # vs2 still uses the document
    assert not store.detach(vs1, f["id"])
    assert store.delete_store(vs2) and store.chunk_count() == 0 and vectors(store) in (None, 0)


def test_removing_a_file_from_its_store_deletes_its_chunks_and_vectors(store, tmp_path):
    vs = store.create_store(None, {}, None)["id"]
    a, b = upload(store, tmp_path, "a.txt", b"a"), upload(store, tmp_path, "b.txt", b"b")
    index(store, store.attach(vs, a, {}, Strategy())["n"], ["apples are red", "apples grow on trees"])
    index(store, store.attach(vs, b, {}, Strategy())["n"], ["bananas are yellow"])
    assert store.chunk_count() == 3 and vectors(store) in (None, 3)
    assert store.detach(vs, a["id"])
    assert store.chunk_count() == 1 and vectors(store) in (None, 1)
    assert store.bm25(vs, '"apples"', ("1", []), 10) == []
    assert [n for _, n, _ in store.dense(vs, bag_of_words(["apples are red"])[0], ("1", []), 10)] == [2]


def test_a_restart_deletes_half_written_chunks_and_vectors_before_reingesting(opener, tmp_path):
    store = opener()
    f = upload(store, tmp_path, "a.txt", b"x")
    vs = store.create_store(None, {}, None)["id"]
    n = store.attach(vs, f, {}, Strategy())["n"]
    job = store.job(n)
    doc = store.start_doc(job["sha256"], job["strategy"].key)
    store.add_chunks(doc, [Chunk(0, "partial words", 2)], bag_of_words(["partial words"]), final=False)
    store = opener.restart(store)  # killed before the last batch: nothing says completed
    assert store.pending() == [n] and store.get_store_file(vs, f["id"])["status"] == "in_progress"
    assert store.bm25(vs, '"partial"', ("1", []), 10) == []
    again = store.start_doc(job["sha256"], job["strategy"].key)
    assert again == doc and store.chunk_count() == 0 and vectors(store) in (None, 0)
    store.add_chunks(doc, [Chunk(0, "whole words", 2)], bag_of_words(["whole words"]), final=True)
    store = opener.restart(store)  # completed survives a restart, and is searchable after it
    assert store.pending() == [] and store.get_store_file(vs, f["id"])["status"] == "completed"
    assert [h[1] for h in store.bm25(vs, '"whole"', ("1", []), 10)] == [n]
    assert len(store.dense(vs, bag_of_words(["whole words"])[0], ("1", []), 10)) == 1


def test_cancelling_a_batch_and_its_status(store, tmp_path):
    vs = store.create_store(None, {}, None)["id"]
    batch = store.create_batch(vs)
    files = [upload(store, tmp_path, f"{i}.txt", f"{i}".encode()) for i in range(3)]
    ns = [store.attach(vs, f, {}, Strategy(), batch)["n"] for f in files]
    index(store, ns[0], ["done"])
    assert store.get_batch(vs, batch)["status"] == "in_progress"
    assert [r["n"] for r in store.list_store_files(vs, "in_progress", batch, 10, "asc", None)[0]] == ns[1:]
    cancelled = store.cancel_batch(vs, batch)
    assert cancelled["status"] == "cancelled"
    assert cancelled["file_counts"] == {
        "in_progress": 0,
        "completed": 1,
        "failed": 0,
        "cancelled": 2,
        "total": 3,
    }
    assert store.job(ns[1]) is None and store.pending() == []
    assert store.get_batch(vs, "vsfb_nope") is None and store.cancel_batch("vs_nope", batch) is None


def test_a_failed_document_fails_its_files_and_keeps_no_chunks(store, tmp_path):
    vs = store.create_store(None, {}, None)["id"]
    f = upload(store, tmp_path, "bad.pdf", b"%PDF-broken")
    n = store.attach(vs, f, {}, Strategy())["n"]
    job = store.job(n)
    doc = store.start_doc(job["sha256"], job["strategy"].key)
    store.add_chunks(doc, [Chunk(0, "some text", 2)], bag_of_words(["some text"]), final=False)
    store.fail_doc(doc, "invalid_file", "bad.pdf: not a PDF")
    row = store.get_store_file(vs, f["id"])
    assert (row["status"], row["error_code"]) == ("failed", "invalid_file")
    assert store.chunk_count() == 0 and vectors(store) in (None, 0)
    other = store.create_store(None, {}, None)["id"]
    assert store.settle_from_doc(store.attach(other, f, {}, Strategy())["n"])  # takes the document's outcome
    assert store.get_store_file(other, f["id"])["status"] == "failed"


def test_dense_scores_are_inner_products_and_similarities_agree(store, tmp_path):
    f = upload(store, tmp_path, "a.txt", b"y")
    vs = store.create_store(None, {}, None)["id"]
    index(store, store.attach(vs, f, {}, Strategy())["n"], ["alpha beta", "gamma delta"])
    q = bag_of_words(["alpha beta"])[0]
    best, second = store.dense(vs, q, ("1", []), 5)
    assert best[2] == pytest.approx(1.0, abs=1e-5) and second[2] == pytest.approx(0.0, abs=1e-5)
    assert store.similarities([best[0], second[0]], q) == pytest.approx(
        {best[0]: 1.0, second[0]: 0.0}, abs=1e-5
    )
    assert store.dense(store.create_store(None, {}, None)["id"], q, ("1", []), 5) == []


def test_a_second_instance_sees_the_first_ones_changes(opener, tmp_path):
    store, other = opener(), opener()  # e.g. two gateway replicas on one metadata database and Milvus
    vs = store.create_store(None, {}, None)["id"]
    a = upload(store, tmp_path, "a.txt", b"a")
    index(store, store.attach(vs, a, {}, Strategy())["n"], ["alpha words"])
    q = bag_of_words(["alpha words"])[0]
    assert len(store.dense(vs, q, ("1", []), 5)) == 1
    assert len(other.dense(vs, q, ("1", []), 5)) == 1  # opened before the collection existed
    b = upload(other, tmp_path, "b.txt", b"b")
    nb = other.attach(vs, b, {}, Strategy())["n"]
    index(other, nb, ["alpha words too"])
    assert len(store.dense(vs, q, ("1", []), 5)) == 2
    other.detach(vs, a["id"])
    assert [n for _, n, _ in store.dense(vs, q, ("1", []), 5)] == [nb]


TEXTS = {
    "fox.txt": ("the quick brown fox jumps over the fence", {"team": "a", "year": 2021, "draft": False}),
    "dog.txt": ("a lazy dog sleeps all day in the sun", {"team": "b", "year": 2023, "draft": True}),
    "day.txt": ("quick thinking saves the day", {"team": "a", "year": 2024}),
}

FILTERS = [
    ({"type": "eq", "key": "team", "value": "a"}, {"fox.txt", "day.txt"}),
    ({"type": "ne", "key": "team", "value": "a"}, {"dog.txt"}),
    ({"type": "gte", "key": "year", "value": 2023}, {"dog.txt", "day.txt"}),
    ({"type": "in", "key": "team", "value": ["b", "c"]}, {"dog.txt"}),
    ({"type": "nin", "key": "draft", "value": [True]}, {"fox.txt", "day.txt"}),
    ({"type": "eq", "key": "draft", "value": False}, {"fox.txt"}),
    (
        {
            "type": "or",
            "filters": [
                {"type": "eq", "key": "team", "value": "b"},
                {
                    "type": "and",
                    "filters": [
                        {"type": "lt", "key": "year", "value": 2022},
                        {"type": "eq", "key": "team", "value": "a"},
                    ],
                },
            ],
        },
        {"fox.txt", "dog.txt"},
    ),
]


@pytest.fixture
def indexed(store, tmp_path):
    vs = store.create_store(None, {}, None)["id"]
    for name, (text, attrs) in TEXTS.items():
        index_text(store, tmp_path, vs, name, text, attrs)
    return store, vs


@pytest.mark.parametrize(
    "retrieval, fusion", [("bm25", "rrf"), ("dense", "rrf"), ("hybrid", "rrf"), ("hybrid", "convex")]
)
def test_every_search_mode_ranks_the_matching_chunk_first(indexed, retrieval, fusion):
    store, vs = indexed
    req = SearchRequest(["lazy dog sleeps"], retrieval=retrieval, fusion=fusion)
    hits = search(store, vs, req, bag_of_words)
    assert hits[0]["filename"] == "dog.txt" and hits[0]["attributes"]["team"] == "b"
    assert all(0 <= h["score"] <= 1 for h in hits)


def test_every_filter_operator_selects_the_same_files(indexed):
    store, vs = indexed
    for flt, expected in FILTERS:
        for retrieval in ("bm25", "dense"):
            req = SearchRequest(["quick fox lazy dog day"], filters=flt, retrieval=retrieval)
            got = {h["filename"] for h in search(store, vs, req, bag_of_words)}
            assert got == expected, (flt, retrieval)


def test_the_ingest_worker_runs_on_the_store(store, tmp_path):
    vs = store.create_store(None, {}, None)["id"]
    f = upload(
        store, tmp_path, "notes.md", b"# Notes\n\nThe warehouse opens at nine.\n\nDeliveries on Monday."
    )
    worker = Ingestor(store, bag_of_words, batch=1).start()
    worker.submit(store.attach(vs, f, {}, Strategy())["n"])
    assert worker.wait(30)
    worker.stop()
    assert store.get_store_file(vs, f["id"])["status"] == "completed"
    (hit,) = search(
        store, vs, SearchRequest(["when does the warehouse open"], max_num_results=1), bag_of_words
    )
    assert hit["filename"] == "notes.md" and "nine" in hit["text"]


KILLED_WRITER = """
import sys
import numpy as np
from fleetlm.rag.chunking import Chunk, Strategy
from fleetlm.rag.milvus_store import MilvusKnowledgeStore
root = sys.argv[1]
store = MilvusKnowledgeStore(f"sqlite:///{root}/meta.db", f"{root}/files", f"{root}/vectors.db")
(__import__("pathlib").Path(root) / "up").write_bytes(b"abc")
f = store.add_file("a.txt", "assistants", __import__("pathlib").Path(root) / "up", "ab" * 32, 3)
vs = store.create_store(None, {}, None)["id"]
n = store.attach(vs, f, {}, Strategy())["n"]
doc = store.start_doc(f["sha256"], Strategy().key)
vec = np.eye(4, dtype=np.float32)
store.add_chunks(doc, [Chunk(i, f"chunk {i}", 2) for i in range(4)], vec, final=False)
print(vs, flush=True)
sys.stdin.read()  # killed here: its vectors are in Milvus, its last batch never came
"""


def test_a_sigkilled_ingestion_restarts_consistent(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        vs = proc.stdout.readline().strip()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert vs.startswith("vs_")
    store = MilvusKnowledgeStore(
        f"sqlite:///{tmp_path}/meta.db", tmp_path / "files", str(tmp_path / "vectors.db")
    )
    try:
        assert store.vector_count() == 4  # the vectors had landed: no file may say completed with them
        assert store.get_store(vs)["file_counts"]["completed"] == 0 and len(store.pending()) == 1
        assert store.dense(vs, np.eye(4, dtype=np.float32)[0], ("1", []), 5) == []
        job = store.job(store.pending()[0])
        store.start_doc(job["sha256"], job["strategy"].key)  # what the ingest worker does on start
        assert store.vector_count() == 0 and store.chunk_count() == 0
    finally:
        store.close()


def test_fts_words_undo_the_fts5_quoting():
    assert fts_words('"cat" OR "sat" OR "a""b"') == 'cat sat a"b'
    assert fts_words("") == ""


def test_the_backend_is_chosen_in_fleet_yaml():
    assert KnowledgeSettings().backend == "sqlite"
    s = KnowledgeSettings(backend="milvus", milvus_uri="http://milvus:19530")
    assert s.milvus_uri == "http://milvus:19530"
    with pytest.raises(ValueError, match="backend"):
        KnowledgeSettings(backend="qdrant")


def _gateway(root: Path, knowledge: dict, storage_url: str | None = None):
    from fleetlm.config import parse_config
    from fleetlm.serve.app import create_app
    from fleetlm.serve.store import UsageStore

    config = parse_config(
        {
            "models": {"m": {"remote": "http://127.0.0.1:9/v1"}},
            "knowledge": {"files_dir": str(root / "blobs"), **knowledge},
        }
    )
    app = create_app(config, UsageStore(storage_url or f"sqlite:///{root / 'fleet.db'}"), {})
    app.state.gateway.knowledge_embed = bag_of_words  # no MiniLM: the test is about the wiring
    return app


def test_the_gateway_serves_vector_stores_from_milvus(tmp_path):
    import openai
    from fastapi.testclient import TestClient

    from fleetlm.serve.files_api import knowledge_base

    app = _gateway(tmp_path, {"backend": "milvus", "milvus_uri": str(tmp_path / "kb-milvus.db")})
    with TestClient(app) as tc:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)
        f = client.files.create(
            file=("tides.txt", b"Tides rise twice a day: the moon pulls."), purpose="assistants"
        )
        vs = client.vector_stores.create(name="sea")
        done = client.vector_stores.files.create_and_poll(
            vector_store_id=vs.id, file_id=f.id, attributes={"topic": "sea"}, poll_interval_ms=50
        )
        assert done.status == "completed"
        kb = knowledge_base(app.state.gateway)
        assert isinstance(kb.store, MilvusKnowledgeStore) and kb.store.meta_url.startswith("sqlite:///")
        page = client.vector_stores.search(
            vector_store_id=vs.id,
            query="why do tides rise",
            filters={"type": "eq", "key": "topic", "value": "sea"},
        )
        assert [r.filename for r in page.data] == ["tides.txt"]
        assert client.vector_stores.files.delete(file_id=f.id, vector_store_id=vs.id).deleted
        assert kb.store.vector_count() == 0


def test_an_unreachable_milvus_is_a_503_in_openai_shape(tmp_path):
    from fastapi.testclient import TestClient

    port = 1  # nothing listens on port 1 of the loopback address
    app = _gateway(tmp_path, {"backend": "milvus", "milvus_uri": f"http://127.0.0.1:{port}"})
    with TestClient(app) as tc:
        r = tc.get("/v1/vector_stores")
    assert r.status_code == 503
    body = r.json()["error"]
    assert body["code"] == "knowledge_store_unavailable" and "Milvus" in body["message"]


def test_the_metadata_follows_the_fleets_postgresql_storage(tmp_path, pg_server):
    from types import SimpleNamespace

    from fleetlm.serve.files_api import open_store

    url = _fresh_pg_database(pg_server)
    settings = KnowledgeSettings(
        backend="milvus", milvus_uri=str(tmp_path / "v.db"), index_path=str(tmp_path / "i")
    )
    gw = SimpleNamespace(config=SimpleNamespace(knowledge=settings), store=SimpleNamespace(url=url))
    store = open_store(gw, tmp_path / "files")
    try:
        assert isinstance(store, MilvusKnowledgeStore) and store.meta_url == url
        assert store.create_store("pg", {}, None)["name"] == "pg"
    finally:
        store.close()
    gw.store.url = f"sqlite:///{tmp_path / 'fleet.db'}"
    gw.config.knowledge = KnowledgeSettings(index_path=str(tmp_path / "kb.db"))
    embedded = open_store(gw, tmp_path / "files")
    assert isinstance(embedded, SqliteKnowledgeStore)
    embedded.close()


def test_vectors_still_being_ingested_never_crowd_out_the_results(store, tmp_path):
    vs = store.create_store(None, {}, None)["id"]
    done, busy = upload(store, tmp_path, "done.txt", b"d"), upload(store, tmp_path, "busy.txt", b"b")
    index(store, store.attach(vs, done, {}, Strategy())["n"], ["red apples"])
    job = store.job(store.attach(vs, busy, {}, Strategy())["n"])
    doc = store.start_doc(job["sha256"], job["strategy"].key)
    texts = ["green apples", "apples apples", "apples pie"]
    store.add_chunks(doc, [Chunk(i, t, 2) for i, t in enumerate(texts)], bag_of_words(texts), final=False)
    (hit,) = store.dense(vs, bag_of_words(["apples apples"])[0], ("1", []), 1)
    assert store.hits([hit[:2]])[0]["text"] == "red apples"
    (hit,) = store.bm25(vs, '"apples"', ("1", []), 1)
    assert store.hits([hit[:2]])[0]["text"] == "red apples"


def test_a_missing_extra_and_a_bad_metadata_url_are_clear_errors(tmp_path, monkeypatch):
    from fleetlm.rag.store import StoreError

    with pytest.raises(StoreError, match="cannot use metadata database"):
        MilvusKnowledgeStore("nosuchdb://x", tmp_path / "files", str(tmp_path / "v.db"))
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if the `milvus` extra were not installed
    with pytest.raises(StoreError, match=r"pip install 'fleetlm\[milvus\]'"):
        MilvusKnowledgeStore(f"sqlite:///{tmp_path / 'm.db'}", tmp_path / "files", str(tmp_path / "v.db"))


def test_concurrent_attaches_of_one_file_give_one_store_file(store, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    vs = store.create_store(None, {}, None)["id"]
    f = upload(store, tmp_path, "a.txt", b"a")
    with ThreadPoolExecutor(6) as pool:
        rows = list(pool.map(lambda _: store.attach(vs, f, {}, Strategy()), range(6)))
    assert len({r["n"] for r in rows}) == 1 and store.get_store(vs)["file_counts"]["total"] == 1


def test_the_scale_benchmark_runs_on_a_tiny_corpus():
    """bench/kb_scale.py's code path (not a timing test): both columns and every mode are printed."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [
            sys.executable,
            str(root / "bench" / "kb_scale.py"),
            "--chunks",
            "40",
            "--files",
            "40",  # years 2010..2029: the filtered mode (year >= 2020) keeps half
            "--queries",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "sqlite (embedded)" in out.stdout and "milvus (milvus-lite, sqlite meta)" in out.stdout
    for mode in ("bm25", "dense", "hybrid", "hybrid + filter"):
        assert f"\n{mode} " in out.stdout


def test_milvus_or_its_metadata_failing_mid_request_is_a_503_not_a_500(tmp_path):
    from fastapi.testclient import TestClient
    from pymilvus.exceptions import MilvusException
    from sqlalchemy.exc import OperationalError

    from fleetlm.serve.files_api import knowledge_base

    app = _gateway(tmp_path, {"backend": "milvus", "milvus_uri": str(tmp_path / "kb-milvus.db")})
    with TestClient(app, raise_server_exceptions=False) as tc:
        assert tc.get("/v1/vector_stores").status_code == 200
        store = knowledge_base(app.state.gateway).store
        failures = [MilvusException(message="collection not loaded"),
                    OperationalError("SELECT 1", {}, Exception("connection refused"))]
        for failure in failures:
            def fail(*_a, failure=failure, **_k):
                raise failure

            store.list_stores = fail
            r = tc.get("/v1/vector_stores")
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "knowledge_store_unavailable"
        store.list_stores = lambda *_a, **_k: 1 / 0  # a bug stays a 500
        assert tc.get("/v1/vector_stores").status_code == 500
