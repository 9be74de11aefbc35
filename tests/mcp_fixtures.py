"""Helpers for the MCP tests: the echo server's spec, an HTTP MCP server as a subprocess, our descendants."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ECHO_SERVER = Path(__file__).with_name("mcp_echo_server.py")
FLEET = str(Path(sys.executable).with_name("fleet"))


def echo_spec(*args: str, timeout_s: float = 20.0) -> dict:
    """The echo test server over stdio, as an mcp_servers entry."""
    return {"command": [sys.executable, str(ECHO_SERVER), *args], "timeout_s": timeout_s}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def http_server(argv: list[str], port: int, ready_s: float = 60.0) -> Iterator[subprocess.Popen]:
    """Run an MCP server over streamable HTTP until the block ends; ready once its port takes connections."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + ready_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{argv} exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv} did not listen on port {port} within {ready_s} s") from None
                time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        proc.stderr.close()


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[1])  # a zombie holds nothing: not counted


def descendants(pid: int | None = None) -> set[int]:
    """Live processes below `pid` (default: this one), from /proc."""
    root = os.getpid() if pid is None else pid
    parents = {int(e): _parent(int(e)) for e in os.listdir("/proc") if e.isdigit()}
    found: set[int] = set()
    frontier = {root}
    while frontier:
        frontier = {p for p, parent in parents.items() if parent in frontier and p not in found}
        found |= frontier
    return found


def wait_no_descendants(before: set[int], seconds: float = 5.0) -> set[int]:
    """Descendants not in `before` still alive after up to `seconds` (empty when all are gone)."""
    deadline = time.monotonic() + seconds
    while (left := descendants() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left
