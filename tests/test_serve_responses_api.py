import json

import openai
import pytest
from fastapi.testclient import TestClient

from responses_fakes import ScriptBackend, connect, make_app, served_app

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}, "strict": True}
ADD = {"type": "function", "name": "add",
       "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                      "required": ["a", "b"]}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses")
    backend = ScriptBackend()
    tc, client, vs, files = served_app(root, backend, assistants={"helper": {
        "model": "m", "instructions": "Use the tools.",
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]}})
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


def test_string_input_and_instructions(api):
    _, client, backend, *_ = api
    say(backend, "Hello there.")
    r = client.responses.create(model="m", input="Say hi", instructions="Be brief.", metadata={"k": "v"})
    assert r.status == "completed" and r.output_text == "Hello there." and r.metadata == {"k": "v"}
    assert r.usage.input_tokens == 7 and r.usage.output_tokens == 2 and r.usage.total_tokens == 9
    assert backend.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hi"},
    ]


def test_items_input_with_parts_and_roles(api):
    _, client, backend, *_ = api
    client.responses.create(
        model="m",
        input=[
            {"role": "developer", "content": "rules"},
            {"role": "user",
             "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
        ],
    )
    assert backend.messages() == [{"role": "system", "content": "rules"}, {"role": "user", "content": "ab"}]


def test_model_is_the_one_asked_for_and_the_header_names_the_one_that_answered(api):
    tc = api[0]
    r = tc.post("/v1/responses", json={"model": "house", "input": "hi"})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "house"
    assert r.headers["x-fleet-model"] == "m" and r.headers["x-fleet-route"] == "alias:house"


def test_file_search_cites_the_marked_file_and_includes_results(api):
    _, client, backend, vs, files, _ = api
    say(backend, "The moon pulls the sea [1].")
    r = client.responses.create(
        model="m",
        input="Why do tides rise?",
        include=["file_search_call.results"],
        tools=[{"type": "file_search", "vector_store_ids": [vs.id], "max_num_results": 2}],
    )
    call, message = r.output
    assert call.type == "file_search_call" and call.queries == ["Why do tides rise?"]
    assert call.results[0].filename == "tides.txt" and call.results[0].file_id == files["tides.txt"].id
    assert "[1] (tides.txt)" in backend.messages()[0]["content"]
    text = message.content[0]
    assert text.text == "The moon pulls the sea." and r.output_text == "The moon pulls the sea."
    assert [(a.type, a.file_id, a.filename, a.index) for a in text.annotations] == [
        ("file_citation", files["tides.txt"].id, "tides.txt", 22)
    ]
    plain = client.responses.create(
        model="m", input="Why do tides rise?", tools=[{"type": "file_search", "vector_store_ids": [vs.id]}]
    )
    assert plain.output[0].results is None


def test_chain_survives_a_restart_and_get_delete(api):
    _, client, backend, _, _, root = api
    say(backend, "Blue.")
    first = client.responses.create(model="m", input="Favourite colour?")
    assert client.responses.retrieve(first.id).output_text == "Blue."
    assert [i.content[0].text for i in client.responses.input_items.list(first.id).data] == [
        "Favourite colour?"
    ]
    other = ScriptBackend()
    with TestClient(make_app(root, other)) as tc2:
        again = connect(tc2).responses.create(model="m", input="Why?", previous_response_id=first.id)
    assert again.previous_response_id == first.id
    assert other.messages() == [
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


# ---------------------------------------------------------------- function tools


def test_the_tool_loop_with_previous_response_id(api):
    """A call comes back as a function_call item; its output, sent by call_id on the chain, reaches the
    model as a tool message after the assistant's tool_calls."""
    _, client, backend, *_ = api
    say(backend, calls=[("get_weather", '{"city": "Paris"}')])
    r = client.responses.create(model="m", input="Weather in Paris?", tools=[WEATHER])
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
    assert call.call_id == "call_0" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("fc_") and r.output_text == ""
    sent = backend.requests[-1]
    assert [t.model_dump(exclude_none=True) for t in sent.tools] == [{"type": "function", "function": {
        "name": "get_weather", "description": "The weather in a city.", "parameters": WEATHER["parameters"],
        "strict": True}}]
    assert sent.tool_choice == "auto" and sent.parallel_tool_calls is None

    say(backend, "It is sunny in Paris.")
    done = client.responses.create(
        model="m", previous_response_id=r.id, tools=[WEATHER],
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "sunny"}'}],
    )
    assert done.output_text == "It is sunny in Paris."
    assert backend.messages() == [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"id": "call_0", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "content": '{"sky": "sunny"}', "tool_call_id": "call_0"},
    ]
    items = client.responses.input_items.list(done.id).data
    assert [(i.type, i.call_id, i.output) for i in items] == [
        ("function_call_output", "call_0", '{"sky": "sunny"}')]


