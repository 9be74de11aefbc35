"""`fleet serve`, `fleet usage`, `fleet keys create`: the gateway's commands."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path

import typer
import yaml

from fleetlm.config import FleetConfig, load_config, resolve_storage_url
from fleetlm.errors import ConfigError
from fleetlm.serve.store import UsageStore

DEFAULT_CONFIG = "fleet.yaml"


def _config(path: Path | None) -> FleetConfig | None:
    if path is not None:
        return load_config(path)
    if Path(DEFAULT_CONFIG).is_file():
        return load_config(DEFAULT_CONFIG)
    return None


def parse_since(text: str) -> float:
    """'30m', '2h', '7d' (ago) or an ISO date/time (UTC unless given) -> unix seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if m:
        return time.time() - float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        dt = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(f"--since: expected e.g. 30m, 2h, 7d or 2026-01-31[T12:00], got {text!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def usage_report(store: UsageStore, config: FleetConfig | None, since: float | None, by: str) -> str:
    rows = store.usage(since, by)  # type: ignore[arg-type]
    if not rows:
        return "no requests logged" + (" in that period" if since else "")
    header = (
        f"{by:<28} {'requests':>8} {'errors':>6} {'prompt_tok':>10} {'compl_tok':>10} {'cost_usd':>12} "
        f"{'mean_ms':>8}"
    )
    lines = [header]
    total = {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}
    for r in rows:
        lines.append(
            f"{str(r[by])[:28]:<28} {r['requests']:>8} {r['errors']:>6} {r['prompt_tokens']:>10} "
            f"{r['completion_tokens']:>10} {r['cost_usd']:>12.6f} {r['mean_latency_ms']:>8.1f}"
        )
        for k in total:
            total[k] += r[k]
    lines.append(
        f"{'TOTAL':<28} {total['requests']:>8} {total['errors']:>6} {total['prompt_tokens']:>10} "
        f"{total['completion_tokens']:>10} {total['cost_usd']:>12.6f}"
    )
    if config is not None:
        strongest = config.strongest_model()
        price = config.models[strongest].price
        baseline = price.cost(total["prompt_tokens"], total["completion_tokens"])
        saved = baseline - total["cost_usd"]
        share = f" ({saved / baseline:.1%})" if baseline > 0 else ""
        lines.append(f"all on {strongest} would have cost ${baseline:.6f}; saved ${saved:.6f}{share}")
    return "\n".join(lines)


def startup_summary(config: FleetConfig, costs: dict) -> list[str]:
    """One line per model: where it runs and what it costs ($ per 1M tokens in/out), and why."""
    lines = []
    for name, spec in config.models.items():
        cost = costs.get(name)
        where = f"{cost.engine} ({cost.reason})" if cost else spec.kind
        source = cost.price_source if cost else "set in the config"
        lines.append(f"  {name}: {where}; ${spec.price.input:.4f} in / ${spec.price.output:.4f} out per 1M "
                     f"tokens ({source})")
    if config.router:
        lines.append(f"  {config.router.name}: router, {config.router.kind}"
                     + (f" with checks {', '.join(config.router.checks)}" if config.router.checks else ""))
    return lines


def _store(config: FleetConfig | None, db: str | None) -> UsageStore:
    return UsageStore(db or resolve_storage_url(config.storage if config else None))


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        config: Path = typer.Option(None, "--config", "-c", help="fleet.yaml (default: ./fleet.yaml)"),
        host: str = typer.Option("127.0.0.1", help="address to listen on"),
        port: int = typer.Option(8000, min=0, max=65535, help="port to listen on"),
        log_level: str = typer.Option("warning", help="uvicorn log level"),
        print_config: bool = typer.Option(False, "--print-config",
                                          help="print the fleet (default: the installed catalog models) as "
                                               "YAML and exit"),
        on_ray: bool = typer.Option(False, "--ray", help="serve on Ray Serve: the gateway and each local "
                                    "model as deployments (replicas: the ray: section of fleet.yaml)"),
    ) -> None:
        """Serve the fleet with OpenAI's API (chat, completions, embeddings, models). Without a config (and
        no ./fleet.yaml): every installed catalog model, each on the engine measured faster here."""
        import uvicorn

        from fleetlm.fleet.measure import price_local_models
        from fleetlm.serve.app import create_app
        from fleetlm.serve.backends import build_backends

        cfg = _config(config)
        if print_config:
            if cfg is None:
                from fleetlm.fleet.default import default_config_yaml

                typer.echo(default_config_yaml(), nl=False)
            else:
                typer.echo(yaml.safe_dump(cfg.model_dump(exclude_defaults=True), sort_keys=False), nl=False)
            return
        if cfg is None:
            from fleetlm.fleet.default import default_config

            cfg = default_config()  # no config anywhere: the installed catalog models
        for line in startup_summary(cfg, price_local_models(cfg, log=lambda m: typer.echo(m, err=True))):
            typer.echo(line, err=True)
        if on_ray:
            from fleetlm.serve.ray_app import run

            run(cfg, host, port)
            return
        store = UsageStore(cfg.storage_url())
        app_ = create_app(cfg, store, build_backends(cfg))
        typer.echo(
            f"fleet gateway on http://{host}:{port}/v1  models: {', '.join(cfg.models)}  "
            f"storage: {store.engine.url.render_as_string(hide_password=True)}",
            err=True,
        )
        uvicorn.run(app_, host=host, port=port, log_level=log_level, access_log=False)

    @app.command()
    def usage(
        since: str = typer.Option(None, help="30m, 2h, 7d or an ISO date (UTC)"),
        by: str = typer.Option("model", help="model | key | day"),
        config: Path = typer.Option(None, "--config", "-c", help="fleet.yaml, for prices and storage"),
        db: str = typer.Option(None, help="storage URL (default: config, $FLEET_DB_URL, ./fleet.db)"),
    ) -> None:
        """Totals from the usage log, and the savings against sending everything to the strongest model."""
        if by not in ("model", "key", "day"):
            raise ConfigError(f"--by must be model, key or day, not {by!r}")
        cfg = _config(config)
        typer.echo(usage_report(_store(cfg, db), cfg, parse_since(since) if since else None, by))

    keys = typer.Typer(help="API keys for the gateway.", no_args_is_help=True)

    @keys.command("create")
    def keys_create(
        budget_usd: float = typer.Option(None, "--budget-usd", min=0, help="spend limit in dollars"),
        rpm: int = typer.Option(None, "--rpm", min=1, help="requests per minute"),
        tpm: int = typer.Option(None, "--tpm", min=1, help="tokens (prompt + completion) per minute"),
        name: str = typer.Option(None, help="a label"),
        config: Path = typer.Option(None, "--config", "-c", help="fleet.yaml, for storage"),
        db: str = typer.Option(None, help="storage URL"),
    ) -> None:
        """Create a key; the secret is printed once (only its hash is stored)."""
        key, secret = _store(_config(config), db).create_key(name, budget_usd, rpm, tpm)
        typer.echo(
            f"key id {key.key_id}  budget {budget_usd if budget_usd is not None else 'unlimited'}  "
            f"rpm {rpm if rpm is not None else 'unlimited'}  tpm {tpm if tpm is not None else 'unlimited'}",
            err=True,
        )
        typer.echo(secret)

    @keys.command("list")
    def keys_list(
        config: Path = typer.Option(None, "--config", "-c"),
        db: str = typer.Option(None, help="storage URL"),
    ) -> None:
        """List keys (ids, limits, spend); secrets are never shown."""
        store = _store(_config(config), db)
        for k in store.keys():
            typer.echo(
                f"{k.key_id}  {k.name or '-'}  budget={k.budget_usd}  rpm={k.rpm}  tpm={k.tpm}  "
                f"spent={store.spend(k.key_id):.6f}{'  revoked' if k.revoked else ''}"
            )

    app.add_typer(keys, name="keys")
