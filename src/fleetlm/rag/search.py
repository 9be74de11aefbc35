"""Search a vector store: BM25 (FTS5), dense (MiniLM cosine) or hybrid (reciprocal-rank fusion or convex).

Scores, all in [0, 1] so that `score_threshold` means something in every mode:
- bm25: FTS5's BM25 `s` (higher is better) squashed to s / (1 + s);
- dense: the cosine similarity of the normalized MiniLM vectors (negative ones count as 0);
- hybrid rrf: sum over the two lists of 1 / (60 + rank), divided by its largest value 2 / 61, so a chunk
  first in both lists scores 1 (k = 60 as in Cormack et al. 2009);
- hybrid convex: alpha * cosine + (1 - alpha) * BM25 scaled to [0, 1] by the best BM25 score of the
  candidates (a chunk only the dense list found gets its BM25 part 0; every candidate's cosine is computed).
Each list takes CANDIDATES (or 4 x max_num_results, if more) before fusion.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fleetlm.rag.filters import compile_filter
from fleetlm.rag.store import KnowledgeStore

Retrieval = Literal["bm25", "dense", "hybrid"]
Fusion = Literal["rrf", "convex"]
RRF_K = 60
CANDIDATES = 50
DEFAULT_ALPHA = 0.5
WORD = re.compile(r"\w+", re.UNICODE)
MAX_QUERY_TERMS = 64

Embed = Callable[[list[str]], np.ndarray]


@dataclass
class SearchRequest:
    queries: list[str]
    max_num_results: int = 10
    filters: dict | None = None
    score_threshold: float = 0.0
    retrieval: Retrieval = "hybrid"
    fusion: Fusion = "rrf"
    alpha: float = DEFAULT_ALPHA
    reranker: str | None = None  # a fleet model that reorders the results (rag/rerank.py, by the endpoint)
    rerank_depth: int = 10


def fts_query(text: str) -> str:
    """An FTS5 MATCH expression: every word of the query, quoted (no operator in it means anything), OR-ed."""
    words = list(dict.fromkeys(w.lower() for w in WORD.findall(text)))[:MAX_QUERY_TERMS]
    return " OR ".join(f'"{w}"' for w in words)


def rrf(lists: Sequence[Sequence[tuple[int, int]]], k: int = RRF_K) -> dict[tuple[int, int], float]:
    """Reciprocal-rank fusion of ranked lists of keys, scaled so that first in every list scores 1."""
    scores: dict[tuple[int, int], float] = {}
    for ranked in lists:
        for rank, key in enumerate(ranked, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    top = len(lists) / (k + 1)
    return {key: s / top for key, s in scores.items()}


def convex(
    bm25: dict[tuple[int, int], float], cosine: dict[tuple[int, int], float], alpha: float
) -> dict[tuple[int, int], float]:
    """alpha * cosine + (1 - alpha) * BM25 / best BM25, over the union of both candidate sets."""
    best = max(bm25.values(), default=0.0)
    keys = set(bm25) | set(cosine)
    return {
        key: alpha * max(0.0, cosine.get(key, 0.0))
        + (1 - alpha) * (bm25.get(key, 0.0) / best if best > 0 else 0.0)
        for key in keys
    }


def search(store: KnowledgeStore, store_id: str, req: SearchRequest, embed: Embed) -> list[dict]:
    """The best chunks, as dicts with file_id, filename, score, attributes and text, best first."""
    text = "\n".join(req.queries)
    where = compile_filter(req.filters, "sf.attributes") if req.filters is not None else ("1", [])
    depth = max(CANDIDATES, 4 * req.max_num_results)
    lexical: list[tuple[int, int, float]] = []
    nearest: list[tuple[int, int, float]] = []
    vector = None
    if req.retrieval in ("bm25", "hybrid") and (match := fts_query(text)):
        lexical = store.bm25(store_id, match, where, depth)
    if req.retrieval in ("dense", "hybrid"):
        vector = embed([text])[0]
        nearest = store.dense(store_id, vector, where, depth)
    if req.retrieval == "bm25":
        scores = {(c, n): s / (1.0 + s) for c, n, s in lexical}
    elif req.retrieval == "dense":
        scores = {(c, n): max(0.0, s) for c, n, s in nearest}
    elif req.fusion == "rrf":
        scores = rrf([[(c, n) for c, n, _ in lexical], [(c, n) for c, n, _ in nearest]])
    else:
        cosine = {(c, n): s for c, n, s in nearest}
        missing = [c for c, n, _ in lexical if (c, n) not in cosine]
        if missing and vector is not None:
            sims = store.similarities(missing, vector)
            cosine.update({(c, n): sims[c] for c, n, _ in lexical if c in sims and (c, n) not in cosine})
        scores = convex({(c, n): s for c, n, s in lexical}, cosine, req.alpha)
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))
    kept = [(key, s) for key, s in ranked if s >= req.score_threshold][: req.max_num_results]
    out = []
    for hit, (_, score) in zip(store.hits([key for key, _ in kept]), kept, strict=True):
        if hit is not None:
            hit["score"] = round(float(score), 6)
            out.append(hit)
    return out
