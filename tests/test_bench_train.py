"""The training and distillation benchmarks' --quick modes run end to end and print well-formed figures.

Smoke tests of the scripts' code paths on tiny models built on the fly (not timing tests): every figure the
real runs report is present, positive where it is a rate, and consistent between the table and the JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(ROOT / "bench" / name), *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


def test_train_bench_quick_reports_single_and_ddp_throughput(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    proc = run_script("train.py", "--quick", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [r["model"] for r in rows] == ["ci-nano"]
    assert result["settings"]["steps"] == 3 and result["settings"]["warmup"] == 1
    for r in rows:
        assert r["params"] > 0
        assert set(r["runs"]) == {"1x1", "1x2", "ddp2x1"}
        for run in r["runs"].values():
            assert run["steps"] == 3 and run["tokens"] > 0 and run["seconds"] > 0
            assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["seconds"])
        # one global batch: the two DDP ranks together see the tokens one process sees
        assert r["runs"]["ddp2x1"]["tokens"] == r["runs"]["1x1"]["tokens"] == r["runs"]["1x2"]["tokens"]
        assert r["ddp_vs_1x1"] == pytest.approx(
            r["runs"]["ddp2x1"]["tokens_per_s"] / r["runs"]["1x1"]["tokens_per_s"])
        assert r["ddp_vs_1x2"] > 0 and r["1x2_vs_1x1"] > 0
    table = proc.stdout
    assert "DDP/1x1" in table and "tok/s" in table
    for r in rows:
        line = next(ln for ln in table.splitlines() if ln.startswith(r["model"]))
        assert f"{r['runs']['1x1']['tokens_per_s']:,.0f} tok/s" in line
        assert f"{r['ddp_vs_1x1']:.2f}x" in line


def test_distill_bench_quick_compares_the_five_methods(tmp_path: Path) -> None:
    out, png = tmp_path / "distill.json", tmp_path / "chart.png"
    proc = run_script("distill.py", "--quick", "--json", str(out), "--png", str(png))
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    methods = result["methods"]
    assert [m["method"] for m in methods] == ["gold", "seq", "kl", "rkl", "gkd"]
    levels = result["levels"]
    assert levels == [1, 2, 3]
    for m in methods:
        assert m["steps"] == result["settings"]["steps"] == 4
        assert m["n"] == result["settings"]["n_test"] > 0
        assert 0.0 <= m["accuracy"] <= 1.0 and m["accuracy"] == pytest.approx(m["correct"] / m["n"])
        assert set(m["per_level"]) == {str(lv) for lv in levels}
        assert m["tokens_from_data"] > 0 and m["answer_tokens_from_data"] > 0 and m["train_seconds"] > 0
    by = {m["method"]: m for m in methods}
    assert by["gkd"]["on_policy_steps"] == 2  # half of 4 steps
    assert by["gold"]["on_policy_steps"] == by["kl"]["on_policy_steps"] == 0
    assert 0.0 <= by["seq"]["teacher_train_agreement"] <= 1.0
    assert result["teacher"]["params"] > 0 and 0.0 <= result["teacher"]["accuracy"] <= 1.0
    verdict = result["verdict"]
    best = max(m["accuracy"] for m in methods)
    assert by[verdict["winner"]]["accuracy"] == best
    assert sorted(verdict["ranking"]) == sorted(by)
    runner = by[verdict["runner_up"]]
    assert verdict["margin_points"] == pytest.approx(100 * (best - runner["accuracy"]))
    assert 0.0 <= verdict["p_value_vs_runner_up"] <= 1.0
    assert f"winner: {verdict['winner']}" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
