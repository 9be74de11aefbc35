"""Background ingestion: a worker thread turns attached files into embedded, indexed chunks.

Each vector store file is a job: extract its text (streamed), cut it into chunks, embed them in batches
and commit each batch; the last batch is committed with the document's `completed` mark (store.py). A job
holds one batch of chunks at a time plus the one after it (to know which batch is the last), so a large file
costs the memory of two batches. A file that cannot be read fails alone with OpenAI's last_error; the next
job goes on. One worker: MiniLM runs one forward at a time anyway, and a single writer never waits on
another. On start the worker first re-queues what a killed process left in_progress.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

import numpy as np

from fleetlm.rag.chunking import Chunk, chunk_stream
from fleetlm.rag.extract import ExtractError, extract
from fleetlm.rag.store import KnowledgeStore

log = logging.getLogger(__name__)

Embed = Callable[[list[str]], np.ndarray]
MAX_ERROR_CHARS = 500
EMBED_SLICE = 4  # chunks per embedding forward during ingestion (see Ingestor)


def batched(chunks: Iterable[Chunk], size: int) -> Iterator[list[Chunk]]:
    it = iter(chunks)
    while batch := list(islice(it, size)):
        yield batch


class Ingestor:
    """The ingest worker of one store; `submit` queues a store file (by its row number `n`).

    A batch of `batch` chunks is committed together but embedded `embed_slice` chunks at a time: the
    gateway's one MiniLM runs one forward at a time, so a search's query embedding that arrives during
    ingestion waits for the forward under way. Measured (`bench/kb_store.py slices`): that wait was
    3.1 s p50 with forwards of 32 chunks, 0.65 s with 8 and 0.28 s with 4, at the same throughput
    (10.8, 11.8 and 11.4 chunks/s)."""

    def __init__(self, store: KnowledgeStore, embed: Embed, batch: int = 32, embed_slice: int = EMBED_SLICE):
        self.store, self.embed, self.batch = store, embed, batch
        self.embed_slice = max(1, embed_slice)
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> Ingestor:
        """Re-queue what was left in_progress, then start the worker (once)."""
        with self._lock:
            if self._thread is None:
                for n in self.store.pending():
                    self._queue.put(n)
                self._thread = threading.Thread(target=self._loop, name="fleet-ingest", daemon=True)
                self._thread.start()
        return self

    def submit(self, n: int) -> None:
        self._queue.put(n)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued job is done (tests, benchmarks); False if `timeout` passed first."""
        done = threading.Event()

        def joiner() -> None:
            self._queue.join()
            done.set()

        threading.Thread(target=joiner, daemon=True).start()
        return done.wait(timeout)

    def stop(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)
                self._thread.join(timeout=30)
                self._thread = None

    def _loop(self) -> None:
        while True:
            n = self._queue.get()
            try:
                if n is None:
                    return
                self.run_job(n)
            except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the worker
                log.exception("ingestion of store file %s failed", n)
                self.store.fail_file(n, "server_error", f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
            finally:
                self._queue.task_done()

    def _embedded(self, texts: list[str]) -> np.ndarray:
        step = self.embed_slice
        return np.concatenate([self.embed(texts[i : i + step]) for i in range(0, len(texts), step)])

    def run_job(self, n: int) -> None:
        """Ingest one store file (or take the outcome of its content, already ingested)."""
        if self.store.settle_from_doc(n):
            return
        job = self.store.job(n)
        if job is None:  # cancelled or removed since it was queued
            return
        strategy = job["strategy"]
        doc_id = self.store.start_doc(job["sha256"], strategy.key)
        path = self.store.blob_path(job["sha256"])
        if not path.exists():
            self.store.fail_doc(doc_id, "invalid_file", f"{job['filename']}: the file's bytes were deleted")
            return
        try:
            batches = batched(chunk_stream(extract(path, job["filename"]), strategy), self.batch)
            current = next(batches, None)
            if current is None:
                raise ExtractError(f"{job['filename']}: no text could be extracted")
            while current is not None:
                if not self.store.doc_wanted(doc_id):  # every file waiting on it was cancelled or removed
                    self.store.drop_doc(doc_id)
                    return
                vectors = self._embedded([c.text for c in current])
                following = next(batches, None)
                if not self.store.add_chunks(doc_id, current, vectors, final=following is None):
                    return  # its last file was removed meanwhile, and the document with it
                current = following
        except ExtractError as exc:
            self.store.fail_doc(doc_id, exc.code, str(exc)[:MAX_ERROR_CHARS])
        except Exception as exc:  # noqa: BLE001 - the embedder or a library failed: this document fails
            log.exception("ingestion of %s failed", job["filename"])
            self.store.fail_doc(doc_id, "server_error", f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
