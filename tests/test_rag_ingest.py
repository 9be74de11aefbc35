import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fleetlm.rag.chunking import Strategy
from fleetlm.rag.ingest import Ingestor
from fleetlm.rag.store import SqliteKnowledgeStore
from rag_fakes import CountingEmbed, Crash, minimal_pdf

SMALL = Strategy(100, 20, auto=False)
LONG_TEXT = " ".join(f"sentence {i} talks about topic {i % 7}." for i in range(400)).encode()  # ~12 chunks


def open_store(tmp_path) -> SqliteKnowledgeStore:
    return SqliteKnowledgeStore(tmp_path / "kb.db", tmp_path / "files")


def upload(store, tmp_path, name: str, data: bytes) -> dict:
    tmp = tmp_path / f"up-{name}"
    tmp.write_bytes(data)
    return store.add_file(name, "assistants", tmp, hashlib.sha256(data).hexdigest(), len(data))


def test_a_bad_file_fails_alone_and_the_batch_goes_on(tmp_path):
    store = open_store(tmp_path)
    vs = store.create_store(None, {}, None)["id"]
    files = [
        upload(store, tmp_path, "good.md", b"# Good\nUseful words here.\n"),
        upload(store, tmp_path, "broken.pdf", b"%PDF-1.7\nnot really"),
        upload(store, tmp_path, "sheet.xlsx", b"PK\x03\x04"),
        upload(store, tmp_path, "empty.txt", b"   \n"),
        upload(store, tmp_path, "paper.pdf", minimal_pdf(["Pdf words on a page"])),
    ]
    ingestor = Ingestor(store, CountingEmbed(), batch=4).start()
    for f in files:
        ingestor.submit(store.attach(vs, f, {}, SMALL)["n"])
    assert ingestor.wait(60)
    status = {f["filename"]: store.get_store_file(vs, f["id"]) for f in files}
    assert status["good.md"]["status"] == status["paper.pdf"]["status"] == "completed"
    assert (status["broken.pdf"]["status"], status["broken.pdf"]["error_code"]) == ("failed", "invalid_file")
    assert (status["sheet.xlsx"]["status"], status["sheet.xlsx"]["error_code"]) == (
        "failed",
        "unsupported_file",
    )
    assert "no text" in status["empty.txt"]["error"]
    ingestor.stop()
    store.close()


def test_the_same_content_is_embedded_once(tmp_path):
    store = open_store(tmp_path)
    embed = CountingEmbed()
    ingestor = Ingestor(store, embed, batch=8).start()
    a, b = upload(store, tmp_path, "a.txt", LONG_TEXT), upload(store, tmp_path, "copy.txt", LONG_TEXT)
    for name in ("one", "two"):
        vs = store.create_store(name, {}, None)["id"]
        ingestor.submit(store.attach(vs, a, {}, SMALL)["n"])
        ingestor.submit(store.attach(vs, b, {}, SMALL)["n"])
    assert ingestor.wait(60)
    chunks = store.chunk_count()
    assert chunks > 5 and embed.texts == chunks  # four attachments, one document, embedded once
    ingestor.stop()
    store.close()


def test_a_crash_between_chunk_batches_recovers_on_restart(tmp_path):
    store = open_store(tmp_path)
    vs = store.create_store(None, {}, None)["id"]
    f = upload(store, tmp_path, "long.txt", LONG_TEXT)
    n = store.attach(vs, f, {}, SMALL)["n"]
    crashing = Ingestor(store, CountingEmbed(crash_after=2), batch=3)
    with pytest.raises(Crash):
        crashing.run_job(n)
    assert store.chunk_count() == 6  # two batches committed, then the "process died"
    assert store.get_store_file(vs, f["id"])["status"] == "in_progress"  # never completed half-indexed
    store.close()

    reopened = open_store(tmp_path)
    embed = CountingEmbed()
    Ingestor(reopened, embed, batch=3).start().wait(60)
    assert reopened.get_store_file(vs, f["id"])["status"] == "completed"
    assert reopened.chunk_count() == embed.texts  # the half-written chunks were replaced, not kept twice
    texts = reopened.chunk_texts(reopened.get_store_file(vs, f["id"])["doc_id"])
    assert len(texts) == len(set(texts)) == embed.texts
    reopened.close()


KILLED_WORKER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from rag_fakes import bag_of_words
    from fleetlm.rag.ingest import Ingestor
    from fleetlm.rag.store import SqliteKnowledgeStore

    def slow(texts):
        time.sleep(0.3)  # slow enough to be killed between batches
        return bag_of_words(texts)

    root = sys.argv[1]
    store = SqliteKnowledgeStore(root + "/kb.db", root + "/files")
    Ingestor(store, slow, batch=2).start()
    time.sleep(60)
