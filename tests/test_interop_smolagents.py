"""smolagents, unchanged, pointed at the gateway with `api_base`: its agent loops complete a multi-step task.

The model behind the gateway is fake_openai's "scripted" planner (a tiny model cannot plan): look the order
up, price its SKU with what the lookup returned, answer with the total. So what is under test is the
gateway's wire format (tools, tool_choice, streamed tool-call deltas, through real HTTP) and smolagents'
own loop. smolagents sends a tool call back as assistant text ("Calling tools: [...]") and its result as a
user message ("Observation: ..."), not as OpenAI tool messages; the planner reads that shape. Last, a real
tiny local model behind the gateway under smolagents' forced tool_choice ("required"): its calls, which the
gateway constrains to parse, must parse in smolagents too.
"""

from __future__ import annotations

import importlib.resources
import json
import re

import jsonschema
import pytest
import yaml

from fake_openai import SHOP_QUANTITY as QUANTITY
from fake_openai import interop_gateway, plan_shop
from fake_openai import shop as new_shop
from fleetlm.serve.store import UsageStore

pytest.importorskip("smolagents", reason="smolagents is pinned in the dev extra (pyproject.toml)")

from smolagents import CodeAgent, OpenAIServerModel, ToolCallingAgent, tool  # noqa: E402
from smolagents.memory import ActionStep  # noqa: E402


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """(gateway's /v1 URL, the fake upstream, the usage store): "scripted" is remote, "tiny" is local."""
    with interop_gateway(tmp_path_factory.mktemp("interop-smolagents")) as gw:
        yield gw


@pytest.fixture
def shop():
    """The shop's two tools (fake_openai.shop; the price as a number), new each test, and the calls they
    received."""
    s = new_shop(float)
    return {**s, "tools": [tool(f) for f in s["functions"]]}


def _text(message: dict) -> str:
    c = message.get("content")
    return c if isinstance(c, str) else "\n".join(p.get("text") or "" for p in c or [])


def _observations(messages: list[dict]) -> list[str]:
    """What smolagents sent back of each tool result: user messages "Observation:\\n<the result>"."""
    return [re.sub(r"^Observation:\s*", "", _text(m)) for m in messages
            if m["role"] == "user" and _text(m).startswith("Observation:")]


def plan_with_tool_calls(messages: list[dict]) -> dict:
    def answer(order: dict, total: float) -> dict:
        text = f"{order['quantity']} x {order['sku']}: {total:.2f}"
        return {"tool_calls": [{"name": "final_answer", "arguments": {"answer": text}}]}

    return plan_shop(_observations(messages), answer)


def plan_with_code(messages: list[dict]) -> dict:
    """CodeAgent's turns: Python in <code> tags; its observation is the code's printed output."""
    obs = [re.search(r"Execution logs:\n(.*)", o).group(1) for o in _observations(messages)]
    if not obs:
        code = "order = get_order(order_id=42)\nprint(order)"
    elif len(obs) == 1:
        sku = json.loads(obs[0])["sku"]  # the literal the lookup printed, not the code's variable
        code = f'print(unit_price(sku="{sku}"))'
    else:
        order = json.loads(obs[0])
        total = round(order["quantity"] * float(obs[1]), 2)
        code = f'final_answer("{order["quantity"]} x {order["sku"]}: {total:.2f}")'
    return {"content": f"Thought: the next step.\n<code>\n{code}\n</code>"}


def _model(url: str, name: str, **kw) -> OpenAIServerModel:
    return OpenAIServerModel(model_id=name, api_base=url, api_key="x", client_kwargs={"max_retries": 0}, **kw)


def _new_rows(store: UsageStore, before: int) -> list[dict]:
    return store.requests()[before:]


