
import pytest

from fleetlm.rag.search import SearchRequest, convex, fts_query, rrf, search
from fleetlm.rag.store import SqliteKnowledgeStore
from rag_fakes import bag_of_words, index_text

TEXTS = ["the quick brown fox jumps", "a lazy dog sleeps all day", "quick thinking saves the day"]


def test_rrf_scores_first_everywhere_as_one():
    scores = rrf([[(1, 1), (2, 1)], [(1, 1), (3, 1)]])
    assert scores[(1, 1)] == pytest.approx(1.0)
    assert scores[(2, 1)] == pytest.approx(scores[(3, 1)]) == pytest.approx((1 / 62) / (2 / 61))


def test_convex_weights_dense_and_scaled_bm25():
    scores = convex({(1, 1): 4.0, (2, 1): 2.0}, {(1, 1): 0.2, (3, 1): 0.9}, alpha=0.25)
    assert scores[(1, 1)] == pytest.approx(0.25 * 0.2 + 0.75 * 1.0)
    assert scores[(2, 1)] == pytest.approx(0.75 * 0.5)
    assert scores[(3, 1)] == pytest.approx(0.25 * 0.9)


def test_fts_query_quotes_words_so_nothing_is_an_operator():
    assert fts_query('NOT "x" OR near(y) AND z*') == '"not" OR "x" OR "or" OR "near" OR "y" OR "and" OR "z"'
    assert fts_query("?!") == ""


@pytest.fixture
def indexed(tmp_path):
    store = SqliteKnowledgeStore(tmp_path / "kb.db", tmp_path / "files")
    vs = store.create_store(None, {}, None)["id"]
    for i, text in enumerate(TEXTS):
        index_text(store, tmp_path, vs, f"{i}.txt", text, {"n": i})
    yield store, vs
    store.close()


@pytest.mark.parametrize(
    "retrieval, fusion", [("bm25", "rrf"), ("dense", "rrf"), ("hybrid", "rrf"), ("hybrid", "convex")]
)
def test_every_mode_ranks_the_matching_chunk_first(indexed, retrieval, fusion):
    store, vs = indexed
    hits = search(store, vs, SearchRequest(["lazy dog"], retrieval=retrieval, fusion=fusion), bag_of_words)
    assert hits[0]["filename"] == "1.txt" and hits[0]["attributes"] == {"n": 1}
    assert all(0 <= h["score"] <= 1 for h in hits)


def test_filters_threshold_and_limit_apply(indexed):
    store, vs = indexed
    req = SearchRequest(["quick day"], filters={"type": "ne", "key": "n", "value": 0})
    assert {h["filename"] for h in search(store, vs, req, bag_of_words)} == {"1.txt", "2.txt"}
    one = search(store, vs, SearchRequest(["quick day"], max_num_results=1), bag_of_words)
    assert len(one) == 1 and one[0]["filename"] == "2.txt"  # both of its words match, in both lists
    strict = search(
        store, vs, SearchRequest(["quick day"], score_threshold=0.999, retrieval="dense"), bag_of_words
    )
    assert strict == []
