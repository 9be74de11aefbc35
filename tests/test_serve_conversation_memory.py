"""serve/conversation_memory over recording backends: compaction instead of failure, the cheapest summariser,
an archive that survives a new gateway, context_length_exceeded only when the newest turn cannot fit."""

from __future__ import annotations

import asyncio

import pytest

from fleetlm.config import parse_config
from fleetlm.errors import ConfigError
from fleetlm.memory.compact import RECALL_PREFIX, SUMMARY_PREFIX
from fleetlm.serve.app import _Call, create_app
from fleetlm.serve.conversation_memory import (
    SUMMARY_INSTRUCTION,
    ContextLengthExceeded,
    _estimate,
    archive_path,
    fit_conversation,
    fit_conversation_report,
    token_counter,
)
from fleetlm.serve.errors import BackendError
from fleetlm.serve.store import UsageStore
from recording_backend import RecordingBackend

BIG_CONTEXT, SMALL_CONTEXT, RESERVE = 600, 4096, 64
SUMMARY = "The user keeps notes about lockers and likes rainy weather."


def make_gateway(root, backends=None, **memory):
    config = parse_config(
        {
            "models": {
                "big": {
                    "remote": "http://127.0.0.1:9/v1",
                    "max_context": BIG_CONTEXT,
                    "price": {"input": 5.0, "output": 15.0},
                },
                "small": {
                    "remote": "http://127.0.0.1:9/v1",
                    "max_context": SMALL_CONTEXT,
                    "price": {"input": 0.1, "output": 0.2},
                },
            },
            "router": {"name": "auto", "kind": "cheapest", "models": ["small", "big"]},
            "assistants": {"helper": {"model": "small", "instructions": "Be kind."}},
            "knowledge": {"files_dir": str(root / "blobs")},
            "memory": {"reserve_tokens": RESERVE, **memory},
        }
    )
    if backends is None:
        backends = {"big": RecordingBackend("big answer", 10, 2), "small": RecordingBackend(SUMMARY, 300, 20)}
    for name, b in backends.items():
        b.name = name
    app = create_app(config, UsageStore(f"sqlite:///{root / 'fleet.db'}"), backends)
    app.state.gateway.app = app  # for the tests that go through HTTP
    return app.state.gateway, backends


def long_conversation(tokens: int) -> list[dict]:
    msgs = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Please remember: Ingrid's locker code is 4471."},
        {"role": "assistant", "content": "Noted."},
    ]
    n = 0
    while _estimate(msgs) < tokens:
        msgs += [
            {"role": "user", "content": f"Filler question {n} about the weather, clouds and rain today?"},
            {
                "role": "assistant",
                "content": f"Filler answer {n}: it may rain later, so bring an umbrella "
                "and a warm coat, and check the forecast again at noon.",
            },
        ]
        n += 1
    return msgs + [{"role": "user", "content": "What is Ingrid's locker code?"}]


def fit(gw, model, msgs, conv=None, **kw):
    return asyncio.run(fit_conversation_report(gw, model, msgs, conv, **kw))


def text(messages: list[dict]) -> str:
    return "\n".join(m["content"] for m in messages)


def test_far_past_the_context_compacts_with_the_cheapest_summariser(tmp_path):
    gw, backends = make_gateway(tmp_path)
    msgs = long_conversation(3 * BIG_CONTEXT)
    assert _estimate(msgs) > 3 * BIG_CONTEXT
    call = _Call("responses")
    fitted, report = fit(gw, "big", msgs, call=call)
    assert report.compacted and report.context_tokens == BIG_CONTEXT
    assert _estimate(fitted) <= BIG_CONTEXT - RESERVE
    assert fitted[0] == msgs[0] and fitted[-1] == msgs[-1] and len(fitted) < len(msgs)
    assert SUMMARY_PREFIX + SUMMARY in text(fitted)
    assert RECALL_PREFIX in text(fitted) and "4471" in text(fitted)  # recalled from the archive
    # the summary came from the cheap model; the answering model was not asked anything
    assert report.summariser == "small" and report.summary_calls >= 1 and backends["big"].requests == []
    asked = backends["small"].requests[0]
    assert asked.messages[0].content == SUMMARY_INSTRUCTION and "4471" in asked.messages[1].content
    assert asked.max_tokens is not None and asked.temperature == 0
    expected = report.summary_calls * (300 * 0.1 + 20 * 0.2) / 1e6
    assert call.extra_cost == pytest.approx(expected) and report.cost_usd == pytest.approx(expected)


