"""`fleet fleet build|info`: a tiny toy fleet trained from a seed; `fleet fleet record`: the real fleet's
outcomes; `fleet models measure`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import typer

from fleetlm.errors import ConfigError

fleet_app = typer.Typer(help="The real fleet's recorded outcomes; a tiny toy fleet built from a seed.",
                        no_args_is_help=True)


@fleet_app.command("build")
def build_cmd(
    out: Path = typer.Option(..., "--out", help="directory to build the fleet in"),
    recipe: str = typer.Option("full", "--recipe", help="full (27 min here) | ci (a reduced copy)"),
    seed: int = typer.Option(0, "--seed"),
    jobs: int | None = typer.Option(None, "--jobs", help="models trained at once (default: the recipe's)"),
    reuse: bool = typer.Option(False, "--reuse", help="keep the tokenizer and models already built in OUT"),
) -> None:
    """Train a tiny toy fleet on the task suite: generalists, an expert, eval, routing outcomes, a router."""
    from fleetlm.fleet.recipe import RECIPES, build_fleet

    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; expected one of {', '.join(RECIPES)}")
    chosen = replace(RECIPES[recipe], seed=seed, jobs=jobs or RECIPES[recipe].jobs)
    summary = build_fleet(out, chosen, log=typer.echo, reuse=reuse)
    typer.echo(f"built the {recipe} fleet in {out} in {summary['seconds']:.0f} s; serve it with "
               f"`fleet serve --config {out / 'fleet.yaml'}`")


@fleet_app.command("info")
def info_cmd(
    fleet_dir: Path = typer.Option(..., "--dir", help="a fleet built by `fleet fleet build`"),
) -> None:
    """A built toy fleet's models, sizes, prices and test accuracy."""
    from fleetlm.fleet import built_config
    from fleetlm.fleet.recipe import params_of

    config = built_config(fleet_dir)
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


@fleet_app.command("record")
def record_cmd(
    out: Path = typer.Option(..., "--out", help="routing-data JSONL (.jsonl.gz to gzip it)"),
    models: str | None = typer.Option(None, "--models", help="comma-separated (default: every installed "
                                                             "catalog chat model)"),
    benches: str = typer.Option("humaneval,gsm8k,tasks", "--benches", help="comma-separated"),
    limit: int | None = typer.Option(None, "--limit", min=1, help="test items per bench (default: all)"),
    train_limit: int = typer.Option(40, "--train-limit", min=0,
                                    help="train items per bench, drawn with --seed"),
    seed: int = typer.Option(0, "--seed"),
    batch: int = typer.Option(16, "--batch", min=1, help="requests decoded together (continuous batching)"),
    threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads for our engine"),
    data: str | None = typer.Option(None, "--gsm8k-data", help="a RouteLLM-style gsm8k folder"),
    merge_only: bool = typer.Option(False, "--merge-only", help="only re-merge OUT's raw log into OUT"),
    from_usage: str | None = typer.Option(None, "--from-usage", help="record the prompts of this gateway "
                                                                     "usage log instead (log_content: true)"),
) -> None:
    """Record every local model's outcomes on HumanEval, GSM8K and the task suite (resumable), merged with
    the replayed models' recorded GSM8K outcomes and the cascade checks' verdicts."""
    from fleetlm.fleet.default import chat_models
    from fleetlm.fleet.record import RecordPlan, finish, record

    names = ([m.strip() for m in models.split(",") if m.strip()] if models
             else [n for n, _ in sorted(chat_models(), key=lambda m: m[1])])
    plan = RecordPlan(models=names, benches=["usage"] if from_usage else
                      [b.strip() for b in benches.split(",") if b.strip()],
                      test_limit=limit, train_limit=train_limit, seed=seed, batch=batch, threads=threads,
                      gsm8k_data=data, usage_log=from_usage)
    if merge_only:
        typer.echo(f"{len(finish(out, plan))} rows in {out}")
        return
    record(plan, out, log=typer.echo)


