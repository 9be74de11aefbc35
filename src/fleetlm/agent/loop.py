"""The agent loop: `Agent` (requests, budgets, checks, escalation), `ToolCallingAgent` and `CodeAgent`.

`Agent.run(task)` is a generator of typed steps (fleetlm.agent.steps). Every step is one request to an
OpenAI-compatible gateway; the request carries its kind as `fleet_step` ("plan", "action", "code",
"retry", "final") so the gateway's `auto` router can use it. A model's mistake never ends the run: a
malformed call, an unknown tool, a tool that raised or an answer that failed a check becomes an
`ErrorStep` the model reads, and the next request goes to the next model of the escalation ladder
(`models`, cheapest first); a step that succeeds sends the one after it back to the first model.
Budgets (steps, tokens, cost, wall time) end the run with a `BudgetExceeded` step; only an unreachable or
refusing gateway raises (`AgentError`).
"""

from __future__ import annotations

import ast
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fleetlm.agent.steps import (
    ActionStep,
    BudgetExceeded,
    ErrorStep,
    FinalAnswerStep,
    ObservationStep,
    PlanStep,
    RunTotals,
    Step,
    ToolCall,
)
from fleetlm.agent.tools import (
    Tool,
    ToolArgumentError,
    ToolDefinitionError,
    ToolError,
    UnknownToolError,
    find_tool,
    to_text,
)
from fleetlm.errors import FleetError

DEFAULT_URL = "http://127.0.0.1:8000/v1"
FINAL_ANSWER = "final_answer"
LAST_STEP = "This is your last step: call final_answer now with your best answer."
LAST_STEP_CODE = "This is your last step: write code that calls final_answer(...) now with your best answer."


class AgentError(FleetError):
    """The run cannot go on: the gateway is unreachable or refused a request, or a bad agent setting."""


@dataclass
class CheckResult:
    ok: bool
    reason: str = ""


# A final-answer check: answer -> bool, (ok, reason) or CheckResult. A check that raises fails.
Check = Callable[[str], Any]


def run_check(check: Check, answer: str) -> CheckResult:
    name = getattr(check, "__name__", type(check).__name__)
    try:
        out = check(answer)
    except Exception as exc:  # a broken check must not crash the run; it rejects, and says why
        return CheckResult(False, f"check {name} raised {type(exc).__name__}: {exc}")
    if isinstance(out, CheckResult):
        result = out
    elif isinstance(out, tuple):
        result = CheckResult(bool(out[0]), str(out[1]) if len(out) > 1 else "")
    else:
        result = CheckResult(bool(out))
    if not result.ok and not result.reason:
        result.reason = f"check {name} rejected the answer"
    return result


def load_prompt(name: str) -> str:
    return resources.files("fleetlm.agent").joinpath("prompts", f"{name}.md").read_text(encoding="utf-8")


def render(template: str, **values: str) -> str:
    # {{name}} placeholders, not str.format: tool descriptions and schemas are full of braces.
    for key, value in values.items():
        template = template.replace("{{" + key + "}}", value)
    return template.strip()


@dataclass
class Reply:
    """One answered request: the assistant message and what it cost."""

    message: Any  # the openai client's ChatCompletionMessage, or None when there was no choice
    requested: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    seconds: float
    escalation: str

    @property
    def text(self) -> str:
        return (getattr(self.message, "content", None) or "") if self.message is not None else ""

    def stamp(self, step: Step) -> Step:
        step.model, step.requested_model = self.model, self.requested
        step.prompt_tokens, step.completion_tokens = self.prompt_tokens, self.completion_tokens
        step.cost_usd, step.seconds, step.escalation = self.cost_usd, self.seconds, self.escalation
        return step


