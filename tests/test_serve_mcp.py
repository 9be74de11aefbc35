"""MCP tools in the gateway (serve/mcp_tools.py): a real echo MCP server over stdio, a scripted upstream
model.

One gateway for the module (fleet.yaml: the scripted model as a remote model, the echo server, and a server
that exits at start), served by uvicorn so that its shutdown stops the MCP servers; no process is left.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx
import openai
import pytest

from fake_openai import UpstreamServer, serving
from fleetlm.config import parse_config
from fleetlm.model import SHIPPED_TINY_MODEL
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import build_backends
from fleetlm.serve.errors import BadRequest
from fleetlm.serve.mcp_tools import MAX_ROUNDS
from fleetlm.serve.protocol import ChatCompletionRequest, McpServerTool, Tool, parse_request
from fleetlm.serve.store import UsageStore
from mcp_fixtures import descendants, echo_spec, wait_no_descendants

PRICE = {"input": 1000.0, "output": 3000.0}  # $ per 1M tokens: a word costs a visible amount
ECHO = {"type": "mcp", "server_label": "echo", "require_approval": "never"}
QUESTION = [{"role": "user", "content": "What is 2 plus 3?"}]
LOOKUP = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}}


def test_tools_entries_are_told_apart_by_type_and_a_bad_function_keeps_its_param():
    body = {"model": "m", "messages": QUESTION, "tools": [LOOKUP, {**ECHO, "allowed_tools": ["add"]}]}
    req = parse_request(ChatCompletionRequest, json.dumps(body).encode())
    assert [type(t) for t in req.tools] == [Tool, McpServerTool] and req.tools[1].allowed_tools == ["add"]
    bad = {**body, "tools": [{"type": "function", "function": {"description": "no name"}}]}
    with pytest.raises(BadRequest) as exc:
        parse_request(ChatCompletionRequest, json.dumps(bad).encode())
    assert exc.value.param == "tools.0.function.name"


@dataclass
class Gateway:
    http: httpx.Client
    openai: openai.OpenAI
    upstream: object
    store: UsageStore
    steps: list  # what the scripted model answered, round by round


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    before = descendants()
    tmp = tmp_path_factory.mktemp("mcp")
    with UpstreamServer() as upstream:
        cfg = parse_config({
            "models": {
                "planner": {"remote": upstream.base_url, "remote_model": "scripted", "price": PRICE},
                "plain": {"remote": upstream.base_url, "remote_model": "m"},
                "tiny": {"path": str(SHIPPED_TINY_MODEL), "dtype": "f32"},  # a local model (our engine)
            },
            "mcp_servers": {"echo": echo_spec(), "broken": echo_spec("exit")},
            "require_api_key": False,  # a key with a budget is used when given (one test), never required
        })
        store = UsageStore(f"sqlite:///{tmp / 'usage.db'}")
        app = create_app(cfg, store, build_backends(cfg))
        with serving(app, "gateway") as port:
            base = f"http://127.0.0.1:{port}/v1"
            with httpx.Client(base_url=base, timeout=60) as http:
                client = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=60)
                yield Gateway(http, client, upstream, store, [])
    # the gateway's shutdown stops the MCP servers it started
    assert wait_no_descendants(before, 15) == set()


def script(gw: Gateway, plan) -> None:
    """The scripted model answers plan(messages); each answer is kept in gw.steps."""
    gw.steps.clear()
    gw.upstream.payloads.clear()

    def step(messages):
        answer = plan(messages)
        gw.steps.append(answer)
        return answer

    gw.upstream.script = step


def add_then_answer(messages):
    """Calls echo__add once, then answers with what the tool said (or what it reported)."""
    if messages[-1]["role"] == "tool":
        return {"content": f"The answer is {messages[-1]['content']}."}
    return {"tool_calls": [{"name": "echo__add", "arguments": {"a": 2, "b": 3}}]}


def words(text) -> int:
    return len((text or "").split())


def upstream_usage(gw: Gateway) -> tuple[int, int]:
    """What the fake upstream counted over the rounds: words of the messages in, words of the answers out."""
    prompt = sum(words(m.get("content")) for p in gw.upstream.payloads for m in p["messages"])
    completion = sum(words(s.get("content")) + sum(words(json.dumps(c["arguments"]))
                                                  for c in s.get("tool_calls") or [])
                     for s in gw.steps)
    return prompt, completion


def chat(gw: Gateway, *, tools=(ECHO,), **body) -> httpx.Response:
    body = {"model": "planner", "messages": QUESTION, "tools": list(tools), **body}
    return gw.http.post("/chat/completions", json=body)


def rows(gw: Gateway, request_id: str) -> list[dict]:
    return [r for r in gw.store.requests() if r["request_id"] == request_id]


def test_the_model_calls_an_mcp_tool_and_answers_with_its_result(gw):
    script(gw, add_then_answer)
    r = chat(gw)
    assert r.status_code == 200, r.text
    body = r.json()
    message = body["choices"][0]["message"]
    assert message["content"] == "The answer is 5." and body["choices"][0]["finish_reason"] == "stop"
    assert "tool_calls" not in message
    assert message["fleet_mcp_calls"] == [
        {"name": "echo__add", "arguments": '{"a": 2, "b": 3}', "output": "5"}]
    assert r.headers["x-fleet-mcp-calls"] == "1"
    assert "mcp: 1 call in 1 round" in r.headers["x-fleet-route"]
    # usage and cost are the sums over both rounds
    prompt, completion = upstream_usage(gw)
    assert len(gw.upstream.payloads) == 2 and prompt > 0 and completion > 0
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    cost = float(r.headers["x-fleet-cost-usd"])
    assert cost == pytest.approx((prompt * PRICE["input"] + completion * PRICE["output"]) / 1e6)
    # each round is a row of the usage log under the request's id
    logged = rows(gw, r.headers["x-request-id"])
    assert [x["status"] for x in logged] == [200, 200]
    assert "mcp round 1" in logged[0]["route_reason"] and "mcp: 1 call" in logged[1]["route_reason"]
    assert sum(x["prompt_tokens"] for x in logged) == prompt
    assert sum(x["cost_usd"] for x in logged) == pytest.approx(cost)
    # upstream: the server's tools as function tools, then the call and its result in OpenAI's shape
    first, second = gw.upstream.payloads
    names = [t["function"]["name"] for t in first["tools"]]
    assert "echo__add" in names and all(t["type"] == "function" for t in first["tools"])
    add = next(t for t in first["tools"] if t["function"]["name"] == "echo__add")["function"]
    assert add["parameters"]["properties"].keys() == {"a", "b"}
    assert "tool_choice" not in first and first["tools"] == second["tools"]
    call_id = gw.upstream.payloads[1]["messages"][1]["tool_calls"][0]["id"]
    assert call_id.startswith("call_")  # the upstream's own id, kept
    assert second["messages"] == [
        *QUESTION,
        {"role": "assistant", "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": "echo__add", "arguments": '{"a": 2, "b": 3}'}}]},
        {"role": "tool", "content": "5", "tool_call_id": call_id},
    ]


def test_the_openai_client_gets_the_answer_and_the_calls(gw):
    script(gw, add_then_answer)
    create = gw.openai.chat.completions.with_raw_response.create
    raw = create(model="planner", messages=QUESTION, tools=[ECHO])
    done = raw.parse()
    assert done.choices[0].message.content == "The answer is 5."
    assert done.choices[0].message.model_extra["fleet_mcp_calls"][0]["output"] == "5"
    assert raw.headers["x-fleet-mcp-calls"] == "1"


def test_streamed_the_tool_round_is_hidden_and_the_answer_streams(gw):
    script(gw, add_then_answer)
    body = {"model": "planner", "messages": QUESTION, "tools": [ECHO], "stream": True,
            "stream_options": {"include_usage": True}}
    with gw.http.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["x-fleet-mcp-calls"] == "1"
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "The answer is 5."
    assert not any(d.get("tool_calls") for d in deltas)  # the round of MCP calls never reaches the client
    assert len(deltas) > 2  # the answer came in pieces, as the upstream streamed it
    assert deltas[0]["fleet_mcp_calls"] == [{"name": "echo__add", "arguments": '{"a": 2, "b": 3}',
                                             "output": "5"}]
    prompt, completion = upstream_usage(gw)
    assert chunks[-1]["usage"] == {"prompt_tokens": prompt, "completion_tokens": completion,
                                   "total_tokens": prompt + completion}
    assert [p["stream"] for p in gw.upstream.payloads] == [True, True]
    assert len(rows(gw, r.headers["x-request-id"])) == 2


def test_a_tool_error_reaches_the_model_as_the_tool_result(gw):
    def plan(messages):
        if messages[-1]["role"] == "tool":
            return {"content": f"It said: {messages[-1]['content']}"}
        return {"tool_calls": [{"name": "echo__fail", "arguments": {}},
                               {"name": "echo__add", "arguments": {"a": "two", "b": 3}}]}

    script(gw, plan)
    r = chat(gw)
    assert r.status_code == 200, r.text
    ran = r.json()["choices"][0]["message"]["fleet_mcp_calls"]
    assert [c["name"] for c in ran] == ["echo__fail", "echo__add"] and r.headers["x-fleet-mcp-calls"] == "2"
    assert "this tool always fails" in ran[0]["error"] and "output" not in ran[0]
    assert "do not match its schema" in ran[1]["error"]  # checked before sending
    results = [m for m in gw.upstream.payloads[-1]["messages"] if m["role"] == "tool"]
    assert [m["content"].startswith("error: ") for m in results] == [True, True]
    assert "this tool always fails" in results[0]["content"]
    assert r.json()["choices"][0]["message"]["content"].startswith("It said: error: ")


def test_allowed_tools_limits_what_the_model_sees_and_runs(gw):
    def plan(messages):
        if messages[-1]["role"] == "tool":
            return {"content": messages[-1]["content"]}
        return {"tool_calls": [{"name": "echo__echo", "arguments": {"text": "hi"}}]}

    script(gw, plan)
    r = chat(gw, tools=[{**ECHO, "allowed_tools": ["add"]}])
    assert r.status_code == 200, r.text
    assert [t["function"]["name"] for t in gw.upstream.payloads[0]["tools"]] == ["echo__add"]
    ran = r.json()["choices"][0]["message"]["fleet_mcp_calls"]
    assert ran[0]["name"] == "echo__echo" and "no tool echo__echo in this request" in ran[0]["error"]
    r = chat(gw, tools=[{**ECHO, "allowed_tools": ["nope"]}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "no tool 'nope'" in r.json()["error"]["message"]


def test_the_round_limit_ends_the_loop_with_a_request_without_tools(gw):
    script(gw, lambda messages: {"tool_calls": [{"name": "echo__add", "arguments": {"a": 1, "b": 1}}]})
    r = chat(gw)
    assert r.status_code == 200, r.text
    payloads = gw.upstream.payloads
    assert len(payloads) == MAX_ROUNDS + 1
    assert [p.get("tool_choice") for p in payloads] == [None] * MAX_ROUNDS + ["none"]
    assert r.headers["x-fleet-mcp-calls"] == str(MAX_ROUNDS)
    assert f"round limit {MAX_ROUNDS} reached" in r.headers["x-fleet-route"]
    # this model calls a tool even so: its answer goes back as it is, the rounds before it listed
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["tool_calls"][0]["function"][
        "name"] == "echo__add"
    assert [c["output"] for c in choice["message"]["fleet_mcp_calls"]] == ["2"] * MAX_ROUNDS
    assert len(rows(gw, r.headers["x-request-id"])) == MAX_ROUNDS + 1


def test_calls_of_the_clients_own_functions_go_back_to_the_client(gw):
    script(gw, lambda messages: {"tool_calls": [{"name": "lookup", "arguments": {"q": "x"}}]})
    r = chat(gw, tools=[ECHO, LOOKUP])
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == "lookup" and message["fleet_mcp_calls"] == []
    assert r.headers["x-fleet-mcp-calls"] == "0" and len(gw.upstream.payloads) == 1
    # a mix of the client's function and an MCP tool: back unchanged, nothing run (a documented limit)
    script(gw, lambda messages: {"tool_calls": [{"name": "lookup", "arguments": {"q": "x"}},
                                                {"name": "echo__add", "arguments": {"a": 1, "b": 2}}]})
    r = chat(gw, tools=[ECHO, LOOKUP])
    calls = r.json()["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["lookup", "echo__add"]
    assert r.headers["x-fleet-mcp-calls"] == "0"


def test_a_streamed_call_of_a_client_function_is_streamed_as_the_upstream_sent_it(gw):
    script(gw, lambda messages: {"tool_calls": [{"name": "lookup", "arguments": {"q": "x"}}]})
    body = {"model": "planner", "messages": QUESTION, "tools": [ECHO, LOOKUP], "stream": True}
    with gw.http.stream("POST", "/chat/completions", json=body) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    fragments = [tc for e in events for tc in e["choices"][0]["delta"].get("tool_calls") or []]
    assert fragments[0]["function"]["name"] == "lookup" and fragments[0]["index"] == 0
    assert json.loads("".join(f["function"]["arguments"] for f in fragments)) == {"q": "x"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("entry, param, words_", [
    ({"type": "mcp", "server_label": "nowhere"}, "tools", "no MCP server named 'nowhere'"),
    ({**ECHO, "server_url": "http://127.0.0.1:9/mcp"}, "tools.0.server_url", "server_url is not accepted"),
    ({**ECHO, "headers": {"Authorization": "Bearer x"}}, "tools.0.headers", "headers is not accepted"),
    ({**ECHO, "require_approval": "always"}, "tools.0.require_approval", "only 'never'"),
    ({"type": "web_search"}, "tools.0", "type must be 'function' or 'mcp'"),
])
def test_bad_mcp_entries_are_400s(gw, entry, param, words_):
    script(gw, add_then_answer)
    r = chat(gw, tools=[entry])
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words_ in err["message"] and err["type"] == "invalid_request_error"
    assert gw.upstream.payloads == []


def test_n_above_one_and_a_clashing_function_name_are_400s(gw):
    script(gw, add_then_answer)
    r = chat(gw, n=2)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    clash = {"type": "function", "function": {"name": "echo__add", "parameters": {"type": "object"}}}
    r = chat(gw, tools=[ECHO, clash])
    assert r.status_code == 400 and "has the name of an MCP tool" in r.json()["error"]["message"]
    assert gw.upstream.payloads == []


def test_a_server_that_fails_to_start_is_a_424(gw):
    script(gw, add_then_answer)
    r = chat(gw, tools=[{"type": "mcp", "server_label": "broken"}])
    assert r.status_code == 424, r.text
    err = r.json()["error"]
    assert err["type"] == "external_connector_error" and err["param"] == "tools"
    assert "'broken'" in err["message"] and "refusing to start" not in err["message"]  # its stderr: the log's
    assert gw.upstream.payloads == []
    assert rows(gw, r.headers["x-request-id"])[0]["status"] == 424
    # the other server still serves
    assert chat(gw).status_code == 200


def test_a_spent_budget_stops_the_loop_before_the_next_round(gw):
    _, secret = gw.store.create_key("agent", budget_usd=0.01)  # the first round costs more than that
    script(gw, add_then_answer)
    body = {"model": "planner", "messages": QUESTION, "tools": [ECHO]}
    r = gw.http.post("/chat/completions", json=body, headers={"authorization": f"Bearer {secret}"})
    assert r.status_code == 429, r.text
    assert r.json()["error"]["type"] == "insufficient_quota" and len(gw.upstream.payloads) == 1
    assert r.headers["x-fleet-mcp-calls"] == "0"  # refused before the tools ran
    logged = rows(gw, r.headers["x-request-id"])
    assert [x["status"] for x in logged] == [200, 429] and logged[0]["cost_usd"] > 0.01
    assert gw.store.spend(logged[0]["key_id"]) == pytest.approx(logged[0]["cost_usd"])


@pytest.mark.parametrize("stream", [False, True])
def test_a_local_model_calls_an_mcp_tool_under_its_grammar(gw, stream):
    # The tiny random model writes noise, but a forced call is held to the MCP tool's schema (two integers),
    # so the call runs; after it tool_choice is auto, and the loop ends with text or at the round limit.
    # Its calls take up to ~52 tokens (long numbers); 64 cut one in about 400 (finish "length": no call).
    body = {"model": "tiny", "messages": QUESTION, "max_tokens": 200, "stream": stream,
            "tool_choice": "required", "tools": [{**ECHO, "allowed_tools": ["add"]}]}
    r = gw.http.post("/chat/completions", json=body)
    assert r.status_code == 200, r.text
    if stream:
        # split on newlines only: the model's noise may hold other line breaks (U+2028) that splitlines takes
        first = json.loads(next(line[6:] for line in r.text.split("\n") if line.startswith("data: {")))
        ran = first["choices"][0]["delta"]["fleet_mcp_calls"]
    else:
        ran = r.json()["choices"][0]["message"]["fleet_mcp_calls"]
    assert ran and r.headers["x-fleet-mcp-calls"] == str(len(ran))
    args = json.loads(ran[0]["arguments"])
    assert ran[0]["name"] == "echo__add" and ran[0]["output"] == str(args["a"] + args["b"])


def test_a_request_without_mcp_tools_is_unchanged(gw):
    r = gw.http.post("/chat/completions", json={"model": "plain", "messages": QUESTION, "tools": [LOOKUP]})
    assert r.status_code == 200
    assert "x-fleet-mcp-calls" not in r.headers and "fleet_mcp_calls" not in r.json()["choices"][0]["message"]
    assert "mcp" not in r.headers["x-fleet-route"]
