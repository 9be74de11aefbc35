import pytest
from fastapi.testclient import TestClient

from fleetlm.config import parse_config
from fleetlm.errors import ConfigError
from fleetlm.serve.app import create_app
from fleetlm.serve.assistants import find_assistant
from fleetlm.serve.store import UsageStore
from recording_backend import RecordingBackend

WEATHER_TOOL = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
CONFIG = {
    "models": {"m": {"remote": "http://127.0.0.1:9/v1", "aliases": ["mini"]}},
    "assistants": {
        "forecaster": {"model": "mini", "instructions": "You forecast the weather.", "tools": [WEATHER_TOOL]},
    },
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("assistants")
    store = UsageStore(f"sqlite:///{root / 'fleet.db'}")
    backend = RecordingBackend("sunny", 3, 1)
    with TestClient(create_app(parse_config(CONFIG), store, {"m": backend})) as tc:
        yield tc, backend, store


def test_an_assistant_is_listed_as_a_model(served):
    tc, _, _ = served
    cards = {c["id"]: c["owned_by"] for c in tc.get("/v1/models").json()["data"]}
    assert cards["forecaster"] == "fleetlm-assistant" and cards["m"] == "fleetlm"
    assert tc.get("/v1/models/forecaster").json()["owned_by"] == "fleetlm-assistant"


def test_a_chat_with_an_assistant_gets_its_instructions_tools_and_model(served):
    tc, backend, store = served
    r = tc.post("/v1/chat/completions", json={
        "model": "forecaster",
        "messages": [{"role": "system", "content": "Answer in French."},
                     {"role": "user", "content": "Paris?"}],
    })
    assert r.status_code == 200, r.text
    assert r.headers["x-fleet-model"] == "m"
    sent = backend.requests[-1]
    assert [(m.role, m.content) for m in sent.messages[:2]] == [
        ("system", "You forecast the weather."), ("system", "Answer in French.")]
    assert [t.function.name for t in sent.tools] == ["weather"]
    row = store.requests()[-1]
    assert (row["model_requested"], row["model_used"]) == ("forecaster", "m")


def test_find_assistant():
    config = parse_config(CONFIG)
    assert find_assistant(config, "forecaster").instructions == "You forecast the weather."
    assert find_assistant(config, "m") is None


@pytest.mark.parametrize("assistant, message", [
    ({"m": {"model": "m"}}, "assistants.m: the name is already"),
    ({"mini": {"model": "m"}}, "assistants.mini: the name is already"),
    ({"a": {"model": "gpt-9"}}, "assistants.a.model: unknown model 'gpt-9'"),
    ({"a": {"model": "m", "tools": [{"type": "web_search"}]}}, "assistants.a.tools.0"),
    ({"a": {"model": "m", "temperature": 2}}, "assistants.a.temperature"),
])
def test_a_bad_assistant_is_a_config_error(assistant, message):
    with pytest.raises(ConfigError, match=message):
        parse_config({**CONFIG, "assistants": assistant})
