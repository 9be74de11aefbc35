"""/v1/responses driven by real clients: the OpenAI Agents SDK's default model (OpenAIResponsesModel) runs a
two-tool task through the gateway, whole and streamed, and `client.responses.parse` gets structured output
from the shipped tiny model (constrained to the schema by the chat path).

The model behind the gateway is fake_openai's "scripted" planner (remote): the Responses request becomes a
chat request with tools, the planner answers tool calls, the SDK runs the tools and sends their outputs back
as function_call_output items (with the whole history as items, as the SDK does).
"""

from __future__ import annotations

import asyncio
import json

import pytest

from fake_openai import SHOP_QUANTITY as QUANTITY
from fake_openai import interop_gateway, plan_shop
from fake_openai import shop as new_shop

pytest.importorskip("agents", reason="openai-agents is pinned in the dev extra (pyproject.toml)")

from agents import (  # noqa: E402
    Agent,
    OpenAIResponsesModel,
    Runner,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI, OpenAI  # noqa: E402
from pydantic import BaseModel  # noqa: E402


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    set_tracing_disabled(True)  # the SDK would export traces to OpenAI
    with interop_gateway(tmp_path_factory.mktemp("responses-agents")) as gw:
        yield gw


@pytest.fixture
def shop():
    s = new_shop(str)
    return {**s, "tools": [function_tool(f) for f in s["functions"]]}


def plan(messages: list[dict]) -> dict:
    return plan_shop([m["content"] for m in messages if m["role"] == "tool"], lambda order, total: {
        "content": f"Order {order['order_id']} is {order['quantity']} x {order['sku']}: {total:.2f} in all."})


def _agent(url: str, shop: dict) -> Agent:
    client = AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    return Agent(name="shop", instructions="Answer questions about orders with the tools.",
                 model=OpenAIResponsesModel(model="scripted", openai_client=client), tools=shop["tools"])


def _expected(shop: dict) -> str:
    return f"Order 42 is {QUANTITY} x {shop['sku']}: {QUANTITY * shop['price']:.2f} in all."


def _check_steps(upstream, rows: list[dict], shop: dict, stream: bool) -> None:
    assert [(r["endpoint"], r["model_used"], r["status"], r["stream"]) for r in rows] == [
        ("responses", "scripted", 200, stream)] * 3
    last = upstream.payloads[-1]["messages"]  # the chat request the third step became
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    for call_msg, result in ((last[2], last[3]), (last[4], last[5])):
        (call,) = call_msg["tool_calls"]
        assert result["tool_call_id"] == call["id"]
    assert json.loads(last[4]["tool_calls"][0]["function"]["arguments"]) == {"sku": shop["sku"]}
    assert last[5]["content"] == str(shop["price"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_the_agents_sdk_runs_a_two_tool_task_over_responses(gateway, shop, stream):
    url, upstream, store = gateway
    upstream.script, upstream.payloads[:] = plan, []
    before = len(store.requests())
    question = "What does order 42 cost in total?"
    if stream:
        async def run():
            result = Runner.run_streamed(_agent(url, shop), question, max_turns=5)
            kinds = [e.item.type async for e in result.stream_events() if e.type == "run_item_stream_event"]
            return result, kinds

        result, kinds = asyncio.run(run())
        assert kinds == ["tool_call_item", "tool_call_output_item"] * 2 + ["message_output_item"]
    else:
        result = Runner.run_sync(_agent(url, shop), question, max_turns=5)
    assert result.final_output == _expected(shop)
    assert shop["seen"] == [("get_order", 42), ("unit_price", shop["sku"])]
    calls = [i.raw_item.name for i in result.new_items if isinstance(i, ToolCallItem)]
    outputs = [i.output for i in result.new_items if isinstance(i, ToolCallOutputItem)]
    assert calls == ["get_order", "unit_price"] and outputs[1] == str(shop["price"])
    assert all(r.usage.output_tokens > 0 for r in result.raw_responses)
    _check_steps(upstream, store.requests()[before:], shop, stream)


class Movie(BaseModel):
    title: str
    year: int


def test_structured_output_from_a_local_model_matches_the_schema(gateway):
    url, _, _ = gateway
    client = OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    for seed in range(2):
        r = client.responses.parse(model="tiny", input=f"A movie, please ({seed}).", text_format=Movie,
                                   temperature=1.0, max_output_tokens=120)
        assert isinstance(r.output_parsed, Movie), r.output_text
        assert r.text.format.type == "json_schema"
