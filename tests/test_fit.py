import pytest

from fleetlm.fleet.fit import (
    FEATURES,
    acceptance_from_dict,
    answer_features,
    fit_acceptance,
    fit_bench,
    fit_policy,
    ladders,
    save_policy,
)
from fleetlm.fleet.outcomes import GPT4, OutcomesError, heldout_figures, load_policy

SMALL, BIG = "small-local", "big-local"
PRICES = {SMALL: (1.0, 1.0), BIG: (3.0, 3.0), GPT4: (10.0, 30.0)}


def row(i, split, small, big, gpt4, small_ok, small_answer="The answer is 5", big_answer="The answer is 5"):
    return {"id": f"q{i}", "prompt": f"q {i}", "bench": "gsm8k", "split": split, "domain": "math",
            "scores": {SMALL: float(small), BIG: float(big), GPT4: float(gpt4)},
            "tokens": {m: {"prompt": 50, "completion": 100} for m in (SMALL, BIG, GPT4)},
            "responses": {SMALL: small_answer, BIG: big_answer, GPT4: "The answer is 5"},
            "checks": {SMALL: [{"name": "math", "passed": small_ok, "detail": "final 5 (marked); 1 equation "
                                                                            "re-checked"}],
                       BIG: [{"name": "math", "passed": True, "detail": "final 5 (marked); 0 equations "
                                                                       "re-checked"}],
                       GPT4: []}}


@pytest.fixture
def rows():
    # the small model's check is right: it passes exactly when the small answer is right; the test rows
    # would reward a different policy, and must never be looked at
    train = [row(i, "train", i % 2, 1, 1, small_ok=bool(i % 2)) for i in range(20)]
    test = [row(100 + i, "test", 0, 0, 1, small_ok=True) for i in range(10)]
    return train + test


def test_ladders_are_every_sub_sequence_in_price_order():
    got = ladders([SMALL, BIG, GPT4])
    assert len(got) == 7 and [SMALL, GPT4] in got and [SMALL, BIG, GPT4] in got and [BIG] in got
    assert [BIG, SMALL] not in ladders([SMALL, BIG])


def test_fit_bench_picks_the_cheapest_ladder_that_keeps_the_floor_on_train(rows):
    spec = fit_bench(rows, "gsm8k", PRICES, floor=0.95)
    # small first: its check keeps its right answers and sends the others on; big is right on all train
    # rows, so GPT-4 is never needed and the cheapest ladder that keeps 95% is small -> big
    assert spec["ladder"] == [SMALL, BIG]
    assert spec["train"]["accuracy"] == 1.0
    assert spec["n_train"] == 20  # the test rows were not used


def test_fit_ignores_test_rows_entirely(rows):
    train_only = [r for r in rows if r["split"] == "train"]
    assert fit_bench(rows, "gsm8k", PRICES) == fit_bench(train_only, "gsm8k", PRICES)
    with pytest.raises(OutcomesError, match="train rows"):
        fit_bench([r for r in rows if r["split"] == "test"], "gsm8k", PRICES)


def test_acceptance_learns_that_a_passed_check_means_right(rows):
    acc = fit_acceptance([r for r in rows if r["split"] == "train"], [SMALL, GPT4])
    good = row(0, "train", 1, 1, 1, small_ok=True)
    bad = row(1, "train", 0, 1, 1, small_ok=False)
    assert acc(good, SMALL) > 0.5 > acc(bad, SMALL)
    again = acceptance_from_dict(acc.to_dict())
    assert again(good, SMALL) == pytest.approx(acc(good, SMALL))
    with pytest.raises(OutcomesError, match="refit"):
        acceptance_from_dict({**acc.to_dict(), "features": ["x"], "weights": [1.0]})


def test_answer_features_see_agreement_with_a_rung_below():
    agree = row(0, "train", 1, 1, 1, True, small_answer="so 12\nThe answer is 12",
                big_answer="The answer is 12")
    differ = row(1, "train", 1, 1, 1, True, small_answer="The answer is 11", big_answer="The answer is 12")
    i = FEATURES.index("agrees_below")
    assert answer_features(agree, BIG, (SMALL,))[i] == 1.0
    assert answer_features(differ, BIG, (SMALL,))[i] == 0.0
    assert answer_features(agree, BIG, ())[i] == 0.0


def test_a_saved_policy_drives_the_heldout_figures(rows, tmp_path):
    policy = fit_policy(rows, PRICES, floor=0.95)
    assert policy["benches"]["gsm8k"]["ladder"] == [SMALL, BIG]
    assert policy["default"]["ladder"][0] == SMALL
    path = save_policy(policy, tmp_path / "policy.json")
    f = heldout_figures(rows, prices=PRICES, policy=load_policy(path))["benches"]["gsm8k"]
    # on the test rows the small model's check passes wrong answers: the fitted ladder pays for it there
    assert f["n"] == 10 and f["auto"]["accuracy"] == 0.0
    assert f["models"][GPT4]["accuracy"] == 1.0
