import io
import time

import openai
import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.rag.chunking import Strategy
from fleetlm.serve.app import create_app
from fleetlm.serve.store import UsageStore
from rag_fakes import minimal_pdf

DOCS = {
    "cats.md": "# Cats\nA cat purrs when it is content and sleeps most of the afternoon on the sofa.\n",
    "rust.txt": "The Rust compiler uses LLVM to emit machine code; the borrow checker rejects data races.\n",
    "bread.html": "<html><body><h1>Baking</h1><p>Knead the dough, let it rise overnight, bake at 230 C.</p>"
    "<script>ignored()</script></body></html>",
    "tides.pdf": minimal_pdf(["Tides rise and fall twice a day because of the pull of the moon."]),
}
ATTRS = {
    "cats.md": {"topic": "pets", "year": 2021},
    "rust.txt": {"topic": "code", "year": 2024},
    "bread.html": {"topic": "food", "year": 2023},
    "tides.pdf": {"topic": "science", "year": 2022},
}


def make_app(root):
    config = parse_config(
        {
            "models": {"m": {"remote": "http://127.0.0.1:9/v1"}},
            "knowledge": {"files_dir": str(root / "blobs")},
        }
    )
    return create_app(config, UsageStore(f"sqlite:///{root / 'fleet.db'}"), {})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("vs")
    with TestClient(make_app(root)) as tc:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)
        yield tc, client, root


def upload(client, name, data):
    data = data.encode() if isinstance(data, str) else data
    return client.files.create(file=(name, io.BytesIO(data)), purpose="assistants")


@pytest.fixture(scope="module")
def library(served):
    """One store with the four documents (each with attributes) and a corrupt PDF, ingested as one batch."""
    _, client, _ = served
    files = {name: upload(client, name, body) for name, body in DOCS.items()}
    broken = upload(client, "broken.pdf", b"%PDF-1.4\nnot a pdf at all")
    vs = client.vector_stores.create(name="library", metadata={"team": "docs"})
    batch = client.vector_stores.file_batches.create_and_poll(
        vector_store_id=vs.id,
        files=[{"file_id": f.id, "attributes": ATTRS[n]} for n, f in files.items()]
        + [{"file_id": broken.id}],
        poll_interval_ms=50,
    )
    return vs, files, broken, batch


def test_a_batch_ingests_and_a_corrupt_file_fails_alone(served, library):
    _, client, _ = served
    vs, files, broken, batch = library
    assert batch.object == "vector_store.files_batch" and batch.status == "completed"
    counts = batch.file_counts
    assert (counts.completed, counts.failed, counts.in_progress, counts.total) == (4, 1, 0, 5)
    failed = client.vector_stores.files.retrieve(broken.id, vector_store_id=vs.id)
    assert failed.status == "failed" and failed.last_error.code == "invalid_file"
    assert "broken.pdf" in failed.last_error.message
    done = client.vector_stores.files.retrieve(files["rust.txt"].id, vector_store_id=vs.id)
    assert done.status == "completed" and done.last_error is None and done.attributes == ATTRS["rust.txt"]
    assert done.chunking_strategy.static.max_chunk_size_tokens == 800  # auto
    assert [f.id for f in client.vector_stores.files.list(vector_store_id=vs.id, filter="failed")] == [
        broken.id
    ]
    listed = client.vector_stores.file_batches.list_files(batch.id, vector_store_id=vs.id)
    assert len(listed.data) == 5
    store = client.vector_stores.retrieve(vs.id)
    assert store.status == "completed" and store.file_counts.total == 5 and store.metadata == {"team": "docs"}
    assert store.usage_bytes == sum(len(b if isinstance(b, bytes) else b.encode()) for b in DOCS.values())


@pytest.mark.parametrize(
    "extra",
    [
        {"fleet_retrieval": "bm25"},
        {"fleet_retrieval": "dense"},
        {},
        {"fleet_fusion": "convex", "fleet_alpha": 0.7},
    ],
)
@pytest.mark.parametrize(
    "query, expected",
    [
        ("why does the cat purr", "cats.md"),
        ("what does the borrow checker reject", "rust.txt"),
        ("how long should the dough rise", "bread.html"),
        ("tides and the moon", "tides.pdf"),
    ],
)
def test_search_finds_the_right_file_in_every_mode(served, library, extra, query, expected):
    _, client, _ = served
    vs = library[0]
    page = client.vector_stores.search(vector_store_id=vs.id, query=query, extra_body=extra)
    assert page.data and page.data[0].filename == expected
    scores = [r.score for r in page.data]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    top = page.data[0]
    assert top.file_id == library[1][expected].id and top.attributes == ATTRS[expected]
    assert top.content[0].type == "text" and "ignored()" not in top.content[0].text


