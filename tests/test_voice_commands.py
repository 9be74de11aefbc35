"""`fleet voice lexicon add|list|rm` and `fleet voice say`: the lexicon edited from the CLI."""

import shutil

import pytest

from cli_runner import run_main
from fleetlm.voice.lexicon import LexiconEntry, LexiconStore


def test_lexicon_add_list_rm(monkeypatch, capsys, tmp_path):
    path = tmp_path / "lex.json"
    fleet = lambda *a: run_main(monkeypatch, capsys, "voice", "lexicon", *a, "--lexicon", str(path))  # noqa: E731
    assert fleet("add", "NASA", "--ipa", "nˈæsə")[0] == 0
    assert fleet("add", "Dr.", "--say", "Doctor")[0] == 0
    code, out, _ = fleet("list")
    assert code == 0 and out.splitlines() == ["dr.\tsay\tDoctor", "nasa\tipa\tnˈæsə"]
    assert fleet("rm", "nasa")[0] == 0
    assert LexiconStore(path).load() == {"dr.": LexiconEntry(say="Doctor")}
    code, _, err = fleet("rm", "nasa")
    assert code == 2 and "no entry" in err


@pytest.mark.parametrize("args, fragment", [(["x", "--ipa", "☃"], "phoneme set"), (["x"], "exactly one"),
                                            (["x", "--ipa", "a", "--say", "b"], "exactly one")])
def test_bad_entries_exit_2_with_one_line(monkeypatch, capsys, tmp_path, args, fragment):
    code, _, err = run_main(monkeypatch, capsys, "voice", "lexicon", "add", *args,
                            "--lexicon", str(tmp_path / "lex.json"))
    assert code == 2 and fragment in err and "Traceback" not in err


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
def test_say_writes_audio_in_the_suffix_format(monkeypatch, capsys, tmp_path):
    out = tmp_path / "hi.wav"
    code, _, err = run_main(monkeypatch, capsys, "voice", "say", "Hello there.", "-o", str(out),
                            "--model", "espeak-ng", "--lexicon", str(tmp_path / "lex.json"))
    assert code == 0, err
    data = out.read_bytes()
    assert data[:4] == b"RIFF" and len(data) > 44 + 24_000  # over half a second at 24 kHz
    code, _, err = run_main(monkeypatch, capsys, "voice", "say", "hi", "-o", str(tmp_path / "hi.ogg"))
    assert code == 2 and "suffix" in err
