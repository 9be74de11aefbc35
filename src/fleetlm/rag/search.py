"""Search a vector store: BM25 (FTS5), dense (MiniLM cosine) or hybrid (convex combination or RRF).

Scores, all in [0, 1] so that `score_threshold` means something in every mode:
- bm25: FTS5's BM25 `s` (higher is better) squashed to s / (1 + s);
- dense: the cosine similarity of the normalized MiniLM vectors (negative ones count as 0);
- hybrid convex (the default): alpha * cosine' + (1 - alpha) * BM25', each min-max scaled over the
  candidates (the best candidate 1, the worst 0; a chunk only the dense list found gets BM25' 0; every
  candidate's cosine is computed exactly). Scores are relative to the query's candidates: the best chunk
  of a query nothing answers still scores near 1;
- hybrid rrf: sum over the two lists of 1 / (60 + rank), divided by its largest value 2 / 61, so a chunk
  first in both lists scores 1 (k = 60 as in Cormack et al. 2009).
Each list takes CANDIDATES (or 4 x max_num_results, if more) before fusion. The BM25 query is every word
of the query text OR-ed, less English stop words ("how", "do", "the", ...) unless that leaves none.

Measured on the labelled set (bench/retrieval.py, docs/KNOWLEDGE.md): min-max scaling beat scaling BM25
by its best score alone (the first version), dropping stop words helped every fused mode a little, and
convex with alpha 0.7 beat RRF; alpha 0.7 was picked on one half of the questions, scored on the other.
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
DEFAULT_FUSION: Fusion = "convex"
DEFAULT_ALPHA = 0.7
WORD = re.compile(r"\w+", re.UNICODE)
MAX_QUERY_TERMS = 64
# Function words that match nearly every chunk: OR-ed in, they only add noise to BM25's ranking.
STOP_WORDS = frozenset("""
a about after all also an and any are as at be been before being between both but by can could did do does
doing done each else for from get gets got had has have how i if in into is it its just let like make makes
may me might more most much must my need no not of on one only or other our out over own same should so some
such than that the their them then there these they this those through to too under up use used uses using
very want was way we were what when where whether which while who whom why will with without would you your
""".split())

Embed = Callable[[list[str]], np.ndarray]


@dataclass
class SearchRequest:
    queries: list[str]
    max_num_results: int = 10
    filters: dict | None = None
    score_threshold: float = 0.0
    retrieval: Retrieval = "hybrid"
    fusion: Fusion = DEFAULT_FUSION
    alpha: float = DEFAULT_ALPHA
    reranker: str | None = None  # a fleet model that reorders the results (rag/rerank.py, by the endpoint)
    rerank_depth: int = 10


def fts_query(text: str) -> str:
    """An FTS5 MATCH expression: the query's words less stop words (all of them if every one is a stop word),
    each quoted (no operator in it means anything), OR-ed."""
    words = list(dict.fromkeys(w.lower() for w in WORD.findall(text)))
    words = [w for w in words if w not in STOP_WORDS] or words
    return " OR ".join(f'"{w}"' for w in words[:MAX_QUERY_TERMS])


def rrf(lists: Sequence[Sequence[tuple[int, int]]], k: int = RRF_K) -> dict[tuple[int, int], float]:
    """Reciprocal-rank fusion of ranked lists of keys, scaled so that first in every list scores 1."""
    scores: dict[tuple[int, int], float] = {}
    for ranked in lists:
        for rank, key in enumerate(ranked, start=1):
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    top = len(lists) / (k + 1)
    return {key: s / top for key, s in scores.items()}


def min_max(scores: dict[tuple[int, int], float]) -> dict[tuple[int, int], float]:
    """Scores scaled to [0, 1] over their own range; all equal (or one) scale to 1."""
    if not scores:
        return {}
    lo, hi = min(scores.values()), max(scores.values())
    if hi <= lo:
        return dict.fromkeys(scores, 1.0)
    return {key: (s - lo) / (hi - lo) for key, s in scores.items()}


def convex(
    bm25: dict[tuple[int, int], float], cosine: dict[tuple[int, int], float], alpha: float
) -> dict[tuple[int, int], float]:
    """alpha * cosine' + (1 - alpha) * BM25' over the union of both candidate sets, each side min-max scaled
    over its candidates (a key missing from a side counts 0 there)."""
    lexical, dense = min_max(bm25), min_max(cosine)
    return {
        key: alpha * dense.get(key, 0.0) + (1 - alpha) * lexical.get(key, 0.0)
        for key in set(bm25) | set(cosine)
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
