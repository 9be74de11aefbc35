"""The embedded knowledge store's first figures: ingestion chunks/s with MiniLM, search latency at N chunks.

    flock /tmp/bench.lock nice .venv/bin/python bench/kb_store.py [--chunks 10000] [--embedded 1000]
        [--queries 200]

A generated corpus (seeded words from a 5,000-word vocabulary, sentences of 6 to 18 words) is written as
text files of about 1,000 cl100k tokens and ingested with `static` chunking of 100 tokens without overlap,
straight through the store and the ingest worker (no HTTP). The first --embedded chunks are ingested with
the real MiniLM (all-MiniLM-L6-v2, one thread as in the gateway): that run gives chunks/s and files/s, wall
time including extraction, chunking, embedding and commits. The rest of the --chunks are filled in with a
random-vector embedder (search cost does not depend on what the vectors say, and MiniLM on this machine
would take minutes for them). Then --queries distinct generated queries are searched in each mode; the
latency is the `search()` call, including the MiniLM query embedding for dense and hybrid (distinct
queries, so MiniLM's cache never answers), and is also given without it (a precomputed query vector).
"""

from __future__ import annotations

import argparse
import hashlib
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fleetlm.rag.chunking import Strategy, encoding
from fleetlm.rag.ingest import Ingestor
from fleetlm.rag.search import SearchRequest, search
from fleetlm.rag.store import SqliteKnowledgeStore

STRATEGY = Strategy(100, 0, auto=False)
WORDS_PER_FILE = 270  # about 1,000 cl100k tokens of the generated words (3.7 a word): ten chunks a file
MODES = [("bm25", "rrf"), ("dense", "rrf"), ("hybrid", "rrf"), ("hybrid", "convex")]


def vocabulary(rng: random.Random, size: int = 5000) -> list[str]:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return ["".join(rng.choice(letters) for _ in range(rng.randint(3, 9))) for _ in range(size)]


def document(rng: random.Random, words: list[str]) -> str:
    out, n = [], 0
    while n < WORDS_PER_FILE:
        k = rng.randint(6, 18)
        out.append(" ".join(rng.choice(words) for _ in range(k)).capitalize() + ".")
        n += k
    return " ".join(out)


