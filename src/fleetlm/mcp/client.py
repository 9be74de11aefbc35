"""`McpToolbox`: the tools of MCP servers (stdio or streamable HTTP) as OpenAI `tools` entries; calling them.

`AsyncMcpToolbox` is the asyncio API (the gateway); `McpToolbox` is the same behind a private event loop in a
background thread, for plain code (an agent loop, the CLI). Both connect to a server when it is first needed
and keep the connection until `close()`.

Names: a tool is exposed as `<server>__<tool>`. The name must pass OpenAI's rule (^[A-Za-z0-9_-]{1,64}$) and
the agent's (a Python identifier), so every character of the tool's own name outside [A-Za-z0-9_] becomes
"_" ("get-weather" -> "files__get_weather"). When that is not enough, because the name would pass 64
characters or two of a server's tools would get the same name, the sanitised name is cut to fit and gets
"_" + the first 8 hex digits of the sha256 of the tool's own name (a tool already valid as it is keeps its
name). Server names are identifiers without "__" (fleetlm.mcp.config), so the first "__" splits a name back.

Each server's connection lives in its own task (`_Connection`): the SDK's transports are anyio task groups
and cancel scopes, which must be entered and left by one task, while calls come from whichever task needs
them. Every wait is bounded: the start by `connect_timeout_s`, each call by `timeout_s`, a server
that goes away by the connection's task ending; the stdio transport kills the server's process group on
close, and a failed start reports only after the process is gone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import json
import logging
import math
import os
import re
import threading
import weakref
from collections import Counter, deque
from collections.abc import Coroutine, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from fleetlm.errors import ConfigError
from fleetlm.mcp.config import McpServerSpec, load_servers, parse_servers
from fleetlm.mcp.errors import (
    McpArgumentsError,
    McpConnectError,
    McpDisconnectedError,
    McpError,
    McpTimeoutError,
    McpToolError,
    McpUnknownToolError,
)

log = logging.getLogger(__name__)

SEPARATOR = "__"
MAX_NAME = 64
NAME_RULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_]")
_HASH_HEX = 8
_MAX_PAGES = 100         # tools/list pages per server: a paginator that never ends cannot hang a connect
_STDERR_LINES = 20
# The stdio transport's shutdown: 2 s for the server to exit once its stdin closes, 2 s after SIGTERM to its
# process group, 2 s after SIGKILL; more than that and something is stuck, and we stop waiting.
_CLOSE_TIMEOUT_S = 10.0
# MCP / JSON-RPC error codes the SDK raises (mcp_types): mapped to our typed errors.
_CONNECTION_CLOSED = -32000
_REQUEST_TIMEOUT = -32001
_METHOD_NOT_FOUND = -32601
_INVALID_PARAMS = -32602

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------ names


def _hashed(server: str, tool: str, safe: str) -> str:
    digest = hashlib.sha256(tool.encode()).hexdigest()[:_HASH_HEX]
    room = MAX_NAME - len(server) - len(SEPARATOR) - 1 - _HASH_HEX
    return f"{server}{SEPARATOR}{safe[:room]}_{digest}"


def tool_names(server: str, tools: Iterable[str]) -> dict[str, str]:
    """The exposed name of each of a server's tools: {own name: "<server>__<name>"} (module docstring)."""
    tools = list(dict.fromkeys(tools))
    safe = {t: _UNSAFE.sub("_", t) for t in tools}
    claims = Counter(safe.values())
    room = MAX_NAME - len(server) - len(SEPARATOR)
    names = {}
    for tool in tools:
        s = safe[tool]
        keep = len(s) <= room and (s == tool or claims[s] == 1)
        names[tool] = f"{server}{SEPARATOR}{s}" if keep else _hashed(server, tool, s)
    return names


def split_name(name: str) -> tuple[str, str] | None:
    """(server, rest) of an exposed name, None when it has no "<server>__" prefix."""
    server, sep, rest = name.partition(SEPARATOR)
    return (server, rest) if sep and server and rest else None


