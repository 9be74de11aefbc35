"""A small MCP server the MCP tests run as a subprocess: `python mcp_echo_server.py [stdio|http PORT|exit]`.

Tools: add(a, b), echo(text), fail() (a tool error), slow(seconds), die() (the process exits mid-call) and
`dotted.name-tool` (a name OpenAI would refuse, so the client must rename it). `exit` writes a line to stderr
and exits with status 3 before speaking MCP: a server that fails at start.
"""

from __future__ import annotations

import asyncio
import os
import sys

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

app = MCPServer("echo", log_level="WARNING")


@app.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@app.tool()
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@app.tool()
def fail() -> str:
    """Always fails with a tool error."""
    raise ToolError("this tool always fails")


@app.tool()
async def slow(seconds: float) -> str:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return f"slept {seconds:g} s"


@app.tool()
def die() -> str:
    """Exit the whole server process in the middle of the call."""
    os._exit(7)


@app.tool(name="dotted.name-tool")
def dotted() -> str:
    """A tool whose name has characters OpenAI's function names do not allow."""
    return "dotted"


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "stdio"
    if mode == "exit":
        print("echo server: refusing to start (asked to)", file=sys.stderr, flush=True)
        sys.exit(3)
    if mode == "http":
        app.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        app.run()
