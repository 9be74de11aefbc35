"""`run_python`: one Python program in a bubblewrap sandbox with time, memory, process and output limits.

How it is isolated (docs/DESIGN-NOTES.md says the same):
- bubblewrap (`bwrap`, Debian's `bubblewrap`) puts the program in new user, pid, network, ipc, uts and
  cgroup namespaces (`--unshare-all`); the network namespace has only its own loopback, so nothing on the
  host (not even 127.0.0.1) nor outside is reachable. `--die-with-parent` and `--new-session` keep it from
  outliving us or reaching our terminal; nested user namespaces are disabled.
- The filesystem is an empty read-only root with read-only binds of /usr (and the /bin, /lib* links), of
  the interpreter's own prefix when it lives elsewhere, a minimal /dev and its own /proc. The only
  writable place is the program's temporary folder, mounted at /sandbox (its cwd, HOME and TMPDIR). The
  repository, /tmp and /home are not visible at all. A caller may add read-only binds (`binds`): the tool
  bridge (sandbox/bridge.py) shares one folder holding its Unix socket, the program's only way out.
- Run as root, we drop to uid/gid 65534 (nobody) before starting bwrap, because the kernel never applies
  RLIMIT_NPROC to root: that limit is what stops a fork bomb.
- A seccomp filter (sandbox/seccomp.py) refuses the system calls escapes and kernel exploits are made of
  (ptrace, mount, new namespaces, BPF, io_uring, keyrings, raw and netlink sockets, ...); bwrap loads it
  just before it execs the launcher.
- A launcher inside the sandbox sets RLIMIT_AS (memory), RLIMIT_CPU, RLIMIT_NPROC, RLIMIT_FSIZE, RLIMIT_NOFILE
  and RLIMIT_CORE, then execs the program, so the limits bind the program and every child, not bwrap.
- A wall-clock timeout kills bwrap's process group; bwrap's pid 1 in the namespace dies with it and the
  kernel kills everything left in the pid namespace. We wait until that namespace is empty.
- stdout and stderr go to files outside the sandbox (RLIMIT_FSIZE bounds them) and are read back capped.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fleetlm.errors import FleetError
from fleetlm.sandbox.seccomp import SeccompUnavailable, filter_bpf

NOBODY = 65534
INSIDE = "/sandbox"
MAX_OUTPUT_BYTES = 64 * 1024
FILE_SIZE_LIMIT = 16 * 1024 * 1024
MAX_PROCESSES = 32
MAX_OPEN_FILES = 256
_RESERVED = {"/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/dev", INSIDE}

# Runs inside the sandbox: set the limits, then replace itself with the program (limits survive exec).
_LAUNCHER = """\
import os, resource, sys
for name, value in {limits!r}:
    resource.setrlimit(getattr(resource, name), (value, value))
