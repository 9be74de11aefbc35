"""Tools and response_format: unit tests of serve/tools.py, then the gateway driven by the official client."""

import json

import jsonschema
import openai
import pytest

from fake_openai import UpstreamServer, serving
from fleetlm.config import parse_config
from fleetlm.engine.constrain import ConstraintError, vocab_of
from fleetlm.model import SHIPPED_TINY_MODEL
from fleetlm.model.tokenizer import Tokenizer
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import build_backends
from fleetlm.serve.protocol import ChatCompletionRequest, Tool
from fleetlm.serve.store import UsageStore
from fleetlm.serve.tools import (
    TOOLS_SYSTEM_PROMPT,
    ChatPlan,
    ToolCallStream,
    ToolError,
    opens_call,
    parse_tool_calls,
    plan_chat,
    text_grammar,
    tool_call_grammar,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
NAMES = list(PARAMS)
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    {"role": "user", "content": "And in Rome?"},
]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(SHIPPED_TINY_MODEL)


def chat(**kw) -> ChatCompletionRequest:
    kw.setdefault("messages", [{"role": "user", "content": "What is the weather in Paris?"}])
    return ChatCompletionRequest(model="tiny", **kw)


# ---------------------------------------------------------------- reading calls back


@pytest.mark.parametrize(
    "text, content, calls",
    [
        ('{"name": "add", "arguments": {"a": 1, "b": 2}}', None, [("add", {"a": 1, "b": 2})]),
        ('  {"name": "add", "parameters": {"a": 1, "b": 2}}\n', None, [("add", {"a": 1, "b": 2})]),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>', None, [("add", {"a": 1})]),
        ('```json\n{"name": "add", "arguments": "{\\"a\\": 3}"}\n```', None, [("add", {"a": 3})]),
        ('[{"name": "add", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "X"}}]', None,
         [("add", {}), ("get_weather", {"city": "X"})]),
        ('{"name": "add", "arguments": {"a": 1}}\n{"name": "add", "arguments": {"a": 2}}', None,
         [("add", {"a": 1}), ("add", {"a": 2})]),  # one call per line
        # Qwen writes its reasoning first, then tagged calls: the text is the content.
        ('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
         '{"name": "add", "arguments": {"a": 2}}\n</tool_call>', "Let me add.",
         [("add", {"a": 1}), ("add", {"a": 2})]),
        ('{"name": "mul", "arguments": {}}', None, None),  # not one of the tools
        ('{"name": "add", "arguments": [1, 2]}', None, None),  # arguments must be an object
        ('The answer is {"name": "add"}', None, None),  # untagged, a call is the whole answer
        ('{"name": "add", "arguments": {', None, None),
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}', None, None),  # an unclosed tag
        ('<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call><tool_call>{"x"}</tool_call>',
         None, None),  # one malformed block makes the whole answer text
    ],
)
def test_parse_tool_calls_rule(text, content, calls):
    got = parse_tool_calls(text, NAMES)
    if calls is None:
        assert got is None
    else:
        assert got is not None and got[0] == content
        assert [(n, json.loads(a)) for n, a in got[1]] == calls


# ---------------------------------------------------------------- the prompt and the grammar


def test_tools_go_through_the_templates_tools_variable(tokenizer):
    plan = plan_chat(chat(tools=TOOLS, messages=HISTORY), tokenizer)
    assert plan.mode == "auto" and plan.calls_constrained and plan.prompt_ids is not None
    prompt = tokenizer.decode(plan.prompt_ids, skip_special_tokens=False)
    assert "You may call a function" in prompt and '"name": "get_weather"' in prompt  # the template's words
    # The earlier call is rendered by the template with its arguments as an object, and the tool's answer too.
    assert '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert "ipython<|end_header_id|>\n\n18 degrees, sunny" in prompt