def test_archive_and_summary_survive_a_new_gateway(tmp_path):
    gw, backends = make_gateway(tmp_path)
    msgs = long_conversation(3 * BIG_CONTEXT)
    first, report = fit(gw, "big", msgs, "conv-1")
    assert report.summary_calls >= 1
    gw.memory_archive.close()
    assert archive_path(gw).is_file() and archive_path(gw).name == "fleet-memory.db"

    gw2, backends2 = make_gateway(tmp_path)
    again, report2 = fit(gw2, "big", msgs, "conv-1")
    assert report2.summary_calls == 0 and backends2["small"].requests == []  # summarised once, kept
    assert again == first and "4471" in text(again)
    # the conversation goes on: only the newly evicted turns are summarised, on top of the stored summary
    longer = msgs + [{"role": "assistant", "content": "It is 4471."}] + long_conversation(BIG_CONTEXT)[3:]
    _, report3 = fit(gw2, "big", longer, "conv-1")
    assert report3.summary_calls >= 1
    assert SUMMARY in backends2["small"].requests[0].messages[1].content


def test_a_summariser_call_without_a_request_is_logged_as_memory(tmp_path):
    gw, _ = make_gateway(tmp_path)
    _, report = fit(gw, "big", long_conversation(3 * BIG_CONTEXT))
    rows = [r for r in gw.store.requests() if r["endpoint"] == "memory"]
    assert len(rows) == 1 and rows[0]["model_used"] == "small"
    assert rows[0]["prompt_tokens"] == report.prompt_tokens and rows[0]["cost_usd"] == pytest.approx(
        report.cost_usd
    )


def test_context_is_the_smallest_the_request_may_reach(tmp_path):
    gw, _ = make_gateway(tmp_path)
    short = [{"role": "user", "content": "hi"}]
    assert fit(gw, "auto", short)[1].context_tokens == BIG_CONTEXT  # the router may pick big
    assert fit(gw, "small", short)[1].context_tokens == SMALL_CONTEXT
    assert fit(gw, "helper", short)[1].context_tokens == SMALL_CONTEXT  # the assistant's model
    fitted, report = fit(gw, "small", short)
    assert fitted is short and not report.compacted
    assert fit(gw, "no-such-model", short)[1].context_tokens is None  # resolve answers the 404 later


def test_only_a_newest_turn_that_cannot_fit_is_an_error(tmp_path):
    gw, _ = make_gateway(tmp_path)
    huge = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "word " * 2000}]
    with pytest.raises(ContextLengthExceeded) as err:
        fit(gw, "big", huge, param="input")
    assert err.value.status == 400
    body = err.value.body()["error"]
    assert body["code"] == "context_length_exceeded" and body["param"] == "input"
    assert str(BIG_CONTEXT) in body["message"]
    with pytest.raises(ContextLengthExceeded):  # an answer as long as the context leaves no room at all
        fit(gw, "big", [{"role": "user", "content": "hi"}], reserve_tokens=BIG_CONTEXT)


def test_a_failing_summariser_leaves_an_extractive_summary(tmp_path):
    class Broken(RecordingBackend):
        async def chat(self, req):
            raise BackendError("down", retryable=False)

    backends = {"big": RecordingBackend("x", 1, 1), "small": Broken("", 0, 0)}
    gw, _ = make_gateway(tmp_path, backends)
    fitted, report = fit(gw, "big", long_conversation(3 * BIG_CONTEXT))
    assert report.errors and report.summary_calls == 0
    assert "Ingrid's locker code is 4471" in text(fitted) and _estimate(fitted) <= BIG_CONTEXT - RESERVE


