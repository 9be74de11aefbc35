"""`fleet tasks generate|docs|routing` (`fleet eval` lives in fleetlm.evals.commands)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fleetlm.tasks.base import TaskError

tasks_app = typer.Typer(help="The built-in checkable task suite.", no_args_is_help=True)


def _domains(text: str | None) -> list[str] | None:
    from fleetlm.tasks.suite import domain_module

    if not text:
        return None
    names = [d.strip() for d in text.split(",") if d.strip()]
    for name in names:
        domain_module(name)  # raises a TaskError naming the valid domains
    return names


@tasks_app.command("generate")
def generate_cmd(
    out: Path = typer.Option(..., "--out", help="Where to write the JSONL records."),
    domains: str = typer.Option("", "--domains", help="Comma-separated domains (default: all)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    n: int = typer.Option(100, "--n", help="Records per domain, spread evenly over the levels."),
    levels: str = typer.Option("", "--levels", help="Levels, e.g. 1,2,3 or 2-5 (default: all)."),
    split: str = typer.Option("train", "--split", help="train, dev, test or all."),
    world_seed: int = typer.Option(0, "--world-seed", help="Seed of the facts world (keep it fixed)."),
    system: str = typer.Option("", "--system", help="An optional system message for every record."),
    allow_duplicates: bool = typer.Option(False, "--allow-duplicates", help="Let a question repeat."),
    with_answers: bool = typer.Option(False, "--with-answers",
                                      help="End each conversation with the gold answer (training data)."),
) -> None:
    """Write chat records with gold answers: training data and eval sets in one format."""
    from fleetlm.tasks.suite import generate, parse_levels, write_jsonl

    records = generate(_domains(domains), n=n, seed=seed, levels=parse_levels(levels), split=split,
                       unique=not allow_duplicates, world_seed=world_seed, system=system or None,
                       answers=with_answers)
    write_jsonl(records, out)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["domain"]] = counts.get(r["domain"], 0) + 1
    summary = ", ".join(f"{d} {c}" for d, c in counts.items())
    typer.echo(f"wrote {len(records)} records ({summary}) to {out}")


@tasks_app.command("docs")
def docs_cmd(
    out: Path = typer.Option(..., "--out", help="Directory for the documents."),
    world_seed: int = typer.Option(0, "--world-seed", help="Seed of the facts world."),
    level: int = typer.Option(6, "--level", help="World size level (1-6)."),
) -> None:
    """Export the facts world as a document collection (one .txt per entity + docs.jsonl)."""
    from fleetlm.tasks import facts
    from fleetlm.tasks.suite import write_documents

    if level not in facts.LEVELS:
        raise TaskError(f"level must be one of {facts.LEVELS}, got {level}")
    path = write_documents(out, world_seed=world_seed, level=level)
    n = sum(1 for _ in path.open())
    typer.echo(f"wrote {n} documents ({facts.build_world(world_seed, level).facts()} facts) to {out}")


@tasks_app.command("routing")
def routing_cmd(
    data: Path = typer.Option(..., "--data", help="The task records the models answered."),
    pred: list[str] = typer.Option(..., "--pred", help="NAME=FILE from `fleet eval --predictions`; repeat."),
    out: Path = typer.Option(..., "--out", help="Where to write the routing-data JSONL."),
) -> None:
    """Join several models' predictions on one task file into routing data (prompt, responses, scores)."""
    from fleetlm.tasks.evaluate import write_routing_data
    from fleetlm.tasks.suite import read_jsonl

    records = read_jsonl(data)
    predictions: dict[str, list[str]] = {}
    for item in pred:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise TaskError(f"--pred wants NAME=FILE, got {item!r}")
        if not Path(file).is_file():
            raise TaskError(f"no such predictions file: {file}")
        by_id = {}
        for lineno, line in enumerate(Path(file).read_text().splitlines(), 1):
            try:
                row = json.loads(line)
                by_id[row["id"]] = row["prediction"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise TaskError(f"{file}:{lineno}: not a prediction row") from exc
        missing = [r["id"] for r in records if r.get("id") not in by_id]
        if missing:
            raise TaskError(f"{file} lacks predictions for {len(missing)} records (e.g. {missing[0]})")
        predictions[name] = [by_id[r["id"]] for r in records]
    write_routing_data(out, records, predictions)
    typer.echo(f"wrote {len(records)} routing rows for {', '.join(predictions)} to {out}")


def register(app: typer.Typer) -> None:
    app.add_typer(tasks_app, name="tasks")
