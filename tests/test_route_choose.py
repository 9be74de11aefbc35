import numpy as np
import pytest

from fleetlm.route.choose import ChooseError, choose_floor, choose_margin, choose_pair, choose_tradeoff

PRED = np.array([[0.9, 0.8, 0.3], [0.5, 0.95, 0.94]])
PRICES = np.array([10.0, 1.0, 0.1])


def test_tradeoff_moves_to_cheaper_models_as_lambda_grows():
    assert choose_tradeoff(PRED, PRICES, 0.0).tolist() == [0, 1]
    assert choose_tradeoff(PRED, PRICES, 0.05).tolist() == [1, 2]  # 0.9-0.5 < 0.8-0.05; 0.9 < 0.935
    assert choose_tradeoff(PRED, PRICES, 10.0).tolist() == [2, 2]


def test_tradeoff_ties_prefer_cheaper():
    assert choose_tradeoff(np.array([[0.5, 0.5]]), np.array([2.0, 1.0]), 0.0).tolist() == [1]


def test_floor_takes_cheapest_model_that_reaches_it():
    assert choose_floor(PRED, PRICES, 0.85).tolist() == [1, 2]
    assert choose_floor(PRED, PRICES, 1.0).tolist() == [0, 1]
    assert choose_floor(PRED, PRICES, 0.0).tolist() == [2, 2]


def test_pair_and_errors():
    assert choose_pair(np.array([0.1, -0.2, 0.3]), 0.0).tolist() == [True, False, True]
    with pytest.raises(ChooseError):
        choose_tradeoff(PRED, np.array([1.0, 2.0]), 0.1)
    with pytest.raises(ChooseError):
        choose_floor(PRED, PRICES, 1.5)


def test_choose_margin_takes_the_cheapest_within_the_margin_of_the_best():
    pred = np.array([[0.10, 0.13, 0.12], [0.30, 0.33, 0.62]])
    prices = np.array([1.0, 5.0, 13.0])
    assert choose_margin(pred, prices, 0.05).tolist() == [0, 2]  # 0.03 below the best is within 0.05
    assert choose_margin(pred, prices, 0.0).tolist() == [1, 2]
    with pytest.raises(ChooseError):
        choose_margin(pred, prices, -0.1)