def test_text_and_parallel_calls_come_as_a_message_then_function_calls(api):
    _, client, backend, *_ = api
    say(backend, "Looking both up.", [("get_weather", '{"city": "Oslo"}'), ("add", '{"a": 1, "b": 2}')])
    r = client.responses.create(model="m", input="Oslo weather, and 1+2?", tools=[WEATHER, ADD],
                                parallel_tool_calls=True)
    assert [o.type for o in r.output] == ["message", "function_call", "function_call"]
    assert r.output_text == "Looking both up." and [o.name for o in r.output[1:]] == ["get_weather", "add"]
    assert r.parallel_tool_calls is True and backend.requests[-1].parallel_tool_calls is True


def test_the_whole_loop_can_be_sent_as_items_without_a_chain(api):
    _, client, backend, *_ = api
    client.responses.create(model="m", tools=[ADD], input=[
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "Adding."},
        {"type": "function_call", "call_id": "c9", "name": "add", "arguments": '{"a": 1, "b": 2}'},
        {"type": "function_call_output", "call_id": "c9", "output": "3"},
    ])
    sent = backend.messages()
    assert sent[1]["role"] == "assistant" and sent[1]["content"] == "Adding."
    assert sent[1]["tool_calls"][0]["id"] == "c9"
    assert sent[2] == {"role": "tool", "content": "3", "tool_call_id": "c9"}


@pytest.mark.parametrize("choice, sent", [
    ("auto", "auto"),
    ("none", "none"),
    ("required", "required"),
    ({"type": "function", "name": "add"}, {"type": "function", "function": {"name": "add"}}),
    ({"type": "file_search"}, "none"),
])
def test_tool_choice_reaches_the_chat_path(api, choice, sent):
    _, client, backend, vs, *_ = api
    r = client.responses.create(model="m", input="Why do tides rise?", tool_choice=choice,
                                tools=[WEATHER, ADD, {"type": "file_search", "vector_store_ids": [vs.id]}])
    assert backend.requests[-1].tool_choice == sent
    searched = [o.type for o in r.output].count("file_search_call")
    assert searched == (0 if choice == "none" else 1)  # none: no tool at all, file_search included
    assert r.tool_choice == choice or r.tool_choice.type == choice["type"]


def test_an_assistants_tools_are_offered(api):
    _, client, backend, *_ = api
    client.responses.create(model="helper", input="find it", tools=[ADD])
    sent = backend.requests[-1]
    assert [t.function.name for t in sent.tools] == ["add", "lookup"]
    assert backend.messages()[0] == {"role": "system", "content": "Use the tools."}


# ---------------------------------------------------------------- input items


