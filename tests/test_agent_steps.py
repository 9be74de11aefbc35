"""fleetlm.agent.steps: what each step carries, how it prints, and how a run's totals add up."""

import json

from fleetlm.agent.steps import (
    ActionStep,
    BudgetExceeded,
    ErrorStep,
    FinalAnswerStep,
    ObservationStep,
    PlanStep,
    RunTotals,
    ToolCall,
)


def test_lines_say_model_tokens_cost_and_escalation():
    step = ActionStep(index=3, model="qwen-1.5b", requested_model="auto", prompt_tokens=100,
                      completion_tokens=20, cost_usd=0.0012, seconds=1.25,
                      escalation="after a parse error on auto",
                      tool_calls=[ToolCall("c1", "calculator", {"expression": "2+2"})])
    assert step.tokens == 120
    assert step.line() == ('[3] action (auto -> qwen-1.5b, 120 tok, $0.001200, 1.2 s, escalated after a '
                           'parse error on auto): calculator({"expression": "2+2"})')
    obs = ObservationStep(index=4, tool="calculator", output="4")
    assert obs.line() == "[4] observation: calculator -> 4"
    err = ErrorStep(index=5, error_type="tool", error="division by zero", retry_model="big")
    assert err.line() == "[5] error: tool: division by zero -> retrying on big"
    assert PlanStep(index=1, plan="1. a\n2. b", model="m").line() == "[1] plan (m): 1. a 2. b"
    assert ActionStep(code="print(1)\nprint(2)").detail() == "code: print(1) print(2)"
    assert len(ObservationStep(output="x" * 1000).detail()) < 320  # long outputs print shortened


def test_final_steps_and_budget():
    final = FinalAnswerStep(answer="42")
    budget = BudgetExceeded(budget="cost", limit=0.01, used=0.0123)
    assert final.ok and isinstance(budget, FinalAnswerStep) and not budget.ok and budget.kind == "budget"
    assert budget.line() == "[0] budget: cost budget exhausted (0.0123 of 0.01); no answer"


def test_to_dict_is_json_with_the_kind():
    totals = RunTotals(requests=2, prompt_tokens=10, completion_tokens=5, cost_usd=0.5, models={"a": 2})
    d = FinalAnswerStep(index=7, answer="x", totals=totals).to_dict()
    assert d["kind"] == "final" and d["totals"]["models"] == {"a": 2} and d["index"] == 7
    assert json.loads(json.dumps(d))["answer"] == "x"
    obs = ObservationStep(output="o", substeps=[ActionStep(text="t")]).to_dict()
    assert obs["substeps"][0]["text"] == "t"


def test_totals_add_and_copy():
    a = RunTotals(requests=1, prompt_tokens=10, completion_tokens=2, cost_usd=0.1, models={"x": 1})
    b = RunTotals(requests=2, prompt_tokens=5, completion_tokens=5, cost_usd=0.2, models={"x": 1, "y": 1})
    snapshot = a.copy()
    a.add(b)
    assert (a.requests, a.tokens, round(a.cost_usd, 6), a.models) == (3, 22, 0.3, {"x": 2, "y": 1})
    assert snapshot.requests == 1 and snapshot.models == {"x": 1}  # a copy does not follow
    assert a.summary().startswith("3 requests, 15 prompt + 7 completion tokens, $0.300000")