def test_search_matches_paraphrases_densely(served, library):
    _, client, _ = served
    page = client.vector_stores.search(
        vector_store_id=library[0].id,
        query="feline noises of happiness",
        extra_body={"fleet_retrieval": "dense"},
    )
    assert page.data[0].filename == "cats.md"


def test_filters_threshold_and_result_count(served, library):
    _, client, _ = served
    vs = library[0]
    page = client.vector_stores.search(
        vector_store_id=vs.id,
        query="code and food",
        filters={
            "type": "and",
            "filters": [
                {"type": "in", "key": "topic", "value": ["code", "food", "pets"]},
                {"type": "gte", "key": "year", "value": 2023},
            ],
        },
    )
    assert {r.filename for r in page.data} == {"rust.txt", "bread.html"}
    one = client.vector_stores.search(vector_store_id=vs.id, query=["cat", "sofa"], max_num_results=1)
    assert len(one.data) == 1 and one.search_query == ["cat", "sofa"]
    strict = client.vector_stores.search(
        vector_store_id=vs.id,
        query="cat purrs",
        ranking_options={"score_threshold": 0.99},
        extra_body={"fleet_retrieval": "dense"},
    )
    assert all(r.score >= 0.99 for r in strict.data) and len(strict.data) < 4


def test_static_chunking_content_and_removal(served):
    _, client, _ = served
    text = " ".join(f"Paragraph {i} explains the rule number {i} of the handbook." for i in range(120))
    f = upload(client, "handbook.txt", text)
    vs = client.vector_stores.create(name="handbook")
    vf = client.vector_stores.files.create_and_poll(
        vector_store_id=vs.id,
        file_id=f.id,
        attributes={"kind": "manual"},
        poll_interval_ms=50,
        chunking_strategy={
            "type": "static",
            "static": {"max_chunk_size_tokens": 200, "chunk_overlap_tokens": 50},
        },
    )
    assert vf.status == "completed" and vf.chunking_strategy.static.max_chunk_size_tokens == 200
    chunks = client.vector_stores.files.content(f.id, vector_store_id=vs.id)
    assert len(chunks.data) > 5 and "Paragraph 0" in chunks.data[0].text
    updated = client.vector_stores.files.update(f.id, vector_store_id=vs.id, attributes={"kind": "guide"})
    assert updated.attributes == {"kind": "guide"}
    assert client.vector_stores.search(vector_store_id=vs.id, query="rule number 7").data
    deleted = client.vector_stores.files.delete(f.id, vector_store_id=vs.id)
    assert deleted.deleted and deleted.object == "vector_store.file.deleted"
    assert client.vector_stores.search(vector_store_id=vs.id, query="rule number 7").data == []
    assert client.vector_stores.retrieve(vs.id).file_counts.total == 0


def test_same_bytes_twice_are_embedded_once_and_deleted_files_stay_searchable(served):
    tc, client, _ = served
    kb = tc.app.state.gateway.knowledge
    body = "Volcanoes erupt when magma pressure exceeds the strength of the crust above it."
    first = upload(client, "volcano.txt", body)
    vs = client.vector_stores.create(name="geo", file_ids=[first.id])
    while client.vector_stores.retrieve(vs.id).status == "in_progress":
        time.sleep(0.05)
    before = kb.store.chunk_count()
    second = upload(client, "volcano-copy.txt", body)
    client.vector_stores.files.create_and_poll(vector_store_id=vs.id, file_id=second.id, poll_interval_ms=50)
    assert kb.store.chunk_count() == before  # same content: one document, no new chunks
    client.files.delete(first.id)  # OpenAI keeps the store's copy until the file is removed from the store
    hits = client.vector_stores.search(vector_store_id=vs.id, query="magma pressure").data
    assert {h.file_id for h in hits} == {first.id, second.id}