def add_files(
    store: SqliteKnowledgeStore,
    ingestor: Ingestor,
    vs: str,
    rng: random.Random,
    words: list[str],
    chunks: int,
    tmp: Path,
) -> int:
    """Generated files attached and ingested until the store holds at least `chunks` chunks; files added."""
    added = 0
    while store.chunk_count() < chunks:
        missing = chunks - store.chunk_count()
        for _ in range(max(1, missing // 12)):  # a round of files a little short of the target, then top up
            data = document(rng, words).encode()
            up = tmp / "upload"
            up.write_bytes(data)
            sha = hashlib.sha256(data).hexdigest()
            f = store.add_file(f"doc{added}.txt", "assistants", up, sha, len(data))
            ingestor.submit(store.attach(vs, f, {"i": added}, STRATEGY)["n"])
            added += 1
        ingestor.wait()
    return added


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def big_file_memory(megabytes: int) -> None:
    """Peak memory Python allocates (tracemalloc) while one generated file of `megabytes` MB is ingested
    with `auto` chunking and a random-vector embedder: the streaming, not the model, is measured."""
    import tracemalloc

    rng = random.Random(3)
    words = vocabulary(rng)
    noise = np.random.default_rng(0)

    def random_vectors(texts: list[str]) -> np.ndarray:
        v = noise.standard_normal((len(texts), 384)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    with tempfile.TemporaryDirectory() as root:
        tmp = Path(root)
        path, digest = tmp / "big.txt", hashlib.sha256()
        with path.open("wb") as out:
            while out.tell() < megabytes * 1_000_000:
                block = document(rng, words).encode() + b"\n"
                digest.update(block)
                out.write(block)
        size = path.stat().st_size
        store = SqliteKnowledgeStore(tmp / "kb.db", tmp / "files")
        vs = store.create_store("big", {}, None)["id"]
        f = store.add_file("big.txt", "assistants", path, digest.hexdigest(), size)
        n = store.attach(vs, f, {}, Strategy())["n"]
        encoding()  # the tokenizer's tables are loaded once per process: not part of a file's cost
        tracemalloc.start()
        start = time.perf_counter()
        Ingestor(store, random_vectors, batch=32).run_job(n)
        took = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"one {size / 1e6:.0f} MB text file, auto chunking: {store.chunk_count()} chunks in {took:.1f} s "
            f"({store.chunk_count() / took:.0f} chunks/s without MiniLM), status "
            f"{store.get_store_file(vs, f['id'])['status']}, peak Python allocations {peak / 1e6:.1f} MB"
        )
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--embedded", type=int, default=1000, help="chunks ingested with the real MiniLM")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--big-mb", type=int, default=0, help="only: peak Python memory ingesting one N MB file")
    args = ap.parse_args()
    if args.big_mb:
        big_file_memory(args.big_mb)
        return
    from fleetlm.serve.embeddings import shared_minilm

    minilm = shared_minilm().load()

    def embed(texts: list[str]) -> np.ndarray:
        return minilm.encode(texts, truncate=True)[0]

    rng = random.Random(12)
    words = vocabulary(rng)
    with tempfile.TemporaryDirectory() as root:
        tmp = Path(root)
        store = SqliteKnowledgeStore(tmp / "kb.db", tmp / "files")
        vs = store.create_store("bench", {}, None)["id"]
        ingestor = Ingestor(store, embed, batch=32).start()
        start = time.perf_counter()
        files = add_files(store, ingestor, vs, rng, words, args.embedded, tmp)
        took = time.perf_counter() - start
        real = store.chunk_count()
        if files:
            print(
                f"ingestion with MiniLM: {files} files, {real} chunks in {took:.1f} s: "
                f"{real / took:.1f} chunks/s, {files / took:.2f} files/s"
            )
        ingestor.stop()

        noise = np.random.default_rng(0)

        def random_vectors(texts: list[str]) -> np.ndarray:
            v = noise.standard_normal((len(texts), 384)).astype(np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True)

        filler = Ingestor(store, random_vectors, batch=256).start()
        start = time.perf_counter()
        add_files(store, filler, vs, rng, words, args.chunks, tmp)
        total = store.chunk_count()
        print(
            f"filled to {total} chunks (random vectors) in {time.perf_counter() - start:.1f} s; "
            f"index file {(tmp / 'kb.db').stat().st_size / 1e6:.0f} MB"
        )
        filler.stop()

        queries = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(args.queries)]
        for retrieval, fusion in MODES:
            lat = []
            for q in queries:
                t = time.perf_counter()
                search(
                    store,
                    vs,
                    SearchRequest([q + f" {retrieval}{fusion}"], retrieval=retrieval, fusion=fusion),
                    embed,
                )
                lat.append((time.perf_counter() - t) * 1000)
            vectors = embed([q + " cached" for q in queries])
            pre = []
            for q, v in zip(queries, vectors, strict=True):
                t = time.perf_counter()
                search(
                    store, vs, SearchRequest([q], retrieval=retrieval, fusion=fusion), lambda _t, v=v: v[None]
                )
                pre.append((time.perf_counter() - t) * 1000)
            name = retrieval if retrieval != "hybrid" else f"hybrid-{fusion}"
            print(
                f"search {name:14s} at {total} chunks: p50 {statistics.median(lat):6.1f} ms, "
                f"p95 {percentile(lat, 95):6.1f} ms; without the query embedding "
                f"p50 {statistics.median(pre):6.1f} ms, p95 {percentile(pre, 95):6.1f} ms"
            )
        store.close()


if __name__ == "__main__":
    main()
