"""The demo's figures: per benchmark accuracy, cost, latency and `auto`'s routes, live and from the recorded
outcomes; the text summary, a PNG and a small self-contained HTML report.

Live figures come from the demo's own requests (demo/run.py `Answer`s). The recorded figures are the held-out
(test split) figures of the shipped outcomes (fleet/outcomes.py `heldout_figures`), their recorded tokens
priced at the prices this gateway served with, so that both sit on one cost scale.
"""

from __future__ import annotations

import html
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from fleetlm.errors import FleetError


def cell_stats(answers: list[Any]) -> dict[str, Any]:
    """n, accuracy, cost, latency and who answered, over one (benchmark, model)'s answers."""
    n = len(answers)
    done = [a for a in answers if a.error is None]
    latencies = sorted(a.latency_s for a in done)
    cost = sum(a.cost_usd for a in answers)
    correct = sum(a.score for a in answers)
    return {
        "n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
        "errors": n - len(done), "cost_usd": cost, "cost_per_item_usd": cost / n if n else 0.0,
        "median_latency_s": statistics.median(latencies) if latencies else None,
        "mean_latency_s": statistics.fmean(latencies) if latencies else None,
        "completion_tokens": sum(a.completion_tokens for a in done),
        "recorded": sum(a.recorded for a in done),
        "answered_by": dict(Counter(a.answered_by for a in done).most_common()),
    }


def reference_of(models: list[str], recorded: list[str]) -> str:
    """The model `auto` is measured against: a recorded frontier model where the benchmark has one, else the
    priciest local model (models come cheapest first)."""
    rec = [m for m in models if m in recorded]
    return rec[-1] if rec else models[-1]


