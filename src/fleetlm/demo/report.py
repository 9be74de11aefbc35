"""The demo's outputs for people: a PNG of cost against accuracy and a small self-contained HTML report."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any


def write_plot(results: list[Any], strongest: str, router: str | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for r in results:
        is_router = r.model == router
        ax.scatter(r.cost_usd * 1e3, r.accuracy, s=90 if is_router else 50, marker="*" if is_router else "o",
                   color="tab:red" if is_router else "tab:blue", zorder=3)
        # the router usually sits on a model it routes to: its label goes below, the models' above
        ax.annotate(r.model, (r.cost_usd * 1e3, r.accuracy), textcoords="offset points",
                    xytext=(6, -12) if is_router else (6, 4), color="tab:red" if is_router else "black")
    ax.set_xlabel("cost of the test split (milli-$)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"The fleet: cost against accuracy (router vs {strongest})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_html(report: dict[str, Any], path: Path, plot_name: str) -> Path:
    rows = "".join(
        f"<tr><td>{html.escape(r['model'])}</td><td>{r['accuracy']:.3f}</td><td>{r['cost_usd']:.6f}</td>"
        f"<td>{r['mean_latency_ms']:.1f}</td><td>{r['errors']}</td>"
        f"<td>{html.escape(', '.join(f'{m}: {c}' for m, c in r['routed_to'].items()))}</td></tr>"
        for r in report["results"])
    domains = sorted({d for r in report["results"] for d in r["by_domain"]})
    domain_rows = "".join(
        f"<tr><td>{html.escape(r['model'])}</td>"
        + "".join(f"<td>{_acc(r['by_domain'].get(d))}</td>" for d in domains) + "</tr>"
        for r in report["results"])
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fleetlm demo</title>
<style>body{{font-family:sans-serif;max-width:56em;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}td:first-child{{text-align:left}}</style>
</head><body>
<h1>fleetlm demo</h1>
<p>{report['records']} test-split tasks (seed {report['seed']}) sent through the gateway with the OpenAI
client, to each model and to the router <code>{html.escape(str(report['router']))}</code>;
{report['seconds']:.0f} s in all.</p>
<p><b>{html.escape(report['summary'][-1])}</b></p>
<table><tr><th>model</th><th>accuracy</th><th>cost $</th><th>mean latency ms</th><th>errors</th>
<th>answered by</th></tr>{rows}</table>
<h2>Accuracy per domain</h2>
<table><tr><th>model</th>{''.join(f'<th>{html.escape(d)}</th>' for d in domains)}</tr>{domain_rows}</table>
<h2>Cost against accuracy</h2><img src="{plot_name}" alt="cost against accuracy">
</body></html>
"""
    path.write_text(page)
    return path


def _acc(cell: list[int] | None) -> str:
    return "" if not cell or not cell[1] else f"{cell[0] / cell[1]:.2f}"