""")


def test_a_server_killed_mid_ingestion_restarts_consistent(tmp_path):
    store = open_store(tmp_path)
    vs = store.create_store(None, {}, None)["id"]
    f = upload(store, tmp_path, "long.txt", LONG_TEXT)
    store.attach(vs, f, {}, SMALL)
    store.close()
    script = tmp_path / "worker.py"
    script.write_text(KILLED_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)], env=env)
    watcher = open_store(tmp_path)
    try:
        deadline = time.monotonic() + 30
        while watcher.chunk_count() < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    partial = watcher.chunk_count()
    assert 2 <= partial < 12 and watcher.get_store_file(vs, f["id"])["status"] == "in_progress"
    watcher.close()

    reopened = open_store(tmp_path)
    embed = CountingEmbed()
    Ingestor(reopened, embed, batch=4).start().wait(60)
    assert reopened.get_store_file(vs, f["id"])["status"] == "completed"
    assert reopened.chunk_count() == embed.texts > partial
    reopened.close()


def test_cancelling_every_waiting_file_abandons_the_document(tmp_path):
    store = open_store(tmp_path)
    vs = store.create_store(None, {}, None)["id"]
    batch = store.create_batch(vs)
    f = upload(store, tmp_path, "long.txt", LONG_TEXT)
    n = store.attach(vs, f, {}, SMALL, batch)["n"]

    class CancelAfterFirst(CountingEmbed):
        def __call__(self, texts):
            if self.calls == 1:
                store.cancel_batch(vs, batch)
            return super().__call__(texts)

    Ingestor(store, CancelAfterFirst(), batch=3).run_job(n)
    assert store.get_store_file(vs, f["id"])["status"] == "cancelled"
    assert store.chunk_count() == 0  # what was written of it went
    store.close()


def test_removing_the_file_while_it_is_embedded_leaves_no_chunks(tmp_path):
    store = open_store(tmp_path)
    vs = store.create_store(None, {}, None)["id"]
    f = upload(store, tmp_path, "long.txt", LONG_TEXT)
    n = store.attach(vs, f, {}, SMALL)["n"]

    class DetachDuringSecond(CountingEmbed):
        def __call__(self, texts):
            if self.calls == 1:
                store.detach(vs, f["id"])  # the API's DELETE, from another thread in the server
            return super().__call__(texts)

    Ingestor(store, DetachDuringSecond(), batch=3).run_job(n)
    assert store.chunk_count() == 0 and store.get_store_file(vs, f["id"]) is None
    store.close()


def peak_ingesting(tmp_path, name: str, megabytes: float) -> tuple[float, int]:
    """Peak Python allocations (MB) while one generated text file of `megabytes` is ingested, and chunks."""
    import tracemalloc

    from fleetlm.rag.chunking import encoding

    store = SqliteKnowledgeStore(tmp_path / f"{name}.db", tmp_path / f"{name}-files")
    vs = store.create_store(None, {}, None)["id"]
    line = " ".join(f"word{i % 97} about thing{i % 13}," for i in range(12)) + "\n"
    data = (line * int(megabytes * 1e6 / len(line))).encode()
    n = store.attach(vs, upload(store, tmp_path, f"{name}.txt", data), {}, Strategy(800, 0, auto=False))["n"]
    encoding()  # loaded once per process, not per file
    tracemalloc.start()
    try:
        Ingestor(store, CountingEmbed(), batch=16).run_job(n)
        peak = tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()
    chunks = store.chunk_count()
    store.close()
    return peak, chunks


def test_a_file_four_times_larger_costs_no_more_memory_to_ingest(tmp_path):
    small, small_chunks = peak_ingesting(tmp_path, "small", 0.25)
    large, large_chunks = peak_ingesting(tmp_path, "large", 1.0)
    assert large_chunks > 3 * small_chunks
    # streaming: one window of tokens and two batches of chunks are held, whatever the file's size
    assert large < small + 0.5, (small, large)


def test_a_batch_is_embedded_in_slices_and_committed_whole(tmp_path):
    store = open_store(tmp_path)
    vs = store.create_store(None, {}, None)["id"]
    f = upload(store, tmp_path, "long.txt", LONG_TEXT)
    n = store.attach(vs, f, {}, SMALL)["n"]
    sizes: list[int] = []

    class Sizes(CountingEmbed):
        def __call__(self, texts):
            sizes.append(len(texts))
            return super().__call__(texts)

    Ingestor(store, Sizes(), batch=7, embed_slice=3).run_job(n)
    chunks = store.chunk_count()
    assert max(sizes) == 3 and sum(sizes) == chunks > 7  # no forward over 3 chunks, every chunk embedded once
    assert store.get_store_file(vs, f["id"])["status"] == "completed"
    store.close()
