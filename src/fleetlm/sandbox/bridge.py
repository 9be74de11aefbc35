"""Tools for sandboxed code through an explicit bridge: a Unix socket shared into the bubblewrap sandbox.

The sandbox (sandbox/bwrap.py) has no network and sees no host files, so the only way out is the one we
open: `ToolBridge` listens on a Unix socket in a private folder, which `run_python_with_tools` binds
read-only at /bridge inside the sandbox. The program gets a small generated stub module, `fleet_tools`,
with one function per declared tool; each call sends one JSON line, {"token", "tool", "arguments"}, and
reads one JSON line back, {"ok": true, "result": text} or {"ok": false, "error": text}. The host runs only
the functions it declared (anything else is an error reply), with a per-run token, a line-size cap and a
call cap. `final_answer(x)` records the answer on the host and ends the program at once.

The socket's folder is reachable only by the sandbox's user (nobody when we run as root) and by us; the
token guards against another process of that user finding it. Abstract Unix sockets and TCP do not cross
the sandbox's network namespace, so the bridge is the only channel.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetlm.sandbox.bwrap import NOBODY, SandboxError, SandboxResult, _drop_to_nobody, run_python

BRIDGE_DIR = "/bridge"
SOCKET_NAME = "tools.sock"
MAX_LINE_BYTES = 1024 * 1024  # one call's arguments or one result; a program cannot flood the host
MAX_CALLS = 200
FINAL_ANSWER = "final_answer"

# The stub, inside the sandbox. It knows only the socket's path, the token and the declared names.
_STUB = '''\
"""Tools of this agent, reached through the host's bridge (one JSON line per call)."""
import json as _json
import os as _os
import socket as _socket
import sys as _sys

_PATH = {path!r}
_TOKEN = {token!r}
_conn = None


class ToolCallError(Exception):
    """A tool call the host refused or that failed; its message says why."""


def _call(name, params, args, kwargs):
    global _conn
    if len(args) > len(params):
        raise TypeError(f"{{name}}() takes at most {{len(params)}} positional arguments")
    arguments = dict(zip(params, args))
    for key in kwargs:
        if key in arguments:
            raise TypeError(f"{{name}}() got multiple values for {{key!r}}")
    arguments.update(kwargs)
    if _conn is None:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.connect(_PATH)
        _conn = sock.makefile("rwb")
    line = _json.dumps({{"token": _TOKEN, "tool": name, "arguments": arguments}}, default=str)
    _conn.write(line.encode() + b"\\n")
    _conn.flush()
    reply = _conn.readline()
    if not reply:
        raise ToolCallError("the bridge closed the connection")
    reply = _json.loads(reply)
    if not reply.get("ok"):
        raise ToolCallError(reply.get("error", "tool call failed"))
    return reply.get("result")


def {final}(answer):
    """End the program with this answer."""
    _call({final!r}, ["answer"], (answer,), {{}})
    _sys.stdout.flush()
    _sys.stderr.flush()
    _os._exit(0)

'''

_FUNCTION = '''
def {name}(*args, **kwargs):
    return _call({name!r}, {params!r}, args, kwargs)


{name}.__doc__ = {doc!r}
'''

# main.py inside the sandbox: install the stub as a module, then run the code with the tools in scope.
_MAIN = '''\
import linecache, sys, types
_stub = types.ModuleType("fleet_tools")
exec(compile({stub!r}, "<fleet_tools>", "exec"), _stub.__dict__)
sys.modules["fleet_tools"] = _stub
_code = {code!r}
linecache.cache["<agent code>"] = (len(_code), None, _code.splitlines(True), "<agent code>")
_scope = {{"__name__": "__main__", "__builtins__": __builtins__}}
_scope.update({{n: getattr(_stub, n) for n in {names!r}}})
del linecache, types, _stub
try:
    exec(compile(_code, "<agent code>", "exec"), _scope)
except SystemExit:
    raise
except BaseException:
    # Printed here, not by the interpreter at exit: only Python's traceback module reads the code's lines
    # from linecache; this frame is left out, so the traceback starts in the agent's code.
    import traceback
    _type, _value, _tb = sys.exc_info()
    traceback.print_exception(_type, _value, _tb.tb_next)
    sys.exit(1)
