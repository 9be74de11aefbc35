"""The OpenAI Agents SDK, unchanged, on an `AsyncOpenAI(base_url=<the gateway>)` client: its Runner completes
a multi-step task, whole and streamed.

The model behind the gateway is fake_openai's "scripted" planner (a tiny model cannot plan): look the order
up, price its SKU with what the lookup returned, answer with the total. The SDK speaks chat completions
through `OpenAIChatCompletionsModel`: tool calls come back to the model as OpenAI tool messages (role "tool",
`tool_call_id`), which the planner reads and the test checks the gateway forwarded and logged in that shape.
Last, a real tiny local model under tool_choice "required" (a forced call, which the gateway constrains to
parse): the SDK parses the call and runs the tool.
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
    ModelSettings,
    OpenAIChatCompletionsModel,
    Runner,
    ToolCallItem,
    ToolCallOutputItem,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI  # noqa: E402


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """(gateway's /v1 URL, the fake upstream, the usage store): "scripted" is remote, "tiny" is local."""
    set_tracing_disabled(True)  # the SDK would export traces to OpenAI
    with interop_gateway(tmp_path_factory.mktemp("interop-agents-sdk")) as gw:
        yield gw


def _model(url: str, name: str) -> OpenAIChatCompletionsModel:
    client = AsyncOpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    return OpenAIChatCompletionsModel(model=name, openai_client=client)


@pytest.fixture
def shop():
    """The shop's two tools (fake_openai.shop; the price as a string), new each test, and the calls they
    received."""
    s = new_shop(str)
    return {**s, "tools": [function_tool(f) for f in s["functions"]]}


def plan(messages: list[dict]) -> dict:
    """The planner: each step reads the tool messages so far (OpenAI's shape: role "tool")."""
    return plan_shop([m["content"] for m in messages if m["role"] == "tool"], lambda order, total: {
        "content": f"Order {order['order_id']} is {order['quantity']} x {order['sku']}: {total:.2f} in all."})


def _agent(url: str, shop: dict) -> Agent:
    return Agent(name="shop", instructions="Answer questions about orders with the tools.",
                 model=_model(url, "scripted"), tools=shop["tools"])


def _expected(shop: dict) -> str:
    return f"Order 42 is {QUANTITY} x {shop['sku']}: {QUANTITY * shop['price']:.2f} in all."


def _check_the_gateway_saw_each_step(upstream, rows: list[dict], shop: dict, stream: bool) -> None:
    assert [(r["model_used"], r["status"], r["stream"]) for r in rows] == [("scripted", 200, stream)] * 3
    assert len(upstream.payloads) == 3
    for p in upstream.payloads:
        assert p["stream"] is stream
        assert [t["function"]["name"] for t in p["tools"]] == ["get_order", "unit_price"]
        assert p["tools"][0]["function"]["parameters"]["properties"]["order_id"]["type"] == "integer"
    # The last step's conversation, as the gateway forwarded it: each call as an assistant message with
    # tool_calls, each result as a tool message answering that call's id.
    last = upstream.payloads[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    for call_msg, result in ((last[2], last[3]), (last[4], last[5])):
        (call,) = call_msg["tool_calls"]
        assert call["type"] == "function" and result["tool_call_id"] == call["id"]
    assert json.loads(last[2]["tool_calls"][0]["function"]["arguments"]) == {"order_id": 42}
    assert json.loads(last[4]["tool_calls"][0]["function"]["arguments"]) == {"sku": shop["sku"]}
    assert json.loads(last[3]["content"])["sku"] == shop["sku"] and last[5]["content"] == str(shop["price"])
    # The usage log has the same conversation as the gateway parsed it (log_content), and the answer.
    logged = json.loads(rows[-1]["prompt"])
    assert [m["role"] for m in logged] == [m["role"] for m in last]
    assert logged[5] == {"role": "tool", "tool_call_id": last[5]["tool_call_id"],
                         "content": str(shop["price"])}
    assert rows[-1]["response"] == _expected(shop)


def test_runner_completes_a_two_tool_task_through_the_gateway(gateway, shop):
    url, upstream, store = gateway
    upstream.script, upstream.payloads[:] = plan, []
    before = len(store.requests())

    result = Runner.run_sync(_agent(url, shop), "What does order 42 cost in total?", max_turns=5)

    assert result.final_output == _expected(shop)
    assert shop["seen"] == [("get_order", 42), ("unit_price", shop["sku"])]  # B got what A returned
    calls = [i.raw_item.name for i in result.new_items if isinstance(i, ToolCallItem)]
    outputs = [i.output for i in result.new_items if isinstance(i, ToolCallOutputItem)]
    assert calls == ["get_order", "unit_price"] and outputs[1] == str(shop["price"])
    assert len(result.raw_responses) == 3
    assert sum(r.usage.output_tokens for r in result.raw_responses) > 0  # the gateway's usage reached the SDK
    _check_the_gateway_saw_each_step(upstream, store.requests()[before:], shop, stream=False)


def test_streamed_run_assembles_tool_call_deltas_through_the_gateway(gateway, shop):
    url, upstream, store = gateway
    upstream.script, upstream.payloads[:] = plan, []
    before = len(store.requests())

    async def run() -> tuple[object, list[str]]:
        result = Runner.run_streamed(_agent(url, shop), "What does order 42 cost in total?", max_turns=5)
        kinds = [e.item.type async for e in result.stream_events() if e.type == "run_item_stream_event"]
        return result, kinds

    result, kinds = asyncio.run(run())

    assert result.final_output == _expected(shop)
    assert shop["seen"] == [("get_order", 42), ("unit_price", shop["sku"])]
    assert kinds == ["tool_call_item", "tool_call_output_item"] * 2 + ["message_output_item"]
    _check_the_gateway_saw_each_step(upstream, store.requests()[before:], shop, stream=True)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_local_models_forced_call_parses_in_the_sdk(gateway, stream):
    """A real (random, tiny) local model under tool_choice "required": the gateway's grammar makes its answer
    a call of `add` with integer arguments, which the SDK parses and runs; the run stops on the tool's output
    (which the SDK turns into a string)."""
    url, _, store = gateway
    sums = []

    @function_tool
    def add(a: int, b: int) -> int:
        """Adds two integers."""
        sums.append((a, b))
        return a + b

    agent = Agent(name="adder", instructions="Use the tool.", model=_model(url, "tiny"), tools=[add],
                  model_settings=ModelSettings(tool_choice="required", temperature=0, max_tokens=120),
                  tool_use_behavior="stop_on_first_tool")
    before = len(store.requests())
    if stream:
        async def run():
            result = Runner.run_streamed(agent, "Add 2 and 3.", max_turns=2)
            async for _ in result.stream_events():
                pass
            return result
        result = asyncio.run(run())
    else:
        result = Runner.run_sync(agent, "Add 2 and 3.", max_turns=2)

    (call,) = [i.raw_item for i in result.new_items if isinstance(i, ToolCallItem)]
    args = json.loads(call.arguments)
    assert call.name == "add" and set(args) == {"a", "b"}
    assert all(isinstance(v, int) for v in args.values())
    assert sums == [(args["a"], args["b"])] and result.final_output == str(args["a"] + args["b"])
    rows = store.requests()[before:]
    assert [(r["model_used"], r["status"], r["stream"]) for r in rows] == [("tiny", 200, stream)]
