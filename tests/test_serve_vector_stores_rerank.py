import io
import math

import openai
import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Choice, Generation
from fleetlm.serve.store import UsageStore
from rag_fakes import bag_of_words

# BM25 and the bag-of-words vectors both put the word-rich decoy first; only the judge knows better.
DOCS = {
    "decoy.txt": "moon moon tides tides: a list of moon phases and tide tables, nothing on the cause.",
    "answer.txt": "The pull of the moon on the oceans makes the tides.",
    "bread.txt": "Knead the dough, let it rise overnight, then bake it.",
}


class Judge:
    """A one-token chat model: yes (p 0.9) for a passage that names the pull of the moon, else no (p 0.8)."""

    def __init__(self):
        self.calls = 0
        self.fail = False

    async def chat(self, request):
        self.calls += 1
        if self.fail:
            raise RuntimeError("engine crashed")
        yes = "pull of the moon" in request.messages[-1].content
        token, p = ("yes", 0.9) if yes else ("no", 0.8)
        lp = {"content": [{"token": token, "logprob": math.log(p), "top_logprobs": []}]}
        return Generation([Choice(0, token, "length", None, lp)], 50, 1)

    async def aclose(self):
        return None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank")
    config = parse_config({"models": {"judge": {"remote": "http://127.0.0.1:9/v1"}},
                           "knowledge": {"files_dir": str(root / "blobs")}})
    judge = Judge()
    app = create_app(config, UsageStore(f"sqlite:///{root / 'fleet.db'}"), {"judge": judge})
    app.state.gateway.knowledge_embed = bag_of_words
    with TestClient(app) as tc:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)
        ids = [client.files.create(file=(n, io.BytesIO(t.encode())), purpose="assistants").id
               for n, t in DOCS.items()]
        vs = client.vector_stores.create(name="tides")
        batch = client.vector_stores.file_batches.create_and_poll(vector_store_id=vs.id, file_ids=ids,
                                                                  poll_interval_ms=50)
        assert batch.file_counts.completed == 3
        yield tc, client, vs.id, judge


QUERY = "moon phases and tide tables"


def test_without_a_ranker_the_decoy_wins(served):
    _, client, vs, _ = served
    page = client.vector_stores.search(vs, query=QUERY, max_num_results=2)
    assert page.data[0].filename == "decoy.txt"


def test_a_fleet_ranker_puts_the_judged_answer_first_within_its_depth(served):
    _, client, vs, judge = served
    before = judge.calls
    page = client.vector_stores.search(vs, query=QUERY, max_num_results=2,
                                       ranking_options={"ranker": "fleet:judge"},
                                       extra_body={"fleet_rerank_depth": 3})
    assert [r.filename for r in page.data][0] == "answer.txt" and len(page.data) == 2
    assert page.data[0].score == pytest.approx(0.9) and page.data[1].score == pytest.approx(0.2)
    assert judge.calls - before == 3  # one judgement per candidate within the depth
    page = client.vector_stores.search(vs, query=QUERY, ranking_options={"ranker": "fleet:judge",
                                                                         "score_threshold": 0.5})
    assert [r.filename for r in page.data] == ["answer.txt"]  # the threshold applies to P(yes)


@pytest.mark.parametrize("body, param", [
    ({"ranking_options": {"ranker": "fleet:nobody"}}, "ranking_options.ranker"),
    ({"ranking_options": {"ranker": "cohere"}}, "ranking_options.ranker"),
    ({"ranking_options": {"ranker": "fleet:judge"}, "fleet_rerank_depth": 0}, "fleet_rerank_depth"),
    ({"ranking_options": {"ranker": "fleet:judge"}, "fleet_rerank_depth": 21}, "fleet_rerank_depth"),
    ({"fleet_rerank_depth": "5"}, "fleet_rerank_depth"),
])
def test_bad_rankers_are_400s_naming_the_field(served, body, param):
    tc, _, vs, _ = served
    r = tc.post(f"/v1/vector_stores/{vs}/search", json={"query": QUERY, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_a_failing_ranker_is_a_502_not_a_traceback(served):
    tc, _, vs, judge = served
    judge.fail = True
    try:
        r = tc.post(f"/v1/vector_stores/{vs}/search",
                    json={"query": QUERY, "ranking_options": {"ranker": "fleet:judge"}})
    finally:
        judge.fail = False
    assert r.status_code == 502 and "engine crashed" in r.json()["error"]["message"]


def test_file_search_in_responses_takes_the_fleet_ranker_too(served):
    _, client, vs, judge = served
    tool = {"type": "file_search", "vector_store_ids": [vs], "max_num_results": 2}
    plain = client.responses.create(model="judge", input=QUERY, tools=[tool],
                                    include=["file_search_call.results"])
    assert plain.output[0].results[0].filename == "decoy.txt"
    before = judge.calls
    ranked = client.responses.create(
        model="judge", input=QUERY, include=["file_search_call.results"],
        tools=[{**tool, "ranking_options": {"ranker": "fleet:judge", "score_threshold": 0.5}}],
    )
    results = ranked.output[0].results
    assert [r.filename for r in results] == ["answer.txt"] and results[0].score == pytest.approx(0.9)
    assert judge.calls - before == 3 + 1  # the three stored chunks judged, then the answer


@pytest.mark.parametrize("ranker", ["fleet:nobody", "cohere"])
def test_file_search_with_a_bad_ranker_is_a_400(served, ranker):
    tc, _, vs, _ = served
    r = tc.post("/v1/responses", json={"model": "judge", "input": QUERY, "tools": [
        {"type": "file_search", "vector_store_ids": [vs], "ranking_options": {"ranker": ranker}}]})
    assert r.status_code == 400, r.text
    assert "ranker" in r.json()["error"]["param"]
