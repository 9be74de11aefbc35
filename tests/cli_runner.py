"""The `fleet` entry point run in-process by tests: exit code, stdout and stderr."""

from __future__ import annotations

import sys

from fleetlm import cli


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run fleetlm.cli.main with argv = ["fleet", *args]; the exit code as an int (0 when it returns)."""
    monkeypatch.setattr(sys, "argv", ["fleet", *args])
    code = 0
    try:
        cli.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out = capsys.readouterr()
    return code, out.out, out.err
