"""The sandbox's cost and strength: start-up overhead per execution, and a battery of escape attempts.

    python bench/sandbox.py [--runs 20]

Overhead: the median wall time of `run_python("pass")` against the same interpreter started plainly
(`python -I -B -c pass`, no isolation), side by side in one run. Escapes: each attempt is a program that
would print ESCAPED if it got out; an attempt is held when the program never prints it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fleetlm.sandbox import run_python

REPO = Path(__file__).resolve().parents[1]


def _raw_call(nr: int, *args: object) -> str:
    """A program making one raw system call; ESCAPED unless the kernel refused it with EPERM (the filter)."""
    joined = ", ".join(str(a) for a in args)
    return ("import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
            f"r = libc.syscall({nr}, {joined})\n"
            "print('refused' if r < 0 and ctypes.get_errno() == 1 else 'ESCAPED', ctypes.get_errno())")


ATTEMPTS = {
    "read a file outside (the repository)": f"print(open({str(REPO / 'README.md')!r}).read()[:9], 'ESCAPED')",
    "read a host secret (/etc/shadow)": "print(open('/etc/shadow').read()[:9], 'ESCAPED')",
    "list the host's /root": "import os\nprint(os.listdir('/root'), 'ESCAPED')",
    "write a file outside (/tmp)": "open('/tmp/fleet-escape', 'w').write('x')\nprint('ESCAPED')",
    "write into /usr": "open('/usr/fleet-escape', 'w').write('x')\nprint('ESCAPED')",
    "open a socket to the internet": "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=3)\n"
                                     "print('ESCAPED')",
    "open a socket to the host's loopback (ssh)": "import socket\n"
        "socket.create_connection(('127.0.0.1', 22), timeout=3)\nprint('ESCAPED')",
    "a subprocess reads outside": "import subprocess\nout = subprocess.run(['/usr/bin/cat', "
                                  f"{str(REPO / 'README.md')!r}], capture_output=True)\n"
                                  "print('ESCAPED' if out.returncode == 0 else out.stderr)",
    "see the host's processes": "import os\npids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
                                "print('ESCAPED' if len(pids) > 5 else pids)",
    "fork bomb": "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
    "fork 500 sleepers": "import os, time\nn = 0\ntry:\n    for _ in range(500):\n"
        "        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n        n += 1\n"
        "except OSError:\n    pass\nprint('ESCAPED' if n >= 500 else n)",
    "sleep forever": "import time\ntime.sleep(10**6)\nprint('ESCAPED')",
    "exhaust memory": "x = []\nwhile True:\n    x.append(bytearray(10**7))",
    "a new user namespace (unshare)": "import subprocess\n"
        "r = subprocess.run(['/usr/bin/unshare', '-U', 'true'])\nprint(r.returncode or 'ESCAPED')",
    # System calls the seccomp filter refuses (x86_64 numbers): each would be a step towards a kernel exploit.
    "trace a process (ptrace)": _raw_call(101, 0, 0, 0, 0),
    "mount a filesystem": _raw_call(165, "b'none'", "b'/sandbox'", "b'tmpfs'", 0, 0),
    "load a BPF program (bpf)": _raw_call(321, 0, 0, 0),
    "set up io_uring": _raw_call(425, 1, 0),
    "open a netlink socket": "import socket\nsocket.socket(socket.AF_NETLINK, socket.SOCK_RAW)\n"
                             "print('ESCAPED')",
}

MUST_BE_STOPPED = {"fork bomb", "sleep forever", "exhaust memory"}


def median_ms(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    plain_python = [sys.executable, "-I", "-B", "-c", "pass"]
    plain = median_ms(lambda: subprocess.run(plain_python, check=True), args.runs)
    boxed = median_ms(lambda: run_python("pass"), args.runs)
    print(f"start-up, median of {args.runs}: plain python {plain:.1f} ms, sandboxed {boxed:.1f} ms, "
          f"overhead {boxed - plain:.1f} ms ({boxed / plain:.2f}x)")
    held = 0
    for name, program in ATTEMPTS.items():
        result = run_python(program, timeout_s=3, memory_mb=256)
        ok = "ESCAPED" not in result.stdout and not Path("/tmp/fleet-escape").exists()
        if name in MUST_BE_STOPPED:  # these never print: held means the limit or the timeout ended them
            ok = ok and not result.passed
        held += ok
        print(f"  {'held' if ok else 'ESCAPED'}: {name}: {result.reason} ({result.seconds:.2f} s)")
    print(f"escape attempts: {held}/{len(ATTEMPTS)} held")


if __name__ == "__main__":
    main()
