"""`fleet demo`: the README's main command."""

from __future__ import annotations

from pathlib import Path

import typer

from fleetlm.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("fleet-demo"), "--out", help="where the report, plot and results go"),
        config: Path = typer.Option(None, "--config", "-c",
                                    help="fleet.yaml (default: the default fleet + recorded GPT-4 on GSM8K)"),
        benches: str = typer.Option("humaneval,gsm8k,tasks", "--benches", help="comma-separated"),
        budget_s: float = typer.Option(None, "--budget-s", min=1,
                                       help="seconds of requests: no round starts that would end past it "
                                            "(default 420)"),
        chunk: int = typer.Option(None, "--chunk", min=1,
                                  help="items of each benchmark per round, sent at once (default 1; the task "
                                       "suite 4x)"),
        rounds: int = typer.Option(None, "--rounds", min=1, help="at most this many rounds"),
        seed: int = typer.Option(0, "--seed", help="order of the held-out items"),
        gsm8k_data: Path = typer.Option(None, "--gsm8k-data", help="a RouteLLM-style gsm8k folder"),
        outcomes: Path = typer.Option(None, "--outcomes", help="recorded outcomes (default: the shipped)"),
        prepare: bool = typer.Option(False, "--prepare",
                                     help="only measure what the gateway would measure at its first start "
                                          "(each model's engines, once per machine), then exit"),
    ) -> None:
        """Serve the real fleet, send held-out HumanEval, GSM8K and task-suite items through each model and
        `auto` with the OpenAI client, and report accuracy, cost, latency and routes (live and recorded)."""
        from fleetlm.demo.items import BENCHES
        from fleetlm.demo.run import DEFAULT_BUDGET_S, DEFAULT_CHUNK
        from fleetlm.demo.run import demo as run_demo
        from fleetlm.demo.run import prepare as run_prepare

        def log(message: str) -> None:
            typer.echo(message, err=True)

        if prepare:
            typer.echo("\n".join(run_prepare(out, config, gsm8k_data=gsm8k_data, log=log)))
            return
        names = [b.strip() for b in benches.split(",") if b.strip()]
        unknown = [b for b in names if b not in BENCHES]
        if unknown or not names:
            raise ConfigError(f"--benches: unknown {', '.join(unknown) or '(none given)'}; expected some of "
                              f"{', '.join(BENCHES)}")
        report = run_demo(out, config, benches=names, chunk=chunk or DEFAULT_CHUNK,
                          budget_s=budget_s or DEFAULT_BUDGET_S, max_rounds=rounds, seed=seed,
                          gsm8k_data=gsm8k_data, outcomes=outcomes, log=log)
        typer.echo("\n".join(report["summary"]))
        typer.echo(f"report: {out / 'report.html'}  plot: {out / 'cost_accuracy.png'}  "
                   f"({report['seconds']:.0f} s, gateway start {report['gateway_start_s']:.0f} s)")