def live_figures(answers: list[Any], models_by_bench: dict[str, list[str]], recorded: list[str],
                 router: str | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for bench, models in models_by_bench.items():
        mine = [a for a in answers if a.bench == bench]
        if not mine:
            continue
        asked = [*models, *([router] if router else [])]
        cells = {m: cell_stats([a for a in mine if a.model == m]) for m in asked}
        ref = reference_of(models, recorded)
        entry: dict[str, Any] = {"n": cells[ref]["n"], "reference": ref, "models": cells}
        if router and cells.get(router, {}).get("n"):
            a, r = cells[router], cells[ref]
            entry["auto_vs_reference"] = {
                "accuracy": a["accuracy"] / r["accuracy"] if r["accuracy"] else None,
                "cost": a["cost_usd"] / r["cost_usd"] if r["cost_usd"] else None}
            entry["routes"] = [{"item": x.item, "answered_by": x.answered_by, "score": x.score,
                                "cost_usd": x.cost_usd, "route": x.route, "error": x.error}
                               for x in mine if x.model == router]
        out[bench] = entry
    return out


def recorded_figures(prices: dict[str, tuple[float, float]], outcomes: str | Path | None = None
                     ) -> tuple[dict[str, Any] | None, str]:
    """(held-out figures of the recorded outcomes, a note); (None, why) when there are none to read."""
    try:
        from fleetlm.fleet.outcomes import heldout_figures, load_meta, load_outcomes, model_prices

        rows = load_outcomes(outcomes)
        recorded_prices = model_prices(load_meta(outcomes))
        served = {m: p for m, p in prices.items() if m in recorded_prices}
        figures = heldout_figures(rows, prices={**recorded_prices, **served})
    except (FleetError, ImportError, OSError) as exc:
        return None, f"no recorded held-out figures: {exc}"
    return figures, (f"recorded outcomes, test split; recorded tokens priced at this gateway's prices "
                     f"({', '.join(sorted(served)) or 'none'}), the others at the recording's")


def headline(bench: str, entry: dict[str, Any], router: str) -> str | None:
    vs = entry.get("auto_vs_reference")
    if not vs or vs["accuracy"] is None or vs["cost"] is None:
        return None
    return (f"{bench}: {router} keeps {vs['accuracy']:.0%} of {entry['reference']}'s accuracy at "
            f"{vs['cost']:.0%} of its cost (n={entry['n']} live)")


def summary_lines(report: dict[str, Any]) -> list[str]:
    """The text the command prints: one table per benchmark, live, then recorded figures beside it."""
    lines: list[str] = []
    router = report["router"]
    recorded = (report.get("recorded") or {}).get("benches", {})
    for bench, entry in report["live"].items():
        rec = recorded.get(bench)
        lines.append(f"{bench}: {entry['n']} held-out items live"
                     + (f"; recorded held-out n={rec['n']}" if rec else ""))
        lines.append(f"  {'model':<46}{'acc':>6}{'$/item':>11}{'med s':>7}{'err':>4}   "
                     f"{'rec acc':>7}{'rec $/item':>11}")
        for model, c in entry["models"].items():
            r = None
            if rec:
                r = rec["auto"] if model == router else rec["models"].get(model)
            med = c["median_latency_s"]
            tag = " (recorded answers)" if c["recorded"] else ""
            lines.append(f"  {model + tag:<46}{c['accuracy']:>6.0%}{c['cost_per_item_usd']:>11.2e}"
                         f"{'-' if med is None else f'{med:.1f}':>7}{c['errors']:>4}   "
                         + (f"{r['accuracy']:>7.1%}{r['cost_per_item_usd']:>11.2e}" if r else ""))
        auto = entry["models"].get(router)
        if auto and auto["answered_by"]:
            n = sum(auto["answered_by"].values())
            sent = ", ".join(f"{m} {c / n:.0%}" for m, c in auto["answered_by"].items())
            lines.append(f"  {router} sent: {sent}")
        line = headline(bench, entry, router) if router else None
        if line:
            lines.append("  " + line)
        if rec:
            a = rec["auto"]
            kept, paid = _pct(a["accuracy_vs_reference"]) or "n/a", _pct(a["cost_vs_reference"]) or "n/a"
            lines.append(f"  recorded held-out: {router} keeps {kept} of {rec['reference']}'s accuracy at "
                         f"{paid} of its cost (n={rec['n']}; {router} there = {a['policy']})")
    if report.get("recorded_note"):
        lines.append(report["recorded_note"])
    return lines


def build_report(answers: list[Any], models: list[str], *, router: str | None, recorded: list[str],
                 rounds: int, seed: int, notes: list[str], prices: dict[str, tuple[float, float]],
                 outcomes: str | Path | None = None) -> dict[str, Any]:
    from fleetlm.demo.fleet import models_for

    benches = list(dict.fromkeys(a.bench for a in answers))
    by_bench = {b: models_for(b, models, recorded) for b in benches}
    figures, note = recorded_figures(prices, outcomes)
    report: dict[str, Any] = {
        "router": router, "models": models, "recorded_models": recorded, "rounds": rounds, "seed": seed,
        "notes": notes,
        "prices_usd_per_1m": {m: list(p) for m, p in prices.items()},
        "live": live_figures(answers, by_bench, recorded, router), "recorded": figures, "recorded_note": note,
    }
    report["summary"] = summary_lines(report)
    return report


# ---- the plot -----------------------------------------------------------------------------------------

def write_plot(report: dict[str, Any], path: Path) -> Path:
    """Per benchmark: accuracy against cost per item (live: filled; recorded held-out: hollow, with random
    routing and the oracle), and below it where `auto` sent its requests."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    live, router = report["live"], report["router"]
    recorded = (report.get("recorded") or {}).get("benches", {})
    benches = list(live)
    fig, axes = plt.subplots(2, max(1, len(benches)), figsize=(5.2 * max(1, len(benches)), 7.5), dpi=100,
                             squeeze=False, gridspec_kw={"height_ratios": [3, 1.2]})
    for col, bench in enumerate(benches):
        ax, bar = axes[0][col], axes[1][col]
        entry, rec = live[bench], recorded.get(bench)
        if rec:
            curve = rec["curve"]
            ax.plot([p["cost"] for p in curve["random"]], [p["accuracy"] for p in curve["random"]], "--",
                    color="grey", lw=1, label="random routing (recorded)")
            ax.plot([p["cost"] for p in curve["oracle"]], [p["accuracy"] for p in curve["oracle"]], ":",
                    color="black", lw=1, label="oracle (recorded)")
            for m, e in [*rec["models"].items(), (router, rec["auto"])]:
                if e["cost_per_item_usd"] > 0:
                    ax.scatter(e["cost_per_item_usd"], e["accuracy"], s=70, facecolors="none",
                               edgecolors="tab:red" if m == router else "tab:blue", zorder=3)
                    if m not in entry["models"] or m == router:  # live points carry the others' names
                        ax.annotate(f"{short_name(m or '')} (rec.)", (e["cost_per_item_usd"], e["accuracy"]),
                                    textcoords="offset points", xytext=(5, 4), fontsize=6, color="grey")
        for m, c in entry["models"].items():
            if c["n"] and c["cost_per_item_usd"] > 0:
                is_router = m == router
                ax.scatter(c["cost_per_item_usd"], c["accuracy"], s=110 if is_router else 45,
                           marker="*" if is_router else "o", color="tab:red" if is_router else "tab:blue",
                           zorder=4)
                label = short_name(m) + (" (recorded)" if c["recorded"] and "@recorded" not in m else "")
                ax.annotate(label, (c["cost_per_item_usd"], c["accuracy"]), textcoords="offset points",
                            xytext=(5, -11) if is_router else (5, 4), fontsize=7,
                            color="tab:red" if is_router else "black")
        ax.set_xscale("log")
        ax.set_xlabel("$ per item")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
        title = f"{bench}: live n={entry['n']} (filled)"
        title += f", recorded n={rec['n']} (hollow)" if rec else ""
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        if rec and col == 0:
            ax.legend(fontsize=7, loc="lower right")
        _route_bars(bar, entry, rec, router, report.get("models") or [])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _route_bars(ax: Any, entry: dict[str, Any], rec: dict[str, Any] | None, router: str | None,
                order: list[str]) -> None:
    """Share of `auto`'s answers per model: live, and on the recorded held-out items (one color per model,
    the same in every benchmark's panel)."""
    auto = entry["models"].get(router or "", {})
    rows = []
    if auto.get("answered_by"):
        n = sum(auto["answered_by"].values())
        rows.append(("live", {m: c / n for m, c in auto["answered_by"].items()}))
    if rec:
        rows.append(("recorded", rec["auto"]["share"]))
    models = list(dict.fromkeys([*order, *(m for _, share in rows for m in share)]))
    colors = dict(zip(models, matplotlib_colors(len(models)), strict=True))
    shown = [m for m in models if any(share.get(m) for _, share in rows)]
    for y, (_, share) in enumerate(rows):
        left = 0.0
        for m in shown:
            w = share.get(m, 0.0)
            if w:
                ax.barh(y, w, left=left, height=0.6, color=colors[m])
                left += w
    for m in shown:  # one legend entry per model
        ax.barh(0, 0, color=colors[m], label=short_name(m))
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_ylim(-0.6, max(1, len(rows)) - 0.4)
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of {router}'s answers")
    if shown:
        ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=2, frameon=False)