def test_input_items_have_stable_ids_and_page(api):
    _, client, _, *_ = api
    texts = ["one", "two", "three"]
    r = client.responses.create(model="m", input=[{"role": "user", "content": t} for t in texts])
    first = client.responses.input_items.list(r.id)
    again = client.responses.input_items.list(r.id)
    assert [i.id for i in first.data] == [i.id for i in again.data]
    assert all(i.id.startswith("msg_") for i in first.data)
    assert [i.content[0].text for i in first.data] == texts[::-1]  # newest first, as OpenAI's default
    page = client.responses.input_items.list(r.id, limit=2, order="asc")
    assert [i.content[0].text for i in page.data] == ["one", "two"] and page.has_more
    assert page.first_id == page.data[0].id and page.last_id == page.data[1].id
    rest = client.responses.input_items.list(r.id, limit=2, order="asc", after=page.last_id)
    assert [i.content[0].text for i in rest.data] == ["three"] and not rest.has_more
    walked = [i.content[0].text for i in client.responses.input_items.list(r.id, limit=1, order="asc")]
    assert walked == texts  # the client's auto-paging follows last_id
    given = client.responses.create(model="m", input=[{"id": "msg_mine", "role": "user", "content": "x"}])
    assert client.responses.input_items.list(given.id).data[0].id == "msg_mine"


@pytest.mark.parametrize("query, param", [("limit=0", "limit"), ("limit=abc", "limit"), ("order=up", "order"),
                                          ("after=msg_none", "after")])
def test_bad_input_items_paging_is_a_400(api, query, param):
    tc, client, *_ = api
    r = client.responses.create(model="m", input="x")
    got = tc.get(f"/v1/responses/{r.id}/input_items?{query}")
    assert got.status_code == 400 and got.json()["error"]["param"] == param


# ---------------------------------------------------------------- bad requests


FS = {"type": "file_search", "vector_store_ids": ["vs_x"]}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "m", "input": ""}, 400, "input"),
        ({"model": "m", "input": []}, 400, "input"),
        ({"model": "m"}, 400, "input"),
        ({"model": "nope", "input": "x"}, 404, "model"),
        ({"model": "m", "input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
        ({"model": "m", "input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, 400,
         "input[0].call_id"),
        ({"model": "m", "input": [{"type": "function_call_output", "output": "1"}]}, 400, "input[0].call_id"),
        ({"model": "m", "input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, 400,
         "input[0].name"),
        ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, 400, "input[0].type"),
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, 400, "tools[0].type"),
        ({"model": "m", "input": "x", "tools": [{"type": "file_search"}]}, 400, "tools[0].vector_store_ids"),
        ({"model": "m", "input": "x", "tools": [{"type": "function"}]}, 400, "tools[0].name"),
        ({"model": "m", "input": "x", "tools": [{"type": "function", "name": "a b"}]}, 400, "tools[0].name"),
        ({"model": "m", "input": "x", "tools": [{"type": "function", "name": "f", "parameters": "{}"}]}, 400,
         "tools[0].parameters"),
        ({"model": "m", "input": "x", "tools": [ADD, ADD]}, 400, "tools[1].name"),
        ({"model": "m", "input": "x", "tools": [FS, FS]}, 400, "tools[1].type"),
        ({"model": "m", "input": "x", "tools": [{**FS, "filters": {"type": "bogus"}}]}, 400,
         "tools[0].filters"),
        ({"model": "m", "input": "x", "tools": [{**FS, "vector_store_ids": ["vs_none"]}]}, 404,
         "tools.vector_store_ids[0]"),
        ({"model": "m", "input": "x", "tools": [ADD], "tool_choice": "sometimes"}, 400, "tool_choice"),
        ({"model": "m", "input": "x", "tool_choice": "required"}, 400, "tool_choice"),
        ({"model": "m", "input": "x", "tools": [ADD], "tool_choice": {"type": "function", "name": "mul"}},
         400, "tool_choice.name"),
        ({"model": "m", "input": "x", "tools": [ADD], "tool_choice": {"type": "file_search"}}, 400,
         "tool_choice.type"),
        ({"model": "m", "input": "x", "tools": [ADD], "tool_choice": {"type": "web_search_preview"}}, 400,
         "tool_choice.type"),
        ({"model": "m", "input": "x", "previous_response_id": "resp_none"}, 404, "previous_response_id"),
        ({"model": "m", "input": "x", "include": ["reasoning"]}, 400, "include[0]"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "yaml"}}}, 400, "text.format.type"),
        ({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, 400,
         "text.format.schema"),
        ({"model": "m", "input": "x", "truncation": "sometimes"}, 400, "truncation"),
        ({"model": "m", "input": "x", "background": True}, 400, "background"),
    ],
)
def test_bad_requests_are_openai_errors(served, body, status, param, stream):
    tc = served[0]
    r = tc.post("/v1/responses", json={**body, "stream": stream})
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_text_format_becomes_the_chat_response_format(api):
    _, client, backend, *_ = api
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    say(backend, '{"n": 3}')
    r = client.responses.create(model="m", input="a number", truncation="auto",
                                text={"format": {"type": "json_schema", "name": "num", "schema": schema}})
    fmt = backend.requests[-1].response_format
    assert fmt.type == "json_schema" and fmt.json_schema == {"name": "num", "schema": schema}
    assert r.text.format.type == "json_schema" and r.truncation == "auto" and r.output_text == '{"n": 3}'


