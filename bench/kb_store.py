"""The embedded knowledge store's figures: ingestion with MiniLM, memory while ingesting, search latency.

    flock /tmp/bench.lock nice .venv/bin/python bench/kb_store.py search [--chunks 10000] [--embedded 1000]
        [--queries 200] [--db DIR]
    flock /tmp/bench.lock nice .venv/bin/python bench/kb_store.py ingest [--pdf FILE] [--html 10] [--text 10]
    flock /tmp/bench.lock nice .venv/bin/python bench/kb_store.py memory [--pdf-mb 100] [--small-files 10000]
    flock /tmp/bench.lock nice .venv/bin/python bench/kb_store.py slices [--seconds 20]
    flock /tmp/bench.lock nice .venv/bin/python bench/kb_store.py scan [--chunks 100000]
    nice .venv/bin/python bench/kb_store.py --big-mb 8        (the first figure: one generated text file)

Everything goes straight through the store and the ingest worker the gateway uses (no HTTP).

`search`: a generated corpus (seeded words from a 5,000-word vocabulary, sentences of 6 to 18 words) is
written as text files of about 1,000 cl100k tokens and ingested with `static` chunking of 100 tokens without
overlap. The first --embedded chunks are ingested with the real MiniLM (all-MiniLM-L6-v2, one thread as in
the gateway): chunks/s and files/s, wall time including extraction, chunking, embedding and commits. The rest
of the --chunks are filled in with a random-vector embedder (search cost does not depend on what the vectors
say, and MiniLM here would take hours for 100,000 chunks). Then --queries distinct generated queries are
searched in each mode: the latency of `search()`, including the MiniLM query embedding for dense and hybrid
(distinct queries, so MiniLM's cache never answers), and without it (a precomputed query vector); then where
the time goes: each stage of a hybrid search timed alone (query embedding, BM25, dense, fetching the hits).
--db keeps the store in DIR and reuses it when it already holds --chunks chunks (ingestion is skipped).

`ingest`: pages/s and chunks/s with the real MiniLM, `auto` chunking and batches of 32 (the gateway's
defaults) for a real multi-page PDF (default: Debian's libtasn1 manual), pages of Debian's python3.11-doc
HTML manual and the reStructuredText sources of that manual (text).

`slices`: MiniLM's throughput in forwards of 32, 8 and 4 chunks, and how long a query embedding waits while a
file is ingested in forwards of each size (rag/ingest.py embeds in slices of 4).

`scan`: the dense scan's kernel alone at --chunks rows: numpy float32, numpy float16, torch float16.

`memory`: peak resident memory (psutil, sampled every 5 ms in a thread) above what the process held before,
while ONE generated PDF of --pdf-mb MB (pages of 9-point text from the python3.11-doc sources, written by
the raw PDF writer below) is ingested, and while --small-files small files (12 lines of the same sources
each) are ingested; peak Python allocations (tracemalloc) in a second run of each, the PDF one on a smaller
PDF of --traced-pdf-mb MB (tracemalloc slows pypdf about five times). The embedder is the random-vector one
(MiniLM's weights are a fixed cost; what is measured is whether ingestion's own memory grows with the file).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import random
import shutil
import statistics
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from fleetlm.rag.chunking import Strategy, encoding
from fleetlm.rag.ingest import Ingestor
from fleetlm.rag.search import CANDIDATES, SearchRequest, fts_query, rrf, search
from fleetlm.rag.store import SqliteKnowledgeStore

STRATEGY = Strategy(100, 0, auto=False)
WORDS_PER_FILE = 270  # about 1,000 cl100k tokens of the generated words (3.7 a word): ten chunks a file
MODES = [("bm25", "rrf"), ("dense", "rrf"), ("hybrid", "rrf"), ("hybrid", "convex")]
SLICES = (32, 8, 4)  # slices: chunks per MiniLM forward during ingestion
DOCS = Path("/usr/share/doc/python3.11/html")
REAL_PDF = Path("/usr/share/doc/libtasn1-doc/libtasn1.pdf")

Embed = Callable[[list[str]], np.ndarray]


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


def random_embedder(seed: int = 0) -> Embed:
    noise = np.random.default_rng(seed)

    def embed(texts: list[str]) -> np.ndarray:
        v = noise.standard_normal((len(texts), 384)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    return embed


def minilm_embedder() -> Embed:
    from fleetlm.serve.embeddings import shared_minilm

    minilm = shared_minilm().load()
    return lambda texts: minilm.encode(texts, truncate=True)[0]


def upload(store: SqliteKnowledgeStore, tmp: Path, name: str, data: bytes) -> dict:
    up = tmp / "upload"
    up.write_bytes(data)
    return store.add_file(name, "assistants", up, hashlib.sha256(data).hexdigest(), len(data))


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
            f = upload(store, tmp, f"doc{added}.txt", document(rng, words).encode())
            ingestor.submit(store.attach(vs, f, {"i": added}, STRATEGY)["n"])
            added += 1
        ingestor.wait()
    return added


def p50_p95(values: list[float]) -> str:
    return f"p50 {statistics.median(values):6.1f} ms, p95 {float(np.percentile(values, 95)):6.1f} ms"


# ---------------------------------------------------------------- memory


class PeakRss:
    """The process's peak resident memory, sampled every `every_s` in a thread, above what it held before."""

    def __init__(self, every_s: float = 0.005):
        import psutil

        self.process, self.every_s = psutil.Process(), every_s
        self.before = self.peak = self.process.memory_info().rss
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(self.every_s):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)

    @property
    def grown_mb(self) -> float:
        return (self.peak - self.before) / 1e6


