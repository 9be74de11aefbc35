"""Routing on the real fleet, from its recorded outcomes: the held-out figures of issue 11, side by side.

GSM8K held-out (fleet = the local models + recorded GPT-4): each model and `auto`, auto's accuracy and cost as
a share of GPT-4's (targets >= 95% at <= 40%), and the quality-cost curve of auto's policy family against
random routing and the oracle (PNG). HumanEval held-out (local models only): auto with the code cascade as a
share of Qwen2.5-Coder-1.5B's pass@1 and compute cost (target >= 98% at <= 60%); the checks cascade fits
nothing, so it is also shown over every recorded item (said so). Then each model's HumanEval pass@1 and
GSM8K accuracy through our engine next to the published figures.

python bench/real_routing.py [--data outcomes.jsonl.gz] [--policy policy.json] [--plot DIR]
(default: the outcomes and policy shipped in src/fleetlm/assets/outcomes)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fleetlm.fleet.outcomes import (
    CODER_15B,
    GPT4,
    heldout_figures,
    load_meta,
    load_outcomes,
    load_policy,
    model_prices,
)

# Published figures of the original (unquantized) models, as docs/EVALS.md sources them.
PUBLISHED = {
    "smollm2-135m-instruct": ("not published", "1.4 (5-shot; model card)"),
    "qwen2.5-coder-0.5b-instruct": ("61.6 (Qwen2.5-Coder tech report, EvalPlus)", "not found"),
    "qwen2.5-coder-1.5b-instruct": ("70.7 (Qwen2.5-Coder tech report, EvalPlus)", "not found"),
}
TARGETS = {"gsm8k": (0.95, 0.40), "humaneval": (0.98, 0.60)}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def bench_table(name: str, f: dict, split: str) -> list[str]:
    ref = f["reference"]
    r = f["models"][ref]
    lines = [f"{name}, {split} split: n={f['n']}, fleet {' < '.join(f['fleet'])}, reference {ref}",
             f"  {'model':<38}{'accuracy':>9}{'$/1k items':>12}{'acc/ref':>9}{'cost/ref':>9}"]
    for m in f["fleet"]:
        e = f["models"][m]
        lines.append(f"  {m:<38}{pct(e['accuracy']):>9}{1000 * e['cost_per_item_usd']:>12.4f}"
                     f"{pct(e['accuracy'] / r['accuracy'] if r['accuracy'] else None):>9}"
                     f"{pct(e['cost_per_item_usd'] / r['cost_per_item_usd']):>9}")
    a = f["auto"]
    lines.append(f"  {'auto':<38}{pct(a['accuracy']):>9}{1000 * a['cost_per_item_usd']:>12.4f}"
                 f"{pct(a['accuracy_vs_reference']):>9}{pct(a['cost_vs_reference']):>9}")
    lines.append(f"  auto = {a['policy']}")
    lines.append("  kept answers from: " + ", ".join(f"{m} {s:.0%}" for m, s in
                                                      sorted(a["share"].items(), key=lambda x: -x[1]))
                 + f"; {a['answers_per_item']:.2f} answers generated per item")
    target = TARGETS.get(name)
    if target:
        ok = (a["accuracy_vs_reference"] or 0) >= target[0] and (a["cost_vs_reference"] or 9) <= target[1]
        lines.append(f"  target >= {target[0]:.0%} of {ref}'s accuracy at <= {target[1]:.0%} of its cost: "
                     f"{'met' if ok else 'NOT met'}")
    return lines


def curve_table(f: dict) -> list[str]:
    """The policy family's points next to random and the oracle at the same cost (interpolated)."""
    import numpy as np

    c = f["curve"]
    ref_cost = f["models"][f["reference"]]["cost_per_item_usd"]
    ref_acc = f["models"][f["reference"]]["accuracy"]
    rc = np.array([p["cost"] for p in c["random"]])
    ra = np.array([p["accuracy"] for p in c["random"]])
    oc = np.array([p["cost"] for p in c["oracle"]])
    oa = np.array([p["accuracy"] for p in c["oracle"]])
    lines = [f"  quality-cost curve (share of {f['reference']}): policy | random | oracle at the same cost",
             f"  {'cost/ref':>9}{'policy':>9}{'random':>9}{'oracle':>9}  policy"]
    for p in c["policy"]:
        x = p["cost"]
        rnd = float(np.interp(x, rc, ra)) if rc.min() <= x <= rc.max() else None
        orc = float(np.interp(x, oc, oa)) if len(oc) else None
        lines.append(f"  {pct(x / ref_cost):>9}{pct(p['accuracy'] / ref_acc):>9}"
                     f"{pct(rnd / ref_acc if rnd is not None else None):>9}"
                     f"{pct(orc / ref_acc if orc is not None else None):>9}  {p['label']}")
    return lines


FLOORS = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 1.0)


def floor_sweep(rows: list[dict], bench: str, prices: dict, f: dict) -> list[str]:
    """auto refitted on the train split at each quality floor, scored on the test rows of `f`: the fitted
    router's own held-out quality-cost curve."""
    from fleetlm.fleet.fit import fit_bench
    from fleetlm.fleet.outcomes import cascade_from, evaluate

    test = [r for r in rows if r["bench"] == bench and r["split"] == "test"
            and all(m in r["scores"] for m in f["fleet"])]
    ref = f["models"][f["reference"]]
    lines = [f"  auto refitted on train at each floor, on these test rows (share of {f['reference']}):",
             f"  {'floor':>6}{'acc/ref':>9}{'cost/ref':>9}  policy"]
    for floor in FLOORS:
        try:
            spec = fit_bench(rows, bench, prices, floor)
        except Exception as exc:  # too few train rows: say so and stop
            lines.append(f"  {floor:>6.2f}  cannot fit: {exc}")
            break
        c = cascade_from({"benches": {bench: spec}}, bench, f["fleet"])
        e = evaluate(test, c, prices)
        lines.append(f"  {floor:>6.2f}{pct(e['accuracy'] / ref['accuracy']):>9}"
                     f"{pct(e['cost_per_item_usd'] / ref['cost_per_item_usd']):>9}  {spec['kind']}: "
                     f"{' -> '.join(spec['ladder'])}")
    return lines


