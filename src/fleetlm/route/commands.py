"""`fleet route ...`: import-routellm, fit, score, eval, calibrate."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fleetlm.errors import FleetError

route_app = typer.Typer(
    help="Routers: send each request to the cheapest model that can handle it.", no_args_is_help=True
)


def _pair(router_models: list[str], strong: str | None, weak: str | None, rows) -> tuple[str, str]:
    from fleetlm.route.data import model_names, score_matrix

    models = model_names(rows)
    if strong is None or weak is None:
        if len(models) != 2:
            raise FleetError(f"name --strong and --weak: the data scores {len(models)} models ({models})")
        means = score_matrix(rows, models).mean(0)
        hi, lo = (0, 1) if means[0] >= means[1] else (1, 0)
        strong, weak = strong or models[hi], weak or models[lo]
    for m in (strong, weak):
        if m not in router_models:
            raise FleetError(f"model {m!r} is not known to the router (it knows {router_models})")
        if m not in models:
            raise FleetError(f"model {m!r} is not scored in the data")
    return strong, weak


def _strong_weak_signal(router: Path, data: Path, strong: str | None, weak: str | None):
    """The router, the strong and weak models, signal = score[strong] - score[weak], and their true scores."""
    from fleetlm.route.data import load_rows, score_matrix
    from fleetlm.route.routers import load_router

    r = load_router(router)
    rows = load_rows(data)
    strong, weak = _pair(r.models, strong, weak, rows)
    pred = r.score(rows)
    signal = pred[:, r.models.index(strong)] - pred[:, r.models.index(weak)]
    return r, strong, weak, signal, score_matrix(rows, [strong, weak])


@route_app.command("import-routellm")
def import_routellm_cmd(
    src: Path = typer.Argument(..., help="folder laid out like RouteLLM's evals data"),
    benchmark: str = typer.Option(..., "--benchmark", help="mmlu | gsm8k"),
    out: Path = typer.Option(..., "--out", help="JSONL file to write"),
) -> None:
    """Convert RouteLLM's recorded outcomes to routing-data JSONL (contaminated prompts dropped)."""
    from fleetlm.route.data import import_routellm, save_rows

    rows = import_routellm(src, benchmark)
    save_rows(rows, out)
    typer.echo(f"wrote {len(rows)} rows to {out}")


@route_app.command("fit")
def fit_cmd(
    data: Path = typer.Option(..., "--data", help="training routing data (JSONL)"),
    router: str = typer.Option(
        "mlp", "--router", help="random | knn | logistic | mlp | mf | gbm | ensemble | cascade"
    ),
    out: Path = typer.Option(..., "--out", help="directory to save the router in"),
    set_: list[str] = typer.Option([], "--set", help="router setting KEY=VALUE (JSON value), repeatable"),
) -> None:
    """Fit a router on routing data and save it."""
    from fleetlm.route.data import load_rows
    from fleetlm.route.routers import make_router

    settings = {}
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep:
            raise FleetError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    rows = load_rows(data)
    r = make_router(router, **settings).fit(rows)
    r.save(out)
    typer.echo(f"fitted {router} router on {len(rows)} rows for models {r.models}; saved to {out}")


@route_app.command("score")
def score_cmd(
    router: Path = typer.Option(..., "--router", help="a saved router directory"),
    data: Path = typer.Option(..., "--data", help="routing data (JSONL) to score"),
    out: Path = typer.Option(..., "--out", help="JSONL of {id, scores}"),
) -> None:
    """Predicted quality per model for each row."""
    from fleetlm.route.data import load_rows
    from fleetlm.route.routers import load_router

    r = load_router(router)
    rows = load_rows(data)
    pred = r.score(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for row, p in zip(rows, pred, strict=True):
            scores = dict(zip(r.models, map(float, p), strict=True))
            f.write(json.dumps({"id": row.id, "scores": scores}) + "\n")
    typer.echo(f"scored {len(rows)} rows to {out}")


@route_app.command("eval")
def eval_cmd(
    router: Path = typer.Option(..., "--router", help="a saved router directory"),
    data: Path = typer.Option(..., "--data", help="held-out routing data (JSONL) with scores"),
    strong: str = typer.Option(
        None, "--strong", help="the strong model (default: the better one in the data)"
    ),
    weak: str = typer.Option(None, "--weak", help="the weak model"),
    plot: Path = typer.Option(None, "--plot", help="PNG to write (default: DIR/eval.png)"),
    price_strong: float = typer.Option(1.0, "--price-strong", help="cost of one strong call"),
    price_weak: float = typer.Option(0.0, "--price-weak", help="cost of one weak call"),
) -> None:
    """PGR curve, APGR, CPT(50%), CPT(80%), cost saving at 95% quality, and a PNG with random/oracle lines."""
    import numpy as np

    from fleetlm.route.metrics import evaluate, pgr_curve, plot_curve

    r, strong, weak, signal, y = _strong_weak_signal(router, data, strong, weak)
    c, pgr = pgr_curve(signal, y[:, 0], y[:, 1])
    typer.echo(f"router {r.kind}: strong {strong}, weak {weak}")
    typer.echo("PGR curve (share of strong calls -> PGR):")
    for share in np.linspace(0, 1, 11):
        k = int(round(share * (len(c) - 1)))
        typer.echo(f"  {c[k]:.2f} -> {pgr[k]:.4f}")
    for line in evaluate(signal, y[:, 0], y[:, 1], price_strong, price_weak).lines():
        typer.echo(line)
    png = plot_curve(plot or (router / "eval.png"), signal, y[:, 0], y[:, 1], label=r.kind)
    typer.echo(f"plot: {png}")


@route_app.command("calibrate")
def calibrate_cmd(
    router: Path = typer.Option(..., "--router", help="a saved router directory"),
    data: Path = typer.Option(..., "--data", help="held-out calibration data (JSONL) with scores"),
    floor: float = typer.Option(0.95, "--floor", help="share of the strong model's quality to keep"),
    confidence: float = typer.Option(0.9, "--confidence", help="probability that the floor holds"),
    strong: str = typer.Option(None, "--strong"),
    weak: str = typer.Option(None, "--weak"),
    price_strong: float = typer.Option(1.0, "--price-strong"),
    price_weak: float = typer.Option(0.0, "--price-weak"),
) -> None:
    """Pick the threshold that keeps the quality floor at the given confidence (DIR/calibration.json)."""
    from dataclasses import asdict

    from fleetlm.route.calibrate import calibrate_floor

    _, strong, weak, signal, y = _strong_weak_signal(router, data, strong, weak)
    cal = calibrate_floor(signal, y[:, 0], y[:, 1], floor, confidence, price_strong, price_weak)
    (router / "calibration.json").write_text(
        json.dumps({**asdict(cal), "strong": strong, "weak": weak}) + "\n"
    )
    for line in cal.lines():
        typer.echo(line)


def register(app: typer.Typer) -> None:
    app.add_typer(route_app, name="route")
