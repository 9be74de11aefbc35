import io

import openai
import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import Choice, Generation
from fleetlm.serve.store import UsageStore
from rag_fakes import bag_of_words


class EchoBackend:
    """Answers a scripted text and keeps the messages it was asked."""

    name = "m"

    def __init__(self):
        self.answer = "ok"
        self.asked: list[list[dict]] = []

    async def chat(self, request):
        self.asked.append([m.model_dump(exclude_none=True) for m in request.messages])
        return Generation([Choice(0, self.answer, "stop")], prompt_tokens=7, completion_tokens=2)

    async def aclose(self):
        pass


def make_app(root, backend):
    config = parse_config(
        {
            "models": {"m": {"remote": "http://127.0.0.1:9/v1"}},
            "knowledge": {"files_dir": str(root / "blobs")},
        }
    )
    app = create_app(config, UsageStore(f"sqlite:///{root / 'fleet.db'}"), {"m": backend})
    app.state.gateway.knowledge_embed = bag_of_words  # no MiniLM: the tests are about shapes
    return app


def connect(tc):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=tc, max_retries=0)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses")
    backend = EchoBackend()
    with TestClient(make_app(root, backend)) as tc:
        client = connect(tc)
        files = {}
        for name, text in {
            "cats.txt": "A cat purrs when it is content and sleeps on the sofa.",
            "tides.txt": "Tides rise and fall twice a day because of the moon.",
        }.items():
            files[name] = client.files.create(file=(name, io.BytesIO(text.encode())), purpose="assistants")
        vs = client.vector_stores.create(name="kb")
        client.vector_stores.file_batches.create_and_poll(
            vector_store_id=vs.id, file_ids=[f.id for f in files.values()], poll_interval_ms=50
        )
        yield tc, client, backend, vs, files, root


def test_string_input_and_instructions(served):
    _, client, backend, *_ = served
    backend.answer = "Hello there."
    r = client.responses.create(model="m", input="Say hi", instructions="Be brief.", metadata={"k": "v"})
    assert r.status == "completed" and r.output_text == "Hello there." and r.metadata == {"k": "v"}
    assert r.usage.input_tokens == 7 and r.usage.output_tokens == 2 and r.usage.total_tokens == 9
    assert backend.asked[-1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi"},
    ]


def test_items_input_with_parts_and_roles(served):
    _, client, backend, *_ = served
    client.responses.create(
        model="m",
        input=[
            {"role": "developer", "content": "rules"},
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
            },
        ],
    )
    assert backend.asked[-1] == [{"role": "system", "content": "rules"}, {"role": "user", "content": "ab"}]


def test_file_search_cites_the_marked_file_and_includes_results(served):
    _, client, backend, vs, files, _ = served
    backend.answer = "The moon pulls the sea [1]."
    r = client.responses.create(
        model="m",
        input="Why do tides rise?",
        include=["file_search_call.results"],
        tools=[{"type": "file_search", "vector_store_ids": [vs.id], "max_num_results": 2}],
    )
    call, message = r.output
    assert call.type == "file_search_call" and call.queries == ["Why do tides rise?"]
    assert call.results[0].filename == "tides.txt" and call.results[0].file_id == files["tides.txt"].id
    assert "[1] (tides.txt)" in backend.asked[-1][0]["content"]
    text = message.content[0]
    assert text.text == "The moon pulls the sea." and r.output_text == "The moon pulls the sea."
    assert [(a.type, a.file_id, a.filename, a.index) for a in text.annotations] == [
        ("file_citation", files["tides.txt"].id, "tides.txt", 22)
    ]
    plain = client.responses.create(
        model="m", input="Why do tides rise?", tools=[{"type": "file_search", "vector_store_ids": [vs.id]}]
    )
    assert plain.output[0].results is None