@dataclass
class _Run:
    task: str
    messages: list[dict]
    started: float
    totals: RunTotals = field(default_factory=RunTotals)
    steps: int = 0            # this agent's own requests (the steps budget); managed agents' are not
    index: int = 0            # steps yielded
    level: int = 0            # rung of the ladder the next request goes to
    failure: str = ""         # why the previous step failed, e.g. "a parse error on auto"
    answer: str | None = None  # a candidate final answer, not checked yet
    answer_call: str = ""     # the final_answer tool call's id (tool-calling agent)
    sub: list[tuple[RunTotals, list[Step]]] = field(default_factory=list)  # managed agents' runs this step
    failed_calls: set[str] = field(default_factory=set)  # calls that failed, as "name(arguments JSON)"

    def elapsed(self) -> float:
        return time.monotonic() - self.started


class Agent:
    """The loop shared by both agents; subclasses say how to ask (`_prepare`) and how to act (`_handle`)."""

    action_kind = "action"
    prompt_name = ""

    def __init__(self, tools: Sequence[Tool] = (), *, models: Sequence[str] | str = ("auto",),
                 client: Any = None, url: str = DEFAULT_URL, api_key: str | None = None, name: str = "agent",
                 description: str = "", instructions: str = "", max_steps: int = 10,
                 max_tokens: int | None = None, max_cost_usd: float | None = None,
                 max_seconds: float | None = None, checks: Sequence[Check] = (), plan: bool = False,
                 temperature: float = 0.0, step_max_tokens: int = 512,
                 request_timeout_s: float = 300.0) -> None:
        self.models = [models] if isinstance(models, str) else [m for m in models]
        if not self.models or not all(isinstance(m, str) and m.strip() for m in self.models):
            raise AgentError("give at least one model (the escalation ladder, cheapest first)")
        if max_steps < 1:
            raise AgentError(f"max_steps must be at least 1, got {max_steps}")
        for label, value in (("max_tokens", max_tokens), ("max_cost_usd", max_cost_usd),
                             ("max_seconds", max_seconds)):
            if value is not None and value <= 0:
                raise AgentError(f"{label} must be positive, got {value}")
        if step_max_tokens < 1:
            raise AgentError(f"step_max_tokens must be at least 1, got {step_max_tokens}")
        names = [t.name for t in tools]
        if len(set(names)) != len(names) or FINAL_ANSWER in names:
            raise ToolDefinitionError(f"tool names must be unique and not {FINAL_ANSWER}: {names}")
        self.tools = list(tools)
        self.name, self.description, self.instructions = name, description, instructions
        self.max_steps, self.max_tokens = max_steps, max_tokens
        self.max_cost_usd, self.max_seconds = max_cost_usd, max_seconds
        self.checks = list(checks)
        self.plan, self.temperature, self.step_max_tokens = plan, temperature, step_max_tokens
        if client is None:
            import openai

            # No client retries: a refused request is reported at once; escalation is the loop's business.
            key = api_key or os.environ.get("FLEET_API_KEY") or "fleet"
            client = openai.OpenAI(base_url=url, api_key=key, max_retries=0, timeout=request_timeout_s)
        self.client = client
        self.last_totals = RunTotals()
        self.last_steps: list[Step] = []

    # ------------------------------------------------------------ what subclasses define

    def _system_prompt(self) -> str:
        return render(load_prompt(self.prompt_name), tools=self._tool_list(),
                      instructions=f"\n{self.instructions}" if self.instructions else "")

    def _tool_list(self) -> str:
        return "\n".join(f"- {t.name}: {t.description.splitlines()[0] if t.description else ''}"
                         for t in self.tools) or "(none)"

    def _prepare(self, run: _Run, kind: str) -> tuple[list[dict], dict]:
        """(messages, extra request options) for the next request of this kind."""
        raise NotImplementedError

    def _handle(self, run: _Run, reply: Reply) -> Iterator[Step]:
        """Act on a reply: yield its steps (ErrorStep for a failure) and set run.answer for a final answer."""
        raise NotImplementedError

    def _reject(self, run: _Run, answer: str, reason: str) -> None:
        """Tell the model its final answer failed a check."""
        run.messages.append({"role": "user", "content": f"Your final answer {answer!r} was rejected: "
                                                        f"{reason}. Fix it and give the final answer again."})

    # ------------------------------------------------------------ the loop

    def run(self, task: str) -> Iterator[Step]:
        """Run the task, yielding each step as it happens; the last is a FinalAnswerStep or BudgetExceeded."""
        if not isinstance(task, str) or not task.strip():
            raise AgentError("give the agent a task (a non-empty string)")
        messages = [{"role": "system", "content": self._system_prompt()}, {"role": "user", "content": task}]
        run = _Run(task, messages, time.monotonic())
        self.last_totals, self.last_steps = run.totals, []
        for step in self._loop(run):
            run.index += 1
            step.index = run.index
            run.totals.seconds = run.elapsed()
            self.last_steps.append(step)
            yield step

    def answer(self, task: str) -> FinalAnswerStep:
        """Run to the end and return the final step."""
        *_, final = self.run(task)
        return final

    def _loop(self, run: _Run) -> Iterator[Step]:
        if self.plan:
            yield from self._plan(run)
        while True:
            spent = self._exhausted(run)
            if spent:
                yield self._budget_step(run, *spent)
                return
            last = self.max_steps - run.steps == 1
            kind = "final" if last else ("retry" if run.failure else self.action_kind)
            messages, options = self._prepare(run, kind)
            model = self.models[run.level]
            reply = self._request(run, kind, model, messages, **options)
            if reply is None:
                yield self._budget_step(run, "seconds", self.max_seconds or 0.0, run.elapsed())
                return
            failed: ErrorStep | None = None
            for step in self._handle(run, reply):
                if isinstance(step, ErrorStep):
                    failed = failed or step
                    step.retry_model = self._next_model(run)
                yield step
            if run.answer is not None and failed is None:
                answer = run.answer
                verdicts = [run_check(check, answer) for check in self.checks]
                rejected = next((v for v in verdicts if not v.ok), None)
                if rejected is None:
                    run.totals.seconds = run.elapsed()
                    yield FinalAnswerStep(answer=answer, totals=run.totals.copy())
                    return
                self._reject(run, answer, rejected.reason)
                run.answer = None
                failed = ErrorStep(error_type="check", retry_model=self._next_model(run),
                                   error=f"final answer {answer!r} rejected: {rejected.reason}")
                yield failed
            run.answer = None
            if failed is not None:
                run.failure = f"after a {failed.error_type} error on {model}"
                run.level = min(run.level + 1, len(self.models) - 1)
            else:
                run.failure, run.level = "", 0

    def _next_model(self, run: _Run) -> str:
        return self.models[min(run.level + 1, len(self.models) - 1)]

    def _exhausted(self, run: _Run) -> tuple[str, float, float] | None:
        t = run.totals
        if run.steps >= self.max_steps:
            return "steps", self.max_steps, run.steps
        if self.max_tokens is not None and t.tokens >= self.max_tokens:
            return "tokens", self.max_tokens, t.tokens
        if self.max_cost_usd is not None and t.cost_usd >= self.max_cost_usd:
            return "cost", self.max_cost_usd, t.cost_usd
        if self.max_seconds is not None and run.elapsed() >= self.max_seconds:
            return "seconds", self.max_seconds, round(run.elapsed(), 3)
        return None

    def _budget_step(self, run: _Run, budget: str, limit: float, used: float) -> BudgetExceeded:
        run.totals.seconds = run.elapsed()
        return BudgetExceeded(budget=budget, limit=limit, used=used, totals=run.totals.copy())

    def _plan(self, run: _Run) -> Iterator[Step]:
        messages = [{"role": "system", "content": render(load_prompt("plan"), tools=self._tool_list())},
                    {"role": "user", "content": run.task}]
        reply = self._request(run, "plan", self.models[0], messages)
        if reply is None:
            return  # out of time: the loop's budget check says so
        plan = reply.text.strip()
        run.messages.append({"role": "assistant", "content": f"Plan:\n{plan}"})
        run.messages.append({"role": "user", "content": "Now carry out the plan, one step at a time."})
        yield reply.stamp(PlanStep(plan=plan))

    def _request(self, run: _Run, kind: str, model: str, messages: list[dict],
                 **options: Any) -> Reply | None:
        """One request to the gateway; None when the wall-time budget ran out while waiting for it."""
        import openai

        max_tokens = self.step_max_tokens
        if self.max_tokens is not None:  # never ask for more completion than the token budget has left
            max_tokens = max(1, min(max_tokens, self.max_tokens - run.totals.tokens))
        if self.max_seconds is not None:
            options["timeout"] = max(0.5, self.max_seconds - run.elapsed())
        escalation = run.failure if model != self.models[0] else ""
        start = time.monotonic()
        try:
            raw = self.client.chat.completions.with_raw_response.create(
                model=model, messages=messages, temperature=self.temperature, max_tokens=max_tokens,
                extra_body={"fleet_step": kind}, **options)
            completion = raw.parse()
        except openai.APITimeoutError as exc:
            if self.max_seconds is not None and run.elapsed() >= self.max_seconds - 0.5:
                return None
            raise AgentError(f"the gateway did not answer the {kind} request to {model} in time") from exc
        except openai.APIConnectionError as exc:
            raise AgentError(f"cannot reach the gateway at {self.client.base_url}: {exc}") from exc
        except openai.APIStatusError as exc:
            raise AgentError(f"the gateway refused the {kind} request to {model}: {exc.status_code} "
                             f"{_error_message(exc)}") from exc
        seconds = time.monotonic() - start
        usage = completion.usage
        pt = int(getattr(usage, "prompt_tokens", 0) or 0)
        ct = int(getattr(usage, "completion_tokens", 0) or 0)
        try:
            cost = float(raw.headers.get("x-fleet-cost-usd") or 0.0)
        except ValueError:
            cost = 0.0
        answered_by = raw.headers.get("x-fleet-model") or completion.model or model
        run.steps += 1
        t = run.totals
        t.requests += 1
        t.prompt_tokens += pt
        t.completion_tokens += ct
        t.cost_usd += cost
        t.count(answered_by)
        message = completion.choices[0].message if completion.choices else None
        return Reply(message, model, answered_by, pt, ct, cost, seconds, escalation)

    def _execute(self, run: _Run, tool: Tool, arguments: dict) -> str:
        """Run one tool; a managed agent's tokens and cost are added to this run's (even when it fails)."""
        try:
            return tool.call(arguments)
        finally:
            if isinstance(tool, ManagedAgentTool):
                run.totals.add(tool.agent.last_totals)
                run.sub.append((tool.agent.last_totals, list(tool.agent.last_steps)))

    def _observation(self, run: _Run, **fields: Any) -> ObservationStep:
        step = ObservationStep(**fields)
        for totals, steps in run.sub:
            step.prompt_tokens += totals.prompt_tokens
            step.completion_tokens += totals.completion_tokens
            step.cost_usd += totals.cost_usd
            step.substeps += steps
        run.sub.clear()
        return step

    # ------------------------------------------------------------ teams

    def as_tool(self, name: str | None = None, description: str | None = None) -> ManagedAgentTool:
        """This agent as a tool with one `task` parameter, so a manager agent can delegate to it."""
        tool_name = name or self.name
        own = ", ".join(t.name for t in self.tools) or "none"
        desc = description or self.description or (
            f"An agent that solves a task with its own tools ({own}). Give it the whole task in plain words; "
            "it answers.")

        def delegate(task: str) -> str:
            final = self.answer(task)
            if not final.ok:
                raise ToolError(f"agent {tool_name} stopped without an answer: {final.detail()}")
            return final.answer or ""

        params = {"type": "object", "properties": {"task": {"type": "string",
                                                             "description": "the task, in plain words"}},
                  "required": ["task"], "additionalProperties": False}
        return ManagedAgentTool(tool_name, desc, params, delegate, agent=self)


