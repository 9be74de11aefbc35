import hashlib

import numpy as np
import pytest

from fleetlm.rag.chunking import Chunk, Strategy
from fleetlm.rag.store import SqliteKnowledgeStore
from rag_fakes import bag_of_words


@pytest.fixture
def store(tmp_path):
    s = SqliteKnowledgeStore(tmp_path / "kb.db", tmp_path / "files")
    yield s
    s.close()


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


def test_same_bytes_are_stored_once_and_deleted_with_the_last_file(store, tmp_path):
    a = upload(store, tmp_path, "a.txt", b"same bytes")
    b = upload(store, tmp_path, "b.txt", b"same bytes")
    assert a["id"] != b["id"] and a["sha256"] == b["sha256"]
    assert len(list((tmp_path / "files").iterdir())) == 1
    assert store.delete_file(a["id"]) and store.blob_path(a["sha256"]).exists()
    assert store.delete_file(b["id"]) and not store.blob_path(a["sha256"]).exists()
    assert not store.delete_file(b["id"])


def test_listing_pages_and_filters_by_purpose(store, tmp_path):
    ids = [
        upload(store, tmp_path, f"{i}.txt", f"{i}".encode(), "batch" if i % 2 else "assistants")["id"]
        for i in range(5)
    ]
    page, more = store.list_files(None, 2, "asc", None)
    assert [r["id"] for r in page] == ids[:2] and more
    page, more = store.list_files(None, 2, "asc", ids[3])
    assert [r["id"] for r in page] == ids[4:] and not more
    page, _ = store.list_files("batch", 10, "desc", None)
    assert [r["id"] for r in page] == [ids[3], ids[1]]


def test_chunks_are_searchable_only_once_completed_and_go_with_the_last_user(store, tmp_path):
    f = upload(store, tmp_path, "a.txt", b"x")
    vs1, vs2 = store.create_store("one", {}, None)["id"], store.create_store("two", {}, None)["id"]
    n1 = store.attach(vs1, f, {"k": 1}, Strategy())["n"]
    n2 = store.attach(vs2, f, {}, Strategy())["n"]
    job = store.job(n1)
    doc = store.start_doc(job["sha256"], job["strategy"].key)
    texts = ["the cat sat on the mat", "dogs bark at night"]
    store.add_chunks(doc, [Chunk(0, texts[0], 6)], bag_of_words(texts[:1]), final=False)
    assert store.bm25(vs1, '"cat"', ("1", []), 10) == []  # half-indexed: not searchable, not completed
    assert store.get_store_file(vs1, f["id"])["status"] == "in_progress"
    store.add_chunks(doc, [Chunk(1, texts[1], 4)], bag_of_words(texts[1:]), final=True)
    # both stores waited on the same content: one document, completed for both in one transaction
    assert (
        store.get_store_file(vs1, f["id"])["status"]
        == store.get_store_file(vs2, f["id"])["status"]
        == "completed"
    )
    assert store.settle_from_doc(n2) and store.chunk_count() == 2
    hits = store.bm25(vs1, '"cat"', ("1", []), 10)
    assert len(hits) == 1 and hits[0][1] == n1
    (near,) = store.dense(vs2, bag_of_words(["dogs bark"])[0], ("1", []), 1)
    assert store.hits([near[:2]])[0]["text"] == "dogs bark at night"
    assert store.get_store(vs1)["file_counts"] == {
        "in_progress": 0,
        "completed": 1,
        "failed": 0,
        "cancelled": 0,
        "total": 1,
    }
    assert store.detach(vs1, f["id"]) and store.chunk_count() == 2  # vs2 still uses the document
    assert store.delete_store(vs2) and store.chunk_count() == 0