def test_chain_survives_a_restart_and_get_delete(served):
    tc, client, backend, _, _, root = served
    backend.answer = "Blue."
    first = client.responses.create(model="m", input="Favourite colour?")
    assert client.responses.retrieve(first.id).output_text == "Blue."
    assert [i.content[0].text for i in client.responses.input_items.list(first.id).data] == [
        "Favourite colour?"
    ]
    other = EchoBackend()
    with TestClient(make_app(root, other)) as tc2:
        again = connect(tc2).responses.create(model="m", input="Why?", previous_response_id=first.id)
    assert again.previous_response_id == first.id
    assert other.asked[-1] == [
        {"role": "user", "content": "Favourite colour?"},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Why?"},
    ]
    assert client.responses.delete(first.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    unstored = client.responses.create(model="m", input="x", store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "m", "input": ""}, 400, "input"),
        ({"model": "m", "input": []}, 400, "input"),
        ({"model": "m"}, 400, "input"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
        (
            {"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]},
            400,
            "input[0].type",
        ),
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"model": "m", "input": "x", "tools": [{"type": "file_search"}]}, 400, "tools[0].vector_store_ids"),
        (
            {
                "model": "m",
                "input": "x",
                "tools": [
                    {"type": "file_search", "vector_store_ids": ["vs_x"], "filters": {"type": "bogus"}}
                ],
            },
            400,
            "tools[0].filters",
        ),
        (
            {"model": "m", "input": "x", "tools": [{"type": "file_search", "vector_store_ids": ["vs_none"]}]},
            404,
            "tools.vector_store_ids[0]",
        ),
        ({"model": "m", "input": "x", "previous_response_id": "resp_none"}, 404, "previous_response_id"),
        ({"model": "m", "input": "x", "include": ["reasoning"]}, 400, "include[0]"),
        ({"model": "m", "input": "x", "stream": True}, 400, "stream"),
    ],
)
def test_bad_requests_are_openai_errors(served, body, status, param):
    tc = served[0]
    r = tc.post("/v1/responses", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_unknown_ids_and_bad_json(served):
    tc = served[0]
    assert tc.get("/v1/responses/resp_none").status_code == 404
    assert tc.delete("/v1/responses/resp_none").json()["error"]["param"] == "response_id"
    assert tc.post("/v1/responses", content=b"{not json").status_code == 400


def test_a_real_small_model_cites_the_file_that_answers(tmp_path, smollm2_gguf):
    """SmolLM2-135M through llama.cpp, a two-file store: the citation points at the tides file."""
    pytest.importorskip("llama_cpp")
    from fleetlm.serve.backends import build_backends

    config = parse_config(
        {
            "models": {"smol": {"gguf": str(smollm2_gguf), "engine": "llama_cpp"}},
            "knowledge": {"files_dir": str(tmp_path / "blobs")},
        }
    )
    app = create_app(config, UsageStore(f"sqlite:///{tmp_path / 'fleet.db'}"), build_backends(config))
    app.state.gateway.knowledge_embed = bag_of_words
    with TestClient(app) as tc:
        client = connect(tc)
        texts = {
            "cats.txt": "A cat purrs when it is content and sleeps on the sofa all afternoon.",
            "tides.txt": "Tides rise and fall twice a day because the moon pulls the oceans.",
        }
        ids = {
            n: client.files.create(file=(n, io.BytesIO(t.encode())), purpose="assistants").id
            for n, t in texts.items()
        }
        vs = client.vector_stores.create(name="kb")
        client.vector_stores.file_batches.create_and_poll(
            vector_store_id=vs.id, file_ids=list(ids.values()), poll_interval_ms=50
        )
        r = client.responses.create(
            model="smol",
            input="Why do tides rise and fall?",
            max_output_tokens=40,
            temperature=0,
            tools=[{"type": "file_search", "vector_store_ids": [vs.id]}],
        )
    annotations = r.output[1].content[0].annotations
    assert r.output_text and annotations, r.output_text
    assert annotations[0].file_id == ids["tides.txt"] and annotations[0].filename == "tides.txt"
