import os
import socket
import time
from pathlib import Path

import pytest

from fleetlm.sandbox import SandboxError, run_python, sandbox_available
from fleetlm.sandbox import bwrap as sandbox_bwrap

pytestmark = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap cannot create namespaces here")


def sandboxed_pids() -> set[int]:
    """Processes of ours that run bwrap or a sandboxed program (zombies excluded: they hold nothing)."""
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and (b"bwrap" in cmd or b"/sandbox/main.py" in cmd or b"sleep 1000" in cmd):
            found.add(int(entry))
    return found


@pytest.fixture
def leaves_nothing():
    before = sandboxed_pids()
    yield
    assert sandboxed_pids() - before == set()


def test_good_program_passes_with_its_output_and_stdin(leaves_nothing):
    result = run_python("import sys\nprint(sum(range(10)), sys.stdin.read()[::-1])", stdin="abc")
    assert result.passed and result.returncode == 0 and not result.timed_out
    assert result.stdout == "45 cba\n" and result.reason == "exit 0"


def test_a_failing_assertion_fails_with_its_error():
    result = run_python("assert 1 + 1 == 3, 'bad sum'")
    assert not result.passed and result.returncode == 1
    assert "AssertionError: bad sum" in result.reason


def test_an_infinite_loop_is_killed_at_the_timeout(leaves_nothing):
    start = time.monotonic()
    result = run_python("while True:\n    pass", timeout_s=1.5)
    assert result.timed_out and not result.passed and result.returncode is None
    assert time.monotonic() - start < 6 and "timed out" in result.reason


def test_a_fork_bomb_is_stopped_and_leaves_nothing(leaves_nothing):
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_python(bomb, timeout_s=2)
    assert not result.passed and result.timed_out


def test_the_process_limit_stops_forks():
    forks = ("import os, time\nn = 0\ntry:\n    for _ in range(500):\n        if os.fork() == 0:\n"
             "            time.sleep(30)\n            os._exit(0)\n        n += 1\n"
             "except OSError:\n    pass\nprint(n)\n")
    result = run_python(forks, timeout_s=5)
    assert result.passed and 0 < int(result.stdout) < sandbox_bwrap.MAX_PROCESSES


def test_children_left_behind_are_killed(leaves_nothing):
    result = run_python("import subprocess\nsubprocess.Popen(['/usr/bin/sleep', '1000'])\nprint('bye')")
    assert result.passed and result.stdout == "bye\n"


def test_endless_allocation_hits_the_memory_limit(leaves_nothing):
    result = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", memory_mb=200, timeout_s=10)
    assert not result.passed and not result.timed_out and "memory" in result.reason.lower()


def test_no_network_not_even_the_hosts_loopback(leaves_nothing):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        local = run_python(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=5)")
    assert not local.passed and not local.timed_out and "Connection refused" in local.reason
    outside = run_python("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=5)")
    assert not outside.passed and not outside.timed_out and "Network is unreachable" in outside.reason
    assert outside.seconds < 3  # refused by the routing table at once, not a connect timeout


def test_writes_go_only_to_its_own_folder(tmp_path, leaves_nothing):
    repo = Path(__file__).resolve().parents[1]
    for target in ("/tmp/fleet-sandbox-escape", str(repo / "escape.txt"), str(tmp_path / "x"), "/usr/x"):
        result = run_python(f"open({target!r}, 'w').write('x')")
        assert not result.passed and ("No such file" in result.reason or "Read-only" in result.reason)
        assert not Path(target).exists()
    inside = run_python("open('x.txt', 'w').write('hi')\nprint(open('x.txt').read())\nimport os\n"
                        "print(os.getcwd(), os.environ['HOME'])")
    assert inside.passed and inside.stdout.split() == ["hi", "/sandbox", "/sandbox"]


def test_the_repository_is_not_visible():
    repo = Path(__file__).resolve().parents[1]
    result = run_python(f"print(open({str(repo / 'README.md')!r}).read())")
    assert not result.passed and "No such file" in result.reason


def test_output_is_capped(leaves_nothing):
    result = run_python("while True:\n    print('x' * 1000)", timeout_s=5)
    assert not result.passed and len(result.stdout) <= sandbox_bwrap.MAX_OUTPUT_BYTES + 100
    assert result.stdout.endswith("[output truncated]")


def test_bad_limits_and_a_missing_bwrap_are_clear_errors(monkeypatch):
    with pytest.raises(SandboxError, match="timeout_s > 0"):
        run_python("print(1)", timeout_s=0)
    monkeypatch.setattr(sandbox_bwrap.shutil, "which", lambda name: None)
    sandbox_bwrap.check_sandbox.cache_clear()
    try:
        with pytest.raises(SandboxError, match="bubblewrap is not installed"):
            run_python("print(1)")
        assert not sandbox_available()
    finally:
        sandbox_bwrap.check_sandbox.cache_clear()


def test_a_subprocess_is_as_confined_as_the_program(leaves_nothing):
    repo = Path(__file__).resolve().parents[1]
    program = (f"import subprocess\nr = subprocess.run(['/usr/bin/cat', {str(repo / 'README.md')!r}], "
               "capture_output=True, text=True)\nprint(r.returncode, 'No such file' in r.stderr)\n"
               "u = subprocess.run(['/usr/bin/unshare', '-U', 'true'], capture_output=True)\n"
               "print(u.returncode)")
    result = run_python(program)
    lines = result.stdout.split("\n")
    assert result.passed and lines[0] == "1 True" and lines[1] != "0"  # no file, and no new user namespace


def test_the_hosts_processes_and_secrets_are_invisible():
    program = ("import os\nprint(sum(p.isdigit() for p in os.listdir('/proc')))\n"
               "print(os.path.exists('/etc/shadow'), os.path.exists('/root'))")
    result = run_python(program)
    pids, secrets = result.stdout.strip().split("\n")
    assert result.passed and int(pids) <= 3 and secrets == "False False"  # bwrap's init and the program
