"""BFCL v4 offline through our gateway (issue 13): each catalog model, tool calls constrained and not.

    .venv/bin/python bench/bfcl.py [--models smollm2-135m-instruct,...] [--categories simple,...|all]
        [--limit 25] [--seed 0] [--max-tokens 256] [--engine auto|llama_cpp|fleetlm] [--concurrency 4]
        [--out runs/bfcl]

Wrap it in `flock /tmp/bench.lock` on a shared machine: it runs real models for a long time.

For the catalog models asked for (default: the three the demo pulls) that are installed (`fleet models list`;
a missing one is skipped with the `fleet models pull` line that installs it), it writes a fleet.yaml naming
them (`catalog:`, the given engine, price 0: cost is not measured here, so the gateway measures nothing but
what `engine: auto` needs, once per machine), starts `fleet serve` on it as a real process on a loopback
port, and scores each model with `fleet eval --bench bfcl`'s code (evals/bfcl.py) on a seeded sample of
--limit items per category (the same items for every model and mode), twice: with `"constrained_decoding":
true` (the gateway holds tool calls to the tools' schemas) and false (the unconstrained baseline).

Printed: per model and category, accuracy and malformed calls (replies that tried to call a tool but did not
parse or match its schema) in both modes side by side, and whether the two modes gave identical replies
everywhere (then the gateway did not act on the field). Written to --out: results.json (every summary, the
side-by-side rows, the settings), bfcl.png (accuracy per category, both modes, one panel per model), the
routing-data rows of each run (rows/MODEL.MODE.jsonl), fleet.yaml and the gateway's log.

Published figures printed beside ours (PUBLISHED): the nearest-sized models with a citable BFCL number, Meta's
Llama 3.2 Instruct 1B and 3B, BFCL V2 overall, self-reported by Meta (their model card's benchmark table): the
3B's 67.0% as listed by llm-stats (wikibench.ai/benchmarks/bfcl-v2), the 1B's 25.7% quoted beside it in a
public report. They are BFCL v2's overall score, with its own category mix and Meta's prompt format, not our
v4 per-category sample: the scale small models reach, not a like-for-like comparison. No BFCL figure for
Qwen2.5-Coder 0.5B/1.5B or SmolLM2-135M was found with a source.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from fleetlm.evals import bfcl

DEFAULT_MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
MODES = (("constrained", True), ("unconstrained", False))
PUBLISHED = ("published (BFCL V2 overall, self-reported; Meta's Llama 3.2 model card): "
             "Llama-3.2-1B-Instruct 25.7%, Llama-3.2-3B-Instruct 67.0%")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="catalog names, comma-separated")
    p.add_argument("--categories", default=",".join(bfcl.DEFAULT_CATEGORIES), help="BFCL categories, or all")
    p.add_argument("--limit", type=int, default=25, help="items per category (a seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=bfcl.MAX_TOKENS)
    p.add_argument("--engine", default="auto", choices=("auto", "llama_cpp", "fleetlm"),
                   help="what runs each model in the gateway (auto: the faster here, measured once)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight to the gateway")
    p.add_argument("--out", type=Path, default=Path("runs/bfcl"))
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.limit < 1:
        p.error("--limit must be >= 1")
    return args


def installed_models(wanted: list[str]) -> tuple[list[str], list[str]]:
    """(installed, missing) among the catalog names asked for; an unknown name is an error."""
    from fleetlm.catalog import entries, list_models

    unknown = [m for m in wanted if m not in entries()]
    if unknown:
        sys.exit(f"error: not catalog models: {', '.join(unknown)} (see: fleet models list)")
    present = {item.entry.name for item in list_models() if item.path is not None}
    return [m for m in wanted if m in present], [m for m in wanted if m not in present]


def fleet_yaml(models: list[str], engine: str) -> dict[str, Any]:
    return {"models": {m: {"catalog": m, "engine": engine, "price": {"input": 0.0, "output": 0.0}}
                       for m in models}}


def side_by_side(results: dict[str, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per model and category (then "all"): n, accuracy and malformed count in each mode."""
    rows = []
    for model, modes in results.items():
        categories = list(next(iter(modes.values()))["domains"])
        for category in [*categories, "all"]:
            row: dict[str, Any] = {"model": model, "category": category}
            for mode, summary in modes.items():
                entry = summary if category == "all" else summary["domains"][category]
                row["n"] = entry["n"]
                row[f"{mode}_accuracy"] = entry["accuracy"]
                row[f"{mode}_malformed"] = entry["malformed"]
            rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    head = ["model", "category", "n", "acc constr %", "acc unconstr %", "malformed constr",
            "malformed unconstr"]

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    cells = [[r["model"], r["category"], str(r["n"]), pct(r.get("constrained_accuracy")),
              pct(r.get("unconstrained_accuracy")), str(r.get("constrained_malformed", "-")),
              str(r.get("unconstrained_malformed", "-"))] for r in rows]
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]

    def line(c: list[str]) -> str:
        pairs = enumerate(zip(c, widths, strict=True))
        return "  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in pairs)

    return "\n".join([line(head), "  ".join("-" * w for w in widths), *[line(c) for c in cells]])