def short_name(model: str) -> str:
    """A plot label: "qwen2.5-coder-1.5b-instruct" -> "qwen2.5-coder-1.5b", "x@recorded" -> "x (recorded)"."""
    name = model.removesuffix("-instruct")
    return name.replace("@recorded", " (recorded)")


def matplotlib_colors(n: int) -> list[Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    return [cmap(i % 10) for i in range(n)]


# ---- the HTML report -----------------------------------------------------------------------------------

def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def _cells(cells: list[str]) -> str:
    return "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _secs(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def _money(x: float | None) -> str:
    return "" if x is None else f"{x:.3g}"


def write_html(report: dict[str, Any], path: Path, plot_name: str) -> Path:
    router = report["router"]
    recorded = (report.get("recorded") or {}).get("benches", {})
    sections = []
    for bench, entry in report["live"].items():
        rows = "".join(_cells([
            html.escape(m) + (" <i>(recorded answers)</i>" if c["recorded"] else ""), str(c["n"]),
            _pct(c["accuracy"]), _money(c["cost_usd"]), _money(c["cost_per_item_usd"]),
            _secs(c["median_latency_s"]), str(c["errors"]),
            html.escape(", ".join(f"{k}: {v}" for k, v in c["answered_by"].items()))])
            for m, c in entry["models"].items())
        routes = "".join(_cells([
            html.escape(r["item"]), html.escape(r["answered_by"] or ""), f"{r['score']:g}",
            _money(r["cost_usd"]), html.escape(r["error"] or r["route"])]) for r in entry.get("routes", []))
        rec = recorded.get(bench)
        rec_rows = ""
        if rec:
            rec_rows = "".join(_cells([
                html.escape(str(m)), _pct(e["accuracy"]), _money(e["cost_per_item_usd"]),
                html.escape(", ".join(f"{k} {v:.0%}" for k, v in e["share"].items()))])
                for m, e in [*rec["models"].items(), (router, rec["auto"])])
        line = headline(bench, entry, router) if router else None
        sections.append(
            f"<h2>{html.escape(bench)}</h2>"
            + (f"<p><b>{html.escape(line)}</b></p>" if line else "")
            + "<table><tr><th>model</th><th>n</th><th>accuracy</th><th>cost $</th><th>$ / item</th>"
              "<th>median latency s</th><th>errors</th><th>answered by</th></tr>" + rows + "</table>"
            + (f"<h3>Where {html.escape(router or '')} sent each request</h3><table><tr><th>item</th>"
               "<th>answered by</th><th>score</th><th>cost $</th><th>route (x-fleet-route)</th></tr>"
               + routes + "</table>" if routes else "")
            + (f"<h3>Recorded held-out figures (test split, n={rec['n']}, reference "
               f"{html.escape(rec['reference'])})</h3><p>{html.escape(router or '')} = "
               f"{html.escape(rec['auto']['policy'])}: "
               f"{_pct(rec['auto']['accuracy_vs_reference'])} of the reference's accuracy at "
               f"{_pct(rec['auto']['cost_vs_reference'])} of its cost.</p>"
               "<table><tr><th>model</th><th>accuracy</th><th>$ / item</th><th>answers kept from</th></tr>"
               + rec_rows + "</table>" if rec else ""))
    listed = [*report.get("notes", []), report.get("recorded_note") or ""]
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in listed if n)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fleetlm demo</title>
<style>body{{font-family:sans-serif;max-width:64em;margin:2em auto}}
table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #ccc;padding:.25em .5em;text-align:right;font-size:.9em}}
td:first-child,td:last-child{{text-align:left}}</style></head><body>
<h1>fleetlm demo</h1>
<p>Held-out items (test split) sent through the gateway (<code>fleet serve</code>) with the OpenAI client, to
each model of the fleet and to <code>{html.escape(str(router))}</code>, in {report['rounds']} rounds
(seed {report['seed']}); {report.get('seconds', 0):.0f} s in all. Scores by the benchmarks' own scorers; cost
from <code>x-fleet-cost-usd</code>; routes from <code>x-fleet-route</code>. Answers of a model marked
<i>recorded</i> are recordings (replay), not generated here. Latency is the client's, with several requests in
flight.</p>
<ul>{notes}</ul>
{''.join(sections)}
<h2>Cost against accuracy</h2><img src="{plot_name}" alt="cost against accuracy" style="max-width:100%">
</body></html>
"""
    path.write_text(page)
    return path
