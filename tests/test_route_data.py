import json

import pytest

from fleetlm.errors import FleetError
from fleetlm.route.data import (
    RouteDataError,
    import_routellm,
    load_rows,
    model_names,
    save_rows,
    score_matrix,
)
from route_synth import STRONG, WEAK, make_routellm_folder


def test_import_mmlu_drops_contaminated_and_keeps_subject(tmp_path):
    src = make_routellm_folder(tmp_path / "src")
    rows = import_routellm(src, "mmlu")
    assert len(rows) == 3 * 40 - 1  # one contaminated prompt dropped
    assert {r.domain for r in rows} == {"easy_history", "hard_algebra", "mid_biology"}
    assert all(set(r.scores) == {WEAK, STRONG} for r in rows)
    assert all(v in (0.0, 1.0) for r in rows for v in r.scores.values())
    assert len({r.id for r in rows}) == len(rows)
    assert all(r.responses is None for r in rows)


def test_import_gsm8k_keeps_responses(tmp_path):
    src = make_routellm_folder(tmp_path / "src")
    rows = import_routellm(src, "gsm8k")
    assert len(rows) == 80
    assert set(rows[0].responses) == {WEAK, STRONG}
    assert "####" in rows[0].responses[WEAK]


def test_round_trip(tmp_path):
    rows = import_routellm(make_routellm_folder(tmp_path / "src"), "gsm8k")
    save_rows(rows, tmp_path / "d.jsonl")
    back = load_rows(tmp_path / "d.jsonl")
    assert [r.to_dict() for r in back] == [r.to_dict() for r in rows]
    assert model_names(back) == [WEAK, STRONG]
    assert score_matrix(back, [STRONG]).shape == (80, 1)


@pytest.mark.parametrize(
    "line, msg",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"prompt": 3}), "'prompt'"),
        (json.dumps({"prompt": "p", "scores": {"a": 1.5}}), "must be a number"),
        (json.dumps({"prompt": "p", "scores": {"a": True}}), "must be a number"),
    ],
)
def test_bad_rows_are_typed_errors(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(RouteDataError, match=msg):
        load_rows(path)


def test_missing_inputs(tmp_path):
    with pytest.raises(FleetError, match="not found"):
        load_rows(tmp_path / "nope.jsonl")
    with pytest.raises(RouteDataError, match="no mmlu/ folder"):
        import_routellm(tmp_path, "mmlu")
    with pytest.raises(RouteDataError, match="unknown benchmark"):
        import_routellm(tmp_path, "mtbench")
