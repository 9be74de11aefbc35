
import pytest

from fleetlm.rag.grounding import Source, cite, grounding_prompt, retrieve
from fleetlm.rag.store import SqliteKnowledgeStore
from rag_fakes import bag_of_words, index_text


def _source(i: int, text: str) -> Source:
    return Source(i, f"file-{i}", f"{i}.txt", 1.0 / i, text, {}, "vs_1")


SOURCES = [_source(1, "Paris is the capital of France"), _source(2, "Tokyo is the capital of Japan")]


@pytest.fixture
def two_stores(tmp_path):
    store = SqliteKnowledgeStore(tmp_path / "kb.db", tmp_path / "files")
    ids = []
    for texts in (["the lazy dog sleeps", "a quick fox"], ["dog food is tasty"]):
        vs = store.create_store(None, {}, None)["id"]
        ids.append(vs)
        for text in texts:
            index_text(store, tmp_path, vs, f"{text}.txt", text, {"t": text})
    yield store, ids
    store.close()


def test_retrieve_merges_stores_best_first_and_numbers_from_one(two_stores):
    store, ids = two_stores
    sources = retrieve(store, ids, "lazy dog", bag_of_words, max_num_results=5)
    assert [s.index for s in sources] == list(range(1, len(sources) + 1))
    assert sources[0].filename == "the lazy dog sleeps.txt" and sources[0].vector_store_id == ids[0]
    assert {s.vector_store_id for s in sources} == set(ids)
    assert [s.score for s in sources] == sorted((s.score for s in sources), reverse=True)
    assert sources[0].attributes == {"t": "the lazy dog sleeps"} and sources[0].text == "the lazy dog sleeps"


def test_retrieve_applies_limit_filters_and_threshold(two_stores):
    store, ids = two_stores
    assert len(retrieve(store, ids, "dog", bag_of_words, max_num_results=1)) == 1
    food = {"type": "eq", "key": "t", "value": "dog food is tasty"}
    only = retrieve(store, ids, "dog", bag_of_words, filters=food)
    assert [s.filename for s in only] == ["dog food is tasty.txt"]
    assert retrieve(store, ids, "dog", bag_of_words, score_threshold=1.01) == []


def test_grounding_prompt_numbers_sources_and_cuts_to_max_chars():
    prompt = grounding_prompt(SOURCES)
    assert "[1] (1.txt)\nParis is the capital of France" in prompt and "[2] (2.txt)" in prompt
    assert "square brackets" in prompt
    short = grounding_prompt(SOURCES, max_chars=10)
    assert "Paris is t" in short and "Tokyo" not in short
    assert "nothing" in grounding_prompt([])


def test_cite_removes_markers_and_points_at_the_claim():
    text, notes = cite("Paris is in France [1]. Tokyo is in Japan [2][9].", SOURCES)
    assert text == "Paris is in France. Tokyo is in Japan."
    assert [(n["file_id"], n["index"]) for n in notes] == [("file-1", 18), ("file-2", 37)]
    assert notes[0] == {"type": "file_citation", "index": 18, "file_id": "file-1", "filename": "1.txt"}
    text, notes = cite("Both [1, 2].", SOURCES)
    assert text == "Both." and [n["file_id"] for n in notes] == ["file-1", "file-2"]


def test_cite_falls_back_to_the_most_overlapping_source():
    text, notes = cite("The capital of Japan is Tokyo.", SOURCES)
    assert text == "The capital of Japan is Tokyo."
    assert [(n["file_id"], n["index"]) for n in notes] == [("file-2", len(text))]
    assert cite("Bananas are yellow.", SOURCES) == ("Bananas are yellow.", [])
    assert cite("Nothing [7].", SOURCES)[1] == []