os.execv(sys.executable, [sys.executable, "-I", "-B", "{inside}/main.py"])
"""


class SandboxError(FleetError):
    """The sandbox cannot start here (no bwrap, no user namespaces): code never runs unsandboxed."""


@dataclass
class SandboxResult:
    passed: bool            # exit status 0 within the time limit
    returncode: int | None  # None when it was killed for the time limit
    stdout: str
    stderr: str
    timed_out: bool
    reason: str             # one line saying what happened
    seconds: float = 0.0


def _world_accessible(path: Path) -> bool:
    """Whether uid nobody can reach `path` (every parent searchable, the path itself readable)."""
    path = path.resolve()
    for p in [*reversed(path.parents), path]:
        mode = p.stat().st_mode
        if not mode & stat.S_IXOTH or (p == path and not mode & stat.S_IROTH):
            return False
    return True


def _drop_to_nobody() -> bool:
    return os.geteuid() == 0


@functools.cache
def _interpreter() -> tuple[str, str | None]:
    """(python to run inside, its prefix to bind read-only or None when it lives under /usr)."""
    candidates = [Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}",
                  Path(sys.base_prefix) / "bin" / "python3", Path("/usr/bin/python3")]
    for cand in candidates:
        if not cand.exists():
            continue
        real = cand.resolve()
        if _drop_to_nobody() and not _world_accessible(real):
            continue  # e.g. a pyenv Python under /root, which nobody cannot enter
        if str(real).startswith("/usr/"):
            return str(real), None
        prefix = real.parent.parent
        if not _drop_to_nobody() or _world_accessible(prefix / "lib"):
            return str(real), str(prefix)
    raise SandboxError("no Python the sandbox user can read (tried the running one and /usr/bin/python3)")


def _bwrap_args(box: Path, seccomp_fd: int, binds: Sequence[tuple[str, str]] = ()) -> list[str]:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SandboxError("bubblewrap is not installed (apt-get install bubblewrap; `make setup` as root)")
    args = [bwrap, "--seccomp", str(seccomp_fd), "--unshare-all", "--unshare-user", "--die-with-parent",
            "--new-session", "--disable-userns", "--hostname", "sandbox", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    _, prefix = _interpreter()
    if prefix:
        args += ["--ro-bind", prefix, prefix]
    args += ["--proc", "/proc", "--dev", "/dev", "--bind", str(box), INSIDE]
    for host, inside in binds:  # read-only, e.g. the tool bridge's socket folder (sandbox/bridge.py)
        args += ["--ro-bind", host, inside]
    args += ["--chdir", INSIDE, "--remount-ro", "/", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin",
             "--setenv", "HOME", INSIDE, "--setenv", "TMPDIR", INSIDE, "--setenv", "LANG", "C.UTF-8",
             "--setenv", "PYTHONHASHSEED", "0"]
    return args


def _limits(timeout_s: float, memory_mb: int) -> list[tuple[str, int]]:
    return [("RLIMIT_AS", memory_mb * 1024 * 1024), ("RLIMIT_CPU", int(timeout_s) + 1),
            ("RLIMIT_NPROC", MAX_PROCESSES), ("RLIMIT_FSIZE", FILE_SIZE_LIMIT),
            ("RLIMIT_NOFILE", MAX_OPEN_FILES), ("RLIMIT_CORE", 0)]


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    # The fields after the command name (which may hold spaces) start after the last ")".
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                continue
    return found


def _pid_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead process whose exit status nobody collected yet holds no resources)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _namespace_members(ns: str) -> list[int]:
    return [int(e) for e in os.listdir("/proc")
            if e.isdigit() and _pid_namespace(int(e)) == ns and _running(int(e))]


def _wait_until_empty(ns: str | None, seconds: float = 5.0) -> None:
    """The kernel empties a pid namespace once its pid 1 dies; wait for that so nothing outlives the call."""
    if ns is None or ns == _pid_namespace(os.getpid()):
        return
    deadline = time.monotonic() + seconds
    while (members := _namespace_members(ns)) and time.monotonic() < deadline:
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.02)


def _read_capped(path: Path, limit: int) -> str:
    with path.open("rb") as f:
        data = f.read(limit + 1)
    text = data[:limit].decode("utf-8", errors="replace")
    return text + "\n[output truncated]" if len(data) > limit else text


def _describe(returncode: int, stderr: str) -> str:
    if returncode == 0:
        return "exit 0"
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if returncode > 128 or returncode < 0:
        signum = returncode - 128 if returncode > 128 else -returncode
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        why = {"SIGXCPU": "CPU time limit", "SIGXFSZ": "file size limit", "SIGKILL": "killed"}.get(name, name)
        return f"{why} ({name})" + (f": {last[:200]}" if last else "")
    if "MemoryError" in last:
        return "memory limit: MemoryError"
    return f"exit {returncode}: {last[:200]}" if last else f"exit {returncode}"


def _seccomp_program() -> bytes:
    try:
        return filter_bpf()
    except SeccompUnavailable as exc:  # never run code without the filter
        raise SandboxError(str(exc)) from exc


def _run(source: str, timeout_s: float, memory_mb: int, stdin: str | None,
         binds: Sequence[tuple[str, str]] = ()) -> SandboxResult:
    python, _ = _interpreter()
    root = Path(tempfile.mkdtemp(prefix="fleet-sandbox-"))
    try:
        box = root / "box"
        box.mkdir()
        (box / "main.py").write_text(source)
        launcher = _LAUNCHER.format(limits=_limits(timeout_s, memory_mb), inside=INSIDE)
        drop = _drop_to_nobody()
        if drop:
            root.chmod(0o711)  # nobody may pass through to box/, not list or read the rest
            os.chown(box, NOBODY, NOBODY)
        (root / "stdin").write_text(stdin or "")
        (root / "seccomp.bpf").write_bytes(_seccomp_program())
        start = time.monotonic()
        timed_out = False
        with (root / "stdin").open("rb") as fin, (root / "stdout").open("wb") as fout, \
                (root / "stderr").open("wb") as ferr, (root / "seccomp.bpf").open("rb") as fbpf:
            args = [*_bwrap_args(box, fbpf.fileno(), binds), python, "-I", "-B", "-c", launcher]
            proc = subprocess.Popen(args, stdin=fin, stdout=fout, stderr=ferr, start_new_session=True,
                                    close_fds=True, pass_fds=(fbpf.fileno(),),
                                    **(dict(user=NOBODY, group=NOBODY, extra_groups=[]) if drop else {}))
            ns = None
            try:
                # bwrap's pid 1 is its child; remember its namespace to check it is empty at the end.
                while ns is None and proc.poll() is None and time.monotonic() - start < 1.0:
                    kids = _children(proc.pid)
                    ns = _pid_namespace(kids[0]) if kids else None
                    if ns is None:
                        time.sleep(0.005)
                proc.wait(timeout=max(0.0, timeout_s - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            finally:
                if proc.poll() is None:  # an exception of ours: never leave the sandbox running
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                _wait_until_empty(ns)
        seconds = time.monotonic() - start
        stdout = _read_capped(root / "stdout", MAX_OUTPUT_BYTES)
        stderr = _read_capped(root / "stderr", MAX_OUTPUT_BYTES)
        if stderr.startswith("bwrap:"):
            raise SandboxError(f"the sandbox could not start: {stderr.strip().splitlines()[0]}")
        if timed_out:
            return SandboxResult(False, None, stdout, stderr, True,
                                 f"timed out after {timeout_s:g} s (killed)", seconds)
        rc = proc.returncode
        return SandboxResult(rc == 0, rc, stdout, stderr, False, _describe(rc, stderr), seconds)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@functools.cache
def check_sandbox() -> None:
    """Run a trivial program once, so a machine without working namespaces fails loudly and early."""
    result = _run("print('ok')", timeout_s=20.0, memory_mb=256, stdin=None)
    if result.stdout.strip() != "ok":
        raise SandboxError(f"the sandbox does not work here: {result.reason}; {result.stderr.strip()[:200]}")


def sandbox_available() -> bool:
    try:
        check_sandbox()
    except SandboxError:
        return False
    return True


def run_python(source: str, *, timeout_s: float = 10.0, memory_mb: int = 512,
               stdin: str | None = None, binds: Sequence[tuple[str, str]] = ()) -> SandboxResult:
    """Run `source` as a Python program in the sandbox; never runs it unsandboxed (raises SandboxError).

    `binds` are (host path, path inside) pairs mounted read-only, for what the caller means to share
    (sandbox/bridge.py shares one folder holding its Unix socket); the inside path must be a new top folder.
    """
    if timeout_s <= 0 or memory_mb < 32:
        raise SandboxError(f"need timeout_s > 0 and memory_mb >= 32, got {timeout_s} and {memory_mb}")
    for host, inside in binds:
        top = inside.rstrip("/")
        if not top.startswith("/") or top.count("/") != 1 or top in _RESERVED or not os.path.exists(host):
            raise SandboxError(f"cannot bind {host!r} at {inside!r}: the host path must exist and the inside "
                               f"path be a new top-level folder (not {', '.join(sorted(_RESERVED))})")
    check_sandbox()
    return _run(source, timeout_s, memory_mb, stdin, binds)
