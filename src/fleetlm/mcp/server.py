"""fleetlm's own tools as an MCP server (the SDK's MCPServer), over stdio or streamable HTTP: `run_python`.

`run_python` runs a program in the bubblewrap sandbox (fleetlm.sandbox: no network, one writable folder, time,
memory, process and output limits) and answers its exit status, stdout and stderr. Where the sandbox cannot
run (no bwrap, no user namespaces) the tool answers an MCP tool error saying so; it never runs code on the
host. There is no file_search tool: fleetlm has no knowledge-base module to serve yet.

Over HTTP the server has no authentication, and `run_python` runs code for whoever reaches the port, so it
listens on loopback unless told otherwise (`fleet mcp serve --host`).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

MAX_TIMEOUT_S = 60.0
MAX_MEMORY_MB = 2048
HTTP_PATH = "/mcp"
TOOLS = ("run_python",)


class RunResult(BaseModel):
    """What `run_python` answers (as JSON text, and as the tool's structured content)."""

    exit_status: int | None = Field(description="the program's exit status; null when killed for time")
    timed_out: bool
    reason: str = Field(description="one line saying what happened, e.g. 'exit 0' or 'memory limit'")
    stdout: str
    stderr: str
    seconds: float


def _run(code: str, stdin: str | None, timeout_s: float, memory_mb: int) -> RunResult:
    from fleetlm.sandbox import run_python

    result = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb, stdin=stdin)
    return RunResult(exit_status=result.returncode, timed_out=result.timed_out, reason=result.reason,
                     stdout=result.stdout, stderr=result.stderr, seconds=round(result.seconds, 3))


def build_server() -> Any:
    """The MCP server with fleetlm's tools (not started: see `serve`)."""
    import anyio
    from mcp.server.mcpserver import MCPServer
    from mcp.server.mcpserver.exceptions import ToolError

    from fleetlm import __version__
    from fleetlm.sandbox import SandboxError

    app = MCPServer("fleetlm", version=__version__, log_level="WARNING",
                    instructions="fleetlm's tools. run_python runs a Python program in a sandbox without "
                                 "network access and answers its exit status, stdout and stderr.")
    # Each run is a process with its own CPU limit; more at once than there are cores only queues them.
    limiter = anyio.CapacityLimiter(max(1, os.cpu_count() or 1))

    @app.tool(name="run_python", description="Run a Python program in a sandbox (no network, no host files, "
                                             "time and memory limits) and return its exit status, stdout and "
                                             "stderr.")
    async def run_python_tool(
        code: Annotated[str, Field(description="the Python program (a whole file; print what you need)")],
        stdin: Annotated[str | None, Field(description="text given to the program on stdin")] = None,
        timeout_s: Annotated[float, Field(gt=0, le=MAX_TIMEOUT_S, description="wall-clock limit")] = 10.0,
        memory_mb: Annotated[int, Field(ge=32, le=MAX_MEMORY_MB, description="address-space limit")] = 512,
    ) -> RunResult:
        try:
            return await anyio.to_thread.run_sync(
                functools.partial(_run, code, stdin, timeout_s, memory_mb), limiter=limiter)
        except SandboxError as exc:
            raise ToolError(f"the sandbox is not available on this server, so nothing ran: {exc}") from None

    return app


def serve(transport: Literal["stdio", "http"] = "stdio", host: str = "127.0.0.1", port: int = 8765) -> None:
    """Serve fleetlm's tools until stdin closes (stdio) or the process is stopped (http)."""
    app = build_server()
    if transport == "stdio":
        app.run("stdio")
        return
    print(f"fleetlm MCP server: http://{host}:{port}{HTTP_PATH} (tools: {', '.join(TOOLS)})", file=sys.stderr,
          flush=True)
    app.run("streamable-http", host=host, port=port, streamable_http_path=HTTP_PATH)