def test_a_restart_deletes_half_written_chunks_before_reingesting(store, tmp_path):
    f = upload(store, tmp_path, "a.txt", b"x")
    vs = store.create_store(None, {}, None)["id"]
    n = store.attach(vs, f, {}, Strategy())["n"]
    job = store.job(n)
    doc = store.start_doc(job["sha256"], job["strategy"].key)
    store.add_chunks(doc, [Chunk(0, "partial", 1)], bag_of_words(["partial"]), final=False)
    assert store.pending() == [n]  # what a restart re-queues
    again = store.start_doc(job["sha256"], job["strategy"].key)
    assert again == doc and store.chunk_count() == 0


def test_cancelling_a_batch_and_its_status(store, tmp_path):
    vs = store.create_store(None, {}, None)["id"]
    batch = store.create_batch(vs)
    files = [upload(store, tmp_path, f"{i}.txt", f"{i}".encode()) for i in range(3)]
    ns = [store.attach(vs, f, {}, Strategy(), batch)["n"] for f in files]
    index(store, ns[0], ["done"])
    assert store.get_batch(vs, batch)["status"] == "in_progress"
    cancelled = store.cancel_batch(vs, batch)
    assert cancelled["status"] == "cancelled"
    assert cancelled["file_counts"] == {
        "in_progress": 0,
        "completed": 1,
        "failed": 0,
        "cancelled": 2,
        "total": 3,
    }
    assert store.job(ns[1]) is None  # the worker skips it
    assert store.get_batch(vs, "vsfb_nope") is None and store.cancel_batch("vs_nope", batch) is None


def test_dense_scores_are_cosine_similarities(store, tmp_path):
    f = upload(store, tmp_path, "a.txt", b"y")
    vs = store.create_store(None, {}, None)["id"]
    n = store.attach(vs, f, {}, Strategy())["n"]
    index(store, n, ["alpha beta", "gamma delta"])
    q = bag_of_words(["alpha beta"])[0]
    (best, second) = store.dense(vs, q, ("1", []), 5)
    assert best[2] == pytest.approx(1.0, abs=1e-5) and second[2] == pytest.approx(0.0, abs=1e-5)
    assert store.similarities([best[0]], q)[best[0]] == pytest.approx(float(q @ q), abs=1e-5)
    assert isinstance(np.float32(best[2]), np.floating)


def test_the_vector_matrix_follows_changes_made_by_another_process(store, tmp_path):
    other = SqliteKnowledgeStore(tmp_path / "kb.db", tmp_path / "files")  # e.g. a second gateway replica
    vs = store.create_store(None, {}, None)["id"]
    a = upload(store, tmp_path, "a.txt", b"a")
    index(store, store.attach(vs, a, {}, Strategy())["n"], ["alpha words"])
    q = bag_of_words(["alpha words"])[0]
    assert len(store.dense(vs, q, ("1", []), 5)) == 1  # the matrix is built and cached
    b = upload(other, tmp_path, "b.txt", b"b")
    index(other, other.attach(vs, b, {}, Strategy())["n"], ["alpha words too"])
    assert {n for _, n, _ in store.dense(vs, q, ("1", []), 5)} == {1, 2}
    other.detach(vs, a["id"])
    assert [n for _, n, _ in store.dense(vs, q, ("1", []), 5)] == [2]
    other.close()


def test_dense_search_of_an_empty_store_is_empty(store):
    vs = store.create_store(None, {}, None)["id"]
    assert store.dense(vs, bag_of_words(["x"])[0], ("1", []), 5) == []


# ---------------------------------------------------------------- search gives what a plain join gives

WORDS = "apple river stone cloud paper tiger lamp orange glass music violet mountain".split()


def reference_bm25(store, store_id: str, match: str, where: tuple[str, list], limit: int) -> list:
    """The answer by definition: every match joined to the store's completed files, ranked in SQL."""
    rows = store._rows(
        "SELECT c.id AS id, sf.n AS n, -bm25(kb_chunks_fts) AS s FROM kb_chunks_fts "
        f"JOIN kb_chunks c ON c.id = kb_chunks_fts.rowid {store._MEMBER} "
        f"WHERE kb_chunks_fts MATCH ? AND ({where[0]})",
        [store_id, match, *where[1]],
    )
    return sorted(((r["id"], r["n"], r["s"]) for r in rows), key=lambda t: (-t[2], t[0], t[1]))[:limit]