def test_store_lifecycle(served):
    _, client, _ = served
    vs = client.vector_stores.create(name="temp", expires_after={"anchor": "last_active_at", "days": 7})
    assert vs.object == "vector_store" and vs.expires_after.days == 7
    renamed = client.vector_stores.update(vs.id, name="renamed", metadata={"k": "v"})
    assert (renamed.name, renamed.metadata) == ("renamed", {"k": "v"})
    assert vs.id in [s.id for s in client.vector_stores.list(limit=100)]
    assert client.vector_stores.delete(vs.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.vector_stores.retrieve(vs.id)


def test_cancelling_a_batch_leaves_consistent_counts(served):
    _, client, _ = served
    files = [upload(client, f"c{i}.txt", f"cancel test document number {i} " * 40) for i in range(4)]
    vs = client.vector_stores.create(name="cancel")
    batch = client.vector_stores.file_batches.create(vector_store_id=vs.id, file_ids=[f.id for f in files])
    cancelled = client.vector_stores.file_batches.cancel(batch.id, vector_store_id=vs.id)
    counts = cancelled.file_counts
    assert counts.in_progress == 0 and counts.completed + counts.cancelled == counts.total == 4
    assert cancelled.status == ("cancelled" if counts.cancelled else "completed")


def test_a_restarted_gateway_finishes_what_was_left_in_progress(tmp_path):
    with TestClient(make_app(tmp_path)) as tc:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)
        f = upload(client, "left.txt", "Left in progress when the server died.")
        vs = client.vector_stores.create(name="restart")
        kb = tc.app.state.gateway.knowledge
        kb.ingestor.stop()  # the worker is gone: the attachment stays in_progress, as after a kill
        kb.store.attach(vs.id, kb.store.get_file(f.id), {}, Strategy())
        assert client.vector_stores.files.retrieve(f.id, vector_store_id=vs.id).status == "in_progress"
    with TestClient(make_app(tmp_path)) as tc:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)
        done = client.vector_stores.files.poll(f.id, vector_store_id=vs.id, poll_interval_ms=50)
        assert done.status == "completed"


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/vector_stores/vs_nope/search", {"query": "x"}, 404, "vector_store_id"),
        ("{vs}/search", {"query": "x", "max_num_results": 0}, 400, "max_num_results"),
        ("{vs}/search", {"query": "x", "max_num_results": 51}, 400, "max_num_results"),
        ("{vs}/search", {"query": ""}, 400, "query"),
        ("{vs}/search", {"query": ["ok", 3]}, 400, "query"),
        (
            "{vs}/search",
            {"query": "x", "filters": {"type": "and", "filters": [{"type": "gt", "key": "y"}]}},
            400,
            "filters.filters[0].value",
        ),
        (
            "{vs}/search",
            {"query": "x", "filters": {"type": "regex", "key": "y", "value": 1}},
            400,
            "filters.type",
        ),
        (
            "{vs}/search",
            {"query": "x", "ranking_options": {"score_threshold": 2}},
            400,
            "ranking_options.score_threshold",
        ),
        ("{vs}/search", {"query": "x", "fleet_retrieval": "magic"}, 400, "fleet_retrieval"),
        ("{vs}/search", {"query": "x", "fleet_alpha": 1.5}, 400, "fleet_alpha"),
        ("{vs}/search", {"query": "x", "surprise": 1}, 400, "surprise"),
        ("{vs}/files", {"file_id": "file-nope"}, 404, "file_id"),
        (
            "{vs}/files",
            {
                "file_id": "{file}",
                "chunking_strategy": {
                    "type": "static",
                    "static": {"max_chunk_size_tokens": 50, "chunk_overlap_tokens": 0},
                },
            },
            400,
            "chunking_strategy.static.max_chunk_size_tokens",
        ),
        ("{vs}/files", {"file_id": "{file}", "attributes": {"k": [1, 2]}}, 400, "attributes"),
        ("{vs}/file_batches", {"file_ids": []}, 400, "file_ids"),
        ("{vs}/file_batches", {"file_ids": ["file-nope"]}, 404, "file_id"),
        ("/v1/vector_stores", {"metadata": {"k": 1}}, 400, "metadata"),
        ("/v1/vector_stores", {"chunking_strategy": {"type": "nope"}}, 400, "chunking_strategy.type"),
    ],
)
def test_bad_requests_are_openai_errors(served, library, path, body, status, param):
    tc, _, _ = served
    vs, files, _, _ = library
    path = path.replace("{vs}", f"/v1/vector_stores/{vs.id}")
    if body.get("file_id") == "{file}":
        body = {**body, "file_id": files["cats.md"].id}
    r = tc.post(path, json=body)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.json()


def test_unknown_ids_and_bad_json(served, library):
    tc, _, _ = served
    vs = library[0]
    for path in [
        "/v1/vector_stores/vs_nope",
        f"/v1/vector_stores/{vs.id}/files/file-nope",
        f"/v1/vector_stores/{vs.id}/file_batches/vsfb_nope",
    ]:
        r = tc.get(path)
        assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = tc.post(
        f"/v1/vector_stores/{vs.id}/search",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert (
        tc.get(f"/v1/vector_stores/{vs.id}/files", params={"filter": "done"}).json()["error"]["param"]
        == "filter"
    )
