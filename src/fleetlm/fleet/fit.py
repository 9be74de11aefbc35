"""Fitting `auto` on recorded outcomes (train split only): the ladder, and an acceptance model per rung.

Two kinds of policy are fitted per benchmark and the one that keeps the quality floor at the lower cost on
the train split wins:
- a checks cascade (what the gateway's `kind: cascade` + `checks` runs): the ladder, a sub-sequence of the
  fleet in price order, is chosen; a rung's answer is kept when its checks pass;
- a fitted cascade: the same ladders, but a rung's answer is kept when P(answer right | its check verdicts,
  its length, whether it agrees with the rungs below) from a logistic model reaches a threshold, chosen on
  the train split.

Never a test item: `fit_policy` drops every row whose split is not "train" before it looks at any score.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fleetlm.fleet.outcomes import (
    Cascade,
    OutcomesError,
    Prices,
    evaluate,
    fleet_for,
    single,
)

FEATURES = ("checked", "passed", "examples_run", "parse_only", "no_final", "equations", "log_tokens",
            "agrees_below", "rungs_below")
DEFAULT_FLOOR = 0.95


def _final(text: str) -> float | None:
    from fleetlm.route.checks import final_number

    return final_number(text or "")[0]


def answer_features(row: dict[str, Any], model: str, below: tuple[str, ...] = ()) -> np.ndarray:
    """What a cascade knows about one answer once it is in: its check verdicts (route/checks.py, recorded),
    its length, and whether its final number agrees with an answer of a rung below (math)."""
    checks = (row.get("checks") or {}).get(model) or []
    details = " ".join(c.get("detail", "") for c in checks)
    passed = all(c.get("passed") for c in checks) if checks else False
    tokens = ((row.get("tokens") or {}).get(model) or {}).get("completion") or 0
    agrees = 0.0
    if below and any(c.get("name") == "math" for c in checks):
        mine = _final((row.get("responses") or {}).get(model, ""))
        others = [_final((row.get("responses") or {}).get(m, "")) for m in below]
        agrees = float(mine is not None and any(
            o is not None and math.isclose(o, mine, rel_tol=1e-6, abs_tol=1e-6) for o in others))
    eqs = 0.0
    for c in checks:
        if c.get("name") == "math" and "re-checked" in c.get("detail", ""):
            try:
                eqs = float(c["detail"].split(";")[1].split()[0])
            except (IndexError, ValueError):
                eqs = 0.0
    return np.array([float(bool(checks)), float(passed), float("prompt examples" in details and passed),
                     float("parse-only" in details), float("no final number" in details), math.log1p(eqs),
                     math.log1p(tokens), agrees, float(len(below))], dtype=np.float64)


@dataclass
class Acceptance:
    """A logistic model of P(answer right | answer_features), one for all rungs (the rung is a feature)."""

    weights: list[float]
    bias: float
    mu: list[float]
    sd: list[float]
    features: tuple[str, ...] = FEATURES

    def __call__(self, row: dict[str, Any], model: str, below: tuple[str, ...] = ()) -> float:
        x = (answer_features(row, model, below) - np.asarray(self.mu)) / np.asarray(self.sd)
        z = float(x @ np.asarray(self.weights) + self.bias)
        return 1.0 / (1.0 + math.exp(-max(-30.0, min(30.0, z))))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "features": list(self.features)}


def acceptance_from_dict(data: dict[str, Any]) -> Acceptance:
    try:
        acc = Acceptance([float(w) for w in data["weights"]], float(data["bias"]),
                         [float(v) for v in data["mu"]], [float(v) for v in data["sd"]],
                         tuple(data.get("features", FEATURES)))
    except (KeyError, TypeError, ValueError) as exc:
        raise OutcomesError(f"not an acceptance model: {exc}") from None
    if list(acc.features) != list(FEATURES) or len(acc.weights) != len(FEATURES):
        raise OutcomesError(f"acceptance model has features {list(acc.features)}; this version computes "
                            f"{list(FEATURES)}: refit it with `fleet fleet fit`")
    return acc


def fit_acceptance(rows: list[dict[str, Any]], ladder: list[str], c: float = 1.0) -> Acceptance | None:
    """Fit on every (row, rung) pair of the ladder but its last rung, each rung seeing the rungs below it."""
    from sklearn.linear_model import LogisticRegression

    xs, ys = [], []
    for row in rows:
        for i, model in enumerate(ladder[:-1]):
            xs.append(answer_features(row, model, tuple(ladder[:i])))
            ys.append(int(row["scores"][model] >= 0.5))
    if len(set(ys)) < 2:
        return None
    x = np.stack(xs)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=2000).fit((x - mu) / sd, ys)
    return Acceptance(clf.coef_[0].tolist(), float(clf.intercept_[0]), mu.tolist(), sd.tolist())


def ladders(fleet: list[str]) -> list[list[str]]:
    """Every non-empty sub-sequence of the fleet, in its price order (the floor on train decides which of
    them may end below the reference model)."""
    n = len(fleet)
    return [[fleet[i] for i in range(n) if mask >> i & 1] for mask in range(1, 2**n)]


def _best(candidates: list[tuple[dict[str, Any], Cascade]], target: float) -> tuple[dict[str, Any], Cascade]:
    """The cheapest candidate that reaches the target accuracy; else the most accurate one."""
    ok = [c for c in candidates if c[0]["accuracy"] >= target - 1e-12]
    if ok:
        return min(ok, key=lambda c: (c[0]["cost_per_item_usd"], -c[0]["accuracy"]))
    return max(candidates, key=lambda c: (c[0]["accuracy"], -c[0]["cost_per_item_usd"]))


def fit_bench(rows: list[dict[str, Any]], bench: str, prices: Prices, floor: float = DEFAULT_FLOOR,
              thresholds: int = 19) -> dict[str, Any]:
    """The policy for one benchmark from its train rows: the checks cascade and the fitted cascade that keep
    `floor` x the reference's train accuracy at least cost; the cheaper of the two (ties: the checks one)."""
    train = [r for r in rows if r.get("bench") == bench and r.get("split") == "train"]
    if len(train) < 5:
        raise OutcomesError(f"{bench}: {len(train)} train rows; record more (`fleet fleet record`)")
    fleet, reference = fleet_for(bench, train, prices)
    train = [r for r in train if all(m in r["scores"] for m in fleet)]
    target = floor * evaluate(train, single(reference), prices)["accuracy"]
    checks = [(evaluate(train, c, prices), c) for c in (Cascade(lad) for lad in ladders(fleet))]
    stats, chosen = _best(checks, target)
    spec: dict[str, Any] = {"ladder": chosen.ladder, "kind": "checks", "train": _brief(stats)}
    fitted_candidates = []
    for lad in ladders(fleet):
        if len(lad) < 2:
            continue
        acc = fit_acceptance(train, lad)
        if acc is None:
            continue
        for t in np.linspace(0.05, 0.95, thresholds):
            c = Cascade(lad, dict.fromkeys(lad[:-1], float(t)), acc)
            fitted_candidates.append((evaluate(train, c, prices), c, acc))
    if fitted_candidates:
        f_stats, f_chosen = _best([(s, c) for s, c, _ in fitted_candidates], target)
        acc = next(a for s, c, a in fitted_candidates if c is f_chosen)
        better = (f_stats["accuracy"] >= target - 1e-12 and (stats["accuracy"] < target - 1e-12 or
                  f_stats["cost_per_item_usd"] < stats["cost_per_item_usd"]))
        if better:
            spec = {"ladder": f_chosen.ladder, "kind": "fitted", "thresholds": f_chosen.thresholds,
                    "accept": acc.to_dict(), "train": _brief(f_stats)}
        spec["checks_alternative"] = {"ladder": chosen.ladder, "train": _brief(stats)}
    spec.update(reference=reference, floor=floor, n_train=len(train))
    return spec


