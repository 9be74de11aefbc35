"""The real fleet's recorded outcomes (shipped in assets/outcomes) and the held-out figures made from them.

`load_outcomes()` reads the rows `fleet fleet record` wrote (one per benchmark item: every model's answer,
score, tokens, latency and cascade-check verdicts; GSM8K rows also hold GPT-4's and Mixtral's recorded
outcomes). `heldout_figures(rows)` replays, on the test split, each model alone and `auto`, and returns per
benchmark: each model's accuracy and cost, `auto`'s accuracy, cost and share of answers per model, both as a
share of the benchmark's reference model, and the quality-cost curve of `auto`'s policy family against random
routing and the oracle.

Costs: an item's cost on a model is its recorded prompt and completion tokens at the model's price ($ per 1M
tokens): local models at their measured-compute price (fleet/measure.py: machine $/h / (tokens/s x 3600) x
1e6, saved in the outcomes' meta file when they were recorded), replayed models at their list prices. A
cascade pays for every model it tried, a rejected cheap answer included.

`auto` is a cascade: the rungs of a ladder answer in turn, cheapest first; a rung's answer is kept when its
acceptance score reaches the rung's threshold, and the last rung's answer is kept as it is. The acceptance
score comes from the checks that ran on the answer (route/checks.py, recorded with it) and, where the policy
was fitted (fleet/fit.py), from a logistic model over them. The shipped policy is assets/outcomes/policy.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fleetlm.errors import FleetError
from fleetlm.jsonl import iter_jsonl

OUTCOMES_DIR = Path(__file__).resolve().parent.parent / "assets" / "outcomes"
DEFAULT_FILE = OUTCOMES_DIR / "outcomes.jsonl.gz"
POLICY_FILE = OUTCOMES_DIR / "policy.json"
GPT4 = "gpt-4-1106-preview@recorded"
MIXTRAL = "Mixtral-8x7B-Instruct-v0.1@recorded"
CODER_15B = "qwen2.5-coder-1.5b-instruct"


class OutcomesError(FleetError):
    """Recorded outcomes that are missing, malformed, or lack what a figure needs (a price, a model)."""


# ---- reading ----------------------------------------------------------------------------------------

def load_outcomes(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The recorded rows (the shipped file by default); .gz or plain JSONL."""
    path = Path(path) if path is not None else DEFAULT_FILE
    if not path.is_file():
        raise OutcomesError(f"no recorded outcomes at {path}; make them with `fleet fleet record --out FILE`")
    rows = []
    for where, row in iter_jsonl(path, OutcomesError, "recorded outcomes"):
        if not isinstance(row, dict) or not isinstance(row.get("scores"), dict) or "bench" not in row:
            raise OutcomesError(f"{where}: not an outcomes row (needs bench and scores)")
        rows.append(row)
    if not rows:
        raise OutcomesError(f"{path}: no rows")
    return rows


def meta_file(path: str | Path | None = None) -> Path:
    path = Path(path) if path is not None else DEFAULT_FILE
    name = path.name.removesuffix(".gz").removesuffix(".jsonl")
    return path.with_name(name + ".meta.json")


def load_meta(path: str | Path | None = None) -> dict[str, Any]:
    """How the outcomes were recorded (OUT.meta.json beside them): plan, engine, prices, counts."""
    file = meta_file(path)
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OutcomesError(f"no meta file {file} beside the outcomes") from None
    except (OSError, ValueError) as exc:
        raise OutcomesError(f"{file}: {exc}") from None


Prices = dict[str, tuple[float, float]]  # model -> ($ per 1M prompt tokens, $ per 1M completion tokens)


def model_prices(meta: dict[str, Any], overrides: dict[str, Any] | None = None) -> Prices:
    """Each model's price: the meta file's (measured or list), then `overrides` ({model: (in, out)} or
    {model: {"input", "output"}})."""
    out: Prices = {}
    for name, p in {**meta.get("prices_usd_per_1m", {}), **(overrides or {})}.items():
        if isinstance(p, dict):
            if p.get("input") is None or p.get("output") is None:
                continue
            out[name] = (float(p["input"]), float(p["output"]))
        else:
            out[name] = (float(p[0]), float(p[1]))
    return out