def measured(run: Callable[[], None], python_too: bool) -> tuple[float, PeakRss, float | None]:
    """Seconds, peak RSS and (when python_too) peak tracemalloc MB of run(); tracemalloc slows it."""
    import tracemalloc

    if python_too:
        tracemalloc.start()
    with PeakRss() as rss:
        start = time.perf_counter()
        run()
        took = time.perf_counter() - start
    peak = None
    if python_too:
        peak = tracemalloc.get_traced_memory()[1] / 1e6
        tracemalloc.stop()
    return took, rss, peak


def source_lines(width: int = 110) -> Iterator[str]:
    """Lines of the python3.11-doc manual's reStructuredText sources, wrapped to `width`, round and round."""
    files = sorted(glob.glob(str(DOCS / "_sources" / "**" / "*.txt"), recursive=True))
    if not files:
        raise SystemExit(f"no text under {DOCS}/_sources: `make kb-corpus` installs python3.11-doc")
    while True:
        for name in files:
            for line in Path(name).read_text(encoding="utf-8", errors="replace").splitlines():
                yield from textwrap.wrap(line, width) or [""]


def pdf_literal(line: str) -> str:
    text = line.encode("ascii", "replace").decode("ascii")
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def write_pdf(path: Path, lines: Iterator[str], megabytes: float, per_page: int = 80) -> int:
    """A PDF of pages of 9-point Helvetica, `per_page` lines each, written object by object until the file
    passes `megabytes` (only the offsets are kept, 10 bytes per object, for the cross-reference table)."""
    offsets: dict[int, int] = {}
    pages: list[int] = []
    with path.open("wb") as out:

        def obj(number: int, body: bytes) -> None:
            offsets[number] = out.tell()
            out.write(f"{number} 0 obj\n".encode() + body + b"\nendobj\n")

        out.write(b"%PDF-1.4\n")
        obj(1, b"<< /Type /Catalog /Pages 2 0 R >>")
        obj(3, b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
        number = 4
        while out.tell() < megabytes * 1_000_000:
            ops = ["BT /F1 9 Tf 10 TL 36 810 Td"]
            ops += [f"{pdf_literal(next(lines))} Tj T*" for _ in range(per_page)]
            stream = "\n".join([*ops, "ET"]).encode()
            obj(number + 1, b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
            obj(
                number,
                f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 842] /Contents {number + 1} 0 R "
                "/Resources << /Font << /F1 3 0 R >> >> >>".encode(),
            )
            pages.append(number)
            number += 2
        kids = " ".join(f"{p} 0 R" for p in pages)
        obj(2, f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
        xref = out.tell()
        out.write(f"xref\n0 {number}\n0000000000 65535 f \n".encode())
        out.write("".join(f"{offsets[n]:010d} 00000 n \n" for n in range(1, number)).encode())
        out.write(f"trailer\n<< /Size {number} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return len(pages)


def pdf_memory(tmp: Path, megabytes: float, traced: bool) -> None:
    """Write a PDF of `megabytes` MB and ingest it alone: time, peak RSS (and peak tracemalloc)."""
    path = tmp / "big.pdf"
    start = time.perf_counter()
    pages = write_pdf(path, source_lines(), megabytes)
    size, digest = path.stat().st_size, hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    print(f"wrote a {size / 1e6:.1f} MB PDF of {pages} pages in {time.perf_counter() - start:.1f} s")
    store = SqliteKnowledgeStore(tmp / "pdf.db", tmp / "files")
    vs = store.create_store("big", {}, None)["id"]
    f = store.add_file("big.pdf", "assistants", path, digest.hexdigest(), size)  # moved to the blob store
    n = store.attach(vs, f, {}, Strategy())["n"]
    ingestor = Ingestor(store, random_embedder(), batch=32)
    took, rss, peak = measured(lambda: ingestor.run_job(n), traced)
    state, chunks = store.get_store_file(vs, f["id"]), store.chunk_count()
    print(
        f"one {size / 1e6:.0f} MB PDF ({pages} pages), auto chunking, random vectors: {chunks} chunks in "
        f"{took:.1f} s ({pages / took:.0f} pages/s, {chunks / took:.0f} chunks/s"
        f"{', slowed by tracemalloc' if traced else ''}), {state['status']} {state['error'] or ''}; "
        f"peak RSS +{rss.grown_mb:.0f} MB over {rss.before / 1e6:.0f} MB"
        + (f", peak Python allocations {peak:.1f} MB" if peak is not None else "")
    )
    store.close()
    shutil.rmtree(tmp / "files")
    (tmp / "pdf.db").unlink()


def memory_figures(pdf_mb: float, traced_pdf_mb: float, small_files: int, python_too: bool) -> None:
    encoding()  # the tokenizer's tables are loaded once per process: not part of a file's cost
    import pypdf  # noqa: F401 - imported once here, so its modules are not counted as the file's memory

    with tempfile.TemporaryDirectory() as root:
        tmp = Path(root)
        if pdf_mb:
            pdf_memory(tmp, pdf_mb, traced=False)
        if traced_pdf_mb and python_too:
            pdf_memory(tmp, traced_pdf_mb, traced=True)
        if small_files:
            lines = source_lines()
            for traced in [False, True] if python_too else [False]:
                store = SqliteKnowledgeStore(tmp / f"small{traced}.db", tmp / f"small-files{traced}")
                vs = store.create_store("small", {}, None)["id"]
                ingestor = Ingestor(store, random_embedder(), batch=32).start()

                def ingest_all(store=store, vs=vs, ingestor=ingestor) -> None:
                    for i in range(small_files):
                        text = "\n".join(next(lines) for _ in range(12)) + f"\n(file {i})\n"
                        f = upload(store, tmp, f"note{i}.md", text.encode())
                        ingestor.submit(store.attach(vs, f, {"i": i}, Strategy())["n"])
                    ingestor.wait()

                took, rss, peak = measured(ingest_all, traced)
                counts = store.get_store(vs)["file_counts"]
                print(
                    f"{small_files} small files (12 lines each), auto chunking, random vectors: "
                    f"{counts['completed']} completed, {store.chunk_count()} chunks in {took:.1f} s "
                    f"({small_files / took:.0f} files/s{', slowed by tracemalloc' if traced else ''}); "
                    f"peak RSS +{rss.grown_mb:.0f} MB over {rss.before / 1e6:.0f} MB"
                    + (f", peak Python allocations {peak:.1f} MB" if peak is not None else "")
                )
                ingestor.stop()
                store.close()


def big_file_memory(megabytes: int) -> None:
    """Peak memory Python allocates (tracemalloc) while one generated file of `megabytes` MB is ingested
    with `auto` chunking and a random-vector embedder: the streaming, not the model, is measured."""
    import tracemalloc

    rng = random.Random(3)
    words = vocabulary(rng)
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
        encoding()
        tracemalloc.start()
        start = time.perf_counter()
        Ingestor(store, random_embedder(), batch=32).run_job(n)
        took = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(
            f"one {size / 1e6:.0f} MB text file, auto chunking: {store.chunk_count()} chunks in {took:.1f} s "
            f"({store.chunk_count() / took:.0f} chunks/s without MiniLM), status "
            f"{store.get_store_file(vs, f['id'])['status']}, peak Python allocations {peak / 1e6:.1f} MB"
        )
        store.close()


# ---------------------------------------------------------------- ingestion with MiniLM


def ingest_figures(pdf: Path, html: int, text: int) -> None:
    """Pages/s and chunks/s of the gateway's ingestion (MiniLM, auto chunking, batches of 32)."""
    from pypdf import PdfReader

    embed = minilm_embedder()
    embed(["warm up"])
    encoding()
    kinds: list[tuple[str, list[Path], int]] = []
    if pdf.is_file():
        kinds.append((f"PDF {pdf.name}", [pdf], len(PdfReader(pdf).pages)))
    else:
        print(f"no PDF at {pdf}: skipped (apt-get install libtasn1-doc, or --pdf FILE)")
    htmls = sorted((DOCS / "library").glob("*.html"))[:html]
    texts = sorted((DOCS / "_sources" / "library").glob("*.txt"))[:text]
    if htmls:
        kinds.append((f"HTML, {len(htmls)} pages of the manual", htmls, len(htmls)))
    if texts:
        kinds.append((f"text, {len(texts)} .rst sources", texts, len(texts)))
    for name, files, pages in kinds:
        with tempfile.TemporaryDirectory() as root:
            tmp = Path(root)
            store = SqliteKnowledgeStore(tmp / "kb.db", tmp / "files")
            vs = store.create_store("ingest", {}, None)["id"]
            ns = [
                store.attach(vs, upload(store, tmp, p.name, p.read_bytes()), {}, Strategy())["n"]
                for p in files
            ]
            size = sum(p.stat().st_size for p in files)
            ingestor = Ingestor(store, embed, batch=32)
            start = time.perf_counter()
            for n in ns:
                ingestor.run_job(n)
            took = time.perf_counter() - start
            counts = store.get_store(vs)["file_counts"]
            chunks = store.chunk_count()
            unit = "pages" if name.startswith("PDF") else "files"
            print(
                f"ingest {name} ({size / 1e6:.2f} MB, {pages} {unit}): {chunks} chunks in {took:.1f} s: "
                f"{pages / took:.2f} {unit}/s, {chunks / took:.2f} chunks/s, {size / 1e3 / took:.1f} kB/s; "
                f"{counts['completed']} of {counts['total']} completed"
            )
            store.close()


def slice_figures(seconds: float) -> None:
    """MiniLM throughput in forwards of 32 chunks against 8, and what a query embedding waits while a file
    is being ingested with each (the gateway's one MiniLM runs one forward at a time)."""
    embed = minilm_embedder()
    lines = source_lines()
    texts = [" ".join(next(lines) for _ in range(40)) for _ in range(64)]  # about 800 tokens each
    embed(["warm up"])
    for size in SLICES:
        start = time.perf_counter()
        for i in range(0, len(texts), size):
            embed([f"{t} {size}" for t in texts[i : i + size]])  # distinct: MiniLM's cache never answers
        took = time.perf_counter() - start
        print(f"MiniLM, {len(texts)} chunks of ~800 tokens, forwards of {size}: {len(texts) / took:.1f}/s")
    for size in SLICES:
        with tempfile.TemporaryDirectory() as root:
            tmp = Path(root)
            store = SqliteKnowledgeStore(tmp / "kb.db", tmp / "files")
            vs = store.create_store("busy", {}, None)["id"]
            f = upload(store, tmp, "big.txt", "\n".join(next(lines) for _ in range(20_000)).encode())
            n = store.attach(vs, f, {}, Strategy())["n"]
            worker = threading.Thread(
                target=Ingestor(store, embed, batch=32, embed_slice=size).run_job, args=(n,), daemon=True
            )
            worker.start()
            waits, end, i = [], time.perf_counter() + seconds, 0
            while time.perf_counter() < end and worker.is_alive():
                t = time.perf_counter()
                embed([f"query number {i} during ingestion {size}"])
                waits.append((time.perf_counter() - t) * 1000)
                i += 1
                time.sleep(0.1)
            store.detach(vs, f["id"])  # the worker abandons the document after its current batch
            worker.join()
            print(f"query embedding while ingesting, forwards of {size}: {p50_p95(waits)} ({i} queries)")
            store.close()


def scan_figures(rows: int, repeats: int = 30) -> None:
    """The dense scan's kernel alone: [rows, 384] unit vectors times one query, numpy float32 (the store's
    first matrix), numpy float16 and torch float16 (the store's now), and torch's error against float64."""
    import torch

    rng = np.random.default_rng(0)
    v = rng.standard_normal((rows, 384)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    q = v[0] + rng.standard_normal(384).astype(np.float32)
    q /= np.linalg.norm(q)
    v16, q16 = v.astype(np.float16), q.astype(np.float16)
    t16, tq16 = torch.from_numpy(v16), torch.from_numpy(q16)
    kernels = {
        "numpy float32": lambda: v @ q,
        "numpy float16": lambda: v16 @ q16,
        "torch float16": lambda: torch.mv(t16, tq16),
    }
    for name, run in kernels.items():
        times = []
        for _ in range(repeats if name != "numpy float16" else 3):  # numpy's float16 product is very slow
            t = time.perf_counter()
            run()
            times.append((time.perf_counter() - t) * 1000)
        print(f"scan of {rows} x 384, {name:14s}: {p50_p95(times)} ({len(times)} runs)")
    error = np.abs(torch.mv(t16, tq16).float().numpy() - v.astype(np.float64) @ q.astype(np.float64)).max()
    print(f"torch float16 scores: largest error {error:.2e} against float64 (the store's bound: {2**-9:.2e})")


# ---------------------------------------------------------------- search latency


def build(args: argparse.Namespace, root: Path, embed: Embed | None) -> tuple[SqliteKnowledgeStore, str]:
    """The store of `search`: reused from --db when it already holds --chunks chunks."""
    store = SqliteKnowledgeStore(root / "kb.db", root / "files")
    existing = store.list_stores(1, "asc", None)[0]
    if existing and store.chunk_count() >= args.chunks:
        print(f"reusing {root / 'kb.db'}: {store.chunk_count()} chunks (ingestion not measured)")
        return store, existing[0]["id"]
    vs = existing[0]["id"] if existing else store.create_store("bench", {}, None)["id"]
    rng = random.Random(12)
    words = vocabulary(rng)
    tmp = root / "tmp"
    tmp.mkdir(exist_ok=True)
    if args.embedded and embed is not None:
        ingestor = Ingestor(store, embed, batch=32).start()
        start = time.perf_counter()
        files = add_files(store, ingestor, vs, rng, words, args.embedded, tmp)
        took = time.perf_counter() - start
        real = store.chunk_count()
        print(
            f"ingestion with MiniLM: {files} files, {real} chunks in {took:.1f} s: "
            f"{real / took:.1f} chunks/s, {files / took:.2f} files/s"
        )
        ingestor.stop()
    filler = Ingestor(store, random_embedder(), batch=256).start()
    start = time.perf_counter()
    add_files(store, filler, vs, rng, words, args.chunks, tmp)
    print(
        f"filled to {store.chunk_count()} chunks (random vectors) in {time.perf_counter() - start:.1f} s; "
        f"index file {(root / 'kb.db').stat().st_size / 1e6:.0f} MB"
    )
    filler.stop()
    return store, vs


def search_figures(args: argparse.Namespace) -> None:
    embed = minilm_embedder()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(args.db) if args.db else Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        store, vs = build(args, root, embed)
        total = store.chunk_count()
        rng = random.Random(99)
        words = vocabulary(random.Random(12))  # the corpus's words
        queries = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(args.queries)]
        start = time.perf_counter()
        store.dense(vs, np.zeros(384, dtype=np.float32), ("1", []), 1)
        print(f"the store's vector matrix built in {(time.perf_counter() - start) * 1000:.0f} ms (once)")
        for retrieval, fusion in MODES:
            lat = []
            for q in queries:
                t = time.perf_counter()
                req = SearchRequest([q + f" {retrieval}{fusion}"], retrieval=retrieval, fusion=fusion)
                search(store, vs, req, embed)
                lat.append((time.perf_counter() - t) * 1000)
            vectors = embed([q + " cached" for q in queries])
            pre = []
            for q, v in zip(queries, vectors, strict=True):
                t = time.perf_counter()
                req = SearchRequest([q], retrieval=retrieval, fusion=fusion)
                search(store, vs, req, lambda _t, v=v: v[None])
                pre.append((time.perf_counter() - t) * 1000)
            name = retrieval if retrieval != "hybrid" else f"hybrid-{fusion}"
            print(
                f"search {name:14s} at {total} chunks: {p50_p95(lat)}; without the query embedding "
                f"{p50_p95(pre)}"
            )
        stages: dict[str, list[float]] = {"query embedding": [], "bm25": [], "dense": [], "hits": []}
        for q in queries:
            text = q + " stages"
            t0 = time.perf_counter()
            vector = embed([text])[0]
            t1 = time.perf_counter()
            lexical = store.bm25(vs, fts_query(text), ("1", []), CANDIDATES)
            t2 = time.perf_counter()
            nearest = store.dense(vs, vector, ("1", []), CANDIDATES)
            t3 = time.perf_counter()
            fused = rrf([[(c, n) for c, n, _ in lexical], [(c, n) for c, n, _ in nearest]])
            store.hits(sorted(fused, key=lambda k: -fused[k])[:10])
            t4 = time.perf_counter()
            for name, took in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
                stages[name].append(took * 1000)
        print(f"where a hybrid search's time goes at {total} chunks ({len(queries)} queries):")
        for name, values in stages.items():
            print(f"  {name:16s} {p50_p95(values)}")
        # Not what search() does today: BM25 in a second thread while MiniLM embeds the query (both let go
        # of the GIL: apsw while SQLite runs, torch in its kernels), then dense and the hits.
        beside = []
        with ThreadPoolExecutor(1) as pool:
            for q in queries:
                text = q + " beside"
                t0 = time.perf_counter()
                pending = pool.submit(store.bm25, vs, fts_query(text), ("1", []), CANDIDATES)
                vector = embed([text])[0]
                nearest = store.dense(vs, vector, ("1", []), CANDIDATES)
                lexical = pending.result()
                fused = rrf([[(c, n) for c, n, _ in lexical], [(c, n) for c, n, _ in nearest]])
                store.hits(sorted(fused, key=lambda k: -fused[k])[:10])
                beside.append((time.perf_counter() - t0) * 1000)
        print(f"  the same hybrid stages with BM25 in a thread beside the query embedding: {p50_p95(beside)}")
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    modes = ["search", "ingest", "memory", "slices", "scan"]
    ap.add_argument("mode", nargs="?", choices=modes, default="search")
    ap.add_argument("--seconds", type=float, default=20, help="slices: how long queries run beside ingestion")
    ap.add_argument("--chunks", type=int, default=10_000)
    ap.add_argument("--embedded", type=int, default=1000, help="search: chunks ingested with the real MiniLM")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--db", help="search: keep the store in this folder and reuse it")
    ap.add_argument("--pdf", type=Path, default=REAL_PDF, help="ingest: a real multi-page PDF")
    ap.add_argument("--html", type=int, default=10, help="ingest: pages of the python3.11-doc manual")
    ap.add_argument("--text", type=int, default=10, help="ingest: .rst sources of the manual")
    ap.add_argument("--pdf-mb", type=float, default=100, help="memory: the generated PDF's size (0: none)")
    ap.add_argument("--small-files", type=int, default=10_000, help="memory: small files (0: none)")
    ap.add_argument(
        "--traced-pdf-mb", type=float, default=10, help="memory: the PDF measured with tracemalloc (slow)"
    )
    ap.add_argument("--no-tracemalloc", action="store_true", help="memory: RSS only")
    ap.add_argument("--big-mb", type=int, default=0, help="only: peak Python memory ingesting one N MB file")
    args = ap.parse_args()
    if args.big_mb:
        big_file_memory(args.big_mb)
    elif args.mode == "ingest":
        ingest_figures(args.pdf, args.html, args.text)
    elif args.mode == "scan":
        scan_figures(args.chunks)
    elif args.mode == "slices":
        slice_figures(args.seconds)
    elif args.mode == "memory":
        memory_figures(args.pdf_mb, args.traced_pdf_mb, args.small_files, not args.no_tracemalloc)
    else:
        search_figures(args)


if __name__ == "__main__":
    main()