def test_an_unknown_call_id_is_named(api):
    tc = api[0]
    body = {"model": "m", "input": [{"type": "function_call_output", "call_id": "call_zz", "output": "1"}]}
    assert "call_zz" in tc.post("/v1/responses", json=body).json()["error"]["message"]


def test_unknown_ids_and_bad_json(served):
    tc = served[0]
    assert tc.get("/v1/responses/resp_none").status_code == 404
    assert tc.delete("/v1/responses/resp_none").json()["error"]["param"] == "response_id"
    assert tc.post("/v1/responses", content=b"{not json").status_code == 400





WEIRD = [None, -1, 0, 2**63, -1e308, 0.5, "", "x" * 3000, "\ud800", [], {}, [1], [{}], {"a": 1}, True,
         [{"type": "message"}], [{"role": "user", "content": [{}]}], {"type": "function"}]
FIELDS = ["model", "input", "instructions", "max_output_tokens", "temperature", "top_p", "metadata", "tools",
          "tool_choice", "include", "store", "previous_response_id", "stream", "user", "parallel_tool_calls",
          "text", "truncation", "reasoning"]


def test_no_field_value_makes_a_500(api):
    """Every field gets every odd value (and goes missing), streamed or not: an OpenAI error or an answer."""
    tc = api[0]
    seen = set()
    for name in FIELDS:
        for value in [*WEIRD, "DELETE"]:
            body = {"model": "m", "input": "hi", "tools": [ADD]}
            if value == "DELETE":
                body.pop(name, None)
            else:
                body[name] = value
            r = tc.post("/v1/responses", content=json.dumps(body))
            assert r.status_code < 500, (name, value, r.status_code, r.text[:200])
            if r.status_code >= 400:
                assert r.json()["error"]["message"], (name, value)
            seen.add(r.status_code)
    assert {200, 400} <= seen


def test_no_tool_or_item_field_value_makes_a_500(api):
    tc = api[0]
    call = {"type": "function_call", "call_id": "c1", "name": "add", "arguments": "{}"}
    output = {"type": "function_call_output", "call_id": "c1", "output": "3"}
    for value in WEIRD:
        bodies = [{"tools": [{**ADD, key: value}], "input": "hi"}
                  for key in ("name", "description", "parameters", "strict", "type")]
        bodies += [{"tools": [ADD], "input": [{**call, key: value}, output]}
                   for key in ("call_id", "name", "arguments", "id", "type")]
        bodies += [{"tools": [ADD], "input": [call, {**output, key: value}]} for key in ("call_id", "output")]
        bodies.append({"input": "hi", "tools": [ADD], "tool_choice": {"type": "function", "name": value}})
        for body in bodies:
            r = tc.post("/v1/responses", content=json.dumps({"model": "m", **body}))
            assert r.status_code < 500, (body, r.status_code, r.text[:200])
