"""bench/voice_roundtrip.py's pure parts: arguments, WER table, percentiles, the WAV for the ASR, plot."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from bench_scripts import bench_script


@pytest.fixture(scope="module")
def bench():
    with bench_script("voice_roundtrip") as module:
        yield module


def row(category: str, normalised: tuple[int, int, int, int], raw: tuple[int, int, int, int],
        error: str | None = None) -> dict:
    keys = ("substitutions", "deletions", "insertions", "words")
    return {"category": category, "normalised": {"error": None, **dict(zip(keys, normalised, strict=True))},
            "raw": {"error": error, **dict(zip(keys, raw, strict=True))}}


def test_arguments_are_checked(bench, capsys):
    assert bench.parse_args(["--sentences", "5"]).sentences == 5
    with pytest.raises(SystemExit):
        bench.parse_args(["--sentences", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--requests", "0"])
    assert "--sentences must be" in capsys.readouterr().err


def test_wer_table_sums_errors_per_category_and_overall(bench):
    rows = [row("date", (1, 0, 0, 4), (2, 1, 0, 4)), row("date", (0, 0, 0, 6), (0, 0, 1, 6), error="boom"),
            row("plain", (0, 1, 0, 10), (0, 0, 0, 10))]
    table = {r["category"]: r for r in bench.wer_table(rows)}
    assert list(table) == ["date", "plain", "all"]
    assert table["date"]["n"] == 2 and table["date"]["words"] == 10
    assert table["date"]["normalised_wer"] == pytest.approx(0.1)
    assert table["date"]["raw_wer"] == pytest.approx(0.4)
    assert table["date"]["raw_failed"] == 1 and table["date"]["normalised_failed"] == 0
    assert table["all"]["normalised_wer"] == pytest.approx(2 / 20)
    assert table["all"]["raw_wer"] == pytest.approx(4 / 20)


def test_percentile_is_nearest_rank(bench):
    xs = [float(x) for x in range(1, 21)]
    assert bench.percentile(xs, 0.5) == 11.0  # round(9.5) is 10 (banker's), the 11th value
    assert bench.percentile(xs, 0.95) == 19.0
    assert bench.percentile([3.0], 0.95) == 3.0


def test_wav_file_holds_the_samples(bench):
    audio = (np.sin(np.arange(2205) / 10) * 3000).astype(np.int16)
    with wave.open(bench.wav_file(audio, 22050)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 22050)
        assert np.array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), audio)


def test_timing_rtf(bench):
    t = bench.Timing()
    t.add(1.0, 0.5, 4.0)
    t.add(1.0, 1.5, 4.0)
    assert t.summary() == {"wall_s": 2.0, "cpu_s": 2.0, "audio_s": 8.0, "rtf_wall": 0.25, "rtf_cpu": 0.25}


def test_plot_is_written(bench, tmp_path):
    table = bench.wer_table([row("date", (1, 0, 0, 4), (2, 1, 0, 4))])
    path = bench.write_plot(table, tmp_path / "voice.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