def test_chatml_template_renders_tools_calls_and_results(tiny_tokenizer_dir):
    chatml = Tokenizer.from_dir(tiny_tokenizer_dir("chatml")[0])
    plan = plan_chat(chat(tools=TOOLS, messages=HISTORY, tool_choice="auto"), chatml)
    prompt = chatml.decode(plan.prompt_ids, skip_special_tokens=False)
    assert "<tools>" in prompt and '"name": "add"' in prompt
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in prompt
    assert "<tool_response>\n18 degrees, sunny\n</tool_response>" in prompt
    # This template asks for calls inside <tool_call> tags: the auto rule reads them back.
    content, calls, finish = plan.shape('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
                                        "</tool_call>", "stop")
    assert content is None and finish == "tool_calls" and calls[0]["function"]["name"] == "add"


def test_a_template_without_tools_gets_a_system_message(tokenizer):
    plain = Tokenizer(tokenizer.backend, tokenizer.config,
                      "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>",
                      tokenizer.eos_token_ids)
    plan = plan_chat(chat(tools=TOOLS, messages=HISTORY, tool_choice="required"), plain)
    assert plan.mode == "forced" and plan.grammar is not None
    assert plain.decode(plan.prompt_ids).startswith(f"<system>{TOOLS_SYSTEM_PROMPT}")
    system, *rest = plan.messages
    assert system["role"] == "system" and '"name": "add"' in system["content"]
    assert [m["role"] for m in rest] == ["user", "assistant", "user", "user"]
    assert json.loads(rest[1]["content"]) == {"name": "get_weather",
                                              "arguments": {"city": "Paris", "unit": "celsius"}}
    assert rest[2]["content"] == "Result of the tool call get_weather: 18 degrees, sunny"


@pytest.mark.parametrize(
    "kw, error, words",
    [
        (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "mul"}}), ToolError, "mul"),
        (dict(tool_choice="required"), ToolError, "needs tools"),
        (dict(tools=TOOLS, tool_choice={"type": "function"}), ToolError, "tool_choice must be"),
        (dict(tools=[{"type": "function", "function": {"name": "bad name"}}]), ToolError, "invalid function"),
        (dict(tools=[ADD, ADD]), ToolError, "unique"),
        (dict(response_format={"type": "json_schema"}), ToolError, "json_schema"),
        (dict(response_format={"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}}),
         ConstraintError, "Invalid type"),
    ],
)
def test_bad_combinations_are_typed_errors(tokenizer, kw, error, words):
    with pytest.raises(error, match=words):
        plan_chat(chat(**kw), tokenizer)


def test_tool_choice_none_shows_tools_but_answers_text(tokenizer):
    plan = plan_chat(chat(tools=TOOLS, tool_choice="none"), tokenizer)
    assert plan.mode == "none" and plan.grammar is None
    call = '{"name": "add", "arguments": {}}'
    assert plan.shape(call, "stop") == (call, None, "stop")


def accepts(grammar, tokenizer, text: str) -> bool:
    """Whether the grammar lets a model write exactly `text` and then stop."""
    matcher = vocab_of(tokenizer).matcher(grammar)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return matcher.consume_tokens(ids) and matcher.is_accepting()


CALL_ADD = '{"name": "add", "arguments": {"a": 1, "b": 2}}'
CALL_WEATHER = '{"name": "get_weather", "arguments": {"city": "Rome", "unit": "celsius"}}'


@pytest.mark.parametrize(
    "text, auto, forced",
    [
        ("Sure, it is sunny.", True, False),  # text: only under auto
        ("\nI think so.", True, False),
        ("", True, False),
        (CALL_ADD, True, True),
        ("\n" + CALL_ADD, True, True),  # a call may open with a few blanks
        ("\n" * 5 + CALL_ADD, False, False),  # not many
        ('{"name": "add", "arguments": {"a": 1}}', False, False),  # b is required
        ('{"name": "add", "arguments": {"a": "one", "b": 2}}', False, False),  # a must be an integer
        # an undeclared tool: auto lets the model name it (the backend then asks it for text), forced does not
        ('{"name": "mul", "arguments": {}}', True, False),
        ('{"name": "add", "arguments": {"x": 1}}', False, False),  # a declared tool keeps its schema
        ('{"city": "Rome"}', False, False),  # JSON that is not a call
        (f"[{CALL_ADD}, {CALL_WEATHER}]", True, True),  # parallel calls: a list
        (f"{CALL_ADD} and more", False, False),  # a call, once begun, ends the answer
        ("<tool_call>\n" + CALL_ADD + "\n</tool_call>", False, False),  # not this template's format
        (f"```json\n{CALL_ADD}\n```", True, False),  # under auto a fenced call is held to the grammar too
        ('```json\n{"name": "add", "arguments": {"a": "x"}}\n```', False, False),
        (f"```xml\n{CALL_ADD}\n```", True, False),  # whatever language the fence names
        ("```python\nprint(1)\n```", True, False),  # a fence that does not open a call is text
        ("```xml\n{not a call}\n```", False, False),
    ],
)
def test_auto_grammar_allows_text_or_whole_calls_and_nothing_half_way(tokenizer, text, auto, forced):
    for choice, expected in (("auto", auto), ("required", forced)):
        plan = plan_chat(chat(tools=TOOLS, tool_choice=choice), tokenizer)
        assert plan.call_format == "json" and accepts(plan.grammar, tokenizer, text) == expected, choice