@dataclass
class ManagedAgentTool(Tool):
    """A Tool that runs an agent; the manager adds that agent's tokens and cost to its own."""

    agent: Any = None


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:300]
    return str(getattr(exc, "message", exc))[:300]


# ---------------------------------------------------------------- the tool-calling agent


class _Malformed(Exception):
    """Text that tries to be a tool call and is not one."""


def parse_text_calls(text: str) -> list[tuple[str, Any]] | None:
    """Tool calls written as text (a JSON object or list, maybe in ```json fences or <tool_call> tags).

    None when the text does not look like a call at all (it is prose); _Malformed when it tries and fails.
    """
    s = text.strip()
    tagged = re.findall(r"<tool_call>(.*?)(?:</tool_call>|$)", s, re.DOTALL)
    if tagged:
        s = "[" + ",".join(t.strip() for t in tagged) + "]" if len(tagged) > 1 else tagged[0].strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", s, re.DOTALL)
    if fenced:
        s = fenced.group(1)
    if not (s.startswith("{") or s.startswith("[") or tagged or '"name"' in s):
        return None
    try:
        data = json.loads(s)
    except json.JSONDecodeError as exc:
        raise _Malformed(f"the tool call is not valid JSON: {exc.msg} (at character {exc.pos})") from exc
    items = data if isinstance(data, list) else [data]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _Malformed('a tool call must be {"name": ..., "arguments": {...}}')
        args = item.get("arguments", item.get("parameters", {}))
        calls.append((item["name"], args))
    return calls or None