def _brief(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: stats[k] for k in ("accuracy", "cost_per_item_usd", "share")}


def fit_policy(rows: list[dict[str, Any]], prices: Prices, floor: float = DEFAULT_FLOOR,
               benches: list[str] | None = None) -> dict[str, Any]:
    """auto's policy for every benchmark with train rows, plus `default`: the checks ladder over the local
    models chosen on all benchmarks' train rows together (the one the default fleet's gateway runs)."""
    train = [r for r in rows if r.get("split") == "train"]
    out: dict[str, Any] = {"floor": floor, "benches": {}}
    for bench in benches or sorted({r["bench"] for r in train}):
        out["benches"][bench] = fit_bench(train, bench, prices, floor)
    out["default"] = fit_default_ladder(train, prices, floor)
    return out


def fit_default_ladder(train: list[dict[str, Any]], prices: Prices, floor: float) -> dict[str, Any]:
    """One ladder of local models for every request (the gateway runs one): the cheapest whose train
    accuracy on every benchmark keeps `floor` x that benchmark's best local model."""
    from fleetlm.fleet.outcomes import scored_in_any

    local = sorted([m for m in scored_in_any(train) if not m.endswith("@recorded")],
                   key=lambda m: prices.get(m, (0.0, 0.0))[::-1])
    train = [r for r in train if all(m in r["scores"] for m in local)]
    if not local or not train:
        raise OutcomesError("no train row has every local model's outcome")
    benches = sorted({r["bench"] for r in train})
    best_local = {}
    for b in benches:
        rows = [r for r in train if r["bench"] == b]
        best_local[b] = max(evaluate(rows, single(m), prices)["accuracy"] for m in local)
    scored = []
    for lad in ladders(local):
        per = {b: evaluate([r for r in train if r["bench"] == b], Cascade(lad), prices) for b in benches}
        ok = all(per[b]["accuracy"] >= floor * best_local[b] - 1e-12 for b in benches)
        cost = sum(per[b]["cost_usd"] for b in benches)
        worst = min(per[b]["accuracy"] / best_local[b] if best_local[b] else 1.0 for b in benches)
        scored.append((ok, cost, worst, lad, per))
    ok = [s for s in scored if s[0]]
    _, cost, worst, lad, per = min(ok, key=lambda s: s[1]) if ok else max(scored, key=lambda s: s[2])
    return {"ladder": lad, "kind": "checks", "floor": floor, "meets_floor": bool(ok), "chosen_among": local,
            "train": {b: _brief(per[b]) for b in benches}}


def save_policy(policy: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(policy, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path
