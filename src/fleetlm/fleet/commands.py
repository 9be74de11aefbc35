"""`fleet fleet build`: rebuild the embedded fleet from a seed; `fleet fleet info`: what is shipped."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer

from fleetlm.errors import ConfigError

fleet_app = typer.Typer(help="The embedded fleet: build it from a seed, show what ships.",
                        no_args_is_help=True)


@fleet_app.command("build")
def build_cmd(
    out: Path = typer.Option(..., "--out", help="directory to build the fleet in"),
    recipe: str = typer.Option("full", "--recipe", help="full (the shipped fleet) | ci (a reduced copy)"),
    seed: int = typer.Option(0, "--seed"),
    jobs: int | None = typer.Option(None, "--jobs", help="models trained at once (default: the recipe's)"),
    reuse: bool = typer.Option(False, "--reuse", help="keep the tokenizer and models already built in OUT"),
) -> None:
    """Train the generalists, distill the expert, evaluate, record routing outcomes, fit the router."""
    from fleetlm.fleet.recipe import RECIPES, build_fleet

    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    chosen = replace(RECIPES[recipe], seed=seed, jobs=jobs or RECIPES[recipe].jobs)
    summary = build_fleet(out, chosen, log=typer.echo, reuse=reuse)
    typer.echo(f"built the {recipe} fleet in {out} in {summary['seconds']:.0f} s; serve it with "
               f"`fleet serve --config {out / 'fleet.yaml'}`")


@fleet_app.command("info")
def info_cmd(
    fleet_dir: Path | None = typer.Option(None, "--dir", help="a built fleet (default: the shipped one)"),
) -> None:
    """The fleet's models, sizes, prices and test accuracy."""
    from fleetlm.fleet import FLEET_DIR, default_config
    from fleetlm.fleet.recipe import params_of

    fleet_dir = fleet_dir or FLEET_DIR
    config = default_config(fleet_dir)
    accuracy = {}
    if (fleet_dir / "eval.json").is_file():
        accuracy = {m: r["accuracy"] for m, r in json.loads((fleet_dir / "eval.json").read_text()).items()}
    typer.echo(f"{'model':<14}{'params':>10}{'$/1M in':>10}{'$/1M out':>10}{'test acc':>10}")
    for name, spec in config.models.items():
        acc = accuracy.get(name)
        typer.echo(f"{name:<14}{params_of(Path(spec.path)):>10,}{spec.price.input:>10.4f}"
                   f"{spec.price.output:>10.4f}{'' if acc is None else f'{acc:.3f}':>10}")
    if config.router:
        r = config.router
        typer.echo(f"router: {r.name} ({r.kind}, floor {r.quality_floor})")


def register(app: typer.Typer) -> None:
    app.add_typer(fleet_app, name="fleet")