@fleet_app.command("fit")
def fit_cmd(
    data: Path | None = typer.Option(None, "--data", help="outcomes from `fleet fleet record` (default: the "
                                                          "shipped ones); only their train rows are read"),
    out: Path = typer.Option(..., "--out", help="policy JSON to write (the shipped one: "
                                                "src/fleetlm/assets/outcomes/policy.json)"),
    floor: float = typer.Option(0.95, "--floor", min=0.0, max=1.0, help="share of the reference's accuracy"),
    from_usage: str | None = typer.Option(None, "--from-usage",
                                          help="first record every installed model on this usage log's "
                                               "prompts (beside OUT)"),
) -> None:
    """Fit auto's policy (ladder; checks or fitted acceptance) per benchmark on the train split; with
    --from-usage, on the user's own logged traffic (recorded first, resumably, beside OUT)."""
    from fleetlm.fleet.fit import fit_policy, save_policy
    from fleetlm.fleet.outcomes import load_meta, load_outcomes, model_prices

    if from_usage:
        from fleetlm.fleet.default import chat_models
        from fleetlm.fleet.record import RecordPlan, record

        data = out.with_name(out.stem + ".usage-outcomes.jsonl.gz")
        names = [n for n, _ in sorted(chat_models(), key=lambda m: m[1])]
        record(RecordPlan(models=names, benches=["usage"], train_limit=None, usage_log=from_usage), data,
               log=typer.echo)
    rows = load_outcomes(data)
    policy = fit_policy(rows, model_prices(load_meta(data)), floor)
    save_policy(policy, out)
    for bench, spec in policy["benches"].items():
        typer.echo(f"{bench}: {spec['kind']} cascade {' -> '.join(spec['ladder'])} "
                   f"(train n={spec['n_train']}, accuracy {spec['train']['accuracy']:.3f})")
    typer.echo(f"default fleet: {' -> '.join(policy['default']['ladder'])}; saved {out}")


def measure_cmd(
    names: list[str] = typer.Argument(..., help="Installed catalog names, .gguf files, or `all`."),
    engines: str = typer.Option(",".join(("llama_cpp", "fleetlm")), "--engines",
                                help="comma-separated: llama_cpp, fleetlm (those that can run the model)"),
    dtype: str = typer.Option("bf16", "--dtype", help="our engine's width: bf16 | f32 | int8 | int4"),
    machine_usd_per_hour: float = typer.Option(None, "--machine-usd-per-hour", min=0.0001,
                                               help="price the measured speed at this hourly machine price"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars"),
) -> None:
    """Time each engine on a model here (single stream, 2 threads): prompt and decode tokens/s, the engine
    `auto` picks, and the price that follows; saved in $FLEET_HOME/measure, re-measured on every call."""
    from fleetlm.catalog import list_models
    from fleetlm.catalog.resolve import resolve_model
    from fleetlm.config import DEFAULT_MACHINE_USD_PER_HOUR
    from fleetlm.fleet.measure import ENGINES, choose_engine, engines_for, measure

    wanted = [e.strip() for e in engines.split(",") if e.strip()]
    unknown = [e for e in wanted if e not in ENGINES]
    if unknown or not wanted:
        raise ConfigError(f"--engines: unknown {', '.join(unknown) or '(none given)'}; expected some of "
                          f"{', '.join(ENGINES)}")
    if names == ["all"]:
        paths = [(i.entry.name, i.path) for i in list_models() if i.path is not None]
    else:
        paths = []
        for name in names:
            ref = resolve_model(name)
            if ref.kind != "gguf":
                raise ConfigError(f"{name}: `fleet models measure` times GGUF models (catalog names, .gguf)")
            paths.append((name, Path(ref.location)))
    hourly = machine_usd_per_hour or DEFAULT_MACHINE_USD_PER_HOUR
    typer.echo(f"{'model':<30}{'engine':<11}{'dtype':<6}{'prompt tok/s':>13}{'decode tok/s':>13}"
               f"{'$/1M in':>10}{'$/1M out':>10}")
    for name, path in paths:
        runnable = [e for e in wanted if e in engines_for(path)]
        if not runnable:
            typer.echo(f"{name:<30}(none of {', '.join(wanted)} can run it here)")
            continue
        for engine in runnable:
            m = measure(path, engine, dtype, progress=not quiet)
            price = m.price(hourly)
            typer.echo(f"{name:<30}{engine:<11}{m.dtype:<6}{m.prompt_tokens_per_second:>13.1f}"
                       f"{m.decode_tokens_per_second:>13.1f}{price.input:>10.4f}{price.output:>10.4f}")
        choice = choose_engine(path, dtype, engines=runnable, measure_missing=False)
        typer.echo(f"{'':<30}auto -> {choice.engine}: {choice.reason}")
    typer.echo(f"prices: ${hourly}/h / (tok/s x 3600) x 1e6 (prompt and completion apart)")


def register(app: typer.Typer) -> None:
    from fleetlm.catalog.commands import models_app

    app.add_typer(fleet_app, name="fleet")
    models_app.command("measure")(measure_cmd)