def plot(f: dict, name: str, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = f["curve"]
    ref_cost = f["models"][f["reference"]]["cost_per_item_usd"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([p["cost"] / ref_cost for p in c["random"]], [p["accuracy"] for p in c["random"]], "--",
            color="grey", label="random (cheapest <-> reference)")
    ax.plot([p["cost"] / ref_cost for p in c["oracle"]], [p["accuracy"] for p in c["oracle"]], "-",
            color="green", label="oracle")
    pol = c["policy"]
    ax.scatter([p["cost"] / ref_cost for p in pol], [p["accuracy"] for p in pol], s=14, color="tab:blue",
               label="auto's policy family (ladders, thresholds)")
    for m in f["fleet"]:
        e = f["models"][m]
        ax.scatter([e["cost_per_item_usd"] / ref_cost], [e["accuracy"]], marker="s", color="black")
        ax.annotate(m.replace("-instruct", "").replace("@recorded", ""), (e["cost_per_item_usd"] / ref_cost,
                    e["accuracy"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    a = f["auto"]
    ax.scatter([a["cost_vs_reference"]], [a["accuracy"]], marker="*", s=160, color="red", label="auto",
               zorder=5)
    ax.set_xscale("symlog", linthresh=0.05)
    ax.set_xlabel(f"cost per item, share of {f['reference']}")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{name} held-out (n={f['n']}): quality vs cost")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def published_table(rows: list[dict], engine: str) -> list[str]:
    lines = [f"each model through our engine ({engine}) next to the published figures",
             f"  {'model':<30}{'HumanEval pass@1':>22}{'GSM8K':>18}   published HumanEval | GSM8K"]
    for m, (he_pub, gsm_pub) in PUBLISHED.items():
        cells = []
        for bench in ("humaneval", "gsm8k"):
            scored = [r["scores"][m] for r in rows if r["bench"] == bench and m in r["scores"]]
            test = [r["scores"][m] for r in rows if r["bench"] == bench and m in r["scores"]
                    and r["split"] == "test"]
            cells.append(f"{pct(sum(test) / len(test)) if test else '-'} (test {len(test)}; all "
                         f"{pct(sum(scored) / len(scored)) if scored else '-'} {len(scored)})")
        lines.append(f"  {m:<30}{cells[0]:>22}  {cells[1]:>18}   {he_pub} | {gsm_pub}")
    return lines


def prices_by_params(prices: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    """A sensitivity check: each local model priced in proportion to its parameters, anchored at the 1.5B's
    measured price (on a crowded machine every model measures about equally slow, which prices them alike)."""
    from fleetlm.catalog import entries

    params = {e.name: e.parameters for e in entries().values()}
    anchor = prices[CODER_15B]
    out = dict(prices)
    for m in prices:
        if m in params and m != CODER_15B:
            k = params[m] / params[CODER_15B]
            out[m] = (anchor[0] * k, anchor[1] * k)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="outcomes JSONL(.gz) (default: the shipped ones)")
    ap.add_argument("--policy", default=None, help="policy JSON (default: the shipped one)")
    ap.add_argument("--plot", default="runs/real_routing", help="folder for the PNGs")
    ap.add_argument("--prices-by-params", action="store_true",
                    help="price local models in proportion to their parameters (a sensitivity check)")
    args = ap.parse_args()
    rows = load_outcomes(args.data)
    meta = load_meta(args.data)
    prices = model_prices(meta)
    if args.prices_by_params:
        prices = prices_by_params(prices)
        print("SENSITIVITY: local models priced in proportion to their parameters, not as measured")
    policy = load_policy(args.policy)
    print("prices ($ per 1M tokens in / out): " + ", ".join(f"{m} {p[0]:.3g}/{p[1]:.3g}"
                                                            for m, p in sorted(prices.items())))
    held = heldout_figures(rows, split="test", prices=prices, policy=policy, benches=["gsm8k", "humaneval"])
    for name in ("gsm8k", "humaneval"):
        f = held["benches"].get(name)
        if f is None:
            print(f"{name}: no test rows")
            continue
        print()
        print("\n".join(bench_table(name, f, "test")))
        print("\n".join(curve_table(f)))
        print("\n".join(floor_sweep(rows, name, prices, f)))
        print(f"  plot: {plot(f, name, Path(args.plot) / f'{name}_heldout.png')}")
    everything = heldout_figures(rows, split="all", prices=prices, policy=policy, benches=["humaneval"])
    f = everything["benches"].get("humaneval")
    if f is not None:
        print()
        print("HumanEval over every recorded item (train and test): the checks cascade fits no parameter, "
              "but its ladder was chosen on the train items, which are counted here")
        print("\n".join(bench_table("humaneval", f, "all")))
    print()
    print("\n".join(published_table(rows, meta.get("engine", "fleetlm"))))
    assert GPT4 and CODER_15B  # the references these figures are about


if __name__ == "__main__":
    main()