def reference_dense(store, store_id: str, q: np.ndarray, where: tuple[str, list], limit: int) -> list:
    rows = store._rows(
        f"SELECT c.id AS id, sf.n AS n, c.embedding AS e FROM kb_chunks c {store._MEMBER} WHERE ({where[0]})",
        [store_id, *where[1]],
    )
    scored = [(r["id"], r["n"], float(np.frombuffer(r["e"], dtype=np.float32) @ q)) for r in rows]
    return sorted(scored, key=lambda t: (-t[2], t[0], t[1]))[:limit]


def add_random_file(store, tmp_path, vs: str, rng: np.random.Generator, i: int, data: bytes | None = None):
    """A file of 1 to 3 chunks of random words and random unit vectors, attached to `vs` and completed."""
    data = data if data is not None else f"file {i} {rng.random()}".encode()
    f = upload(store, tmp_path, f"f{i}.txt", data)
    n = store.attach(vs, f, {"i": i}, Strategy())["n"]
    job = store.job(n)
    if job is None:  # the content was already completed
        return f, n
    if store.settle_from_doc(n):
        return f, n
    doc = store.start_doc(job["sha256"], job["strategy"].key)
    texts = [" ".join(rng.choice(WORDS, size=rng.integers(3, 9))) for _ in range(rng.integers(1, 4))]
    vectors = rng.standard_normal((len(texts), 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store.add_chunks(doc, [Chunk(k, t, 5) for k, t in enumerate(texts)], vectors, final=True)
    return f, n


def assert_same_answers(store, stores: list[str], rng: np.random.Generator) -> None:
    from fleetlm.rag.filters import compile_filter

    wheres = [("1", []), compile_filter({"type": "gt", "key": "i", "value": 25}, "sf.attributes")]
    for vs in stores:
        for where in wheres:
            for limit in (1, 5, 50):
                for words in (["apple"], ["tiger", "lamp"], ["glass", "river", "cloud"]):
                    match = " OR ".join(f'"{w}"' for w in words)
                    got, want = (
                        store.bm25(vs, match, where, limit),
                        reference_bm25(store, vs, match, where, limit),
                    )
                    assert [g[:2] for g in got] == [w[:2] for w in want]
                    assert [g[2] for g in got] == pytest.approx([w[2] for w in want])
                q = rng.standard_normal(384).astype(np.float32)
                q /= np.linalg.norm(q)
                got, want = store.dense(vs, q, where, limit), reference_dense(store, vs, q, where, limit)
                assert [g[:2] for g in got] == [w[:2] for w in want]
                assert [g[2] for g in got] == pytest.approx([w[2] for w in want], abs=1e-5)


def test_bm25_and_dense_give_the_plain_joins_answers_as_the_stores_change(store, tmp_path, monkeypatch):
    import fleetlm.rag.store as store_module

    # small depths, so that a store holding a small share of the index grows its prefix and falls back
    monkeypatch.setattr(store_module, "BM25_FIRST_DEPTH", 2)
    monkeypatch.setattr(store_module, "BM25_MAX_DEPTH", 8)
    rng = np.random.default_rng(7)
    big, small, third = (store.create_store(name, {}, None)["id"] for name in ("big", "small", "third"))
    files = [add_random_file(store, tmp_path, big, rng, i) for i in range(40)]
    for i in range(40, 46):
        add_random_file(store, tmp_path, small, rng, i)
    shared = b"the same bytes in two stores"
    add_random_file(store, tmp_path, third, rng, 46, shared)
    assert_same_answers(store, [big, small, third], rng)  # the matrices are built here

    before = store._matrices[big]
    for i in range(50, 55):  # new documents: appended in place to the cached matrix
        add_random_file(store, tmp_path, big, rng, i)
    assert_same_answers(store, [big, small, third], rng)
    assert store._matrices[big].units is before.units and store._matrices[big].size > before.size
    old_ids, _, old_units, _ = before.view()
    assert old_units.shape[0] == len(old_ids)  # an older view keeps its rows

    add_random_file(store, tmp_path, big, rng, 60, shared)  # older chunk ids join: rows re-sorted
    add_random_file(store, tmp_path, big, rng, 61, shared)  # the same document twice in one store
    for f, _ in files[:5]:
        store.detach(big, f["id"])
    store.delete_store(small)
    assert_same_answers(store, [big, third], rng)
    ids, ns, _, _ = store._vectors(big)
    pairs = list(zip(ids.tolist(), ns.tolist(), strict=True))
    assert pairs == sorted(pairs)


def test_hits_come_in_the_order_asked_and_none_for_what_went(store, tmp_path):
    rng = np.random.default_rng(1)
    vs = store.create_store(None, {}, None)["id"]
    (fa, na), (fb, nb) = (add_random_file(store, tmp_path, vs, rng, i) for i in range(2))
    ranked = store.dense(vs, np.ones(384, dtype=np.float32), ("1", []), 50)
    chunks = {n: [cid for cid, m, _ in ranked if m == n] for n in (na, nb)}
    pairs = [(chunks[nb][0], nb), (chunks[na][0], na), (10_000, na)]
    got = store.hits(pairs)
    assert [h["filename"] if h else None for h in got] == ["f1.txt", "f0.txt", None]
    assert got[0]["attributes"] == {"i": 1} and got[0]["file_id"] == fb["id"] and got[0]["text"]
    store.detach(vs, fa["id"])
    assert store.hits(pairs)[1] is None and store.hits([]) == []


def index_vectors(store, tmp_path, vs: str, name: str, vectors: np.ndarray) -> int:
    f = upload(store, tmp_path, name, name.encode())
    n = store.attach(vs, f, {}, Strategy())["n"]
    doc = store.start_doc(store.job(n)["sha256"], Strategy().key)
    store.add_chunks(doc, [Chunk(k, f"chunk {k}", 2) for k in range(len(vectors))], vectors, final=True)
    return n


def test_dense_ranks_by_exact_scores_where_float16_cannot_tell_them_apart(store, tmp_path):
    rng = np.random.default_rng(3)
    base = rng.standard_normal(384).astype(np.float32)
    base /= np.linalg.norm(base)
    # 300 near-copies of one vector: their cosines to it differ by less than float16 can resolve
    near = base + 1e-4 * rng.standard_normal((300, 384)).astype(np.float32)
    near /= np.linalg.norm(near, axis=1, keepdims=True)
    vs = store.create_store(None, {}, None)["id"]
    index_vectors(store, tmp_path, vs, "near.txt", near)
    got = store.dense(vs, base, ("1", []), 10)
    assert [g[:2] for g in got] == [w[:2] for w in reference_dense(store, vs, base, ("1", []), 10)]
    assert len({round(g[2], 7) for g in got}) > 1  # the scores differ, by less than float16 resolves
    assert got[0][2] - got[-1][2] < 1e-3


def test_dense_handles_vectors_far_outside_float16s_range(store, tmp_path):
    rng = np.random.default_rng(4)
    big = rng.standard_normal((50, 384)).astype(np.float32) * np.float32(1e6)  # not normalized at all
    vs = store.create_store(None, {}, None)["id"]
    index_vectors(store, tmp_path, vs, "big.txt", big)
    q = rng.standard_normal(384).astype(np.float32) * np.float32(1e5)
    got, want = store.dense(vs, q, ("1", []), 5), reference_dense(store, vs, q, ("1", []), 5)
    assert [g[:2] for g in got] == [w[:2] for w in want]
    assert [g[2] for g in got] == pytest.approx([w[2] for w in want], rel=1e-5)
    assert store.dense(vs, np.zeros(384, dtype=np.float32), ("1", []), 3)[0][2] == 0.0