def item_cost(row: dict[str, Any], model: str, prices: Prices) -> float:
    """Dollars this item cost on `model`: its recorded tokens at the model's price."""
    if model not in prices:
        raise OutcomesError(f"no price for {model} (run `fleet models measure {model}`, or pass prices=)")
    tokens = (row.get("tokens") or {}).get(model) or {}
    p_in, p_out = prices[model]
    return ((tokens.get("prompt") or 0) * p_in + (tokens.get("completion") or 0) * p_out) / 1e6


def checks_passed(row: dict[str, Any], model: str) -> bool | None:
    """Whether every recorded check on the model's answer passed; None when no check applied."""
    checks = (row.get("checks") or {}).get(model)
    if not checks:
        return None
    return all(c.get("passed") for c in checks)


# ---- policies ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What a policy did on one item: the model whose answer was kept, its score, the whole cost, the
    models that answered on the way."""

    model: str
    score: float
    cost: float
    tried: tuple[str, ...]


@dataclass
class Cascade:
    """A ladder of models, cheapest first. A rung's answer is kept when accept(row, model) reaches the
    rung's threshold (default: its checks passed); the last rung's answer is always kept. With
    unchecked="keep", an answer no check applies to is kept as the gateway does."""

    ladder: list[str]
    thresholds: dict[str, float] = field(default_factory=dict)
    accept: Callable[[dict[str, Any], str, tuple[str, ...]], float] | None = None
    unchecked: str = "keep"
    label: str = ""

    def score_answer(self, row: dict[str, Any], model: str, below: tuple[str, ...] = ()) -> float | None:
        """The answer's acceptance score (below: the rungs that answered before it); None: unchecked."""
        if self.accept is not None:
            return self.accept(row, model, below)
        verdict = checks_passed(row, model)
        return None if verdict is None else float(verdict)

    def __call__(self, row: dict[str, Any], prices: Prices) -> Outcome:
        cost, tried = 0.0, []
        for i, model in enumerate(self.ladder):
            cost += item_cost(row, model, prices)
            tried.append(model)
            last = i == len(self.ladder) - 1
            if last:
                break
            s = self.score_answer(row, model, tuple(tried[:-1]))
            if s is None:
                if self.unchecked == "keep":
                    break
                continue
            if s >= self.thresholds.get(model, 0.5):
                break
        return Outcome(tried[-1], float(row["scores"][tried[-1]]), cost, tuple(tried))

    def describe(self) -> str:
        rungs = " -> ".join(f"{m}" + (f" (>= {self.thresholds[m]:.3g})" if m in self.thresholds else "")
                            for m in self.ladder)
        return self.label or f"cascade {rungs}"


def single(model: str) -> Callable[[dict[str, Any], Prices], Outcome]:
    def run(row: dict[str, Any], prices: Prices) -> Outcome:
        return Outcome(model, float(row["scores"][model]), item_cost(row, model, prices), (model,))
    return run


# ---- which fleet, which reference -------------------------------------------------------------------