def test_settings_turn_it_off_and_name_the_summariser(tmp_path):
    gw, backends = make_gateway(tmp_path, enabled=False)
    msgs = long_conversation(3 * BIG_CONTEXT)
    assert asyncio.run(fit_conversation(gw, "big", msgs, None)) is msgs
    (tmp_path / "b").mkdir()
    gw, backends = make_gateway(tmp_path / "b", summarizer="big")
    _, report = fit(gw, "big", msgs)
    assert report.summariser == "big" and backends["big"].requests and not backends["small"].requests
    with pytest.raises(ConfigError, match="memory.summarizer"):
        parse_config({"models": {"m": {"remote": "http://h/v1"}}, "memory": {"summarizer": "nope"}})


def test_counts_use_the_models_own_tokenizer_and_template(tmp_path):
    class CharTokenizer:
        def apply_chat_template(self, messages, add_generation_prompt=True):
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

        def encode(self, text, add_special_tokens=True):
            return list(text)

    gw, backends = make_gateway(tmp_path)
    backends["big"].tokenizer = CharTokenizer()
    msgs = [{"role": "user", "content": "abc"}]
    assert token_counter(gw, "big")(msgs) == len("<user>abc<assistant>")
    assert token_counter(gw, "small")(msgs) == _estimate(msgs)  # no tokenizer held: the estimate


def test_prepare_chat_compacts_plain_conversations_only(tmp_path):
    from fleetlm.serve.conversation_memory import prepare_chat
    from fleetlm.serve.protocol import ChatCompletionRequest

    gw, _ = make_gateway(tmp_path)
    msgs = long_conversation(3 * BIG_CONTEXT)
    req = ChatCompletionRequest.model_validate({"model": "big", "messages": msgs, "max_tokens": 32})
    out = asyncio.run(prepare_chat(gw, req, _Call("chat")))
    assert len(out.messages) < len(msgs) and out.messages[-1].content == msgs[-1]["content"]
    assert out.max_tokens == 32 and "4471" in "\n".join(m.text() for m in out.messages)
    short = req.model_copy(update={"messages": req.messages[-1:]})
    assert asyncio.run(prepare_chat(gw, short, _Call("chat"))) is short
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}] + msgs[1:]
    with_parts = ChatCompletionRequest.model_validate({"model": "big", "messages": parts})
    assert asyncio.run(prepare_chat(gw, with_parts, _Call("chat"))) is with_parts  # left to the backend


def test_responses_api_compacts_a_long_input_and_answers_400_past_it(tmp_path):
    import inspect

    from fastapi.testclient import TestClient

    from fleetlm.serve import responses_api

    if "fit_conversation" not in inspect.getsource(responses_api):
        pytest.skip("serve/responses_api.py does not call fit_conversation yet")
    gw, backends = make_gateway(tmp_path)
    msgs = long_conversation(3 * BIG_CONTEXT)
    items = [{"type": "message", "role": m["role"], "content": m["content"]} for m in msgs[1:]]
    with TestClient(gw.app) as tc:
        r = tc.post(
            "/v1/responses", json={"model": "big", "input": items, "instructions": msgs[0]["content"]}
        )
        assert r.status_code == 200, r.text
        sent = [m.model_dump(exclude_none=True) for m in backends["big"].requests[-1].messages]
        assert len(sent) < len(msgs) and sent[-1]["content"] == msgs[-1]["content"]
        assert "4471" in text(sent) and backends["small"].requests  # recalled; summarised by the cheap model
        huge = [{"type": "message", "role": "user", "content": "word " * 3000}]
        r = tc.post("/v1/responses", json={"model": "big", "input": huge})
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert r.json()["error"]["param"] == "input"


def test_every_summariser_call_fits_its_context_with_the_summary_it_hands_on(tmp_path):
    long_summary = "Ingrid's locker code is 4471 and the user talked about rain. " * 12  # ~170 tokens
    backends = {"big": RecordingBackend("x", 1, 1), "small": RecordingBackend(long_summary, 900, 200)}
    gw, _ = make_gateway(tmp_path, backends)
    gw.config.models["small"].max_context = 1024  # the smallest a summariser may have: several calls
    _, report = fit(gw, "big", long_conversation(6 * BIG_CONTEXT))
    assert report.summary_calls >= 3 and not report.errors
    for req in backends["small"].requests:
        sent = [m.model_dump(exclude_none=True) for m in req.messages]
        assert _estimate(sent) + req.max_tokens <= 1024
