"""MCP tools in /v1/responses: a real echo MCP server over stdio (fleet.yaml's mcp_servers), a scripted model.
The gateway runs the model's calls of the server's tools (serve/mcp_tools.py) and the response shows them as
OpenAI's `mcp_list_tools` and `mcp_call` items, whole and streamed; the server is stopped with the gateway."""

import json

import pytest
from fastapi.testclient import TestClient

from mcp_fixtures import descendants, echo_spec, wait_no_descendants
from responses_fakes import ScriptBackend, connect, make_app

ECHO = {"type": "mcp", "server_label": "echo", "require_approval": "never", "allowed_tools": ["add", "fail"]}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    before = descendants()
    backend = ScriptBackend()
    app = make_app(tmp_path_factory.mktemp("responses-mcp"), backend, mcp_servers={"echo": echo_spec()})
    with TestClient(app) as tc:
        yield tc, connect(tc), backend
    assert wait_no_descendants(before, 15) == set()  # the gateway's shutdown stopped the server


@pytest.fixture
def api(served):
    served[2].reset()
    return served


def plan(backend, *calls):
    backend.script += [{"calls": list(calls)}, {"text": "It is 5."}]


def test_the_gateway_runs_the_mcp_calls_and_shows_them_as_items(api):
    tc, client, backend = api
    plan(backend, ("echo__add", '{"a": 2, "b": 3}'), ("echo__fail", "{}"))
    r = client.responses.create(model="m", input="2+3?", tools=[ECHO])
    assert [o.type for o in r.output] == ["mcp_list_tools", "mcp_call", "mcp_call", "message"]
    listing, added, failed, message = r.output
    assert listing.server_label == "echo" and sorted(t.name for t in listing.tools) == ["add", "fail"]
    assert (added.name, added.server_label, added.output, added.error) == ("add", "echo", "5", None)
    assert failed.name == "fail" and "always fails" in failed.error and failed.output is None
    assert message.content[0].text == "It is 5." and r.usage.input_tokens == 14  # both rounds counted
    sent = backend.messages()  # the second round: the calls and their results, as the chat path sends them
    assert sent[-2]["role"] == "tool" and sent[-2]["content"] == "5" and "always fails" in sent[-1]["content"]
    assert [t.function.name for t in backend.requests[0].tools] == ["echo__add", "echo__fail"]
    # the next turn of the chain sees the calls that ran
    client.responses.create(model="m", input="And doubled?", previous_response_id=r.id, tools=[ECHO])
    history = backend.messages()
    assert history[1]["tool_calls"][0]["function"] == {"name": "echo__add", "arguments": '{"a": 2, "b": 3}'}
    assert history[2] == {"role": "tool", "content": "5", "tool_call_id": added.id}


def test_a_streamed_answer_after_mcp_calls(api):
    _, client, backend = api
    plan(backend, ("echo__add", '{"a": 2, "b": 3}'))
    with client.responses.stream(model="m", input="2+3?", tools=[ECHO]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[2:9] == ["response.output_item.added", "response.mcp_list_tools.in_progress",
                          "response.mcp_list_tools.completed", "response.output_item.done",
                          "response.output_item.added", "response.mcp_call.in_progress",
                          "response.mcp_call_arguments.done"]
    assert kinds[9:11] == ["response.mcp_call.completed", "response.output_item.done"]
    assert [o.type for o in final.output] == ["mcp_list_tools", "mcp_call", "message"]
    assert final.output[1].output == "5" and final.output_text == "It is 5. "


@pytest.mark.parametrize("tool, param", [
    ({"type": "mcp", "server_label": "nowhere"}, "tools"),
    ({"type": "mcp", "server_label": "echo", "server_url": "http://evil"}, "tools[0].server_url"),
    ({"type": "mcp", "server_label": "echo", "require_approval": "always"}, "tools[0].require_approval"),
    ({"type": "mcp"}, "tools[0].server_label"),
])
def test_bad_mcp_tools_are_400s(api, tool, param):
    tc, _, _ = api
    for stream in (False, True):
        r = tc.post("/v1/responses", json={"model": "m", "input": "x", "tools": [tool], "stream": stream})
        assert r.status_code == 400, r.text
        assert json.loads(r.text)["error"]["param"] == param