def local_models(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Models scored on every row that are not replayed (no @recorded)."""
    return [m for m in scored_in_all(rows) if not m.endswith("@recorded")]


def scored_in_any(rows: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(m for r in rows for m in r["scores"]))


def scored_in_all(rows: Sequence[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    common = set(rows[0]["scores"])
    for r in rows[1:]:
        common &= set(r["scores"])
    return [m for m in rows[0]["scores"] if m in common]


def fleet_for(bench: str, rows: Sequence[dict[str, Any]], prices: Prices) -> tuple[list[str], str]:
    """(the fleet, cheapest first, and the reference model) of a benchmark's figures: GSM8K = the local
    models + recorded GPT-4 (reference GPT-4); HumanEval = the local models (reference Qwen2.5-Coder-1.5B);
    otherwise the local models, reference the priciest. Every local model recorded on some row of the
    bench is in the fleet: figures are computed on the rows where all of the fleet was recorded."""
    local = [m for m in scored_in_any(rows) if not m.endswith("@recorded")]
    if bench == "gsm8k" and GPT4 in scored_in_any(rows):
        fleet = [*local, GPT4]
        reference = GPT4
    else:
        fleet = local
        reference = CODER_15B if bench == "humaneval" and CODER_15B in local else ""
    fleet = sorted(fleet, key=lambda m: prices.get(m, (0.0, 0.0))[::-1])
    if not fleet:
        raise OutcomesError(f"{bench}: no model is scored on every row")
    return fleet, reference or fleet[-1]


# ---- figures ----------------------------------------------------------------------------------------

def evaluate(rows: Sequence[dict[str, Any]], policy: Callable[[dict[str, Any], Prices], Outcome],
             prices: Prices) -> dict[str, Any]:
    """Accuracy, total and per-item cost, and the share of kept answers per model, of a policy on rows."""
    outcomes = [policy(r, prices) for r in rows]
    n = len(outcomes)
    share: dict[str, float] = {}
    for o in outcomes:
        share[o.model] = share.get(o.model, 0.0) + 1.0 / n
    total = sum(o.cost for o in outcomes)
    return {"n": n, "accuracy": sum(o.score for o in outcomes) / n, "cost_usd": total,
            "cost_per_item_usd": total / n, "share": share,
            "answers_per_item": sum(len(o.tried) for o in outcomes) / n}


def curves(rows: Sequence[dict[str, Any]], fleet: list[str], reference: str, prices: Prices,
           family: Sequence[Cascade]) -> dict[str, list[dict[str, float]]]:
    """Quality-cost points (mean accuracy, mean cost per item):
    - policy: each member of `family` (auto's policy at its other settings), sorted by cost;
    - random: a share p of items to the reference, the rest to the cheapest model, p from 0 to 1;
    - oracle: per item the model maximising true score - lambda x cost, lambda swept (knows the outcomes)."""
    cheap = fleet[0]
    a = evaluate(rows, single(cheap), prices)
    b = evaluate(rows, single(reference), prices)
    random = [{"p": float(p), "accuracy": (1 - p) * a["accuracy"] + p * b["accuracy"],
               "cost": (1 - p) * a["cost_per_item_usd"] + p * b["cost_per_item_usd"]}
              for p in np.linspace(0, 1, 11)]
    scores = np.array([[r["scores"][m] for m in fleet] for r in rows], dtype=np.float64)
    costs = np.array([[item_cost(r, m, prices) for m in fleet] for r in rows], dtype=np.float64)
    scale = float(costs.mean()) or 1.0
    oracle = []
    for lam in np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 60)]):
        # ties go to the cheaper model: fleet is cheapest first and argmax takes the first maximum
        pick = np.argmax(scores - lam * costs / scale, axis=1)
        rows_ = np.arange(len(rows))
        oracle.append({"lambda": float(lam), "accuracy": float(scores[rows_, pick].mean()),
                       "cost": float(costs[rows_, pick].mean())})
    policy = []
    for c in family:
        e = evaluate(rows, c, prices)
        policy.append({"label": c.describe(), "accuracy": e["accuracy"], "cost": e["cost_per_item_usd"]})
    policy.sort(key=lambda p: p["cost"])
    return {"policy": policy, "random": random, "oracle": _pareto(oracle)}


def _pareto(points: list[dict[str, float]]) -> list[dict[str, float]]:
    """The points no other point beats on both accuracy and cost, by cost."""
    points = sorted(points, key=lambda p: (p["cost"], -p["accuracy"]))
    out: list[dict[str, float]] = []
    for p in points:
        if not out or p["accuracy"] > out[-1]["accuracy"] + 1e-12:
            out.append(p)
    return out


def heldout_figures(rows: Sequence[dict[str, Any]], *, split: str = "test", prices: Prices | None = None,
                    meta: dict[str, Any] | None = None, policy: dict[str, Any] | None = None,
                    benches: Sequence[str] | None = None) -> dict[str, Any]:
    """Per benchmark, on `split` ("test", or "all" for fixed-check cascades, which fit nothing): each model
    alone, `auto` (the policy, default the shipped one, fleet/fit.py), both against the reference model, and
    the quality-cost curves. prices: {model: (in, out)} $ per 1M tokens (default: the meta file's)."""
    if split not in ("test", "train", "all"):
        raise OutcomesError(f"unknown split {split!r}; expected test, train or all")
    if prices is None:
        prices = model_prices(meta if meta is not None else load_meta())
    policy = policy if policy is not None else load_policy()
    out: dict[str, Any] = {"split": split, "benches": {}}
    for bench in benches or sorted({r["bench"] for r in rows}):
        picked = [r for r in rows if r["bench"] == bench and (split == "all" or r.get("split") == split)]
        if not picked:
            continue
        fleet, reference = fleet_for(bench, picked, prices)
        picked = [r for r in picked if all(m in r["scores"] for m in fleet)]
        models = {m: evaluate(picked, single(m), prices) for m in scored_in_all(picked) if m in prices}
        auto_policy = cascade_from(policy, bench, fleet)
        auto = evaluate(picked, auto_policy, prices)
        ref = models[reference]
        auto.update(policy=auto_policy.describe(), reference=reference,
                    accuracy_vs_reference=auto["accuracy"] / ref["accuracy"] if ref["accuracy"] else None,
                    cost_vs_reference=(auto["cost_per_item_usd"] / ref["cost_per_item_usd"]
                                       if ref["cost_per_item_usd"] else None))
        family = policy_family(policy, bench, fleet)
        out["benches"][bench] = {"n": len(picked), "fleet": fleet, "reference": reference, "models": models,
                                 "auto": auto, "curve": curves(picked, fleet, reference, prices, family)}
    return out


# ---- the shipped policy -----------------------------------------------------------------------------

def load_policy(path: str | Path | None = None) -> dict[str, Any]:
    """auto's policy per benchmark ({"benches": {bench: {"ladder": [...], "thresholds": {...}}}, "default":
    {...}}); without a shipped file, a checks cascade over the fleet, cheapest first."""
    file = Path(path) if path is not None else POLICY_FILE
    if not file.is_file():
        return {"benches": {}, "default": {}}
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutcomesError(f"{file}: {exc}") from None


def _accept_fn(spec: dict[str, Any]) -> Callable[[dict[str, Any], str, tuple[str, ...]], float] | None:
    """A fitted acceptance model (fleet/fit.py), or None for plain check verdicts."""
    if not spec.get("accept"):
        return None
    from fleetlm.fleet.fit import acceptance_from_dict

    return acceptance_from_dict(spec["accept"])


def cascade_from(policy: dict[str, Any], bench: str, fleet: list[str]) -> Cascade:
    """auto on this benchmark's fleet: the policy's ladder for the bench (models it names that the fleet
    lacks are dropped), else every model of the fleet, cheapest first, on check verdicts."""
    spec = (policy.get("benches") or {}).get(bench) or policy.get("default") or {}
    ladder = [m for m in spec.get("ladder", fleet) if m in fleet] or list(fleet)
    return Cascade(ladder, {m: float(t) for m, t in (spec.get("thresholds") or {}).items()},
                   _accept_fn(spec), label=spec.get("label", ""))


def policy_family(policy: dict[str, Any], bench: str, fleet: list[str]) -> list[Cascade]:
    """auto's policy at other settings, for its curve: every ladder of the fleet (each keeps the price
    order and ends at the reference or any other model) on check verdicts, and, for a fitted acceptance
    model, its thresholds swept."""
    family = []
    n = len(fleet)
    for mask in range(1, 2**n):
        ladder = [fleet[i] for i in range(n) if mask >> i & 1]
        family.append(Cascade(ladder))
    base = cascade_from(policy, bench, fleet)
    if base.accept is not None:
        for t in np.linspace(0.05, 0.95, 19):
            family.append(Cascade(base.ladder, dict.fromkeys(base.ladder[:-1], float(t)), base.accept,
                                  label=f"{' -> '.join(base.ladder)} (fitted, accept >= {t:.2f})"))
    return family


def format_figures(figures: dict[str, Any]) -> str:
    """The figures as text tables, one per benchmark."""
    lines = []
    for bench, f in figures["benches"].items():
        ref = f["reference"]
        lines.append(f"{bench} ({figures['split']} split, n={f['n']}), reference {ref}")
        lines.append(f"  {'model':<40}{'acc %':>8}{'$/item':>12}{'acc/ref':>9}{'cost/ref':>9}")
        r = f["models"][ref]
        for m, e in [*f["models"].items(), ("auto", f["auto"])]:
            acc = e["accuracy"] / r["accuracy"] if r["accuracy"] else float("nan")
            cost = e["cost_per_item_usd"] / r["cost_per_item_usd"] if r["cost_per_item_usd"] else float("nan")
            lines.append(f"  {m:<40}{100 * e['accuracy']:>8.1f}{e['cost_per_item_usd']:>12.3g}"
                         f"{acc:>9.1%}{cost:>9.1%}")
        share = ", ".join(f"{m} {s:.0%}" for m, s in sorted(f["auto"]["share"].items(), key=lambda x: -x[1]))
        lines.append(f"  auto = {f['auto']['policy']}; answers kept from: {share}")
    return "\n".join(lines)
