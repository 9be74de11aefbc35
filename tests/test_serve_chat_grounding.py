import io
import json
import random

import openai
import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.rag.grounding import Source, cite
from fleetlm.serve.app import create_app
from fleetlm.serve.chat_grounding import Grounding, MarkerFilter
from fleetlm.serve.store import UsageStore
from rag_fakes import bag_of_words
from recording_backend import RecordingBackend

DOCS = {
    "tides.txt": "Tides rise and fall twice a day because of the pull of the moon on the oceans.",
    "bread.txt": "Knead the dough, let it rise overnight in a cool place, then bake it at 230 C.",
}
ANSWER = "The moon pulls the oceans, so tides rise and fall [1]."


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounded")
    config = parse_config({"models": {"m": {"remote": "http://127.0.0.1:9/v1"}},
                           "knowledge": {"files_dir": str(root / "blobs")},
                           "assistants": {"librarian": {"model": "m", "instructions": "Cite your sources.",
                                                        "vector_store_ids": ["notes"],
                                                        "max_num_results": 1}}})
    backend = RecordingBackend(ANSWER, 10, 5)
    app = create_app(config, UsageStore(f"sqlite:///{root / 'fleet.db'}"), {"m": backend})
    app.state.gateway.knowledge_embed = bag_of_words  # no MiniLM load: the tests are about the wiring
    with TestClient(app) as tc:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)
        files = {n: client.files.create(file=(n, io.BytesIO(t.encode())), purpose="assistants")
                 for n, t in DOCS.items()}
        vs = client.vector_stores.create(name="notes")
        batch = client.vector_stores.file_batches.create_and_poll(
            vector_store_id=vs.id, file_ids=[f.id for f in files.values()], poll_interval_ms=50
        )
        assert batch.file_counts.completed == 2
        yield tc, backend, vs.id, files


def ask(tc, search, stream=False, question="Why do tides rise and fall?"):
    body = {"model": "m", "messages": [{"role": "system", "content": "Be brief."},
                                       {"role": "user", "content": question}],
            "fleet_file_search": search, "stream": stream}
    return tc.post("/v1/chat/completions", json=body)


def test_the_sources_reach_the_model_and_the_answer_cites_the_right_file(served):
    tc, backend, vs_id, files = served
    r = ask(tc, {"vector_store_ids": [vs_id], "max_num_results": 1})
    assert r.status_code == 200, r.text
    sent = backend.requests[-1]
    assert [m.role for m in sent.messages] == ["system", "system", "user"]  # the caller's system text first
    assert sent.messages[0].content == "Be brief."
    assert "pull of the moon" in sent.messages[1].content and "Knead" not in sent.messages[1].content
    assert sent.fleet_file_search is None
    message = r.json()["choices"][0]["message"]
    assert message["annotations"], message
    for a in message["annotations"]:
        assert a["type"] == "file_citation"
        assert a["file_citation"]["file_id"] == files["tides.txt"].id
        assert a["file_citation"]["filename"] == "tides.txt"
        assert 0 <= a["file_citation"]["index"] <= len(message["content"])
    assert "fleet_file_search_results" not in r.json()


def test_results_are_returned_when_asked_and_a_store_may_be_named(served):
    tc, _, _, files = served
    r = ask(tc, {"vector_store_ids": ["notes"], "max_num_results": 1, "include_results": True})
    assert r.status_code == 200, r.text
    found = r.json()["fleet_file_search_results"]
    assert [x["file_id"] for x in found] == [files["tides.txt"].id]
    assert "pull of the moon" in found[0]["content"][0]["text"]


