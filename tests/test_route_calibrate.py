import numpy as np
import pytest

from fleetlm.route.calibrate import CalibrationError, calibrate_floor, clopper_pearson, floor_holds


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
