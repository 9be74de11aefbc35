"""rag/metrics.py: recall@k, MRR@k and nDCG@k on hand-worked examples."""

import math

import pytest

from fleetlm.rag.metrics import NoRelevant, mrr_at_k, ndcg_at_k, recall_at_k, score_runs


def test_one_relevant_at_rank_two():
    ranked = ["a", "b", "c"]
    assert recall_at_k(ranked, {"b"}, 1) == 0.0
    assert recall_at_k(ranked, {"b"}, 2) == 1.0
    assert mrr_at_k(ranked, {"b"}, 10) == 0.5
    assert ndcg_at_k(ranked, {"b"}, 10) == pytest.approx(1 / math.log2(3))  # 0.6309


def test_relevant_first_scores_one_and_missing_scores_zero():
    assert ndcg_at_k(["a", "b"], {"a"}, 10) == 1.0
    assert mrr_at_k(["a", "b"], {"a"}, 10) == 1.0
    assert recall_at_k(["x", "y"], {"a"}, 5) == 0.0
    assert mrr_at_k(["x", "y"], {"a"}, 10) == 0.0
    assert ndcg_at_k(["x", "y"], {"a"}, 10) == 0.0


def test_cutoff_excludes_later_ranks():
    ranked = [f"d{i}" for i in range(12)]
    assert mrr_at_k(ranked, {"d10"}, 10) == 0.0  # rank 11
    assert mrr_at_k(ranked, {"d9"}, 10) == pytest.approx(0.1)  # rank 10


def test_two_relevant():
    ranked = ["a", "x", "c"]
    assert recall_at_k(ranked, {"a", "c"}, 2) == 0.5
    assert recall_at_k(ranked, {"a", "c"}, 3) == 1.0
    # DCG 1 + 1/log2(4) = 1.5 over the ideal 1 + 1/log2(3)
    assert ndcg_at_k(ranked, {"a", "c"}, 3) == pytest.approx(1.5 / (1 + 1 / math.log2(3)))


def test_duplicates_count_once_at_their_first_place():
    # several chunks of one passage: the passage holds rank 1, "a" moves up to rank 2
    assert recall_at_k(["x", "x", "a"], {"a"}, 2) == 1.0
    assert mrr_at_k(["x", "x", "a"], {"a"}, 10) == 0.5


def test_bad_input_is_refused():
    with pytest.raises(NoRelevant):
        recall_at_k(["a"], set(), 5)
    with pytest.raises(ValueError):
        mrr_at_k(["a"], {"a"}, 0)
    with pytest.raises(ValueError):
        score_runs([])


def test_score_runs_averages_the_three_figures():
    scores = score_runs([(["a", "b"], {"a"}), (["b", "a"], {"a"}), (["c"] * 3, {"a"})])
    assert scores.n == 3
    assert scores.recall_at_5 == pytest.approx(2 / 3)
    assert scores.mrr_at_10 == pytest.approx((1 + 0.5 + 0) / 3)
    assert scores.ndcg_at_10 == pytest.approx((1 + 1 / math.log2(3)) / 3)
