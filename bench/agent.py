"""The agent benchmark: seeded multi-step tasks on the confined tools, run through a gateway per model.

    python bench/agent.py --url http://127.0.0.1:8000/v1 --models auto,qwen2.5-coder-1.5b-instruct --limit 20
    python bench/agent.py --models "qwen2.5-coder-0.5b-instruct>qwen2.5-coder-1.5b-instruct" --code

Each entry of --models is one agent configuration: a model, or an escalation ladder written `a>b` (cheapest
first). Every task (fleetlm.agent.bench_tasks) gets a fresh workspace with its files and database; the
agent runs it through the gateway and the task's checker reads the final answer and the state it left.
Prints, per configuration side by side: success rate, tokens, cost (the gateway's x-fleet-cost-usd),
requests, error steps and wall time; --out writes every run as JSON. Running real models is slow on a
small machine: start with --limit 2.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from fleetlm.agent.bench_tasks import FAMILIES, AgentTask, generate_tasks
from fleetlm.agent.loop import CodeAgent, ToolCallingAgent
from fleetlm.agent.steps import BudgetExceeded, ErrorStep
from fleetlm.agent.tools import builtin_tools
from fleetlm.errors import FleetError


@dataclass
class Outcome:
    task: str
    family: str
    config: str
    passed: bool
    why: str = ""
    answer: str | None = None
    requests: int = 0
    tokens: int = 0
    cost_usd: float = 0.0
    errors: int = 0
    budget: str = ""
    seconds: float = 0.0
    models: dict = field(default_factory=dict)


def run_task(task: AgentTask, ladder: list[str], args: argparse.Namespace) -> Outcome:
    workspace = Path(tempfile.mkdtemp(prefix="fleet-agent-bench-"))
    config = ">".join(ladder)
    start = time.monotonic()
    try:
        task.prepare(workspace)
        kind = CodeAgent if args.code else ToolCallingAgent
        agent = kind(builtin_tools(task.tools, workspace), models=ladder, url=args.url,
                     max_steps=args.max_steps, max_seconds=args.max_seconds, step_max_tokens=args.step_tokens,
                     temperature=args.temperature)
        errors, final = 0, None
        try:
            for step in agent.run(task.prompt):
                errors += isinstance(step, ErrorStep)
                final = step
                if args.verbose:
                    print(f"  {task.id} {step.line()}", file=sys.stderr)
        except FleetError as exc:  # the gateway refused or broke: this run fails, the benchmark goes on
            return Outcome(task.id, task.family, config, False, f"error: {exc}",
                           seconds=time.monotonic() - start)
        answer = final.answer if final is not None else None
        passed, why = task.check(answer, workspace)
        totals = agent.last_totals
        return Outcome(task.id, task.family, config, passed, why, answer, totals.requests, totals.tokens,
                       totals.cost_usd, errors, final.budget if isinstance(final, BudgetExceeded) else "",
                       time.monotonic() - start, dict(totals.models))
    finally:
        shutil.rmtree(workspace, ignore_errors=True)


def _rate(outcomes: list[Outcome]) -> str:
    won = sum(o.passed for o in outcomes)
    return f"{won}/{len(outcomes)} ({100 * won / max(1, len(outcomes)):.1f}%)"


def _per_success(outcomes: list[Outcome]) -> str:
    won = sum(o.passed for o in outcomes)
    return f"{sum(o.cost_usd for o in outcomes) / won:.6f}" if won else "-"


ROWS = {
    "tasks": lambda g: str(len(g)),
    "success": _rate,
    "tokens (total)": lambda g: str(sum(o.tokens for o in g)),
    "tokens per task": lambda g: f"{sum(o.tokens for o in g) / max(1, len(g)):.0f}",
    "cost (USD, total)": lambda g: f"{sum(o.cost_usd for o in g):.6f}",
    "cost per success": _per_success,
    "requests per task": lambda g: f"{sum(o.requests for o in g) / max(1, len(g)):.1f}",
    "error steps": lambda g: str(sum(o.errors for o in g)),
    "out of budget": lambda g: str(sum(1 for o in g if o.budget)),
    "seconds per task": lambda g: f"{sum(o.seconds for o in g) / max(1, len(g)):.1f}",
}


def summarize(outcomes: list[Outcome], configs: list[str]) -> str:
    """The configurations side by side: one column each, then success per task family."""
    groups = {c: [o for o in outcomes if o.config == c] for c in configs}
    width = max(16, *(len(c) + 2 for c in configs))  # a ladder's name is long; it is the column's title
    lines = [f"{'':<24}" + "".join(f"{c:>{width}}" for c in configs)]
    for label, fn in ROWS.items():
        lines.append(f"{label:<24}" + "".join(f"{fn(g):>{width}}" for g in groups.values()))
    for fam in sorted({o.family for o in outcomes}):
        cells = []
        for g in groups.values():
            f = [o for o in g if o.family == fam]
            cells.append(f"{sum(o.passed for o in f)}/{len(f)}")
        lines.append(f"  {fam:<22}" + "".join(f"{c:>{width}}" for c in cells))
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000/v1", help="the gateway's OpenAI-compatible URL")
    p.add_argument("--models", default="auto",
                   help="comma-separated configurations; each a model or a ladder a>b (default: auto)")
    p.add_argument("--limit", type=int, default=0, help="run only the first N tasks (0: all)")
    p.add_argument("--n", type=int, default=140, help="tasks to generate (>= 100 for the full set)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", default="", help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    p.add_argument("--code", action="store_true", help="the code agent instead of the tool-calling one")
    p.add_argument("--max-steps", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=300.0, help="wall-time budget per task")
    p.add_argument("--step-tokens", type=int, default=400, help="max completion tokens per step")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--out", type=Path, help="write every run as JSON here")
    p.add_argument("--verbose", action="store_true", help="print every step to stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configs = [c.strip() for c in args.models.split(",") if c.strip()]
    if not configs or args.limit < 0 or args.max_steps < 1:
        print("error: give --models, --limit >= 0 and --max-steps >= 1", file=sys.stderr)
        return 2
    try:
        tasks = generate_tasks(args.n, args.seed, [f for f in args.families.split(",") if f] or None)
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.limit:
        tasks = tasks[:args.limit]
    outcomes = []
    for config in configs:
        ladder = [m.strip() for m in config.split(">") if m.strip()]
        for task in tasks:
            try:
                outcome = run_task(task, ladder, args)
            except FleetError as exc:  # the agent cannot be built here (no sandbox for --code, a bad setting)
                print(f"error: {exc}", file=sys.stderr)
                return 2
            outcomes.append(outcome)
            mark = "ok  " if outcome.passed else "FAIL"
            why = f" ({outcome.why})" if outcome.why else ""
            print(f"{mark} {config} {task.id}: {outcome.requests} requests, {outcome.tokens} tokens, "
                  f"${outcome.cost_usd:.6f}, {outcome.seconds:.1f} s{why}", flush=True)
    print()
    print(summarize(outcomes, configs))
    if args.out:
        args.out.write_text(json.dumps([o.__dict__ for o in outcomes], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
