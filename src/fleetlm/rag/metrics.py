"""Ranking metrics with binary relevance: recall@k, MRR@k and nDCG@k, per query and averaged.

A query's `ranked` is the list of retrieved ids best first (duplicates count once, at their first place);
`relevant` is the set of ids that answer it. With one relevant id, as in the labelled set, recall@k is
whether it is in the top k, MRR@k is 1/rank (0 past k) and nDCG@k is 1/log2(rank + 1) (0 past k).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class NoRelevant(ValueError):
    """A query with no relevant id cannot be scored (every metric would be undefined or vacuous)."""


def _first_occurrences(ranked: Sequence[str], k: int) -> list[str]:
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    seen: set[str] = set()
    unique: list[str] = []
    for item in ranked:
        if item not in seen:
            seen.add(item)
            unique.append(item)
        if len(unique) == k:
            break
    return unique


def _check(relevant: set[str]) -> None:
    if not relevant:
        raise NoRelevant("a query needs at least one relevant id")


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Share of the relevant ids found in the top k."""
    _check(relevant)
    return len(set(_first_occurrences(ranked, k)) & relevant) / len(relevant)


def mrr_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """1 / rank of the first relevant id in the top k, else 0."""
    _check(relevant)
    for rank, item in enumerate(_first_occurrences(ranked, k), start=1):
        if item in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """DCG of the top k (gain 1 per relevant id, discount log2(rank + 1)) over the best possible DCG."""
    _check(relevant)
    dcg = sum(1.0 / math.log2(rank + 1)
              for rank, item in enumerate(_first_occurrences(ranked, k), start=1) if item in relevant)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    return dcg / ideal


@dataclass(frozen=True)
class Scores:
    recall_at_5: float
    mrr_at_10: float
    ndcg_at_10: float
    n: int


def score_runs(runs: Iterable[tuple[Sequence[str], set[str]]]) -> Scores:
    """The figures the retrieval benchmark prints, averaged over (ranked, relevant) pairs."""
    recall = mrr = ndcg = 0.0
    n = 0
    for ranked, relevant in runs:
        recall += recall_at_k(ranked, relevant, 5)
        mrr += mrr_at_k(ranked, relevant, 10)
        ndcg += ndcg_at_k(ranked, relevant, 10)
        n += 1
    if not n:
        raise ValueError("no queries to score")
    return Scores(recall_at_5=recall / n, mrr_at_10=mrr / n, ndcg_at_10=ndcg / n, n=n)
