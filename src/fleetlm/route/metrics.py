"""Routing metrics as in RouteLLM's paper: PGR curve, APGR, CPT(x), cost saving, and the plot.

The router's signal is one number per prompt (higher = more need of the strong model); sending the top
share c of prompts to the strong model gives quality r(c). PGR(c) = (r(c) - r_weak) / (r_strong - r_weak),
APGR = integral of PGR over c in [0, 1], CPT(x) = least c with PGR(c) >= x.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fleetlm.errors import FleetError


class MetricError(FleetError):
    """Inputs for which a routing metric is undefined."""


def quality_curve(
    signal: np.ndarray, q_strong: np.ndarray, q_weak: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(shares c_k = k/N, quality r_k) for k = 0..N prompts sent to the strong model.

    Ties in the signal are broken at random in expectation: tied prompts share their mean gain, so a
    constant router scores exactly like the random one instead of like whatever order the file had.
    """
    signal = np.asarray(signal, dtype=np.float64)
    q_strong = np.asarray(q_strong, dtype=np.float64)
    q_weak = np.asarray(q_weak, dtype=np.float64)
    n = len(signal)
    if n == 0 or not (len(q_strong) == len(q_weak) == n):
        raise MetricError("signal, strong and weak scores must be non-empty and of the same length")
    order = np.argsort(-signal, kind="stable")
    s_sorted = signal[order]
    gain = (q_strong - q_weak)[order]
    # mean gain over each run of tied signals
    bounds = np.flatnonzero(np.diff(s_sorted)) + 1
    starts = np.concatenate([[0], bounds])
    sums = np.add.reduceat(gain, starts)
    counts = np.diff(np.concatenate([starts, [n]]))
    gain = np.repeat(sums / counts, counts)
    r = (q_weak.sum() + np.concatenate([[0.0], np.cumsum(gain)])) / n
    return np.arange(n + 1) / n, r


def oracle_signal(q_strong: np.ndarray, q_weak: np.ndarray) -> np.ndarray:
    """Knows the outcomes: sends first the prompts where the strong model gains most."""
    return np.asarray(q_strong, dtype=np.float64) - np.asarray(q_weak, dtype=np.float64)


def pgr_curve(signal, q_strong, q_weak) -> tuple[np.ndarray, np.ndarray]:
    c, r = quality_curve(signal, q_strong, q_weak)
    r_weak, r_strong = r[0], float(np.mean(q_strong))
    if abs(r_strong - r_weak) < 1e-12:
        raise MetricError("strong and weak models have the same mean quality: PGR is undefined")
    return c, (r - r_weak) / (r_strong - r_weak)


def apgr(signal, q_strong, q_weak) -> float:
    c, pgr = pgr_curve(signal, q_strong, q_weak)
    return float(np.trapezoid(pgr, c)) if hasattr(np, "trapezoid") else float(np.trapz(pgr, c))


def cpt(signal, q_strong, q_weak, x: float) -> float:
    """Least share of strong calls whose PGR reaches x (1.0 if it never does before all calls are strong)."""
    c, pgr = pgr_curve(signal, q_strong, q_weak)
    hit = np.flatnonzero(pgr >= x - 1e-12)
    return float(c[hit[0]]) if len(hit) else 1.0


def cost_per_call(share_strong: float, price_strong: float, price_weak: float) -> float:
    return share_strong * price_strong + (1 - share_strong) * price_weak


@dataclass
class RouteReport:
    apgr: float
    cpt50: float
    cpt80: float
    cpt95: float
    random_apgr: float
    oracle_apgr: float
    saving_vs_strong: float  # cost(always strong) / cost(router) at PGR 95%
    saving_vs_random: float  # cost(random) / cost(router) at PGR 95%
    r_strong: float
    r_weak: float
    n: int

    def lines(self) -> list[str]:
        return [
            f"prompts {self.n}  strong quality {self.r_strong:.4f}  weak quality {self.r_weak:.4f}",
            f"APGR {self.apgr:.4f}  (random {self.random_apgr:.4f}, oracle {self.oracle_apgr:.4f})",
            f"CPT(50%) {self.cpt50:.4f}  CPT(80%) {self.cpt80:.4f}  CPT(95%) {self.cpt95:.4f}",
            f"cost saving at 95% PGR: x{self.saving_vs_strong:.3f} vs always-strong, "
            f"x{self.saving_vs_random:.3f} vs random",
        ]


def evaluate(signal, q_strong, q_weak, price_strong: float = 1.0, price_weak: float = 0.0) -> RouteReport:
    """All of the issue's figures for one router's signal; random's CPT(x) is x by definition."""
    q_strong, q_weak = np.asarray(q_strong, np.float64), np.asarray(q_weak, np.float64)
    c95 = cpt(signal, q_strong, q_weak, 0.95)
    router_cost = cost_per_call(c95, price_strong, price_weak)
    random_cost = cost_per_call(0.95, price_strong, price_weak)
    const = np.zeros(len(q_strong))
    return RouteReport(
        apgr=apgr(signal, q_strong, q_weak),
        cpt50=cpt(signal, q_strong, q_weak, 0.5),
        cpt80=cpt(signal, q_strong, q_weak, 0.8),
        cpt95=c95,
        random_apgr=apgr(const, q_strong, q_weak),
        oracle_apgr=apgr(oracle_signal(q_strong, q_weak), q_strong, q_weak),
        saving_vs_strong=price_strong / router_cost if router_cost > 0 else float("inf"),
        saving_vs_random=random_cost / router_cost if router_cost > 0 else float("inf"),
        r_strong=float(q_strong.mean()),
        r_weak=float(q_weak.mean()),
        n=len(q_strong),
    )


def plot_curve(path: str | Path, signal, q_strong, q_weak, label: str = "router") -> Path:
    """PNG of quality against share of strong calls, with the random and oracle lines."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    c, r = quality_curve(signal, q_strong, q_weak)
    _, r_oracle = quality_curve(oracle_signal(q_strong, q_weak), q_strong, q_weak)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot(c, r, label=f"{label} (APGR {apgr(signal, q_strong, q_weak):.3f})")
    ax.plot([0, 1], [r[0], r[-1]], "--", color="gray", label="random")
    ax.plot(c, r_oracle, ":", color="green", label="oracle")
    ax.set_xlabel("share of calls to the strong model")
    ax.set_ylabel("quality")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
