"""fleetlm.agent.loop: the tool-calling agent driven by a scripted gateway, and once through the real gateway.

The scripted gateway (agent_fakes.py) answers each model from its own script and sets the gateway's cost
and model headers, so the tests check steps, escalation, budgets, checks, teams and what goes on the wire.
"""

import time

import openai
import pytest

from agent_fakes import Delay, call
from fake_openai import free_port, serving
from fleetlm.agent.loop import (
    AgentError,
    CheckResult,
    ToolCallingAgent,
    extract_code,
    parse_text_calls,
    run_check,
)
from fleetlm.agent.steps import (
    ActionStep,
    BudgetExceeded,
    ErrorStep,
    FinalAnswerStep,
    ObservationStep,
    PlanStep,
)
from fleetlm.agent.tools import ToolDefinitionError, calculator_tool, file_tools, tool


@pytest.fixture
def workspace(tmp_path):
    (tmp_path / "prices.txt").write_text("apples: 17 cents each\n")
    return tmp_path


def agent(gw, tools, **kw):
    kw.setdefault("models", ["small"])
    return ToolCallingAgent(tools, url=gw.url, **kw)


def kinds(steps):
    return [s.kind for s in steps]


# ---------------------------------------------------------------- a multi-step run


def test_two_tools_then_the_answer(gw, workspace):
    gw.script("small", call("read_file", {"path": "prices.txt"}),
              call("calculator", {"expression": "3 * 17"}), call("final_answer", {"answer": "51"}))
    a = agent(gw, [calculator_tool(), *file_tools(workspace)])
    steps = list(a.run("How many cents do 3 apples cost?"))
    assert kinds(steps) == ["action", "observation", "action", "observation", "action", "final"]
    assert [s.index for s in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[1].output == "apples: 17 cents each\n" and steps[1].tool == "read_file"
    assert steps[3].output == "51" and steps[3].tool == "calculator"
    final = steps[-1]
    assert isinstance(final, FinalAnswerStep) and final.ok and final.answer == "51"
    # Each action is one request; its step carries the model, tokens and the gateway's cost header.
    actions = [s for s in steps if isinstance(s, ActionStep)]
    assert all(s.model == "small" and s.requested_model == "small" and s.tokens > 0 for s in actions)
    assert all(s.cost_usd == pytest.approx(s.tokens * 1e-6, abs=1e-8) for s in actions)
    assert final.totals.requests == 3 and final.totals.models == {"small": 3}
    assert final.totals.cost_usd == pytest.approx(sum(s.cost_usd for s in actions))
    assert final.totals.tokens == sum(s.tokens for s in actions)
    # The wire: the step kind as fleet_step, the tools plus final_answer, tool results sent back.
    bodies = gw.bodies()
    assert [b["fleet_step"] for b in bodies] == ["action", "action", "action"]
    assert [t["function"]["name"] for t in bodies[0]["tools"]] == [
        "calculator", "read_file", "write_file", "list_files", "final_answer"]
    assert bodies[0]["tool_choice"] == "required" and bodies[0]["temperature"] == 0
    tool_msgs = [m for m in bodies[2]["messages"] if m["role"] == "tool"]
    assert [m["content"] for m in tool_msgs] == ["apples: 17 cents each\n", "51"]
    system = bodies[2]["messages"][0]
    assert system["role"] == "system" and "final_answer" in system["content"]
    assert bodies[0]["messages"][1] == {"role": "user", "content": "How many cents do 3 apples cost?"}


def test_a_plan_step_comes_first_without_tools(gw):
    gw.script("small", "1. use calculator\n2. answer", call("final_answer", {"answer": 4}))
    steps = list(agent(gw, [calculator_tool()], plan=True).run("2+2?"))
    assert kinds(steps) == ["plan", "action", "final"]
    assert isinstance(steps[0], PlanStep) and steps[0].plan.startswith("1. use calculator")
    plan_body, act_body = gw.bodies()
    assert plan_body["fleet_step"] == "plan" and "tools" not in plan_body
    assert any("Plan:\n1. use calculator" in (m.get("content") or "") for m in act_body["messages"])
    assert steps[-1].answer == "4"  # a number sent for the answer is kept, as text


def test_a_prose_reply_is_the_answer_unless_calls_are_required(gw):
    gw.script("small", "The answer is 4.")
    assert agent(gw, [calculator_tool()]).answer("2+2?").answer == "The answer is 4."
    gw.script("small", "The answer is 4.", call("final_answer", {"answer": "4"}))
    steps = list(agent(gw, [calculator_tool()], accept_text_answer=False).run("2+2?"))
    assert kinds(steps) == ["error", "action", "final"] and "no tool call" in steps[0].error


def test_calls_written_as_text_are_read(gw):
    gw.script("small",
              '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>',
              '```json\n{"name": "final_answer", "arguments": {"answer": "42"}}\n```')
    steps = list(agent(gw, [calculator_tool()]).run("6*7?"))
    assert kinds(steps) == ["action", "observation", "action", "final"]
    assert steps[1].output == "42" and steps[-1].answer == "42"
    # The call read from text goes back to the model as a proper tool call with its result.
    second = gw.bodies()[1]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "calculator" and second[-1]["content"] == "42"


# ---------------------------------------------------------------- failures and escalation


def test_a_malformed_call_escalates_to_the_next_model(gw):
    gw.script("weak", '{"name": "calculator", "arguments": {"expression": "2+',
              call("final_answer", {"answer": "4"}))
    gw.script("strong", call("calculator", {"expression": "2+2"}))
    steps = list(agent(gw, [calculator_tool()], models=["weak", "strong"]).run("What is 2+2?"))
    assert kinds(steps) == ["error", "action", "observation", "action", "final"]
    err = steps[0]
    assert isinstance(err, ErrorStep) and err.error_type == "parse" and "not valid JSON" in err.error
    assert err.model == "weak" and err.retry_model == "strong" and err.tokens > 0
    assert steps[1].model == "strong" and steps[1].escalation == "after a parse error on weak"
    assert steps[3].model == "weak" and steps[3].escalation == ""  # a good step sends the next one back down
    assert [(b["model"], b["fleet_step"]) for b in gw.bodies()] == [
        ("weak", "action"), ("strong", "retry"), ("weak", "action")]
    # The stronger model sees the mistake and the error message.
    retry_messages = gw.bodies("strong")[0]["messages"]
    assert retry_messages[-1]["role"] == "user" and "not valid JSON" in retry_messages[-1]["content"]
    assert steps[-1].answer == "4" and steps[-1].totals.models == {"weak": 2, "strong": 1}
    assert "retrying on strong" in err.line() and "escalated after a parse error on weak" in steps[1].line()


@pytest.mark.parametrize("bad, error_type, words", [
    (call("weather", {"city": "Oslo"}), "unknown_tool", "no tool named 'weather'"),
    (call("calculator", {"expr": "1"}), "parse", "do not match its schema"),
    (call("calculator", raw='{"expression": '), "parse", "not valid JSON"),
    (call("calculator", {"expression": "1/0"}), "tool", "division by zero"),
    (call("final_answer", {}), "parse", "final_answer needs an answer"),
])
def test_each_kind_of_failed_step_is_an_error_and_a_retry(gw, bad, error_type, words):
    gw.script("weak", bad)
    gw.script("strong", call("final_answer", {"answer": "done"}))
    steps = list(agent(gw, [calculator_tool()], models=["weak", "strong"]).run("task"))
    errors = [s for s in steps if isinstance(s, ErrorStep)]
    assert len(errors) == 1 and errors[0].error_type == error_type and words in errors[0].error
    assert errors[0].retry_model == "strong" and steps[-1].answer == "done" and steps[-1].model == ""
    assert gw.bodies("strong")[0]["fleet_step"] == "retry"
    # The failed call still got its tool message, so the conversation stays well-formed for the next model.
    sent = gw.bodies("strong")[0]["messages"]
    if sent[-2].get("tool_calls"):
        assert sent[-1]["role"] == "tool" and sent[-1]["tool_call_id"] == sent[-2]["tool_calls"][0]["id"]
        assert sent[-1]["content"].startswith("Error:")


def test_on_the_top_model_a_failure_retries_there(gw):
    gw.script("only", call("calculator", {"expression": "1/0"}), call("final_answer", {"answer": "x"}))
    steps = list(agent(gw, [calculator_tool()], models="only").run("task"))
    assert kinds(steps) == ["action", "error", "action", "final"]
    assert steps[1].retry_model == "only" and gw.bodies()[1]["fleet_step"] == "retry"


def test_an_answer_given_with_other_calls_waits_for_their_results(gw):
    gw.script("small", call("calculator", {"expression": "6*7"}, ("final_answer", {"answer": "40"})),
              call("final_answer", {"answer": "42"}))
    steps = list(agent(gw, [calculator_tool()]).run("6*7?"))
    assert kinds(steps) == ["action", "observation", "action", "final"] and steps[-1].answer == "42"
    held = [m for m in gw.bodies()[1]["messages"] if m["role"] == "tool"]
    assert held[0]["content"] == "42" and held[1]["content"].startswith("Not accepted: you answered before")
    assert gw.bodies()[1]["fleet_step"] == "action"  # not a failure: no escalation


def test_a_repeated_failing_call_is_pointed_out(gw):
    bad = call("calculator", {"expression": "1/0"})
    gw.script("small", bad, bad, call("final_answer", {"answer": "none"}))
    steps = list(agent(gw, [calculator_tool()]).run("1/0?"))
    assert kinds(steps) == ["action", "error", "action", "error", "action", "final"]
    first, second = ([m for m in b["messages"] if m["role"] == "tool"][-1]["content"]
                     for b in gw.bodies()[1:])
    assert "made this exact call before" not in first and second.endswith("it failed: change it.")


def test_a_failing_call_next_to_final_answer_holds_the_answer_back(gw):
    gw.script("small", call("calculator", {"expression": "1/0"}, ("final_answer", {"answer": "inf"})),
              call("final_answer", {"answer": "undefined"}))
    steps = list(agent(gw, [calculator_tool()]).run("1/0?"))
    assert kinds(steps) == ["action", "error", "action", "final"] and steps[-1].answer == "undefined"
    held = [m for m in gw.bodies()[1]["messages"] if m["role"] == "tool"]
    assert [m["content"][:12] for m in held] == ["Error: divis", "Not accepted"]


# ---------------------------------------------------------------- budgets


def test_the_step_budget_ends_with_a_forced_final_then_budget_exceeded(gw):
    loop = call("calculator", {"expression": "1+1"})
    gw.script("small", loop, loop, loop)
    steps = list(agent(gw, [calculator_tool()], max_steps=3).run("loop"))
    assert kinds(steps) == ["action", "observation"] * 3 + ["budget"]
    final = steps[-1]
    assert isinstance(final, BudgetExceeded) and isinstance(final, FinalAnswerStep) and not final.ok
    assert final.budget == "steps" and final.limit == 3 and final.used == 3 and final.totals.requests == 3
    last = gw.bodies()[-1]  # the last allowed step asks for the answer, forcing final_answer
    assert last["fleet_step"] == "final"
    assert last["tool_choice"] == {"type": "function", "function": {"name": "final_answer"}}
    assert "last step" in last["messages"][-1]["content"]
    assert "steps budget exhausted (3 of 3)" in final.line()


def test_the_token_budget(gw):
    gw.script("small", call("calculator", {"expression": "1+1"}), call("calculator", {"expression": "2+2"}))
    steps = list(agent(gw, [calculator_tool()], max_tokens=30, step_max_tokens=500).run("count " * 40))
    assert steps[-1].kind == "budget" and steps[-1].budget == "tokens" and steps[-1].used >= 30
    assert len(gw.bodies()) == 1 and gw.bodies()[0]["max_tokens"] == 30  # never asks for more than is left


def test_the_cost_budget(gw):
    gw.prices["pricey"] = 0.01
    gw.script("pricey", call("calculator", {"expression": "1+1"}), call("final_answer", {"answer": "2"}))
    steps = list(agent(gw, [calculator_tool()], models="pricey", max_cost_usd=0.05).run("1+1"))
    assert kinds(steps) == ["action", "observation", "budget"] and steps[-1].budget == "cost"
    assert steps[-1].used == pytest.approx(steps[0].cost_usd) and steps[0].cost_usd > 0.05


def test_the_wall_time_budget_stops_a_slow_request(gw):
    gw.script("small", Delay(5.0, call("final_answer", {"answer": "late"})))
    start = time.monotonic()
    steps = list(agent(gw, [calculator_tool()], max_seconds=1.0).run("hurry"))
    assert time.monotonic() - start < 4.0
    assert kinds(steps) == ["budget"] and steps[0].budget == "seconds" and steps[0].used >= 1.0


# ---------------------------------------------------------------- final-answer checks


def is_number(answer):
    return answer.strip().lstrip("-").isdigit(), "the answer must be a number"


def test_a_failed_check_is_an_error_step_and_the_loop_goes_on(gw):
    gw.script("weak", call("final_answer", {"answer": "four"}))
    gw.script("strong", call("final_answer", {"answer": "4"}))
    steps = list(agent(gw, [calculator_tool()], models=["weak", "strong"], checks=[is_number]).run("2+2?"))
    assert kinds(steps) == ["action", "error", "action", "final"]
    assert steps[1].error_type == "check" and "the answer must be a number" in steps[1].error
    assert steps[1].retry_model == "strong" and steps[-1].answer == "4"
    feedback = gw.bodies("strong")[0]["messages"][-1]
    assert feedback["role"] == "tool" and "rejected: the answer must be a number" in feedback["content"]


def test_check_results_in_every_shape():
    assert run_check(lambda a: True, "x") == CheckResult(True, "")
    assert run_check(lambda a: CheckResult(False, "no"), "x") == CheckResult(False, "no")

    def nonempty(a):
        return bool(a)

    assert run_check(nonempty, "") == CheckResult(False, "check nonempty rejected the answer")
    assert run_check(lambda a: 1 / 0, "x").reason.endswith("raised ZeroDivisionError: division by zero")


def test_a_text_answer_failing_its_check_gets_a_user_message(gw):
    gw.script("small", "four", "4")
    steps = list(agent(gw, [], checks=[is_number]).run("2+2?"))
    assert kinds(steps) == ["action", "error", "action", "final"] and steps[-1].answer == "4"
    assert "was rejected: the answer must be a number" in gw.bodies()[1]["messages"][-1]["content"]


# ---------------------------------------------------------------- teams


def test_a_managed_agent_is_a_tool(gw):
    gw.script("boss", call("mathematician", {"task": "compute 6*7"}), call("final_answer", {"answer": "42"}))
    gw.script("worker", call("calculator", {"expression": "6*7"}), call("final_answer", {"answer": "42"}))
    worker = agent(gw, [calculator_tool()], models="worker", name="mathematician",
                   description="Does arithmetic with a calculator.")
    as_tool = worker.as_tool()
    assert as_tool.name == "mathematician" and as_tool.parameters["required"] == ["task"]
    assert as_tool.openai_spec()["function"]["description"] == "Does arithmetic with a calculator."
    steps = list(agent(gw, [as_tool], models="boss").run("What is 6 times 7?"))
    assert kinds(steps) == ["action", "observation", "action", "final"]
    obs = steps[1]
    assert isinstance(obs, ObservationStep) and obs.output == "42" and obs.tool == "mathematician"
    assert kinds(obs.substeps) == ["action", "observation", "action", "final"]
    assert obs.tokens == obs.substeps[-1].totals.tokens > 0 and obs.cost_usd > 0
    totals = steps[-1].totals
    assert totals.requests == 4 and totals.models == {"boss": 2, "worker": 2}
    assert totals.tokens == steps[0].tokens + steps[2].tokens + obs.tokens
    assert gw.bodies("worker")[0]["messages"][1]["content"] == "compute 6*7"


def test_a_managed_agent_without_an_answer_is_a_tool_error(gw):
    gw.script("boss", call("helper", {"task": "t"}), call("final_answer", {"answer": "gave up"}))
    gw.script("worker", call("calculator", {"expression": "1"}))
    helper = agent(gw, [calculator_tool()], models="worker", max_steps=1).as_tool("helper")
    steps = list(agent(gw, [helper], models="boss").run("task"))
    assert kinds(steps) == ["action", "error", "action", "final"]
    assert steps[1].error_type == "tool" and "stopped without an answer" in steps[1].error
    assert steps[1].tokens > 0 and steps[-1].totals.requests == 3  # its spending still counts


# ---------------------------------------------------------------- typed errors


def test_bad_settings_and_an_unreachable_gateway_are_agent_errors(gw):
    with pytest.raises(AgentError, match="max_steps"):
        agent(gw, [], max_steps=0)
    with pytest.raises(AgentError, match="at least one model"):
        agent(gw, [], models=[])
    with pytest.raises(AgentError, match="max_cost_usd must be positive"):
        agent(gw, [], max_cost_usd=0)
    with pytest.raises(ToolDefinitionError, match="unique"):
        agent(gw, [calculator_tool(), calculator_tool()])

    @tool
    def final_answer(answer: str) -> str:
        """Clashes with the built-in one."""
        return answer

    with pytest.raises(ToolDefinitionError, match="not final_answer"):
        agent(gw, [final_answer])
    with pytest.raises(AgentError, match="give the agent a task"):
        next(agent(gw, []).run("  "))
    with pytest.raises(AgentError, match="refused the action request to nosuch: 404 model 'nosuch' not"):
        list(agent(gw, [], models="nosuch").run("hi"))
    down = ToolCallingAgent([], url=f"http://127.0.0.1:{free_port()}/v1", models="m")
    with pytest.raises(AgentError, match="cannot reach the gateway"):
        list(down.run("hi"))


# ---------------------------------------------------------------- parsing helpers


@pytest.mark.parametrize("text, calls", [
    ("The answer is 4", None),
    ('{"name": "f", "arguments": {"a": 1}}', [("f", {"a": 1})]),
    ('{"name": "f", "parameters": {"a": 1}}', [("f", {"a": 1})]),
    ('[{"name": "f"}, {"name": "g", "arguments": "{}"}]', [("f", {}), ("g", "{}")]),
    ('<tool_call>{"name": "f"}</tool_call><tool_call>{"name": "g"}</tool_call>', [("f", {}), ("g", {})]),
])
def test_parse_text_calls(text, calls):
    assert parse_text_calls(text) == calls


@pytest.mark.parametrize("text", ['{"name": "f", "arguments": {', '{"arguments": {}}', "[1, 2]"])
def test_parse_text_calls_malformed(text):
    from fleetlm.agent.loop import _Malformed

    with pytest.raises(_Malformed):
        parse_text_calls(text)


@pytest.mark.parametrize("text, code", [
    ("Thought.\n```python\nprint(1)\n```\n", "print(1)"),
    ("```py\na = 1\n```\nthen\n```python\nprint(a)\n```", "a = 1\nprint(a)"),
    ("```python\nprint('cut off'", "print('cut off'"),
    ("no code here", None),
])
def test_extract_code(text, code):
    assert extract_code(text) == code


# ---------------------------------------------------------------- the real gateway, a tiny local model


@pytest.fixture(scope="module")
def real_gateway(tmp_path_factory):
    from fleetlm.config import parse_config
    from fleetlm.model import SHIPPED_TINY_MODEL
    from fleetlm.serve.app import create_app
    from fleetlm.serve.backends import build_backends
    from fleetlm.serve.store import UsageStore

    tmp = tmp_path_factory.mktemp("agent-gateway")
    cfg = parse_config({"models": {"tiny": {"path": str(SHIPPED_TINY_MODEL), "dtype": "f32"}}})
    app = create_app(cfg, UsageStore(f"sqlite:///{tmp / 'u.db'}"), build_backends(cfg))
    with serving(app, "gateway", ready_s=60) as port:
        yield f"http://127.0.0.1:{port}/v1"


def test_through_the_real_gateway_with_a_tiny_model(real_gateway):
    client = openai.OpenAI(base_url=real_gateway, api_key="x", max_retries=0, timeout=120)
    a = ToolCallingAgent([calculator_tool()], client=client, models="tiny", max_steps=2, step_max_tokens=120,
                         temperature=1.0)
    steps = list(a.run("What is 17 * 23?"))
    # The tiny model is random, but tool_choice makes the gateway emit well-formed calls: the first request
    # calls a tool (calculator or final_answer), and the last, forced to final_answer, gives an answer.
    requested = [s for s in steps if s.requested_model]
    assert requested and all(s.model == "tiny" and s.prompt_tokens > 0 and s.completion_tokens > 0
                             for s in requested)
    assert all(isinstance(s, (ActionStep, ErrorStep)) for s in requested)
    first = requested[0]
    assert isinstance(first, ActionStep) and first.tool_calls
    assert all(c.name in ("calculator", "final_answer") for c in first.tool_calls)
    final = steps[-1]
    assert isinstance(final, FinalAnswerStep) and final.totals.requests <= 2
    assert final.totals.models == {"tiny": final.totals.requests} and final.totals.cost_usd >= 0
    assert final.ok or final.budget == "steps"
