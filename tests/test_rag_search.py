
import pytest

from fleetlm.rag.search import SearchRequest, convex, fts_query, min_max, rrf, search
from fleetlm.rag.store import SqliteKnowledgeStore
from rag_fakes import bag_of_words, index_text

TEXTS = ["the quick brown fox jumps", "a lazy dog sleeps all day", "quick thinking saves the day"]


def test_rrf_scores_first_everywhere_as_one():
    scores = rrf([[(1, 1), (2, 1)], [(1, 1), (3, 1)]])
    assert scores[(1, 1)] == pytest.approx(1.0)
    assert scores[(2, 1)] == pytest.approx(scores[(3, 1)]) == pytest.approx((1 / 62) / (2 / 61))


def test_convex_weights_both_sides_min_max_scaled():
    bm25 = {(1, 1): 4.0, (2, 1): 2.0, (4, 1): 1.0}
    cosine = {(1, 1): 0.2, (2, 1): 0.5, (3, 1): 0.9, (4, 1): 0.1}
    scores = convex(bm25, cosine, alpha=0.25)
    assert scores[(1, 1)] == pytest.approx(0.25 * 0.125 + 0.75 * 1.0)
    assert scores[(2, 1)] == pytest.approx(0.25 * 0.5 + 0.75 * (1 / 3))
    assert scores[(3, 1)] == pytest.approx(0.25 * 1.0)  # only the dense list found it: its BM25 part is 0
    assert scores[(4, 1)] == pytest.approx(0.0)  # last on both sides
    assert all(0 <= s <= 1 for s in scores.values())


def test_min_max_of_equal_or_single_scores_is_one():
    assert min_max({(1, 1): 3.0}) == {(1, 1): 1.0}
    assert min_max({(1, 1): 0.4, (2, 1): 0.4}) == {(1, 1): 1.0, (2, 1): 1.0}
    assert min_max({}) == {}


def test_fts_query_quotes_words_so_nothing_is_an_operator():
    assert fts_query('NEAR "x" OR near(y) AND z*') == '"near" OR "x" OR "y" OR "z"'
    assert fts_query("?!") == ""


def test_fts_query_drops_stop_words_unless_nothing_is_left():
    assert fts_query("How do I copy a list in Python?") == '"copy" OR "list" OR "python"'
    assert fts_query("what is it") == '"what" OR "is" OR "it"'


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