def test_a_stream_ends_with_the_citations(served):
    tc, backend, vs_id, files = served
    r = ask(tc, {"vector_store_ids": [vs_id], "max_num_results": 1}, stream=True)
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    annotations = last["choices"][0]["delta"]["annotations"]
    assert annotations and {a["file_citation"]["file_id"] for a in annotations} == {files["tides.txt"].id}
    streamed = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-2])
    assert "tides rise and fall" in streamed
    assert "[1]" not in streamed  # the markers are stripped as the text streams
    whole = ask(tc, {"vector_store_ids": [vs_id], "max_num_results": 1}).json()["choices"][0]["message"]
    assert streamed.rstrip() == whole["content"]  # so the annotations' offsets count in the same text
    assert [a["file_citation"]["index"] for a in annotations] == [
        a["file_citation"]["index"] for a in whole["annotations"]
    ]
    assert "pull of the moon" in backend.requests[-1].messages[1].content


def test_an_unknown_vector_store_is_a_404(served):
    tc, _, _, _ = served
    r = ask(tc, {"vector_store_ids": ["vs_nope"]})
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["param"] == "fleet_file_search.vector_store_ids" and "vs_nope" in err["message"]


@pytest.mark.parametrize("search, param", [
    ({"vector_store_ids": []}, "fleet_file_search.vector_store_ids"),
    ({"vector_store_ids": ["notes"], "max_num_results": 0}, "fleet_file_search.max_num_results"),
    ({"vector_store_ids": ["notes"], "top_k": 3}, "fleet_file_search.top_k"),
    ({"vector_store_ids": ["notes"], "filters": {"type": "near", "key": "a", "value": 1}},
     "fleet_file_search.filters.type"),
    ("notes", "fleet_file_search"),
])
def test_a_malformed_field_is_a_400_naming_it(served, search, param):
    tc, _, _, _ = served
    r = ask(tc, search)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_an_assistant_grounds_in_its_named_store(served):
    tc, backend, _, files = served
    r = tc.post("/v1/chat/completions", json={
        "model": "librarian",
        "messages": [{"role": "user", "content": "Knead dough, bake bread: at what heat?"}]})
    assert r.status_code == 200, r.text
    sent = backend.requests[-1]
    assert sent.messages[0].content == "Cite your sources."
    assert "overnight" in sent.messages[1].content and "moon" not in sent.messages[1].content
    cited = {a["file_citation"]["file_id"] for a in r.json()["choices"][0]["message"]["annotations"]}
    assert cited == {files["bread.txt"].id}


# ---------------------------------------------------------------- markers in a stream


def test_the_marker_filter_holds_what_may_become_a_marker():
    f = MarkerFilter()
    assert [f.feed(p) for p in ["The sea", " ", "[", "1", "]", ". Next", " [", "x]"]] == [
        "The sea", "", "", "", "", ". Next", "", " [x]"]
    assert f.flush() == ""
    g = Grounding([])
    assert g.feed("up [2") == "up" and g.flush() == " [2" and g.text == "up [2"  # never closed: kept


@pytest.mark.parametrize("seed", range(30))
def test_the_marker_filter_streams_exactly_what_cite_returns(seed):
    """Any answer, cut anywhere: the pieces add up to cite's text, so its annotation offsets hold."""
    rng = random.Random(seed)
    words = ["tides", "rise", " ", "[1]", "[2, 3]", "[", "1", "]", ",", ".", "  ", "\n", "[x]", "[12", " [3]"]
    text = "".join(rng.choice(words) for _ in range(40))
    sources = [Source(i, f"file-{i}", f"{i}.txt", 1.0, "tides rise") for i in (1, 2, 3)]
    clean, _ = cite(text, sources)
    for cuts in (sorted(rng.sample(range(1, len(text)), 6)), list(range(1, len(text)))):
        f = MarkerFilter()
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert "".join(f.feed(p) for p in pieces) + f.flush() == clean


def test_clean_rewrites_a_streams_pieces_in_place():
    from fleetlm.serve.backends import Delta

    g = Grounding([])
    pieces = [Delta(0, "Tides rise"), Delta(0, " [1"), Delta(0, "]. Moon"), Delta(0, " ["),
              Delta(0, None, "stop")]
    for d in pieces:
        g.clean(d)
    assert [d.text for d in pieces] == ["Tides rise", "", ". Moon", "", " ["]
    assert g.text == "Tides rise [1]. Moon ["  # the raw answer, for the citations chunk
