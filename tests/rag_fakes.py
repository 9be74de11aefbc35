"""Test helpers for the knowledge base: a deterministic stand-in for MiniLM, and a minimal valid PDF."""

from __future__ import annotations

import hashlib
import re

import numpy as np

DIM = 384


def bag_of_words(texts: list[str]) -> np.ndarray:
    out = np.zeros((len(texts), DIM), dtype=np.float32)
    for i, text in enumerate(texts):
        for word in re.findall(r"\w+", text.lower()):
            out[
                i, int.from_bytes(hashlib.blake2b(word.encode(), digest_size=4).digest(), "little") % DIM
            ] += 1
        norm = np.linalg.norm(out[i])
        if norm:
            out[i] /= norm
    return out


class CountingEmbed:
    """bag_of_words that counts the texts it embedded (and can crash after some calls)."""

    def __init__(self, crash_after: int | None = None):
        self.texts = 0
        self.calls = 0
        self.crash_after = crash_after

    def __call__(self, texts: list[str]) -> np.ndarray:
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise Crash("simulated crash between chunk batches")
        self.calls += 1
        self.texts += len(texts)
        return bag_of_words(texts)


class Crash(BaseException):
    """Not an Exception: nothing in the ingest path catches it, as nothing catches a SIGKILL."""


def minimal_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page (offsets computed, so no repair is needed)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>")
    objects.append("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {5 + 2 * i} 0 R "
            "/Resources << /Font << /F1 3 0 R >> >> >>"
        )
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
    out, offsets = b"%PDF-1.4\n", []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def index_text(store, tmp_path, vector_store_id: str, filename: str, text: str, attributes: dict) -> dict:
    """Put TEXT in the store as one file of one chunk, attached and indexed at once (no ingestor)."""
    from fleetlm.rag.chunking import Chunk, Strategy

    (tmp_path / "up").write_bytes(text.encode())
    file = store.add_file(
        filename, "assistants", tmp_path / "up", hashlib.sha256(text.encode()).hexdigest(), 1
    )
    n = store.attach(vector_store_id, file, attributes, Strategy())["n"]
    doc = store.start_doc(store.job(n)["sha256"], Strategy().key)
    store.add_chunks(doc, [Chunk(0, text, len(text.split()))], bag_of_words([text]), final=True)
    return file
