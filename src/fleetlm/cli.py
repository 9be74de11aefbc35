"""The `fleet` command: thin, it parses, calls the library and prints.

Each capability registers its own commands from `fleetlm.<capability>.commands`, a module that
exposes `register(app: typer.Typer) -> None`; a capability not built yet is simply absent.
"""

from __future__ import annotations

import importlib
import sys

import typer

from fleetlm.errors import FleetError

CAPABILITIES = ("catalog", "model", "engine", "compress", "bench", "tasks", "evals", "train", "route",
                "serve", "fleet", "demo", "mcp", "agent", "voice")

app = typer.Typer(
    name="fleet",
    help="fleetlm: serve, route, distill, compress and accelerate a fleet of language models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the fleetlm version."""
    from fleetlm import __version__

    typer.echo(__version__)


def _register_capabilities() -> None:
    for name in CAPABILITIES:
        module_name = f"fleetlm.{name}.commands"
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only a capability that does not exist yet is skipped; a broken import inside one is a bug.
            if exc.name in (module_name, f"fleetlm.{name}"):
                continue
            raise
        module.register(app)


_register_capabilities()


def main() -> None:
    try:
        app()
    except FleetError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
