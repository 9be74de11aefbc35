"""`fleet agent run "TASK"`: an agent against a gateway, printing each step as it happens and the cost."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import typer

from fleetlm.agent.steps import RunTotals

agent_app = typer.Typer(help="Agents that call tools, or write code that calls them, through the gateway.",
                        no_args_is_help=True)


def _ladder(models: list[str]) -> list[str]:
    ladder = [m.strip() for spec in models for m in spec.split(",") if m.strip()]
    return ladder or ["auto"]


def _totals_line(totals: RunTotals) -> str:
    models = ", ".join(f"{m} x{n}" for m, n in totals.most_used())
    return (f"tokens: {totals.tokens} ({totals.prompt_tokens} prompt + {totals.completion_tokens} "
            f"completion), cost: ${totals.cost_usd:.6f}, {totals.requests} requests, {totals.seconds:.1f} s"
            + (f", models: {models}" if models else ""))


@agent_app.command("run")
def run_cmd(
    task: str = typer.Argument(..., help="The task, in plain words."),
    tools: str = typer.Option("calculator", "--tools",
                              help="Comma-separated built-in tools: calculator, files, sqlite, python."),
    model: list[str] = typer.Option(["auto"], "--model",
                                    help="Model, or an escalation ladder cheapest first (a,b or repeat)."),
    url: str = typer.Option("http://127.0.0.1:8000/v1", "--url", help="The gateway's OpenAI-compatible URL."),
    code: bool = typer.Option(False, "--code",
                              help="A code agent: the model writes Python that runs in the sandbox."),
    max_steps: int = typer.Option(10, "--max-steps", min=1, help="Requests to the gateway, at most."),
    max_tokens: int = typer.Option(0, "--max-tokens", min=0, help="Token budget (0: none)."),
    max_cost: float = typer.Option(0.0, "--max-cost", min=0.0, help="Cost budget in USD (0: none)."),
    max_seconds: float = typer.Option(0.0, "--max-seconds", min=0.0, help="Wall-time budget (0: none)."),
    workspace: Path = typer.Option(None, "--workspace",
                                   help="Folder for the files and sqlite tools (default: a temporary one)."),
    plan: bool = typer.Option(False, "--plan", help="Ask for a plan first (one more request)."),
    as_json: bool = typer.Option(False, "--json", help="Print each step as a JSON line instead."),
) -> None:
    """Run TASK with the given tools; prints every step as it happens and the tokens and cost at the end."""
    from fleetlm.agent.loop import CodeAgent, ToolCallingAgent
    from fleetlm.agent.tools import builtin_tools

    names = [t.strip() for t in tools.split(",") if t.strip()]
    temporary = workspace is None and any(n in ("files", "sqlite") for n in names)
    folder = Path(tempfile.mkdtemp(prefix="fleet-agent-")) if temporary else workspace
    try:
        kind = CodeAgent if code else ToolCallingAgent
        agent = kind(builtin_tools(names, folder), models=_ladder(model), url=url, max_steps=max_steps,
                     max_tokens=max_tokens or None, max_cost_usd=max_cost or None,
                     max_seconds=max_seconds or None, plan=plan)
        final = None
        for step in agent.run(task):
            typer.echo(json.dumps(step.to_dict(), default=str) if as_json else step.line())
            final = step
        if not as_json:
            typer.echo(f"answer: {final.answer}" if final is not None and final.ok else "no answer")
            typer.echo(_totals_line(agent.last_totals))
        if final is None or not final.ok:
            raise typer.Exit(1)
    finally:
        if temporary and folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
