"""/v1/responses chains past the answering model's context are compacted (serve/conversation_memory.py), not
refused: a fact planted in the chain's first response is still in front of the model three contexts later."""

import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.memory.compact import SUMMARY_PREFIX
from fleetlm.serve.app import create_app
from fleetlm.serve.conversation_memory import _estimate
from fleetlm.serve.store import UsageStore
from responses_fakes import ScriptBackend, connect

CONTEXT = 600


@pytest.fixture
def client(tmp_path):
    config = parse_config({
        "models": {"m": {"remote": "http://127.0.0.1:9/v1", "max_context": CONTEXT,
                         "price": {"input": 1.0, "output": 2.0}},
                   "s": {"remote": "http://127.0.0.1:9/v1", "max_context": 4096,
                         "price": {"input": 0.1, "output": 0.2}}},
        "knowledge": {"files_dir": str(tmp_path / "blobs")},
        "memory": {"reserve_tokens": 64},
    })
    backend, summariser = ScriptBackend(), ScriptBackend()
    summariser.name = "s"
    backends = {"m": backend, "s": summariser}
    with TestClient(create_app(config, UsageStore(f"sqlite:///{tmp_path / 'fleet.db'}"), backends)) as tc:
        yield connect(tc), backend, tc, summariser


def filler(turns: int) -> list[dict]:
    items = []
    for n in range(turns):
        question = f"Filler question {n} about the weather, clouds and rain today?"
        answer = (f"Filler answer {n}: it may rain later, so bring an umbrella and a warm coat, and check "
                  "the forecast again at noon.")
        items += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return items


def test_a_chain_past_three_contexts_is_compacted_and_keeps_the_planted_fact(client):
    api, backend, tc, summariser = client
    backend.script.append({"text": "Noted."})
    first = api.responses.create(model="m", input="Please remember: Ingrid's locker code is 4471.",
                                 instructions="You are a helpful assistant.")
    items = [*filler(40), {"role": "user", "content": "What is Ingrid's locker code?"}]
    whole = [m for it in items for m in [{"role": it["role"], "content": it["content"]}]]
    assert _estimate(whole) > 3 * CONTEXT
    backend.requests.clear()
    r = api.responses.create(model="m", input=items, previous_response_id=first.id, max_output_tokens=32)
    assert r.status == "completed"
    answered = backend.messages()
    assert len(backend.requests) == 1 and summariser.requests  # the cheaper model wrote the summary
    assert _estimate(answered) <= CONTEXT and answered[-1]["content"] == "What is Ingrid's locker code?"
    text = "\n".join(m["content"] for m in answered)
    assert "4471" in text and SUMMARY_PREFIX in text
    row = tc.app.state.gateway.store.requests()[-1]
    assert row["endpoint"] == "responses" and row["status"] == 200
    answer_cost = (7 * 1.0 + 2 * 2.0) / 1e6
    summaries_cost = len(summariser.requests) * (7 * 0.1 + 2 * 0.2) / 1e6
    assert row["cost_usd"] == pytest.approx(answer_cost + summaries_cost)


def test_a_conversation_with_tool_calls_passes_as_it_is(client):
    api, backend, _, _ = client
    items = [*filler(3), {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
             {"type": "function_call_output", "call_id": "c1", "output": "done"}]
    api.responses.create(model="m", input=items,
                         tools=[{"type": "function", "name": "f", "parameters": {"type": "object"}}])
    assert len(backend.requests) == 1 and len(backend.messages()) == len(items) - 1  # call joins its message


def test_a_newest_turn_that_cannot_fit_is_context_length_exceeded(client):
    _, _, tc, _ = client
    r = tc.post("/v1/responses", json={"model": "m", "input": "word " * 3000})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "input"
