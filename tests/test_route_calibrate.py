import numpy as np
import pytest

from fleetlm.route.calibrate import (
    CalibrationError,
    calibrate_floor,
    calibrate_tradeoff,
    clopper_pearson,
    floor_holds,
)


def _synthetic(n, rng):
    # a signal that is informative but noisy: weak fails more often where the signal is high
    signal = rng.random(n)
    strong = (rng.random(n) < 0.85).astype(float)
    weak = (rng.random(n) < 0.9 - 0.6 * signal).astype(float)
    return signal, strong, weak


def test_clopper_pearson_known_values():
    lo, hi = clopper_pearson(0, 10, 0.05)
    assert lo == 0.0 and hi == pytest.approx(1 - 0.05 ** (1 / 10))
    lo, hi = clopper_pearson(10, 10, 0.05)
    assert hi == 1.0 and lo == pytest.approx(0.05 ** (1 / 10))


def test_floor_coverage_over_random_splits():
    rng = np.random.default_rng(0)
    floor, confidence, trials = 0.95, 0.9, 60
    violations, shares = 0, []
    for _ in range(trials):
        s, q_s, q_w = _synthetic(4000, rng)
        cal = calibrate_floor(s[:1000], q_s[:1000], q_w[:1000], floor, confidence)
        ok, _, _ = floor_holds(s[1000:], q_s[1000:], q_w[1000:], cal.threshold, floor)
        violations += not ok
        shares.append(cal.share_strong)
    assert violations / trials <= 1 - confidence  # the guarantee, checked on held-out data
    assert 0.05 < np.mean(shares) < 1.0  # and it still saves strong calls


def test_calibration_reports_cost_and_rejects_bad_input():
    rng = np.random.default_rng(1)
    s, q_s, q_w = _synthetic(500, rng)
    cal = calibrate_floor(s, q_s, q_w, 0.9, 0.9, price_strong=10.0, price_weak=1.0)
    assert cal.cost_per_call == pytest.approx(cal.share_strong * 10 + (1 - cal.share_strong) * 1)
    assert any("share of strong calls" in line for line in cal.lines())
    with pytest.raises(CalibrationError):
        calibrate_floor(s, q_s, q_w, floor=1.5)
    with pytest.raises(CalibrationError):
        calibrate_floor(s[:5], q_s[:5], q_w[:5])


def test_calibrated_price_weight_keeps_the_floor_on_its_rows_and_saves():
    rng = np.random.default_rng(0)
    n = 400
    hard = rng.random(n) < 0.3  # the cheap model fails the hard third, the strong one gets all right
    outcomes = np.stack([(~hard).astype(float), np.ones(n)], axis=1)
    pred = np.stack([np.where(hard, 0.2, 0.9), np.full(n, 0.95)], axis=1) + rng.normal(0, 0.05, (n, 2))
    cal = calibrate_tradeoff(pred, outcomes, np.array([0.1, 1.0]), ["cheap", "strong"], floor=0.95)
    assert cal.strongest == "strong" and cal.strongest_quality == 1.0
    assert cal.quality >= 0.95 and cal.lam > 0 and cal.cost_share < 0.5
    # a floor of 1 allows no loss: the cheap model keeps only prompts it gets right, at a higher cost
    strict = calibrate_tradeoff(pred, outcomes, np.array([0.1, 1.0]), ["cheap", "strong"], floor=1.0)
    assert strict.quality == 1.0 and strict.cost_share >= cal.cost_share
    with pytest.raises(CalibrationError):
        calibrate_tradeoff(pred, outcomes[:, :1], np.array([0.1, 1.0]), ["cheap", "strong"], floor=0.9)
