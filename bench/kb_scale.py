"""Search latency of the knowledge store's two backends side by side: embedded SQLite vs Milvus (milvus-lite).

    flock /tmp/bench.lock nice .venv/bin/python bench/kb_scale.py [--chunks 10000] [--files 1000]
        [--queries 200] [--meta-url postgresql://...] [--milvus-uri http://host:19530]

Both stores get the same generated corpus, written straight through the Protocol (start_doc, add_chunks,
the same calls the ingest worker makes): --files files of --chunks/--files chunks each, every chunk 60
seeded words from a 5,000-word vocabulary with a random unit vector (search cost does not depend on what
the vectors say), each file carrying an attribute `year` for the filtered run. Then --queries distinct
generated queries are searched with `search()` in each mode, with a precomputed query vector (no MiniLM:
the figure is the store's). p50/p95 in milliseconds, and write throughput, are printed side by side. The
Milvus store's metadata is a SQLite file unless --meta-url names another database; its vectors go to a
fresh milvus-lite file unless --milvus-uri names a server (then its collection is dropped first).
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fleetlm.rag.chunking import Chunk, Strategy
from fleetlm.rag.search import SearchRequest, search
from fleetlm.rag.store import KnowledgeStore, SqliteKnowledgeStore

DIM = 384
WORDS_PER_CHUNK = 60
MODES = [("bm25", "rrf", False), ("dense", "rrf", False), ("hybrid", "rrf", False), ("hybrid", "rrf", True)]
FILTER = {"type": "gte", "key": "year", "value": 2020}  # about half of the files (years 2010..2029)


def vocabulary(rng: random.Random, size: int = 5000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)]


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def fill(store: KnowledgeStore, tmp: Path, files: int, per_file: int, seed: int) -> tuple[str, float]:
    """The generated corpus into one vector store; (its id, seconds the writes took)."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    words = vocabulary(rng)
    vs = store.create_store("bench", {}, None)["id"]
    took = 0.0
    for i in range(files):
        texts = [" ".join(rng.choice(words) for _ in range(WORDS_PER_CHUNK)) for _ in range(per_file)]
        vectors = unit(noise, per_file)
        (tmp / "up").write_bytes(f"file {i}".encode())
        f = store.add_file(f"f{i}.txt", "assistants", tmp / "up", f"{i:064x}", 8)
        start = time.perf_counter()
        n = store.attach(vs, f, {"year": 2010 + i % 20}, Strategy())["n"]
        doc = store.start_doc(f["sha256"], Strategy().key)
        store.add_chunks(
            doc, [Chunk(j, t, WORDS_PER_CHUNK) for j, t in enumerate(texts)], vectors, final=True
        )
        assert store.job(n) is None  # completed
        took += time.perf_counter() - start
    return vs, took


def latencies(store: KnowledgeStore, vs: str, queries: list[str], vectors: np.ndarray) -> dict[str, list]:
    out = {}
    for retrieval, fusion, filtered in MODES:
        vector = iter(vectors)
        name = f"{retrieval}{' + filter' if filtered else ''}"
        ms = []
        for q in queries:
            v = next(vector)
            req = SearchRequest([q], retrieval=retrieval, fusion=fusion, filters=FILTER if filtered else None)
            start = time.perf_counter()
            hits = search(store, vs, req, lambda _texts, v=v: v[None, :])
            ms.append((time.perf_counter() - start) * 1000)
            assert hits, f"{name}: no hits for {q!r}"
        out[name] = ms
    return out


def pct(xs: list[float], p: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(p) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--meta-url", default=None, help="the Milvus store's metadata database (default SQLite)")
    ap.add_argument("--milvus-uri", default=None, help="a Milvus server (default: a fresh milvus-lite file)")
    args = ap.parse_args()
    from fleetlm.rag.milvus_store import MilvusKnowledgeStore

    per_file = max(1, args.chunks // args.files)
    rng = random.Random(99)
    words = vocabulary(random.Random(1))  # the corpus' own vocabulary: every query word occurs somewhere
    queries = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(args.queries)]
    qvectors = unit(np.random.default_rng(7), args.queries)
    results, writes = {}, {}
    with tempfile.TemporaryDirectory() as root:
        tmp = Path(root)
        stores = {"sqlite (embedded)": lambda: SqliteKnowledgeStore(tmp / "kb.db", tmp / "files")}
        meta = args.meta_url or f"sqlite:///{tmp / 'meta.db'}"
        uri = args.milvus_uri or str(tmp / "vectors.db")
        kind = f"{'server' if args.milvus_uri else 'milvus-lite'}, {meta.split(':', 1)[0].split('+')[0]} meta"
        stores[f"milvus ({kind})"] = lambda: _milvus(
            MilvusKnowledgeStore, meta, tmp / "files", uri, bool(args.milvus_uri)
        )
        for name, make in stores.items():
            store = make()
            vs, took = fill(store, tmp, args.files, per_file, seed=1)
            total = args.files * per_file
            writes[name] = (total, took)
            print(
                f"{name}: wrote {total} chunks ({args.files} files) in {took:.1f} s: "
                f"{total / took:.0f} chunks/s"
            )
            results[name] = latencies(store, vs, queries, qvectors)
            store.close()
    names = list(results)
    print(f"\nsearch() latency at {args.files * per_file} chunks, {args.queries} queries, ms (p50 / p95)")
    w = max(len(n) for n in names) + 4
    print(f"{'mode':<18}" + "".join(f"{n:>{w}}" for n in names))
    for mode in results[names[0]]:
        cells = [f"{pct(results[n][mode], 50):.1f} / {pct(results[n][mode], 95):.1f}" for n in names]
        print(f"{mode:<18}" + "".join(f"{c:>{w}}" for c in cells))


def _milvus(cls, meta: str, files: Path, uri: str, server: bool):
    store = cls(meta, files, uri)
    if server and store.client.has_collection(store.collection):  # a clean start on a shared server
        store.client.drop_collection(store.collection)
        store._ready = False
    return store


if __name__ == "__main__":
    main()
