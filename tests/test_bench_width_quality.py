"""bench/width_quality.py: the exact sign test, and one end-to-end run of two widths on a tiny model."""

from __future__ import annotations

import json
import sys

import pytest
from scipy.stats import binomtest

from bench_scripts import bench_script


@pytest.fixture(scope="module")
def bench():
    with bench_script("width_quality") as module:
        yield module


@pytest.mark.parametrize(("a", "b"), [(0, 0), (3, 0), (2, 7), (10, 10), (1, 12)])
def test_sign_test_is_the_exact_binomial_test(bench, a, b):
    expected = 1.0 if a + b == 0 else binomtest(a, a + b, 0.5).pvalue
    assert bench.sign_test_p(a, b) == pytest.approx(expected, rel=1e-9)


def test_two_widths_score_the_same_items(bench, tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "w.json"
    monkeypatch.setattr(sys, "argv", ["width_quality.py", "--model", str(tiny_llama), "--benches", "gsm8k",
                                      "--dtypes", "f32,bf16", "--limit", "3", "--batch", "2",
                                      "--max-tokens", "4", "--json", str(out)])
    bench.main()
    report = json.loads(out.read_text())["benches"]["gsm8k"]
    ref, other = report["f32"], report["bf16"]
    assert ref["items"] == other["items"] == 3
    # the reference against itself: nothing discordant, every reply the same
    assert ref["right_at_ref_only"] == ref["right_here_only"] == 0 and ref["identical_replies"] == 1.0
    assert ref["p_sign_test"] == 1.0
    assert 0 < other["completion_tokens"] <= 3 * 4 and other["tokens_per_s"] > 0
    assert other["right_at_ref_only"] + other["right_here_only"] <= 3
    table = capsys.readouterr().out
    assert "gsm8k" in table and "bf16" in table and "same reply" in table