def test_tagged_format_follows_a_template_that_writes_tool_call_tags(tiny_tokenizer_dir):
    chatml = Tokenizer.from_dir(tiny_tokenizer_dir("chatml")[0])
    plan = plan_chat(chat(tools=TOOLS), chatml)
    assert plan.call_format == "tagged"
    one, two = (f"<tool_call>\n{c}\n</tool_call>" for c in (CALL_ADD, CALL_WEATHER))
    assert accepts(plan.grammar, chatml, one) and accepts(plan.grammar, chatml, f"{one}\n{two}")
    assert accepts(plan.grammar, chatml, "Plain text.")
    assert not accepts(plan.grammar, chatml, f"Let me look.\n{one}")  # a call never hides inside text
    assert not accepts(plan.grammar, chatml, CALL_ADD)  # untagged
    missing = '<tool_call>\n{"name": "add", "arguments": {}}\n</tool_call>'  # a and b are required
    assert not accepts(plan.grammar, chatml, missing)
    single = plan_chat(chat(tools=TOOLS, parallel_tool_calls=False), chatml)
    assert accepts(single.grammar, chatml, one) and not accepts(single.grammar, chatml, f"{one}\n{two}")


def test_under_the_grammar_only_an_answer_that_opens_as_a_call_is_read_as_calls():
    plan = ChatPlan([], mode="auto", tool_names=NAMES, calls_constrained=True)
    text = f"Sure. {CALL_ADD}"
    assert plan.shape(text, "stop") == (text, None, "stop")
    content, calls, finish = plan.shape(f"```json\n{CALL_ADD}\n```", "stop")
    assert content is None and finish == "tool_calls" and calls[0]["function"]["name"] == "add"


def test_the_tag_may_be_the_vocabularys_own_token(tiny_tokenizer_dir):
    chatml = Tokenizer.from_dir(tiny_tokenizer_dir("chatml")[0])
    tools = [Tool.model_validate(t) for t in TOOLS]
    grammar = tool_call_grammar(tools, "tagged", tag_ids=(5, 6))  # ids 5, 6 stand for the tag tokens
    body = chatml.encode(f"\n{CALL_ADD}\n", add_special_tokens=False)
    matcher = vocab_of(chatml).matcher(grammar)
    assert matcher.consume_tokens([5, *body, 6]) and matcher.is_accepting()
    spelled = vocab_of(chatml).matcher(grammar)  # and spelled out, as tokenizers without the token write it
    ids = chatml.encode(f"<tool_call>\n{CALL_ADD}\n</tool_call>", add_special_tokens=False)
    assert spelled.consume_tokens(ids) and spelled.is_accepting()


def test_parallel_tool_calls_false_allows_one_call(tokenizer):
    plan = plan_chat(chat(tools=TOOLS, parallel_tool_calls=False), tokenizer)
    assert accepts(plan.grammar, tokenizer, CALL_ADD)
    assert not accepts(plan.grammar, tokenizer, f"[{CALL_ADD}, {CALL_WEATHER}]")