@dataclass(frozen=True)
class McpTool:
    """One tool of one server, as the model sees it (`name`) and as the server knows it (`tool`)."""

    name: str                 # "<server>__<tool>", what the model calls
    server: str
    tool: str                 # the server's own name for it
    description: str
    parameters: dict[str, Any]  # the tool's input JSON Schema (an object)

    def openai(self) -> dict[str, Any]:
        """The tool as an entry of an OpenAI chat request's `tools`."""
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


def _parameters(schema: Any) -> dict[str, Any]:
    # MCP requires an object schema; OpenAI's clients also expect "properties", even when empty.
    params = dict(schema) if isinstance(schema, dict) else {}
    params.setdefault("type", "object")
    if params.get("type") == "object":
        params.setdefault("properties", {})
    return params


def _result_text(result: Any) -> str:
    """A CallToolResult's content as text: text blocks joined by newlines, other blocks as placeholders."""
    parts = []
    for block in result.content or []:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            res = block.resource
            text = getattr(res, "text", None)
            parts.append(text if text is not None else f"[resource {res.uri} ({res.mime_type or 'binary'})]")
        elif kind == "resource_link":
            parts.append(f"[resource link: {block.uri}]")
        elif kind in ("image", "audio"):
            parts.append(f"[{kind}: {block.mime_type}, {len(block.data) * 3 // 4} bytes]")
        else:
            parts.append(f"[{kind} content]")
    if not parts and result.structured_content is not None:
        return json.dumps(result.structured_content, ensure_ascii=False)
    return "\n".join(parts)


# ------------------------------------------------------------------------------------------------ one server


class _StderrTail:
    """A stdio server's stderr, read by a thread: each line logged at DEBUG, the last ones kept for errors."""

    def __init__(self, server: str) -> None:
        read_fd, write_fd = os.pipe()
        self.file = os.fdopen(write_fd, "w")  # the child's stderr
        self._lines: deque[str] = deque(maxlen=_STDERR_LINES)
        self.closed = threading.Event()  # every writer is gone: the server (and what it started) has exited
        self._thread = threading.Thread(target=self._read, args=(os.fdopen(read_fd, "rb"), server),
                                        name=f"mcp-stderr-{server}", daemon=True)
        self._thread.start()

    def _read(self, pipe: Any, server: str) -> None:
        with pipe:
            for raw in pipe:
                line = raw.decode("utf-8", errors="replace").rstrip()
                if line:
                    self._lines.append(line)
                    log.debug("mcp server %s: %s", server, line)
        self.closed.set()

    def release(self) -> None:
        """Close our copy of the write end: the reader ends once the server (and what it started) exits."""
        if not self.file.closed:
            self.file.close()

    async def settle(self) -> None:
        """Give the reader a moment to take the last lines of a server that just exited."""
        self.release()
        await asyncio.to_thread(self._thread.join, 1.0)

    def tail(self, lines: int = 3) -> str:
        kept = list(self._lines)[-lines:]
        return f" (its stderr ended: {' | '.join(kept)[-400:]})" if kept else ""


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, which anyio's task groups wrap errors in."""
    inner = getattr(exc, "exceptions", None)
    if inner is None:
        return [exc]
    return [leaf for e in inner for leaf in _leaves(e)]


def _cause(exc: BaseException) -> BaseException:
    leaves = [e for e in _leaves(exc) if not isinstance(e, asyncio.CancelledError)]
    return leaves[0] if leaves else exc


