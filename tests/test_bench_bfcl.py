"""bench/bfcl.py's pure parts: arguments, the fleet it serves, the side-by-side table, plot and mode check."""

from __future__ import annotations

import json

import pytest

from bench_scripts import bench_script

pytest.importorskip("bfcl_eval", reason="needs bfcl-eval's data: pip install --no-deps bfcl-eval==2026.3.23")



@pytest.fixture(scope="module")
def bench():
    with bench_script("bfcl") as module:
        yield module


def summary(correct: dict[str, tuple[int, int, int]]) -> dict:
    """A summary as bfcl.summarize writes it: category -> (n, correct, malformed)."""
    domains = {c: {"n": n, "correct": k, "accuracy": k / n, "malformed": bad}
               for c, (n, k, bad) in correct.items()}
    n, k = sum(v[0] for v in correct.values()), sum(v[1] for v in correct.values())
    return {"n": n, "correct": k, "accuracy": k / n, "malformed": sum(v[2] for v in correct.values()),
            "domains": domains}


def test_defaults_and_the_fleet_yaml(bench):
    args = bench.parse_args([])
    assert (args.limit, args.seed, args.engine) == (25, 0, "auto")
    assert args.models.split(",") == list(bench.DEFAULT_MODELS)
    with pytest.raises(SystemExit):
        bench.parse_args(["--limit", "0"])
    fleet = bench.fleet_yaml(["smollm2-135m-instruct"], "llama_cpp")
    from fleetlm.config import parse_config

    spec = parse_config(fleet).models["smollm2-135m-instruct"]
    assert spec.catalog == "smollm2-135m-instruct" and spec.engine == "llama_cpp"
    assert "price" in spec.model_fields_set  # an explicit price: the gateway does not measure one


def test_side_by_side_rows_and_table(bench):
    results = {"m": {"constrained": summary({"simple": (4, 3, 0), "irrelevance": (4, 2, 1)}),
                     "unconstrained": summary({"simple": (4, 1, 2), "irrelevance": (4, 4, 3)})}}
    rows = bench.side_by_side(results)
    assert [r["category"] for r in rows] == ["simple", "irrelevance", "all"]
    assert rows[0] == {"model": "m", "category": "simple", "n": 4, "constrained_accuracy": 0.75,
                       "constrained_malformed": 0, "unconstrained_accuracy": 0.25,
                       "unconstrained_malformed": 2}
    assert rows[2]["constrained_accuracy"] == 5 / 8 and rows[2]["unconstrained_malformed"] == 5
    table = bench.format_rows(rows).splitlines()
    assert table[0].split()[:3] == ["model", "category", "n"]
    assert table[2].split() == ["m", "simple", "4", "75.0", "25.0", "0", "2"]
    assert table[4].split() == ["m", "all", "8", "62.5", "62.5", "1", "5"]


def test_identical_replies_and_the_plot(bench, tmp_path):
    rows = tmp_path / "rows"
    rows.mkdir()

    def write(mode, replies):
        lines = [json.dumps({"id": i, "responses": {"m": r}}) for i, r in replies.items()]
        (rows / f"m.{mode}.jsonl").write_text("\n".join(lines) + "\n")

    write("constrained", {"a": "x", "b": "y"})
    write("unconstrained", {"a": "x", "b": "y"})
    assert bench.identical_replies(rows, "m") is True
    write("unconstrained", {"a": "x", "b": "z"})
    assert bench.identical_replies(rows, "m") is False
    results = {"m": {"constrained": summary({"simple": (2, 1, 0)}),
                     "unconstrained": summary({"simple": (2, 0, 1)})}}
    png = bench.write_plot(results, tmp_path / "bfcl.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