def test_auto_with_a_response_format_is_calls_or_that_json(tokenizer):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    plan = plan_chat(chat(tools=TOOLS, response_format=fmt), tokenizer)
    assert accepts(plan.grammar, tokenizer, '{"answer": 4}') and accepts(plan.grammar, tokenizer, CALL_ADD)
    assert not accepts(plan.grammar, tokenizer, "four")
    assert not accepts(plan.grammar, tokenizer, '{"answer": "4"}')
    assert not accepts(plan.grammar, tokenizer, '{"name": "add", "arguments": {"a": 1}}')


def test_constrained_decoding_false_leaves_the_output_free(tokenizer):
    for kw in (dict(tools=TOOLS), dict(tools=TOOLS, tool_choice="required"),
               dict(response_format={"type": "json_object"})):
        plan = plan_chat(chat(constrained_decoding=False, **kw), tokenizer)
        assert plan.grammar is None and not plan.calls_constrained
    # the switch is ours: it is never sent to a remote model
    assert "constrained_decoding" not in chat(constrained_decoding=False).model_dump()


# ---------------------------------------------------------------- streaming deltas


def _replay(plan: ChatPlan, pieces: list[str]) -> tuple[str, dict, str | None]:
    """Feed text deltas; return the content, the tool calls assembled as a client would, the finish."""
    stream, content, calls, finish = ToolCallStream(plan), "", {}, None
    for i, text in enumerate(pieces):
        for p in stream.push(text, "stop" if i == len(pieces) - 1 else None):
            content += p.text or ""
            finish = p.finish_reason or finish
            for c in p.tool_calls or []:
                slot = calls.setdefault(c["index"], {"id": c.get("id"), "name": "", "arguments": ""})
                slot["name"] += c["function"].get("name") or ""
                slot["arguments"] += c["function"].get("arguments") or ""
    return content, calls, finish


def test_stream_of_a_forced_call_sends_arguments_as_they_come():
    plan = ChatPlan([], mode="forced", tool_names=NAMES, calls_constrained=True)
    text = '{"name": "add", "arguments": {"a": 12, "b": 3}}'
    stream = ToolCallStream(plan)
    pieces = [stream.push(text[i:i + 3], None) for i in range(0, len(text), 3)]
    first_args = next(i for i, ps in enumerate(pieces) if any((p.tool_calls or [{}])[0].get("function", {})
                                                                  .get("arguments") for p in ps))
    assert first_args < len(pieces) - 3  # arguments go out while the call is still being written
    content, calls, finish = _replay(plan, [text[i:i + 3] for i in range(0, len(text), 3)])
    assert content == "" and finish == "tool_calls"
    assert calls[0]["name"] == "add" and json.loads(calls[0]["arguments"]) == {"a": 12, "b": 3}
    assert calls[0]["id"].startswith("call_")


@pytest.mark.parametrize("call_format", ["tagged", "json"])
def test_stream_of_parallel_constrained_calls_sends_each_in_turn(call_format):
    plan = ChatPlan([], mode="auto", tool_names=NAMES, call_format=call_format, calls_constrained=True)
    if call_format == "tagged":
        text = f"<tool_call>\n{CALL_ADD}\n</tool_call>\n<tool_call>\n{CALL_WEATHER}\n</tool_call>"
    else:
        text = f"[{CALL_ADD}, {CALL_WEATHER}]"
    content, calls, finish = _replay(plan, [text[i:i + 2] for i in range(0, len(text), 2)])
    assert content == "" and finish == "tool_calls" and len(calls) == 2
    assert calls[0]["name"] == "add" and json.loads(calls[0]["arguments"]) == {"a": 1, "b": 2}
    assert calls[1]["name"] == "get_weather"
    assert json.loads(calls[1]["arguments"]) == {"city": "Rome", "unit": "celsius"}
    assert calls[0]["id"] != calls[1]["id"]


def test_stream_of_a_call_cut_by_the_budget_ends_with_length():
    plan = ChatPlan([], mode="forced", tool_names=NAMES, calls_constrained=True)
    stream = ToolCallStream(plan)
    pieces = stream.push('{"name": "add", "arguments": {"a": 1', None) + stream.push("2", "length")
    assert pieces[-1].finish_reason == "length"


