"""A quality floor with a guarantee: pick the routing threshold on a held-out calibration split.

Floor: routed quality >= q x the strong model's quality. Routed - q*strong = (1-q)*strong - losses + gains,
where a loss is a prompt the strong model gets right and the routed choice gets wrong. Dropping the gains
(conservative), the floor holds when  loss_rate <= (1-q) * strong_rate.  We bound loss_rate from above and
strong_rate from below with exact Clopper-Pearson intervals (delta/2 each), and walk the thresholds from
"all strong" downward (fixed-sequence testing, as in Learn-then-Test), stopping at the first that fails:
with probability >= 1 - delta the chosen threshold keeps the floor on new data from the same distribution.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import beta

from fleetlm.errors import FleetError


class CalibrationError(FleetError):
    """A floor or confidence that makes no sense, or too little calibration data."""


def clopper_pearson(k: int, n: int, delta: float) -> tuple[float, float]:
    """One-sided exact bounds: (lower, upper), each holding with probability >= 1 - delta."""
    lo = 0.0 if k == 0 else float(beta.ppf(delta, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(1 - delta, k + 1, n - k))
    return lo, hi


@dataclass
class Calibration:
    threshold: float  # call the strong model when signal >= threshold
    floor: float
    confidence: float
    share_strong: float  # expected share of calls to the strong model (on the calibration split)
    cost_per_call: float  # expected cost per call at the given prices
    cost_vs_strong: float  # that cost / always-strong's cost
    loss_upper: float
    strong_lower: float
    n: int

    def lines(self) -> list[str]:
        return [
            f"floor {self.floor:.3f} of strong quality at {self.confidence:.0%} confidence "
            f"(n={self.n}): threshold {self.threshold:.6g}",
            f"expected share of strong calls {self.share_strong:.4f}; cost per call {self.cost_per_call:.6g} "
            f"({self.cost_vs_strong:.4f} of always-strong)",
        ]


def calibrate_floor(
    signal,
    q_strong,
    q_weak,
    floor: float = 0.95,
    confidence: float = 0.9,
    price_strong: float = 1.0,
    price_weak: float = 0.0,
) -> Calibration:
    signal = np.asarray(signal, dtype=np.float64)
    q_strong = np.asarray(q_strong, dtype=np.float64) >= 0.5
    q_weak = np.asarray(q_weak, dtype=np.float64) >= 0.5
    n = len(signal)
    if not 0.0 < floor <= 1.0:
        raise CalibrationError(f"floor must be in (0, 1], got {floor}")
    if not 0.0 < confidence < 1.0:
        raise CalibrationError(f"confidence must be in (0, 1), got {confidence}")
    if n < 10:
        raise CalibrationError(f"need at least 10 calibration rows, got {n}")
    delta = 1.0 - confidence
    strong_lower, _ = clopper_pearson(int(q_strong.sum()), n, delta / 2)
    budget = (1.0 - floor) * strong_lower
    # candidate thresholds: each distinct signal value, from the highest share of strong calls down
    cands = np.unique(signal)  # ascending: threshold = smallest value -> everyone strong
    loss_if_weak = q_strong & ~q_weak  # a prompt left to the weak model loses only here
    threshold, loss_hi = -np.inf, 0.0
    for t in cands[1:]:  # t = cands[0] (and -inf) send everything to the strong model: zero loss
        k = int((loss_if_weak & (signal < t)).sum())
        _, hi = clopper_pearson(k, n, delta / 2)
        if hi > budget:
            break
        threshold, loss_hi = float(t), hi
    share = float((signal >= threshold).mean())
    cost = share * price_strong + (1 - share) * price_weak
    return Calibration(
        threshold=threshold,
        floor=floor,
        confidence=confidence,
        share_strong=share,
        cost_per_call=cost,
        cost_vs_strong=cost / price_strong if price_strong > 0 else 0.0,
        loss_upper=loss_hi,
        strong_lower=strong_lower,
        n=n,
    )


def floor_holds(signal, q_strong, q_weak, threshold: float, floor: float) -> tuple[bool, float, float]:
    """On new data: (routed quality >= floor x strong quality, routed quality, strong quality)."""
    signal = np.asarray(signal, dtype=np.float64)
    q_strong, q_weak = np.asarray(q_strong, np.float64), np.asarray(q_weak, np.float64)
    routed = np.where(signal >= threshold, q_strong, q_weak).mean()
    strong = q_strong.mean()
    return bool(routed >= floor * strong - 1e-12), float(routed), float(strong)


@dataclass
class Tradeoff:
    """A price weight lambda (choose_tradeoff) keeping a quality floor over the traffic of a held-out set."""

    lam: float
    floor: float
    strongest: str
    quality: float  # mean outcome of the picks on the held-out rows
    strongest_quality: float  # mean outcome of the strongest model on them
    cost_share: float  # mean relative price of the picks (strongest = 1)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Tradeoff:
        """From to_dict's output; KeyError, ValueError or TypeError when a field is missing or wrong."""
        return cls(float(data["lam"]), float(data["floor"]), str(data["strongest"]), float(data["quality"]),
                   float(data["strongest_quality"]), float(data["cost_share"]))


def calibrate_tradeoff(pred: np.ndarray, outcomes: np.ndarray, rel_prices: np.ndarray, models: list[str],
                       floor: float, grid: int = 400) -> Tradeoff:
    """The largest lambda whose picks (argmax of pred - lambda x price) keep, on held-out rows with their true
    outcomes, at least `floor` x the strongest (priciest) model's mean outcome. pred must be out-of-sample."""
    from fleetlm.route.choose import choose_tradeoff

    pred, outcomes, rel_prices = (np.asarray(a, dtype=np.float64) for a in (pred, outcomes, rel_prices))
    if pred.shape != outcomes.shape or pred.shape[1] != len(rel_prices) or len(models) != len(rel_prices):
        raise CalibrationError("predictions, outcomes, prices and models do not line up")
    strong = int(np.argmax(rel_prices))
    target = floor * outcomes[:, strong].mean()
    rows = np.arange(len(pred))
    best = None
    for lam in np.concatenate([[0.0], np.geomspace(1e-3, 10.0, grid)]):
        picks = choose_tradeoff(pred, rel_prices, float(lam))
        quality = outcomes[rows, picks].mean()
        if quality >= target - 1e-12:
            best = (float(lam), float(quality), float(rel_prices[picks].mean()))
    if best is None:  # not even the best predictions reach the floor: always the strongest
        best = (0.0, float(outcomes[:, strong].mean()), 1.0)
    lam, quality, share = best
    return Tradeoff(lam, floor, models[strong], quality, float(outcomes[:, strong].mean()), share)