'''


@dataclass
class BridgeCall:
    tool: str
    arguments: dict
    result: str | None = None
    error: str | None = None


@dataclass
class BridgeResult:
    sandbox: SandboxResult
    calls: list[BridgeCall] = field(default_factory=list)
    answered: bool = False  # final_answer was called
    answer: Any = None

    @property
    def failed_calls(self) -> list[BridgeCall]:
        return [c for c in self.calls if c.error is not None]


def _identifier(name: str) -> bool:
    return name.isidentifier() and not name.startswith("_") and name not in ("ToolCallError", FINAL_ANSWER)


class ToolBridge:
    """A Unix socket server for one sandboxed run; it executes only the declared functions.

    `functions` maps each tool's name to its parameter names (in order, for positional calls) and an
    optional description; `handler(name, arguments)` runs one and returns text or raises (the message goes
    back to the program as a ToolCallError).
    """

    def __init__(self, functions: Mapping[str, Sequence[str]], handler: Callable[[str, dict], str], *,
                 descriptions: Mapping[str, str] | None = None, max_calls: int = MAX_CALLS) -> None:
        for name in functions:
            if not _identifier(name):
                raise SandboxError(f"tool name {name!r} cannot be a Python function in the sandbox")
        self.functions = {n: list(p) for n, p in functions.items()}
        self.descriptions = dict(descriptions or {})
        self.handler = handler
        self.max_calls = max_calls
        self.token = secrets.token_hex(16)
        self.calls: list[BridgeCall] = []
        self.answered = False
        self.answer: Any = None
        self._lock = threading.Lock()  # one call at a time: handlers need not be thread-safe
        self._dir: Path | None = None
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._connections: list[socket.socket] = []
        self._stop = threading.Event()

    @property
    def host_dir(self) -> Path:
        if self._dir is None:
            raise SandboxError("the bridge is not open")
        return self._dir

    def stub_source(self) -> str:
        src = _STUB.format(path=f"{BRIDGE_DIR}/{SOCKET_NAME}", token=self.token, final=FINAL_ANSWER)
        for name, params in self.functions.items():
            src += _FUNCTION.format(name=name, params=params, doc=self.descriptions.get(name, ""))
        return src

    def program(self, code: str) -> str:
        """The main.py that runs `code` with the tools (and final_answer, ToolCallError) in its globals."""
        names = [*self.functions, FINAL_ANSWER, "ToolCallError"]
        return _MAIN.format(stub=self.stub_source(), code=code, names=names)

    # ------------------------------------------------------------ serving

    def __enter__(self) -> ToolBridge:
        self._dir = Path(tempfile.mkdtemp(prefix="fleet-bridge-"))
        path = self._dir / SOCKET_NAME
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        # The sandbox connects as its own user: the socket must be writable by it, and its folder
        # enterable by it and by no one else (mkdtemp's 0700, owned by that user when we are root).
        path.chmod(0o666)
        if _drop_to_nobody():
            os.chown(self._dir, NOBODY, NOBODY)
        server.listen(4)
        server.settimeout(0.1)
        self._server = server
        t = threading.Thread(target=self._accept, name="fleet-bridge", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in list(self._threads):
            t.join(timeout=5)
        if self._server is not None:
            self._server.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            self._connections.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name="fleet-bridge-conn", daemon=True)
            t.start()
            self._threads.append(t)

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rwb") as f:
            while not self._stop.is_set():
                try:
                    line = f.readline(MAX_LINE_BYTES + 1)
                except OSError:
                    return
                if not line:
                    return
                if len(line) > MAX_LINE_BYTES:
                    self._reply(f, {"ok": False, "error": f"a call longer than {MAX_LINE_BYTES} bytes"})
                    return  # the rest of that line cannot be read sensibly: drop the connection
                self._reply(f, self._handle(line))

    @staticmethod
    def _reply(f: Any, reply: dict) -> None:
        try:
            f.write(json.dumps(reply, ensure_ascii=False, default=str).encode() + b"\n")
            f.flush()
        except OSError:
            pass

    def _handle(self, line: bytes) -> dict:
        try:
            request = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return {"ok": False, "error": "a call must be one JSON object per line"}
        if not isinstance(request, dict) or not secrets.compare_digest(str(request.get("token", "")),
                                                                       self.token):
            return {"ok": False, "error": "refused: not this run's bridge token"}
        name, arguments = request.get("tool"), request.get("arguments")
        if not isinstance(arguments, dict):
            return {"ok": False, "error": "arguments must be an object"}
        with self._lock:
            if len(self.calls) >= self.max_calls:
                return {"ok": False, "error": f"more than {self.max_calls} tool calls in one program"}
            call = BridgeCall(str(name), arguments)
            self.calls.append(call)
            if name == FINAL_ANSWER:
                self.answered, self.answer = True, arguments.get("answer")
                call.result = "ok"
                return {"ok": True, "result": "ok"}
            if name not in self.functions:
                call.error = f"there is no tool named {name!r} here"
                return {"ok": False, "error": call.error}
            try:
                call.result = str(self.handler(name, arguments))
            except Exception as exc:  # the tool's failure is the program's to handle, not ours
                call.error = str(exc) or type(exc).__name__
                return {"ok": False, "error": call.error}
            return {"ok": True, "result": call.result}


def run_python_with_tools(code: str, functions: Mapping[str, Sequence[str]],
                          handler: Callable[[str, dict], str], *,
                          descriptions: Mapping[str, str] | None = None, timeout_s: float = 30.0,
                          memory_mb: int = 512) -> BridgeResult:
    """Run `code` in the sandbox with the declared tools callable as functions (and `final_answer`)."""
    with ToolBridge(functions, handler, descriptions=descriptions) as bridge:
        result = run_python(bridge.program(code), timeout_s=timeout_s, memory_mb=memory_mb,
                            binds=[(str(bridge.host_dir), BRIDGE_DIR)])
    return BridgeResult(result, list(bridge.calls), bridge.answered, bridge.answer)