def test_stream_under_auto_passes_text_at_once_and_holds_json():
    plan = ChatPlan([], mode="auto", tool_names=NAMES)
    stream = ToolCallStream(plan)
    assert [p.text for p in stream.push("Hello", None)] == ["Hello"]  # not held back
    content, calls, finish = _replay(plan, ['{"name": "get_weather", ', '"arguments": {"city": "Rome"}}'])
    assert content == "" and finish == "tool_calls" and json.loads(calls[0]["arguments"]) == {"city": "Rome"}
    content, calls, finish = _replay(plan, ["{not a call", "}"])
    assert content == "{not a call}" and calls == {} and finish == "stop"


# ---------------------------------------------------------------- the gateway, with the official client


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tools")
    with UpstreamServer() as upstream:
        cfg = parse_config({"models": {
            "tiny": {"path": str(SHIPPED_TINY_MODEL), "dtype": "f32"},
            "remote": {"remote": upstream.base_url, "remote_model": "m"},
        }})
        app = create_app(cfg, UsageStore(f"sqlite:///{tmp / 'u.db'}"), build_backends(cfg))
        with serving(app, "gateway") as port:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0,
                                   timeout=60)
            yield client, upstream


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_with_the_openai_client(gateway, choice):
    client, _ = gateway
    for seed in range(3):
        r = client.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS, tool_choice=choice,
                                           temperature=1.0, seed=seed, max_tokens=120)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        (call,) = c.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name in (NAMES if choice == "required" else ["add"])
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])


def test_streamed_tool_call_with_the_openai_client(gateway):
    client, _ = gateway
    chunks = list(client.chat.completions.create(
        model="tiny", messages=HISTORY, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5,
        max_tokens=120, stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert deltas and all(d.index == 0 for d in deltas)
    assert deltas[0].id.startswith("call_") and deltas[0].type == "function" and deltas[0].function.name
    assert all(d.id is None for d in deltas[1:])  # later fragments carry arguments only, as OpenAI sends them
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), PARAMS[deltas[0].function.name])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "tool_calls"


def test_auto_answers_text_from_a_model_that_does_not_call(gateway):
    client, _ = gateway
    r = client.chat.completions.create(model="tiny", messages=HISTORY, tools=TOOLS, temperature=0,
                                       max_tokens=8)
    c = r.choices[0]  # the random tiny model writes no JSON: its text comes back as the content
    assert c.message.tool_calls is None and c.message.content and c.finish_reason in ("stop", "length")


@pytest.mark.parametrize("seed", range(3))
def test_json_schema_response_format_with_the_openai_client(gateway, seed):
    client, _ = gateway
    schema = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "year": {"type": "integer"},
                       "genres": {"type": "array", "items": {"enum": ["drama", "comedy"]}},
                       "rating": {"type": ["number", "null"]}},
        "required": ["title", "year", "genres", "rating"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "movie", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A movie"}],
                                       response_format=fmt, temperature=1.0, seed=seed, max_tokens=100, n=2)
    for c in r.choices:
        jsonschema.validate(json.loads(c.message.content), schema)
    chunks = list(client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "A movie"}], response_format=fmt,
        temperature=1.0, seed=seed, max_tokens=100, stream=True))
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)),
                        schema)


def test_json_object_response_format(gateway):
    client, _ = gateway
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "JSON please"}],
                                       response_format={"type": "json_object"}, temperature=1.0, seed=1,
                                       max_tokens=60)
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_invalid_schema_is_a_400(gateway):
    client, _ = gateway
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
        "a": {"$ref": "#/$defs/Missing"}}}}}
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       response_format=fmt)
    assert exc.value.status_code == 400 and "Missing" in exc.value.body["message"]
    assert exc.value.body["type"] == "invalid_request_error"


def test_remote_models_get_tools_and_response_format_unchanged(gateway):
    client, upstream = gateway
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True}}
    client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                   tool_choice="auto", response_format=fmt)
    sent = upstream.payloads[-1]
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto" and sent["response_format"] == fmt


