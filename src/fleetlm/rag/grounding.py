"""Grounded answers: numbered sources, the system prompt that cites them as [n], file_citation annotations.

Shared by /v1/responses (file_search), the chat extension / assistants and the answer benchmark.

Citation convention (OpenAI's `file_citation`): the model is asked to write [n] after a claim; `cite` removes
the markers from the text and puts one annotation per cited source at the character offset where its marker
stood, so the annotation `index` points just after the claim in the text the client shows.

Fallback when the model wrote no usable marker (small models often ignore the instruction): the answer is
attributed to the source(s) whose words it overlaps most, measured as the share of the answer's distinct
words (lower-cased, 3+ letters) found in the source; every source within OVERLAP_MARGIN of the best one,
and at least MIN_OVERLAP, is cited at the end of the text. An answer sharing nothing with any
source gets no citation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from fleetlm.rag.search import Embed, SearchRequest, search
from fleetlm.rag.store import KnowledgeStore

MARKER = re.compile(r"\s?\[(\d+(?:\s*,\s*\d+)*)\]")
WORD = re.compile(r"[^\W\d_]{3,}", re.UNICODE)
MIN_OVERLAP = 0.2
OVERLAP_MARGIN = 0.05

INSTRUCTIONS = (
    "Answer the question using only the numbered sources below. After each sentence that uses a source, "
    "write its number in square brackets, like [1] or [2]. If the sources do not contain the answer, say so."
)


@dataclass
class Source:
    """One retrieved chunk, numbered for the prompt."""

    index: int
    file_id: str
    filename: str
    score: float
    text: str
    attributes: dict = field(default_factory=dict)
    vector_store_id: str = ""


def _chunk_text(hit: dict) -> str:
    text = hit.get("text", "")
    if isinstance(text, list):  # OpenAI-shaped content parts
        return "\n".join(part.get("text", "") for part in text if isinstance(part, dict))
    return str(text)


def retrieve(
    store: KnowledgeStore,
    vector_store_ids: list[str],
    query: str,
    embed: Embed,
    *,
    max_num_results: int = 10,
    filters: dict | None = None,
    score_threshold: float = 0.0,
) -> list[Source]:
    """search() over each store, merged by score (best first, ties by store order), numbered 1..n."""
    req = SearchRequest(
        [query], max_num_results=max_num_results, filters=filters, score_threshold=score_threshold
    )
    found: list[tuple[float, int, int, dict, str]] = []
    for order, store_id in enumerate(vector_store_ids):
        for rank, hit in enumerate(search(store, store_id, req, embed)):
            found.append((-float(hit["score"]), order, rank, hit, store_id))
    found.sort(key=lambda row: row[:3])
    return [
        Source(
            index=i,
            file_id=hit["file_id"],
            filename=hit["filename"],
            score=float(hit["score"]),
            text=_chunk_text(hit),
            attributes=dict(hit.get("attributes") or {}),
            vector_store_id=store_id,
        )
        for i, (_, _, _, hit, store_id) in enumerate(found[:max_num_results], start=1)
    ]


def grounding_prompt(sources: list[Source], *, max_chars: int | None = None) -> str:
    """How to answer and cite, then the numbered sources (at most max_chars of source text if given)."""
    if not sources:
        return "No source matched the question. Say that the knowledge base has nothing on it."
    budget = max_chars if max_chars is not None else sum(len(s.text) for s in sources)
    blocks = []
    for source in sources:
        if budget <= 0:
            break
        text = source.text[:budget]
        budget -= len(text)
        blocks.append(f"[{source.index}] ({source.filename})\n{text.strip()}")
    return INSTRUCTIONS + "\n\nSources:\n" + "\n\n".join(blocks)


def _annotation(source: Source, index: int) -> dict:
    return {"type": "file_citation", "index": index, "file_id": source.file_id, "filename": source.filename}


def _words(text: str) -> set[str]:
    return {w.lower() for w in WORD.findall(text)}


def overlap_sources(text: str, sources: list[Source]) -> list[Source]:
    """The fallback: sources sharing the most of the answer's words (see the module docstring)."""
    words = _words(text)
    if not words or not sources:
        return []
    shares = [(len(words & _words(s.text)) / len(words), s) for s in sources]
    best = max(share for share, _ in shares)
    if best < MIN_OVERLAP:
        return []
    return [s for share, s in shares if share >= best - OVERLAP_MARGIN]


def cite(text: str, sources: list[Source]) -> tuple[str, list[dict]]:
    """The answer without [n] markers, and one file_citation per valid marker (or the overlap fallback)."""
    by_index = {s.index: s for s in sources}
    out: list[str] = []
    annotations: list[dict] = []
    length = 0
    last = 0
    for match in MARKER.finditer(text):
        piece = text[last : match.start()]
        out.append(piece)
        length += len(piece)
        last = match.end()
        for number in dict.fromkeys(int(n) for n in match.group(1).split(",")):
            if number in by_index:
                annotations.append(_annotation(by_index[number], length))
    out.append(text[last:])
    clean = "".join(out)
    if not annotations:
        annotations = [_annotation(s, len(clean)) for s in overlap_sources(clean, sources)]
    return clean, annotations