def _final_answer_tool() -> dict:
    return {"type": "function", "function": {
        "name": FINAL_ANSWER, "description": "Give the final answer to the task; this ends the task.",
        "parameters": {"type": "object", "properties": {"answer": {"type": "string",
                                                                   "description": "the answer alone"}},
                       "required": ["answer"]}}}


def _final_answer_of(arguments: Any) -> str | None:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict) or "answer" not in arguments or arguments["answer"] is None:
        return None
    # A number or a list is an answer too (models send 42 for "42"): keep it, as text.
    return to_text(arguments["answer"]).strip()


class ToolCallingAgent(Agent):
    """Each step the model calls tools through the OpenAI `tools` field; `final_answer` ends the run.

    `tool_choice="required"` (the default) lets the gateway constrain a local model to well-formed calls;
    an upstream that ignores it may still answer in text, which is read as calls when it is JSON and as
    the final answer when it is prose (`accept_text_answer`).
    """

    prompt_name = "tool_calling"

    def __init__(self, tools: Sequence[Tool] = (), *, tool_choice: str | dict = "required",
                 accept_text_answer: bool = True, **kwargs: Any) -> None:
        super().__init__(tools, **kwargs)
        self.tool_choice, self.accept_text_answer = tool_choice, accept_text_answer

    def _prepare(self, run: _Run, kind: str) -> tuple[list[dict], dict]:
        specs = [t.openai_spec() for t in self.tools] + [_final_answer_tool()]
        if kind == "final":
            return ([*run.messages, {"role": "user", "content": LAST_STEP}],
                    {"tools": specs, "tool_choice": {"type": "function", "function": {"name": FINAL_ANSWER}}})
        return run.messages, {"tools": specs, "tool_choice": self.tool_choice}

    def _error(self, run: _Run, reply: Reply | None, error_type: str, error: str) -> ErrorStep:
        step = ErrorStep(error_type=error_type, error=error)
        return reply.stamp(step) if reply is not None else step

    def _handle(self, run: _Run, reply: Reply) -> Iterator[Step]:
        text = reply.text
        raw_calls = getattr(reply.message, "tool_calls", None) or []
        calls = [ToolCall(tc.id or f"call_{run.steps}_{i}", tc.function.name, tc.function.arguments)
                 for i, tc in enumerate(raw_calls)]
        if not calls:
            try:
                found = parse_text_calls(text)
            except _Malformed as exc:
                run.messages.append({"role": "assistant", "content": text})
                run.messages.append({"role": "user", "content": f"Error: {exc}. Call a tool with JSON "
                                                                "arguments that match its schema, or call "
                                                                "final_answer."})
                yield self._error(run, reply, "parse", f"{exc}: {text[:200]!r}")
                return
            if found:
                calls = [ToolCall(f"call_{run.steps}_{i}", n, a) for i, (n, a) in enumerate(found)]
            elif text.strip() and self.accept_text_answer:
                run.messages.append({"role": "assistant", "content": text})
                run.answer, run.answer_call = text.strip(), ""
                yield reply.stamp(ActionStep(text=text))
                return
            else:
                run.messages.append({"role": "assistant", "content": text})
                run.messages.append({"role": "user", "content": "Error: your reply had no tool call. Call a "
                                                                "tool, or final_answer with the answer."})
                yield self._error(run, reply, "parse", "the reply had no tool call" +
                                  (" and no text" if not text.strip() else ""))
                return
        run.messages.append({"role": "assistant", "content": text or None, "tool_calls": [
            {"id": c.id, "type": "function", "function": {
                "name": c.name,
                "arguments": c.arguments if isinstance(c.arguments, str) else json.dumps(c.arguments)}}
            for c in calls]})
        yield reply.stamp(ActionStep(tool_calls=calls, text=text))

        def answer_tool(call: ToolCall, content: str) -> None:
            run.messages.append({"role": "tool", "tool_call_id": call.id, "content": content})

        failed = False
        finals = [c for c in calls if c.name == FINAL_ANSWER]
        for call in calls:
            if call.name == FINAL_ANSWER:
                continue
            try:
                tool = find_tool(self.tools, call.name)
                call.arguments = tool.parse_arguments(call.arguments)
            except (UnknownToolError, ToolArgumentError) as exc:
                failed = True
                answer_tool(call, f"Error: {exc}")
                yield self._error(run, None, "unknown_tool" if isinstance(exc, UnknownToolError) else "parse",
                                  str(exc))
                continue
            key = f"{call.name}({json.dumps(call.arguments, sort_keys=True)})"
            try:
                output = self._execute(run, tool, call.arguments)
            except ToolError as exc:
                failed = True
                # Small models repeat a failing call word for word (the 1.5B did, five times): say so.
                again = " You made this exact call before and it failed: change it." \
                    if key in run.failed_calls else ""
                run.failed_calls.add(key)
                answer_tool(call, f"Error: {exc}{again}")
                error = self._error(run, None, "tool", str(exc))
                sub = self._observation(run)  # a managed agent that failed still spent its tokens
                error.prompt_tokens, error.completion_tokens = sub.prompt_tokens, sub.completion_tokens
                error.cost_usd = sub.cost_usd
                yield error
                continue
            answer_tool(call, output)
            yield self._observation(run, tool=call.name, tool_call_id=call.id, output=output)
        for i, call in enumerate(finals):
            answer = _final_answer_of(call.arguments)
            if i > 0:
                answer_tool(call, "Ignored: only the first final_answer counts.")
            elif answer is None:
                failed = True
                answer_tool(call, 'Error: call final_answer with {"answer": "..."}.')
                yield self._error(run, None, "parse", f"final_answer needs an answer, got {call.arguments!r}")
            elif failed:
                answer_tool(call, "Not accepted: another call in this step failed. Fix it first.")
            elif len(calls) > len(finals):
                # Small models call tools and answer in one breath, guessing the results (seen with the
                # 1.5B on the agent benchmark): an answer counts only once the results were there to read.
                answer_tool(call, "Not accepted: you answered before seeing the results of your other calls. "
                                  "Read them, then call final_answer alone.")
            else:
                run.answer, run.answer_call = answer, call.id

    def _reject(self, run: _Run, answer: str, reason: str) -> None:
        if run.answer_call:
            run.messages.append({"role": "tool", "tool_call_id": run.answer_call,
                                 "content": f"Error: your final answer was rejected: {reason}. "
                                            "Fix it and call final_answer again."})
        else:
            super()._reject(run, answer, reason)


