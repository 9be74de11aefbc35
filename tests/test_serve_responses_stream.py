import json
import time

import httpx
import pytest

from fleetlm.serve.backends import Delta
from responses_fakes import ScriptBackend, make_app, served_app

ADD = {"type": "function", "name": "add",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "required": ["a", "b"]}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses-stream")
    backend = ScriptBackend()
    tc, client, vs, files = served_app(root, backend)
    try:
        yield tc, client, backend, vs, files, root
    finally:
        tc.__exit__(None, None, None)


@pytest.fixture
def api(served):
    served[2].reset()
    return served


def say(backend, text=None, calls=()):
    backend.script.append({"text": text, "calls": list(calls)})


def raw_events(tc, body) -> list[tuple[str, dict]]:
    """The SSE stream as (event name, data) pairs, read without the SDK."""
    with tc.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        text = "".join(r.iter_text())
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_a_text_stream_in_openais_order_and_stored(api):
    tc, client, backend, *_ = api
    say(backend, "Tides follow the moon.")
    events = list(client.responses.create(model="house", input="Why tides?", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.model == "house"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response
    assert deltas == done.output_text == "Tides follow the moon. " and done.status == "completed"
    assert done.usage.input_tokens == 7 and done.model == "house"
    stored = client.responses.retrieve(done.id)
    assert stored.output_text == deltas and stored.output[0].id == done.output[0].id
    # a streamed response continues a chain like any other
    say(backend, "Yes.")
    client.responses.create(model="m", input="Sure?", previous_response_id=done.id)
    assert [m["role"] for m in backend.messages()] == ["user", "assistant", "user"]


def test_file_search_events_and_citations_without_raw_markers(api):
    _, client, backend, vs, files, _ = api
    say(backend, "The moon pulls the sea [1]. It rises [1, 2].")
    ask = dict(model="m", input="Why do tides rise?", include=["file_search_call.results"],
               tools=[{"type": "file_search", "vector_store_ids": [vs.id], "max_num_results": 1}])
    with client.responses.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2:7] == ["response.output_item.added", "response.file_search_call.in_progress",
                          "response.file_search_call.searching", "response.file_search_call.completed",
                          "response.output_item.done"]
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "[" not in deltas and deltas == final.output_text == "The moon pulls the sea. It rises. "
    added = [e.annotation for e in events if e.type == "response.output_text.annotation.added"]
    assert [(a["file_id"], a["index"]) if isinstance(a, dict) else (a.file_id, a.index) for a in added] == [
        (files["tides.txt"].id, 22), (files["tides.txt"].id, 32)]  # [2] names no source: dropped
    search, message = final.output
    assert search.results[0].filename == "tides.txt" and message.content[0].annotations[0].index == 22


def test_streamed_function_calls_send_their_arguments_as_they_come(api):
    _, client, backend, *_ = api
    say(backend, "Adding.", [("add", '{"a": 2, "b": 40}'), ("add", '{"a": 1, "b": 1}')])
    with client.responses.stream(model="m", input="2+40 and 1+1?", tools=[ADD]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [i.type for i in added] == ["message", "function_call", "function_call"]
    assert added[1].name == "add" and added[1].call_id == "call_0" and added[1].arguments == ""
    kinds = [e.type for e in events]
    # the message is done before the first call opens
    assert kinds.index("response.output_item.done") < kinds.index("response.function_call_arguments.delta")
    for k, args in enumerate(['{"a": 2, "b": 40}', '{"a": 1, "b": 1}']):
        pieces = [e.delta for e in events
                  if e.type == "response.function_call_arguments.delta" and e.output_index == k + 1]
        assert len(pieces) == 2 and "".join(pieces) == args
        (done,) = [e for e in events
                   if e.type == "response.function_call_arguments.done" and e.output_index == k + 1]
        assert done.arguments == args
    assert [(o.type, getattr(o, "arguments", None)) for o in final.output] == [
        ("message", None), ("function_call", '{"a": 2, "b": 40}'), ("function_call", '{"a": 1, "b": 1}')]
    assert all(o.status == "completed" for o in final.output)


def test_a_backend_failing_mid_stream_ends_in_response_failed(api):
    tc, client, backend, *_ = api
    say(backend, "one two three four five")
    backend.fail_after = 2
    events = raw_events(tc, {"model": "m", "input": "count"})
    name, last = events[-1]
    assert name == last["type"] == "response.failed"
    failed = last["response"]
    assert failed["status"] == "failed" and "connection dropped" in failed["error"]["message"]
    assert failed["error"]["code"] == "server_error" and failed["output"][0]["status"] == "incomplete"
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    assert client.responses.retrieve(failed["id"]).status == "failed"
    (row,) = [r for r in tc.app.state.gateway.store.requests() if r["status"] != 200]
    assert row["status"] == 502 and row["endpoint"] == "responses" and row["completion_tokens"] == 2


def test_a_bug_mid_stream_is_a_response_failed_too(tmp_path):
    from fastapi.testclient import TestClient

    class Broken(ScriptBackend):
        async def stream_chat(self, req):
            yield Delta(0, "half ")
            raise ValueError("a bug")

    with TestClient(make_app(tmp_path, Broken())) as tc:
        events = raw_events(tc, {"model": "m", "input": "x"})
        rows = tc.app.state.gateway.store.requests()
    assert events[-1][0] == "response.failed"
    assert events[-1][1]["response"]["error"]["message"] == "internal error: ValueError"
    assert [r["status"] for r in rows] == [500]


def test_a_client_that_leaves_stops_the_model(tmp_path):
    from fake_openai import serving

    backend = ScriptBackend()
    backend.endless = True
    app = make_app(tmp_path, backend)
    with serving(app, "gateway") as port:
        body = {"model": "m", "input": "go on forever", "stream": True}
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/responses", json=body, timeout=10) as r:
            for n, _ in enumerate(r.iter_lines()):
                if n > 20:
                    break
        left = time.monotonic()
        while backend.closed == 0 and time.monotonic() - left < 5:
            time.sleep(0.05)
        assert backend.closed == 1, "the backend's stream was not closed"
        store = app.state.gateway.store
        while not store.requests() and time.monotonic() - left < 5:
            time.sleep(0.05)
    (row,) = store.requests()
    assert row["status"] == 499 and row["error"] == "client went away" and row["completion_tokens"] > 0


def test_a_model_that_cannot_answer_at_all_is_a_json_error_not_a_stream(tmp_path):
    from fastapi.testclient import TestClient

    class Down(ScriptBackend):
        def stream_chat(self, req):
            from fleetlm.serve.errors import BackendError

            raise BackendError("m: refused", retryable=True)

    with TestClient(make_app(tmp_path, Down())) as tc:
        r = tc.post("/v1/responses", json={"model": "m", "input": "x", "stream": True})
    assert r.status_code == 503 and "refused" in r.json()["error"]["message"]
