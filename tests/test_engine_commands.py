"""`fleet generate`: streams text, reports tokens/s, and turns bad input into one line + exit code 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import run_main
from fleetlm.engine import Engine

FLEET = Path(sys.executable).with_name("fleet")


def test_generate_streams_greedy_text_and_speeds(monkeypatch, capsys, tiny_llama):
    code, out, err = run_main(monkeypatch, capsys, "generate", "--model", str(tiny_llama), "--dtype", "f32",
                              "--prompt", "Hello", "--max-tokens", "8")
    assert code == 0, err
    expected = Engine.load(tiny_llama, dtype="f32").complete(["Hello"], max_tokens=8)[0]
    assert out == expected + "\n"
    assert "prompt:" in err and "decode:" in err and "tok/s" in err


def test_generate_chat_and_seeded_sampling(monkeypatch, capsys, tiny_llama):
    args = ["generate", "--model", str(tiny_llama), "--dtype", "f32", "--chat", "Hi!", "--max-tokens", "6",
            "--temperature", "0.9", "--seed", "3"]
    code1, out1, _ = run_main(monkeypatch, capsys, *args)
    code2, out2, _ = run_main(monkeypatch, capsys, *args)
    assert code1 == code2 == 0
    assert out1 == out2
    messages = [{"role": "user", "content": "Hi!"}]
    expected = Engine.load(tiny_llama, dtype="f32").chat([messages], max_tokens=6, temperature=0.9, seed=3)[0]
    assert out1 == expected + "\n"


def _assert_one_line_error(code, err):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err


def test_wrong_path_via_console_command(tmp_path):
    fleet = str(FLEET) if FLEET.exists() else shutil.which("fleet")
    if fleet is None:
        pytest.skip("the fleet console command is not installed")
    proc = subprocess.run([fleet, "generate", "--model", str(tmp_path / "missing"), "--max-tokens", "2"],
                          capture_output=True, text=True, timeout=120)
    _assert_one_line_error(proc.returncode, proc.stderr)
    assert "missing" in proc.stderr


def test_dir_that_is_not_a_checkpoint(monkeypatch, capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    code, _, err = run_main(monkeypatch, capsys, "generate", "--model", str(tmp_path))
    _assert_one_line_error(code, err)


def test_unsupported_architecture(monkeypatch, capsys, tmp_path, tiny_llama):
    bad = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, bad)
    config = json.loads((bad / "config.json").read_text())
    config["model_type"] = "gpt2"
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    code, _, err = run_main(monkeypatch, capsys, "generate", "--model", str(bad))
    _assert_one_line_error(code, err)


@pytest.mark.parametrize("extra", [["--dtype", "fp8"], ["--prompt", "a", "--chat", "b"],
                                   ["--max-tokens", "0"], ["--temperature", "-1"]])
def test_bad_options_are_one_line_errors(monkeypatch, capsys, tiny_llama, extra):
    code, _, err = run_main(monkeypatch, capsys, "generate", "--model", str(tiny_llama), *extra)
    _assert_one_line_error(code, err)


def test_default_model_is_the_shipped_tiny_model(monkeypatch, capsys):
    from fleetlm.model import SHIPPED_TINY_MODEL

    if not (Path(SHIPPED_TINY_MODEL) / "config.json").exists():
        pytest.skip("the shipped tiny model is not built yet")
    code, out, err = run_main(monkeypatch, capsys, "generate", "--max-tokens", "4", "--dtype", "f32")
    assert code == 0, err
    assert out.endswith("\n") and "decode:" in err