def test_a_conversation_the_template_rejects_is_a_400_and_the_model_keeps_serving(gateway):
    client, _ = gateway
    with pytest.raises(openai.BadRequestError, match="unknown role"):  # the Llama 3 template's own check
        client.chat.completions.create(model="tiny", max_tokens=2,
                                       messages=[{"role": "developer", "content": "be brief"},
                                                 {"role": "user", "content": "hi"}])
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# ---------------------------------------------------------------- real catalog models


QWEN = "qwen2.5-coder-0.5b-instruct"


def _catalog_client(name: str, engine: str, tmp_path):
    from fastapi.testclient import TestClient

    cfg = parse_config({"models": {name: {"catalog": name, "engine": engine}}})
    return TestClient(create_app(cfg, UsageStore(f"sqlite:///{tmp_path / 'u.db'}"), build_backends(cfg)))


@pytest.mark.parametrize("engine", ["llama_cpp", "fleetlm"])
def test_smollm2_forced_calls_parse_and_match_on_both_engines(smollm2_gguf, tmp_path, engine):
    body = {"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Add 2 and 40."}],
            "tools": TOOLS, "tool_choice": "required", "temperature": 0, "max_tokens": 60}
    with _catalog_client("smollm2-135m-instruct", engine, tmp_path) as client:
        whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert whole["finish_reason"] == "tool_calls"
        call = whole["message"]["tool_calls"][0]["function"]
        jsonschema.validate(json.loads(call["arguments"]), PARAMS[call["name"]])
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            lines = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    deltas = [tc for ch in lines for c in ch["choices"] for tc in c["delta"].get("tool_calls") or []]
    assert deltas[0]["function"]["name"] == call["name"]
    assert "".join(d["function"].get("arguments") or "" for d in deltas) == call["arguments"]  # same call


def test_qwen_calls_a_tool_under_auto_in_its_own_format(tmp_path):
    from fleetlm.catalog import installed_path

    if installed_path(QWEN) is None:
        pytest.skip(f"{QWEN} is not installed (fleet models pull {QWEN}); the suite never downloads it")
    with _catalog_client(QWEN, "llama_cpp", tmp_path) as client:
        ask = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
        body = {"model": QWEN, "messages": ask, "tools": TOOLS, "temperature": 0, "max_tokens": 80}
        r = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert r["finish_reason"] == "tool_calls"
        call = r["message"]["tool_calls"][0]["function"]
        assert call["name"] == "get_weather" and json.loads(call["arguments"])["city"] == "Paris"
        text = client.post("/v1/chat/completions", json={
            "model": QWEN, "messages": [{"role": "user", "content": "Say hello in French."}],
            "tools": TOOLS, "temperature": 0, "max_tokens": 20}).json()["choices"][0]
    assert text["message"].get("tool_calls") is None and text["message"]["content"]


@pytest.mark.parametrize("text, opens", [("", None), ("  {", True), ("<tool_call>", True), ("Hi", False),
                                         ("`", None), ("```js", None), ("```js\n", None), ("```js\n[", True),
                                         ("```js\nvar", False), ("``x", False)])
def test_opens_call_tells_as_soon_as_it_can(text, opens):
    assert opens_call(text) is opens


def test_the_answer_asked_for_after_an_undeclared_call_is_prose(tokenizer):
    grammar = text_grammar("json")
    assert accepts(grammar, tokenizer, "I have no tool for restaurants.")
    assert accepts(grammar, tokenizer, "42")
    for spelled in ('```json\n"name": "find"\n```', '"name": "find"', '{"name": "find"}', "(find)", ""):
        assert not accepts(grammar, tokenizer, spelled), spelled  # BFCL: Qwen spelled its call again so


def test_stream_stops_at_a_call_of_an_undeclared_tool(tokenizer):
    plan = plan_chat(chat(tools=TOOLS), tokenizer)
    stream = ToolCallStream(plan)
    pieces = stream.push('{"name": "mul", "arguments": ', None) + stream.push("{}}", None)
    assert stream.undeclared and not any(p.tool_calls for p in pieces)  # nothing of it reached the client
    assert plan.undeclared_call('{"name": "mul", "arguments": {}}')
    assert not plan.undeclared_call(CALL_ADD) and not plan.undeclared_call("mul it")
