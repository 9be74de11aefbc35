import subprocess
import sys

from typer.testing import CliRunner

from fleetlm import __version__
from fleetlm.cli import app


def test_version_command_prints_package_version():
    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == __version__


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-c", "from fleetlm.cli import main; main()", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    assert "fleet" in out.stdout.lower()
