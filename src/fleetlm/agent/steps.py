"""The steps an agent's run yields, as dataclasses: plan, action, observation, error, final answer, budget.

A step that made a request to the gateway carries what that request cost: the model that answered (the
gateway's `x-fleet-model`), the one asked for, tokens, cost (`x-fleet-cost-usd`) and seconds, and when it
ran on a stronger model than the first, why (`escalation`). Steps without a request (a tool's observation)
carry zeros there. `RunTotals` adds a run up; the final step holds a copy.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

PREVIEW_CHARS = 300  # how much of a long text one printed line shows


def _preview(text: str, limit: int = PREVIEW_CHARS) -> str:
    one_line = " ".join(str(text).split())
    return one_line if len(one_line) <= limit else one_line[:limit] + "..."


@dataclass
class RunTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    models: dict[str, int] = field(default_factory=dict)  # answering model -> requests

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, other: RunTotals) -> None:
        """Fold a managed agent's run into its manager's (its requests are the manager's requests too)."""
        self.requests += other.requests
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        for model, n in other.models.items():
            self.count(model, n)

    def count(self, model: str, n: int = 1) -> None:
        self.models[model] = self.models.get(model, 0) + n

    def most_used(self) -> list[tuple[str, int]]:
        return sorted(self.models.items(), key=lambda kv: (-kv[1], kv[0]))

    def copy(self) -> RunTotals:
        return RunTotals(self.requests, self.prompt_tokens, self.completion_tokens, self.cost_usd,
                         self.seconds, dict(self.models))

    def summary(self) -> str:
        models = ", ".join(f"{m} x{n}" for m, n in self.most_used())
        return (f"{self.requests} requests, {self.prompt_tokens} prompt + {self.completion_tokens} "
                f"completion tokens, ${self.cost_usd:.6f}, {self.seconds:.1f} s"
                + (f" ({models})" if models else ""))


@dataclass(kw_only=True)
class Step:
    kind: ClassVar[str] = "step"
    index: int = 0
    model: str = ""            # the model that answered (x-fleet-model), "" for a step without a request
    requested_model: str = ""  # the model asked for: "auto" or a rung of the escalation ladder
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    escalation: str = ""       # why this request went to a stronger model, e.g. "after a parse error on auto"

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind
        return d

    def detail(self) -> str:
        return ""

    def line(self) -> str:
        """One line for a terminal, as `fleet agent run` prints it."""
        meta = []
        if self.model or self.requested_model:
            who = self.model or self.requested_model
            if self.requested_model and self.model and self.requested_model != self.model:
                who = f"{self.requested_model} -> {self.model}"
            meta.append(who)
        if self.tokens:
            meta.append(f"{self.tokens} tok")
        if self.cost_usd:
            meta.append(f"${self.cost_usd:.6f}")
        if self.seconds >= 0.05:
            meta.append(f"{self.seconds:.1f} s")
        if self.escalation:
            meta.append(f"escalated {self.escalation}")
        head = f"[{self.index}] {self.kind}" + (f" ({', '.join(meta)})" if meta else "")
        return f"{head}: {self.detail()}"


@dataclass(kw_only=True)
class PlanStep(Step):
    kind: ClassVar[str] = "plan"
    plan: str = ""

    def detail(self) -> str:
        return _preview(self.plan)


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: dict | str  # a dict once parsed; the raw text when it did not parse

    def render(self) -> str:
        args = self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments,
                                                                                  ensure_ascii=False)
        return f"{self.name}({args})"


@dataclass(kw_only=True)
class ActionStep(Step):
    kind: ClassVar[str] = "action"
    tool_calls: list[ToolCall] = field(default_factory=list)
    code: str = ""  # the code agent's program
    text: str = ""  # the model's words besides its calls or code

    def detail(self) -> str:
        if self.code:
            return "code: " + _preview(self.code)
        if self.tool_calls:
            return "; ".join(_preview(c.render(), 200) for c in self.tool_calls)
        return _preview(self.text)


@dataclass(kw_only=True)
class ObservationStep(Step):
    kind: ClassVar[str] = "observation"
    tool: str = ""          # the tool that answered ("python" for the code agent's program)
    tool_call_id: str = ""
    output: str = ""
    calls: list[dict] = field(default_factory=list)  # the code agent's bridged tool calls, in order
    substeps: list[Step] = field(default_factory=list)  # a managed agent's own steps

    def detail(self) -> str:
        return (f"{self.tool} -> " if self.tool else "") + _preview(self.output)


# What went wrong in an ErrorStep; each is the model's mistake or a tool's failure, shown to the model.
ERROR_TYPES = ("parse", "unknown_tool", "tool", "code", "check")


@dataclass(kw_only=True)
class ErrorStep(Step):
    kind: ClassVar[str] = "error"
    error_type: str = "parse"  # one of ERROR_TYPES
    error: str = ""
    retry_model: str = ""      # the model the next request goes to (a stronger one when there is one)

    def detail(self) -> str:
        retry = f" -> retrying on {self.retry_model}" if self.retry_model else ""
        return f"{self.error_type}: {_preview(self.error)}{retry}"


@dataclass(kw_only=True)
class FinalAnswerStep(Step):
    kind: ClassVar[str] = "final"
    answer: str | None = None
    totals: RunTotals = field(default_factory=RunTotals)

    @property
    def ok(self) -> bool:
        return self.answer is not None

    def detail(self) -> str:
        return _preview(self.answer or "")


@dataclass(kw_only=True)
class BudgetExceeded(FinalAnswerStep):
    """The run ended without an accepted answer because a budget ran out."""

    kind: ClassVar[str] = "budget"
    budget: str = ""   # "steps", "tokens", "cost" or "seconds"
    limit: float = 0.0
    used: float = 0.0

    def detail(self) -> str:
        return f"{self.budget} budget exhausted ({self.used:g} of {self.limit:g}); no answer"