# ---------------------------------------------------------------- the code agent


def extract_code(text: str) -> str | None:
    """The Python in a reply's ```python blocks (joined); an unclosed last block (cut off) counts too."""
    blocks = re.findall(r"```(?:python3?|py)?[ \t]*\n(.*?)(?:```|$)", text, re.DOTALL)
    code = "\n".join(b.rstrip() for b in blocks if b.strip())
    return code or None


class CodeAgent(Agent):
    """Each step the model writes a Python program; it runs in the bubblewrap sandbox, where the tools are
    functions reached through the bridge (fleetlm.sandbox.bridge), and `final_answer(x)` ends the run."""

    action_kind = "code"
    prompt_name = "code"

    def __init__(self, tools: Sequence[Tool] = (), *, code_timeout_s: float = 30.0, memory_mb: int = 512,
                 **kwargs: Any) -> None:
        from fleetlm.sandbox import check_sandbox

        super().__init__(tools, **kwargs)
        check_sandbox()  # no sandbox, no code agent: the model's code never runs on the host
        self.code_timeout_s, self.memory_mb = code_timeout_s, memory_mb

    def _tool_list(self) -> str:
        lines = []
        for t in self.tools:
            doc = " ".join(t.description.split())
            lines.append(f"{t.signature()}  # {doc[:300]}")
        return "\n".join(lines) or "(no tools)"

    def _prepare(self, run: _Run, kind: str) -> tuple[list[dict], dict]:
        if kind == "final":
            return [*run.messages, {"role": "user", "content": LAST_STEP_CODE}], {}
        return run.messages, {}

    def _handle(self, run: _Run, reply: Reply) -> Iterator[Step]:
        from fleetlm.sandbox.bridge import FINAL_ANSWER as BRIDGE_FINAL
        from fleetlm.sandbox.bridge import run_python_with_tools

        text = reply.text
        run.messages.append({"role": "assistant", "content": text})
        code = extract_code(text)
        problem = None
        if code is None:
            problem = f"the reply had no ```python code block: {' '.join(text.split())[:160]!r}"
        else:
            try:
                ast.parse(code)  # parsing runs nothing: a syntax error is caught before the sandbox starts
            except SyntaxError as exc:
                problem = f"syntax error on line {exc.lineno}: {exc.msg}"
        if problem:
            run.messages.append({"role": "user",
                                 "content": f"Error: {problem}. Answer with one ```python block."})
            yield reply.stamp(ErrorStep(error_type="parse", error=problem))
            return
        yield reply.stamp(ActionStep(code=code, text=text))
        tools = {t.name: t for t in self.tools}
        timeout = self.code_timeout_s
        if self.max_seconds is not None:
            timeout = max(1.0, min(timeout, self.max_seconds - run.elapsed()))
        result = run_python_with_tools(
            code, {n: t.parameter_names for n, t in tools.items()},
            lambda name, args: self._execute(run, tools[name], args),
            descriptions={n: t.description for n, t in tools.items()}, timeout_s=timeout,
            memory_mb=self.memory_mb)
        calls = [{"tool": c.tool, "arguments": c.arguments, "result": c.result, "error": c.error}
                 for c in result.calls if c.tool != BRIDGE_FINAL]
        log = "\n".join(
            f"{c['tool']}({json.dumps(c['arguments'], ensure_ascii=False, default=str)[:200]}) -> "
            + (to_text(c["result"], 300) if c["error"] is None else f"error: {c['error'][:300]}")
            for c in calls)
        stdout = result.sandbox.stdout.strip()
        output = to_text(stdout or "(no output)") + (f"\nTool calls:\n{log}" if log else "")
        if result.answered:
            run.answer = to_text(result.answer).strip()
            run.messages.append({"role": "user", "content": f"Output:\n{output}"})
            yield self._observation(run, tool="python", output=output, calls=calls)
            return
        if not result.sandbox.passed:
            stderr = "\n".join(result.sandbox.stderr.strip().splitlines()[-8:])
            tool_failed = bool(result.failed_calls) and "ToolCallError" in result.sandbox.stderr
            error = f"{result.sandbox.reason}\n{stderr}".strip()
            run.messages.append({"role": "user", "content": f"Error: the code failed.\n{error}\n"
                                                            f"Output before the error:\n{output}"})
            step = self._observation(run)  # only to collect a managed agent's spending
            err = ErrorStep(error_type="tool" if tool_failed else "code", error=error,
                            prompt_tokens=step.prompt_tokens, completion_tokens=step.completion_tokens,
                            cost_usd=step.cost_usd)
            yield err
            return
        run.messages.append({"role": "user", "content": f"Output:\n{output}\nContinue; call "
                                                        "final_answer(answer) when you know the answer."})
        yield self._observation(run, tool="python", output=output, calls=calls)
