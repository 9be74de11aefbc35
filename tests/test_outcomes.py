import gzip
import json

import pytest

from fleetlm.fleet.outcomes import (
    GPT4,
    Cascade,
    OutcomesError,
    evaluate,
    fleet_for,
    format_figures,
    heldout_figures,
    item_cost,
    load_meta,
    load_outcomes,
    model_prices,
    single,
)

SMALL, BIG = "small-local", "big-local"
PRICES = {SMALL: (1.0, 2.0), BIG: (3.0, 6.0), GPT4: (10.0, 30.0)}


def row(i, split, small, big, gpt4, small_checks=True, bench="gsm8k"):
    """One synthetic GSM8K row: scores per model, 100 prompt + 100 completion tokens each."""
    checks = [{"name": "math", "passed": small_checks, "detail": "x"}]
    models = {SMALL: small, BIG: big, GPT4: gpt4}
    return {"id": f"q{i}", "prompt": f"question {i}", "bench": bench, "split": split, "domain": "math",
            "scores": {m: float(s) for m, s in models.items()},
            "tokens": {m: {"prompt": 100, "completion": 100} for m in models},
            "checks": {SMALL: checks, BIG: [{"name": "math", "passed": True, "detail": "x"}], GPT4: []},
            "responses": {m: "The answer is 1" for m in models}}


def cost(model):
    p_in, p_out = PRICES[model]
    return (100 * p_in + 100 * p_out) / 1e6


@pytest.fixture
def rows():
    # test: small right and checked on 0-1, wrong but checked on 2, wrong and caught on 3; big right on 0-2
    return [row(0, "test", 1, 1, 1), row(1, "test", 1, 1, 1), row(2, "test", 0, 1, 1),
            row(3, "test", 0, 0, 1, small_checks=False), row(4, "train", 0, 0, 0)]


def test_item_cost_is_tokens_at_the_price_and_a_missing_price_is_an_error(rows):
    assert item_cost(rows[0], GPT4, PRICES) == pytest.approx(100 * 10 / 1e6 + 100 * 30 / 1e6)
    with pytest.raises(OutcomesError, match="no price for big-local"):
        item_cost(rows[0], BIG, {SMALL: (1.0, 1.0)})


def test_a_cascade_keeps_checked_answers_and_pays_for_every_rung_it_tried(rows):
    c = Cascade([SMALL, GPT4])
    test = rows[:4]
    e = evaluate(test, c, PRICES)
    # kept small on 0, 1, 2 (checks passed; 2 is wrong), escalated 3 to GPT-4 (right)
    assert e["accuracy"] == pytest.approx(3 / 4)
    assert e["share"] == pytest.approx({SMALL: 0.75, GPT4: 0.25})
    assert e["cost_usd"] == pytest.approx(4 * cost(SMALL) + cost(GPT4))
    assert e["answers_per_item"] == pytest.approx(5 / 4)


def test_a_threshold_on_a_fitted_score_decides_instead_of_the_checks(rows):
    accept = {"q0": 0.9, "q1": 0.2, "q2": 0.1, "q3": 0.95}
    c = Cascade([SMALL, GPT4], {SMALL: 0.5}, accept=lambda r, m, below: accept[r["id"]])
    outcomes = [c(r, PRICES) for r in rows[:4]]
    assert [o.model for o in outcomes] == [SMALL, GPT4, GPT4, SMALL]
    assert [o.score for o in outcomes] == [1.0, 1.0, 1.0, 0.0]


def test_fleet_for_gsm8k_adds_recorded_gpt4_as_reference_and_orders_by_price(rows):
    fleet, ref = fleet_for("gsm8k", rows, PRICES)
    assert fleet == [SMALL, BIG, GPT4] and ref == GPT4
    local = [{**r, "bench": "tasks", "scores": {SMALL: r["scores"][SMALL], BIG: r["scores"][BIG]}}
             for r in rows]
    assert fleet_for("tasks", local, PRICES) == ([SMALL, BIG], BIG)


def test_heldout_figures_use_the_test_split_only_and_compare_with_the_reference(rows):
    policy = {"benches": {"gsm8k": {"ladder": [SMALL, GPT4]}}}
    f = heldout_figures(rows, prices=PRICES, policy=policy)["benches"]["gsm8k"]
    assert f["n"] == 4  # the train row is not counted
    assert f["models"][GPT4]["accuracy"] == 1.0 and f["models"][SMALL]["accuracy"] == 0.5
    auto = f["auto"]
    assert auto["accuracy_vs_reference"] == pytest.approx(0.75)
    assert auto["cost_vs_reference"] == pytest.approx((4 * cost(SMALL) + cost(GPT4)) / (4 * cost(GPT4)))
    curve = f["curve"]
    # random routing runs from the cheapest model alone to the reference alone
    assert curve["random"][0]["accuracy"] == pytest.approx(0.5)
    assert curve["random"][-1]["cost"] == pytest.approx(cost(GPT4))
    # the oracle reaches every item some model gets right, at the cheapest such model's cost
    best = curve["oracle"][-1]
    assert best["accuracy"] == 1.0
    assert best["cost"] == pytest.approx((2 * cost(SMALL) + cost(BIG) + cost(GPT4)) / 4)
    assert all(a["cost"] <= b["cost"] for a, b in zip(curve["policy"], curve["policy"][1:], strict=False))
    assert "auto" in format_figures({"split": "test", "benches": {"gsm8k": f}})
    everything = heldout_figures(rows, prices=PRICES, policy=policy, split="all")["benches"]["gsm8k"]
    assert everything["n"] == 5


def test_without_a_policy_auto_climbs_the_whole_fleet(rows):
    f = heldout_figures(rows, prices=PRICES, policy={"benches": {}, "default": {}})["benches"]["gsm8k"]
    assert f["auto"]["policy"] == f"cascade {SMALL} -> {BIG} -> {GPT4}"
    # 0, 1, 2 kept at small; 3 fails small's check, big passes its check but is wrong
    assert f["auto"]["accuracy"] == pytest.approx(0.5)
    assert evaluate(rows[:4], single(BIG), PRICES)["accuracy"] == pytest.approx(0.75)


def test_load_outcomes_reads_gzip_and_rejects_what_is_not_an_outcomes_file(tmp_path, rows):
    path = tmp_path / "o.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "o.meta.json").write_text(json.dumps({"prices_usd_per_1m": {
        SMALL: {"input": 1.0, "output": 2.0}, BIG: {"input": None, "output": None}}}))
    assert [r["id"] for r in load_outcomes(path)] == [r["id"] for r in rows]
    prices = model_prices(load_meta(path), {GPT4: (10, 30)})
    assert prices == {SMALL: (1.0, 2.0), GPT4: (10.0, 30.0)}  # an unmeasured model has no price
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x"}\n')
    with pytest.raises(OutcomesError, match="not an outcomes row"):
        load_outcomes(bad)
    with pytest.raises(OutcomesError, match="no recorded outcomes"):
        load_outcomes(tmp_path / "missing.jsonl.gz")


def test_a_model_recorded_on_some_rows_only_joins_the_fleet_on_those_rows(rows):
    partial = [dict(r) for r in rows]
    partial[1] = {**partial[1], "scores": {m: s for m, s in partial[1]["scores"].items() if m != BIG}}
    f = heldout_figures(partial, prices=PRICES, policy={"benches": {}})["benches"]["gsm8k"]
    assert f["fleet"] == [SMALL, BIG, GPT4]
    assert f["n"] == 3  # the row without the big model's outcome is left out, not the big model