class _Connection:
    """One server's session, held open by its own task until `close()` or until the server goes away."""

    def __init__(self, name: str, spec: McpServerSpec) -> None:
        self.name = name
        self.spec = spec
        self.tools: dict[str, McpTool] = {}
        self.client: Any = None
        self.task: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self._ready = asyncio.Event()
        self._scope: Any = None
        self._stderr: _StderrTail | None = None

    async def _transport(self, stack: AsyncExitStack) -> Any:
        """The transport, as the SDK's Client takes it; a stdio server's stderr goes to our pipe."""
        if self.spec.command is not None:
            from mcp.client.stdio import StdioServerParameters, stdio_client

            argv = self.spec.argv()
            params = StdioServerParameters(command=argv[0], args=argv[1:],
                                           env=self.spec.resolved_env() or None, cwd=self.spec.cwd)
            self._stderr = _StderrTail(self.name)
            stack.callback(self._stderr.release)
            return stdio_client(params, errlog=self._stderr.file)
        import httpx2
        from mcp.client.streamable_http import streamable_http_client
        from mcp.shared._httpx_utils import create_mcp_http_client

        # The SDK's own client and timeouts (a long read for event streams), plus the configured headers.
        timeout = httpx2.Timeout(self.spec.timeout_s, read=max(300.0, self.spec.timeout_s))
        http = create_mcp_http_client(headers=self.spec.resolved_headers() or None, timeout=timeout)
        await stack.enter_async_context(http)
        return streamable_http_client(self.spec.url or "", http_client=http)

    async def _hold(self) -> None:
        import anyio
        from mcp import Client, Implementation

        from fleetlm import __version__

        try:
            # One scope around the whole session: its deadline bounds the handshake and is lifted once
            # connected; close() cancels it. (A scope of its own around the handshake alone would be left
            # while the transport's task group, entered inside it, is still open: anyio forbids that.)
            with anyio.CancelScope(deadline=anyio.current_time() + self.spec.handshake_timeout_s) as scope:
                self._scope = scope
                async with AsyncExitStack() as stack:
                    transport = await self._transport(stack)
                    me = Implementation(name="fleetlm", version=__version__)
                    client = Client(transport, client_info=me)
                    await stack.enter_async_context(client)
                    if self._stderr is not None:
                        self._stderr.release()
                    self.tools = await self._list(client)
                    self.client = client
                    scope.deadline = math.inf
                    self._ready.set()
                    await anyio.sleep_forever()
            if self.client is None and self.failure is None:  # the deadline (or close()) came first
                self.failure = TimeoutError()
        except BaseException as exc:  # the task reports through self.failure, never into asyncio's log
            self.failure = exc
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.client = None
            if self._stderr is not None and self.failure is not None:
                await self._stderr.settle()
            self._ready.set()

    async def _list(self, client: Any) -> dict[str, McpTool]:
        listed: list[Any] = []
        cursor = None
        for _ in range(_MAX_PAGES):
            page = await client.list_tools(cursor=cursor)
            listed.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                break
        names = tool_names(self.name, [t.name for t in listed])
        tools: dict[str, McpTool] = {}
        for t in listed:
            exposed = names[t.name]
            if exposed in tools or not NAME_RULE.match(exposed):
                log.warning("mcp server %s: tool %r skipped (its name %r is taken or invalid)",
                            self.name, t.name, exposed)
                continue
            tools[exposed] = McpTool(exposed, self.name, t.name,
                                     t.description or f"{t.name} (a tool of MCP server {self.name})",
                                     _parameters(t.input_schema))
        return tools

    async def open(self) -> None:
        """Start the server (or reach it), hand-shake and list its tools; a typed error when it cannot."""
        self.task = asyncio.get_running_loop().create_task(self._hold(), name=f"mcp-{self.name}")
        try:
            await asyncio.wait_for(self._ready.wait(), self.spec.handshake_timeout_s + _CLOSE_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self.close()
            raise McpConnectError(f"MCP server {self.name} did not start within "
                                  f"{self.spec.handshake_timeout_s:g} s"
                                  + self.stderr_tail()) from None
        if self.failure is not None or self.client is None:
            raise self._connect_error(self.failure)

    def stderr_tail(self) -> str:
        return self._stderr.tail() if self._stderr is not None else ""

    def _where(self) -> str:
        return f"{' '.join(self.spec.argv())!r}" if self.spec.command is not None else str(self.spec.url)

    def _connect_error(self, failure: BaseException | None) -> McpError:
        from mcp import MCPError

        exc = _cause(failure) if failure is not None else TimeoutError()
        if isinstance(exc, ConfigError):
            return McpConnectError(f"MCP server {self.name}: {exc}")
        # TimeoutError first: it is an OSError too.
        if isinstance(exc, (TimeoutError, asyncio.CancelledError)):
            return McpConnectError(f"MCP server {self.name} ({self._where()}) did not complete the MCP "
                                   f"handshake within {self.spec.handshake_timeout_s:g} s"
                                   + self.stderr_tail())
        if isinstance(exc, FileNotFoundError):
            return McpConnectError(f"MCP server {self.name}: command not found: {self.spec.argv()[0]!r}")
        if isinstance(exc, OSError) and self.spec.command is not None:
            return McpConnectError(f"MCP server {self.name}: cannot start {self._where()}: "
                                   f"{exc.strerror or exc}")
        if isinstance(exc, MCPError) and exc.code == _CONNECTION_CLOSED:
            what = "exited during start-up" if self.spec.command is not None else "closed the connection"
            return McpConnectError(f"MCP server {self.name} ({self._where()}) {what}" + self.stderr_tail())
        if isinstance(exc, MCPError):
            return McpConnectError(f"MCP server {self.name} ({self._where()}) answered the handshake with "
                                   f"error {exc.code}: {exc.message}")
        text = str(exc).strip() or type(exc).__name__
        if self.spec.url is not None:
            return McpConnectError(f"MCP server {self.name}: cannot reach {self.spec.url}: {text}")
        return McpConnectError(f"MCP server {self.name} ({self._where()}) failed to start: "
                               f"{type(exc).__name__}: {text}" + self.stderr_tail())

    @property
    def alive(self) -> bool:
        # A stdio server that exited while idle closed its stderr: start it again before the next call rather
        # than fail that call (the session itself only notices when a request is sent).
        exited = self._stderr is not None and self._stderr.closed.is_set()
        return self.client is not None and self.task is not None and not self.task.done() and not exited

    async def call(self, tool: McpTool, arguments: dict[str, Any], timeout_s: float) -> str:
        from mcp import MCPError

        assert self.task is not None and self.client is not None, "call on a connection that is not open"
        call = asyncio.ensure_future(self.client.call_tool(tool.tool, arguments))
        try:
            done, _ = await asyncio.wait({call, self.task}, timeout=timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            call.cancel()
            raise
        if call not in done:
            call.cancel()
            if self.task in done:
                raise self._gone(tool, self.failure)
            raise McpTimeoutError(f"{tool.name}: MCP server {self.name} did not answer within "
                                  f"{timeout_s:g} s")
        try:
            result = call.result()
        except MCPError as exc:
            if exc.code == _CONNECTION_CLOSED:
                raise self._gone(tool, exc) from None
            if exc.code == _REQUEST_TIMEOUT:
                raise McpTimeoutError(f"{tool.name}: MCP server {self.name} timed out: "
                                      f"{exc.message}") from None
            if exc.code == _INVALID_PARAMS:
                raise McpArgumentsError(f"{tool.name}: MCP server {self.name} rejected the arguments: "
                                        f"{exc.message}") from None
            if exc.code == _METHOD_NOT_FOUND:
                raise McpUnknownToolError(f"{tool.name}: MCP server {self.name} does not know it: "
                                          f"{exc.message}") from None
            raise McpToolError(f"{tool.name}: MCP server {self.name} answered error {exc.code}: "
                               f"{exc.message}") from None
        except Exception as exc:  # a transport failure or a malformed result: the server, not the tool
            raise McpDisconnectedError(f"{tool.name}: MCP server {self.name} failed during the call: "
                                       f"{type(exc).__name__}: {str(exc)[:300]}") from None
        text = _result_text(result)
        if result.is_error:
            raise McpToolError(text or f"{tool.name} failed (MCP server {self.name} gave no message)")
        return text

    def _gone(self, tool: McpTool, failure: BaseException | None) -> McpDisconnectedError:
        from mcp import MCPError

        why = ""
        if failure is not None and not isinstance(failure, asyncio.CancelledError):
            cause = _cause(failure)
            if str(cause) and not (isinstance(cause, MCPError) and cause.code == _CONNECTION_CLOSED):
                why = f": {type(cause).__name__}: {str(cause)[:200]}"
        what = "exited" if self.spec.command is not None else "closed the connection"
        return McpDisconnectedError(f"{tool.name}: MCP server {self.name} {what} during the call{why}"
                                    + self.stderr_tail())

    async def close(self) -> None:
        task = self.task
        if task is None or task.done():
            return
        if self._scope is not None:
            self._scope.cancel()
        done, _ = await asyncio.wait({task}, timeout=_CLOSE_TIMEOUT_S)
        if not done:  # the transport's bounded shutdown did not finish: stop waiting for it
            log.warning("mcp server %s did not shut down within %g s", self.name, _CLOSE_TIMEOUT_S)
            task.cancel()
            await asyncio.wait({task}, timeout=1.0)


# ------------------------------------------------------------------------------------------------ toolboxes


def _specs(servers: Mapping[str, McpServerSpec | Mapping[str, Any]]) -> dict[str, McpServerSpec]:
    # Specs already validated pass through as they are; the names are checked either way.
    return parse_servers(dict(servers))


def _check_arguments(tool: McpTool, arguments: Any) -> dict[str, Any]:
    import jsonschema

    if isinstance(arguments, str):  # a model's tool call carries its arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise McpArgumentsError(f"arguments of {tool.name} are not valid JSON: {exc.msg}") from None
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise McpArgumentsError(f"arguments of {tool.name} must be a JSON object, got "
                                f"{type(arguments).__name__}")
    try:
        validator = jsonschema.validators.validator_for(tool.parameters)(tool.parameters)
        error = jsonschema.exceptions.best_match(validator.iter_errors(arguments))
    except (jsonschema.SchemaError, TypeError, ValueError):
        return arguments  # the server's schema is broken: let the server judge the arguments
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path)
        raise McpArgumentsError(f"arguments of {tool.name} do not match its schema"
                                f"{f' at {where}' if where else ''}: {error.message}")
    return arguments


class AsyncMcpToolbox:
    """The tools of several MCP servers, for asyncio code; use it from one event loop only.

    `async with AsyncMcpToolbox(config.mcp_servers) as box: tools = await box.tools(); await box.call(...)`.
    """

    def __init__(self, servers: Mapping[str, McpServerSpec | Mapping[str, Any]]) -> None:
        self.servers = _specs(servers)
        self._conns: dict[str, _Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._closed = False

    def server_of(self, name: str) -> str | None:
        """The configured server an exposed tool name belongs to, None when it is none of ours."""
        parts = split_name(name)
        return parts[0] if parts and parts[0] in self.servers else None

    async def _connection(self, server: str) -> _Connection:
        if self._closed:
            raise McpError("this MCP toolbox is closed")
        if server not in self.servers:
            raise McpUnknownToolError(f"no MCP server named {server!r} (configured: "
                                      f"{', '.join(self.servers) or 'none'})")
        lock = self._locks.setdefault(server, asyncio.Lock())
        async with lock:  # concurrent first calls share one start
            conn = self._conns.get(server)
            if conn is not None and conn.alive:
                return conn
            if conn is not None:  # it went away: reconnect (a new process, the tools listed again)
                await conn.close()
            conn = _Connection(server, self.servers[server])
            self._conns[server] = conn
            try:
                await conn.open()
            except McpError:  # it has stopped already; a caller's cancellation leaves it for aclose() instead
                self._conns.pop(server, None)
                raise
            return conn

    async def list_tools(self, servers: Iterable[str] | None = None) -> list[McpTool]:
        """The tools of the given servers (default: all), connecting to them (concurrently) as needed."""
        names = list(self.servers if servers is None else servers)
        conns = await asyncio.gather(*(self._connection(s) for s in names))
        return [tool for conn in conns for tool in conn.tools.values()]

    async def tools(self, servers: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """The tools as OpenAI `tools` entries ({"type": "function", "function": {...}})."""
        return [t.openai() for t in await self.list_tools(servers)]

    async def call(self, name: str, arguments: dict[str, Any] | str | None = None, *,
                   timeout_s: float | None = None) -> str:
        """Call a tool by its exposed name: its text, or a typed McpError (McpToolError: the tool's own)."""
        server = self.server_of(name)
        if server is None:
            raise McpUnknownToolError(f"no MCP tool named {name!r}: names are <server>__<tool> with a server "
                                      f"of {', '.join(self.servers) or '(none configured)'}")
        conn = await self._connection(server)
        tool = conn.tools.get(name)
        if tool is None:
            raise McpUnknownToolError(f"MCP server {server} has no tool {name!r}; its tools are: "
                                      f"{', '.join(sorted(conn.tools)) or 'none'}")
        args = _check_arguments(tool, arguments)
        limit = conn.spec.timeout_s if timeout_s is None else timeout_s
        if limit <= 0:
            raise McpError(f"timeout_s must be > 0, got {limit}")
        try:
            return await conn.call(tool, args, limit)
        except McpDisconnectedError:
            await conn.close()  # the next call starts it again
            raise

    async def aclose(self) -> None:
        """Close every connection; a stdio server is stopped (stdin closed, then its process group killed)."""
        self._closed = True
        conns, self._conns = list(self._conns.values()), {}
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    async def __aenter__(self) -> AsyncMcpToolbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, box: AsyncMcpToolbox) -> None:
    """Close the toolbox on its loop, then stop the loop and its thread (weakref.finalize runs it at exit)."""
    if loop.is_closed():
        return
    if loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(box.aclose(), loop).result(_CLOSE_TIMEOUT_S + 5)
        except Exception as exc:  # noqa: BLE001  closing is best effort; say so, never raise from here
            log.warning("closing MCP servers: %s: %s", type(exc).__name__, exc)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
    if not thread.is_alive():
        loop.close()


class McpToolbox:
    """The tools of several MCP servers, for plain (synchronous) code; safe to share between threads.

    ```python
    with McpToolbox(load_config("fleet.yaml").mcp_servers) as box:
        tools = box.tools()                                  # OpenAI tools entries, <server>__<tool>
        text = box.call("files__read_file", {"path": "a.txt"})
    ```
    A private event loop runs in a background thread, started on first use; `close()` stops the servers
    and the thread (also done at interpreter exit).
    """

    def __init__(self, servers: Mapping[str, McpServerSpec | Mapping[str, Any]]) -> None:
        self._box = AsyncMcpToolbox(servers)
        self.servers = self._box.servers
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._closed = False
        self._finalizer: weakref.finalize | None = None

    @classmethod
    def from_config(cls, path: str | Path) -> McpToolbox:
        """The servers of a fleet.yaml (or of a file holding only `mcp_servers:`)."""
        return cls(load_servers(path))

    def server_of(self, name: str) -> str | None:
        return self._box.server_of(name)

    def _run(self, coro: Coroutine[Any, Any, T], bound_s: float) -> T:
        with self._lock:
            if self._closed:
                coro.close()
                raise McpError("this MCP toolbox is closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="fleetlm-mcp", daemon=True)
                thread.start()
                self._loop = loop
                self._finalizer = weakref.finalize(self, _stop_loop, loop, thread, self._box)
            loop = self._loop
        future = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            # Every await inside is bounded already; this bound only guards against a bug (ours, the SDK's).
            return future.result(timeout=bound_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise McpTimeoutError(f"no answer from the MCP servers within {bound_s:g} s") from None

    def _bound(self, servers: Iterable[str] | None = None, timeout_s: float | None = None) -> float:
        specs = [self.servers[s] for s in (servers or self.servers) if s in self.servers]
        longest = max([max(s.timeout_s, s.handshake_timeout_s) for s in specs], default=30.0)
        return 2 * (timeout_s or 0) + 2 * longest + 2 * _CLOSE_TIMEOUT_S

    def list_tools(self, servers: Iterable[str] | None = None) -> list[McpTool]:
        servers = list(servers) if servers is not None else None
        return self._run(self._box.list_tools(servers), self._bound(servers))

    def tools(self, servers: Iterable[str] | None = None) -> list[dict[str, Any]]:
        return [t.openai() for t in self.list_tools(servers)]

    def call(self, name: str, arguments: dict[str, Any] | str | None = None, *,
             timeout_s: float | None = None) -> str:
        server = self.server_of(name)
        return self._run(self._box.call(name, arguments, timeout_s=timeout_s),
                         self._bound([server] if server else [], timeout_s))

    def close(self) -> None:
        with self._lock:
            self._closed = True
            finalizer = self._finalizer
        if finalizer is not None:
            finalizer()

    def __enter__(self) -> McpToolbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
