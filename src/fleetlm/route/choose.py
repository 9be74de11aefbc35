"""Choosing a model from predicted qualities: best quality minus lambda x price, or a floor at least cost."""

from __future__ import annotations

import numpy as np

from fleetlm.errors import FleetError


class ChooseError(FleetError):
    """Prices or predictions that do not line up with the fleet's models."""


def _check(pred: np.ndarray, prices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.atleast_2d(np.asarray(pred, dtype=np.float64))
    prices = np.asarray(prices, dtype=np.float64)
    if pred.shape[1] != prices.shape[0]:
        raise ChooseError(f"{pred.shape[1]} predicted qualities per prompt but {prices.shape[0]} prices")
    if (prices < 0).any():
        raise ChooseError("prices must be non-negative")
    return pred, prices


def choose_tradeoff(pred, prices, lam: float) -> np.ndarray:
    """Index of the model maximising predicted quality - lam * price, per prompt (ties: the cheaper)."""
    pred, prices = _check(pred, prices)
    utility = pred - lam * prices
    # among equal utilities prefer the cheapest: sort models by price, argmax takes the first maximum
    order = np.argsort(prices, kind="stable")
    return order[np.argmax(utility[:, order], axis=1)]


def choose_floor(pred, prices, floor: float) -> np.ndarray:
    """Cheapest model whose predicted quality reaches `floor` x the best predicted quality, per prompt."""
    pred, prices = _check(pred, prices)
    if not 0.0 <= floor <= 1.0:
        raise ChooseError(f"quality floor must be in [0, 1], got {floor}")
    ok = pred >= floor * pred.max(axis=1, keepdims=True) - 1e-12
    cost = np.where(ok, prices[None, :], np.inf)
    return np.argmin(cost, axis=1)


def choose_margin(pred, prices, margin: float) -> np.ndarray:
    """Cheapest model whose predicted quality is within `margin` of the best prediction, per prompt.

    With margin = (1 - q) x the strongest model's mean quality, the expected quality summed over the traffic
    stays >= q x the strongest model's (when predictions are unbiased): a floor over traffic, not per request.
    """
    pred, prices = _check(pred, prices)
    if margin < 0:
        raise ChooseError(f"margin must be >= 0, got {margin}")
    ok = pred >= pred.max(axis=1, keepdims=True) - margin - 1e-12
    return np.argmin(np.where(ok, prices[None, :], np.inf), axis=1)


def choose_pair(signal, threshold: float) -> np.ndarray:
    """Two models: True where the strong model is called (signal = scores[strong] - scores[weak])."""
    return np.asarray(signal) >= threshold
