import numpy as np
import pytest

from fleetlm.route.metrics import MetricError, apgr, cpt, evaluate, pgr_curve, plot_curve, quality_curve

# 4 prompts: strong right on all but #3; weak right on #0 and #3.
STRONG = np.array([1, 1, 1, 0.0])
WEAK = np.array([1, 0, 0, 1.0])


def test_pgr_hand_computed():
    # signal sends #1 first, then #2, then #0, then #3
    signal = np.array([0.2, 0.9, 0.5, 0.1])
    c, r = quality_curve(signal, STRONG, WEAK)
    assert np.allclose(c, [0, 0.25, 0.5, 0.75, 1.0])
    assert np.allclose(r, [0.5, 0.75, 1.0, 1.0, 0.75])
    _, pgr = pgr_curve(signal, STRONG, WEAK)
    assert np.allclose(pgr, [0, 1, 2, 2, 1])  # r_strong = r_weak + 0.25
    # trapezoid: 0.25 * (0.5 + 1.5 + 2 + 1.5)
    assert apgr(signal, STRONG, WEAK) == pytest.approx(1.375)
    assert cpt(signal, STRONG, WEAK, 0.5) == pytest.approx(0.25)
    assert cpt(signal, STRONG, WEAK, 1.5) == pytest.approx(0.5)


def test_random_is_half_and_oracle_beats_it():
    rng = np.random.default_rng(0)
    s, w = (rng.random(500) < 0.8).astype(float), (rng.random(500) < 0.6).astype(float)
    assert apgr(np.zeros(500), s, w) == pytest.approx(0.5)  # ties: expected value under a random order
    rep = evaluate(rng.random(500), s, w)
    assert rep.oracle_apgr > 1.0 > rep.random_apgr == pytest.approx(0.5)
    assert abs(rep.apgr - 0.5) < 0.1  # a random signal lands near the random line
    assert rep.cpt50 <= rep.cpt80 <= rep.cpt95
    assert rep.saving_vs_strong == pytest.approx(1 / rep.cpt95)


def test_cost_saving_with_prices():
    signal = np.array([0.2, 0.9, 0.5, 0.1])
    rep = evaluate(signal, STRONG, WEAK, price_strong=10.0, price_weak=1.0)
    # PGR reaches 0.95 at c = 0.25: cost 0.25*10 + 0.75*1 = 3.25
    assert rep.saving_vs_strong == pytest.approx(10 / 3.25)
    assert rep.saving_vs_random == pytest.approx((0.95 * 10 + 0.05) / 3.25)


def test_undefined_and_plot(tmp_path):
    with pytest.raises(MetricError):
        apgr(np.zeros(3), np.ones(3), np.ones(3))
    with pytest.raises(MetricError):
        quality_curve(np.zeros(2), np.ones(3), np.ones(3))
    png = plot_curve(tmp_path / "p.png", np.array([0.2, 0.9, 0.5, 0.1]), STRONG, WEAK)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