def _expected_answer(shop: dict) -> str:
    return f"{QUANTITY} x {shop['sku']}: {QUANTITY * shop['price']:.2f}"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_calling_agent_completes_a_two_tool_task_through_the_gateway(gateway, shop, stream):
    url, upstream, store = gateway
    upstream.script, upstream.payloads[:] = plan_with_tool_calls, []
    before = len(store.requests())
    agent = ToolCallingAgent(tools=shop["tools"], model=_model(url, "scripted"), stream_outputs=stream,
                             max_steps=5, verbosity_level=0)

    answer = agent.run("What does order 42 cost in total?")

    assert answer == _expected_answer(shop)
    # Each tool got what the step before returned: the lookup's SKU reached the price tool.
    assert shop["seen"] == [("get_order", 42), ("unit_price", shop["sku"])]
    steps = [s for s in agent.memory.steps if isinstance(s, ActionStep)]
    assert [[c.name for c in s.tool_calls] for s in steps] == [["get_order"], ["unit_price"],
                                                              ["final_answer"]]
    assert all(s.error is None for s in steps)

    # The gateway saw three requests, each served by the scripted upstream, whole or streamed as asked.
    rows = _new_rows(store, before)
    assert [(r["model_used"], r["status"], r["stream"]) for r in rows] == [("scripted", 200, stream)] * 3
    assert all(r["completion_tokens"] > 0 for r in rows)
    # What it forwarded: smolagents' tools and its forced tool_choice, unchanged; each step's conversation
    # carries the previous steps' calls and results in smolagents' text shape.
    assert len(upstream.payloads) == 3
    for p in upstream.payloads:
        assert p["tool_choice"] == "required" and p["stream"] is stream
        assert {t["function"]["name"] for t in p["tools"]} == {"get_order", "unit_price", "final_answer"}
        assert p["tools"][0]["function"]["parameters"]["properties"]["order_id"]["type"] == "integer"
    last = upstream.payloads[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "Calling tools:" in _text(last[2]) and "get_order" in _text(last[2])
    assert _observations(last) == [json.dumps({"order_id": 42, "sku": shop["sku"], "quantity": QUANTITY}),
                                   str(shop["price"])]
    # The usage log holds the same conversation as the gateway parsed it (log_content).
    assert json.loads(rows[-1]["prompt"])[-1]["content"][0]["text"] == f"Observation:\n{shop['price']}"


def test_code_agent_completes_the_task_running_its_code_locally(gateway, shop):
    url, upstream, store = gateway
    upstream.script, upstream.payloads[:] = plan_with_code, []
    before = len(store.requests())
    agent = CodeAgent(tools=shop["tools"], model=_model(url, "scripted"), max_steps=5, verbosity_level=0)

    answer = agent.run("What does order 42 cost in total?")

    assert answer == _expected_answer(shop)
    assert shop["seen"] == [("get_order", 42), ("unit_price", shop["sku"])]
    rows = _new_rows(store, before)
    assert [(r["model_used"], r["status"]) for r in rows] == [("scripted", 200)] * 3
    for p in upstream.payloads:  # CodeAgent sends no tools; it stops the model at its closing tag
        assert "tools" not in p and "</code>" in p["stop"]
    assert f'unit_price(sku="{shop["sku"]}")' in _text(upstream.payloads[-1]["messages"][-2])


def test_a_local_models_forced_calls_parse_in_smolagents(gateway):
    """A real (random, tiny) local model: smolagents forces a call each step (tool_choice "required"); the
    gateway's grammar makes it one of the tools with valid arguments, which smolagents parses and runs."""
    url, _, store = gateway
    sums = []

    @tool
    def add(a: int, b: int) -> int:
        """Adds two integers.

        Args:
            a: the first
            b: the second
        """
        sums.append((a, b))
        return a + b

    templates = yaml.safe_load(
        importlib.resources.files("smolagents.prompts").joinpath("toolcalling_agent.yaml").read_text())
    # The tiny model's context is 2048 tokens: a short system prompt instead of smolagents' long one.
    templates["system_prompt"] = "Call a tool: {%- for t in tools.values() %} {{ t.name }}{%- endfor %}"
    before = len(store.requests())
    agent = ToolCallingAgent(tools=[add], model=_model(url, "tiny", temperature=0, max_tokens=120),
                             prompt_templates=templates, max_steps=2, verbosity_level=0)
    answer = agent.run("Add 2 and 3.")

    steps = [s for s in agent.memory.steps if isinstance(s, ActionStep) and s.model_output_message]
    assert steps, "no step got an answer from the model"
    calls = []
    for s in steps:
        assert s.error is None and s.model_output_message.tool_calls, s.error  # a call came back as a call
        calls += s.tool_calls
    for c in calls:
        assert c.name in ("add", "final_answer")
        if c.name == "add":
            jsonschema.validate(c.arguments, ADD_ARGS)
    assert sums == [(c.arguments["a"], c.arguments["b"]) for c in calls if c.name == "add"]  # and ran
    assert answer is not None
    rows = _new_rows(store, before)  # one request per step (and one for the answer after the last step)
    assert len(rows) in (len(steps), len(steps) + 1)
    assert all(r["model_used"] == "tiny" and r["status"] == 200 for r in rows)


ADD_ARGS = {"type": "object", "required": ["a", "b"],
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}