def identical_replies(rows_dir: Path, model: str) -> bool:
    """Whether both modes gave every item the same reply (the gateway then ignored constrained_decoding)."""
    def replies(mode: str) -> dict[str, str]:
        lines = (rows_dir / f"{model}.{mode}.jsonl").read_text().splitlines()
        return {r["id"]: r["responses"][model] for r in map(json.loads, lines)}

    return replies("constrained") == replies("unconstrained")


def write_plot(results: dict[str, dict[str, dict[str, Any]]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(11, 3.2 * len(results)), squeeze=False)
    for ax, (model, modes) in zip(axes[:, 0], results.items(), strict=True):
        categories = list(next(iter(modes.values()))["domains"])
        width = 0.38
        for k, (mode, summary) in enumerate(modes.items()):
            xs = [i + (k - 0.5) * width for i in range(len(categories))]
            accs = [100 * summary["domains"][c]["accuracy"] for c in categories]
            bars = ax.bar(xs, accs, width, label=mode)
            for bar, c, acc in zip(bars, categories, accs, strict=True):
                bad = summary["domains"][c]["malformed"]
                label = f"{acc:.0f}" + (f"\n{bad} bad" if bad else "")  # a 0% bar is otherwise invisible
                ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(categories)), categories, fontsize=8)
        ax.set_ylim(0, 115)
        ax.set_ylabel("accuracy %")
        n = next(iter(modes.values()))["domains"][categories[0]]["n"]
        ax.set_title(f"{model}: BFCL v4, {n} items per category (accuracy %; 'bad': malformed calls)",
                     fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from fleetlm.demo.run import GatewayProcess
    from fleetlm.errors import FleetError

    args = parse_args(argv)
    categories = bfcl.parse_categories(args.categories)
    bfcl.data_dir()  # fail now, not after the gateway has started, when bfcl-eval is missing
    models, missing = installed_models([m.strip() for m in args.models.split(",") if m.strip()])
    for m in missing:
        print(f"skipped {m}: not installed (fleet models pull {m})", file=sys.stderr)
    if not models:
        print("error: none of the models is installed", file=sys.stderr)
        return 2
    out = args.out
    rows_dir = out / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    config = out / "fleet.yaml"
    config.write_text(yaml.safe_dump(fleet_yaml(models, args.engine), sort_keys=False))
    print(f"starting fleet serve on {config} ({', '.join(models)}, engine {args.engine})", file=sys.stderr)
    started = time.time()
    try:
        gateway = GatewayProcess(config, f"sqlite:///{(out / 'usage.db').resolve()}", out / "gateway.log")
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        for model in models:
            results[model] = {}
            for mode, flag in MODES:
                with (rows_dir / f"{model}.{mode}.jsonl").open("w") as sink:
                    summary, _ = bfcl.evaluate(f"{gateway.url}#{model}", categories=categories,
                                               limit=args.limit, seed=args.seed, max_tokens=args.max_tokens,
                                               concurrency=args.concurrency, constrained=flag, out=sink,
                                               progress=not args.no_progress)
                results[model][mode] = summary
                print(bfcl.format_table(summary), file=sys.stderr)
    except FleetError as exc:
        print(f"error: {exc} (gateway log: {out / 'gateway.log'})", file=sys.stderr)
        return 2
    finally:
        gateway.stop()
    same = {m: identical_replies(rows_dir, m) for m in results}
    rows = side_by_side(results)
    print()
    print(f"BFCL v4 offline, {args.limit} items per category (seed {args.seed}), through fleet serve "
          f"(engine {args.engine}), {time.time() - started:.0f} s")
    print(format_rows(rows))
    for model, identical in same.items():
        if identical:
            print(f"note: {model}: constrained and unconstrained replies are identical on every item (the "
                  "gateway did not act on constrained_decoding, or constraining changed nothing)")
    print(PUBLISHED)
    report = {"settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "categories": categories, "models": models, "skipped": missing,
                           "bfcl_package": bfcl.BFCL_PACKAGE, "seconds": round(time.time() - started, 1)},
              "rows": rows, "identical_replies": same, "summaries": results, "published": PUBLISHED}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    plot = write_plot(results, out / "bfcl.png")
    print(f"results: {out / 'results.json'}  plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
