"""`fleet demo`: the README's main command."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def demo(
        out: Path = typer.Option(Path("fleet-demo"), "--out", help="where the report, plot and results go"),
        config: Path = typer.Option(None, "--config", "-c", help="fleet.yaml (default: the embedded fleet)"),
        n: int = typer.Option(40, "--n", min=1, help="test tasks per domain"),
        concurrency: int = typer.Option(16, "--concurrency", min=1, help="requests in flight"),
        seed: int = typer.Option(12345, "--seed", help="seed of the test tasks"),
    ) -> None:
        """Serve the embedded fleet, send the test split through it (each model, then the router), report."""
        from fleetlm.demo.run import demo as run_demo

        report = run_demo(out, config, n_per_domain=n, concurrency=concurrency, seed=seed)
        typer.echo("\n".join(report["summary"]))
        typer.echo(f"report: {out / 'report.html'}  plot: {out / 'cost_accuracy.png'}  "
                   f"({report['seconds']:.0f} s)")
