"""Typed MCP errors: a server that cannot be reached or used, and a tool call that failed.

Two families, because callers treat them differently:
- `McpToolError` (and its subclasses for an unknown tool and bad arguments) is about one call: an agent shows
  its message to the model as an observation and the model may try again.
- `McpConnectError`, `McpDisconnectedError` and `McpTimeoutError` are about the server: it did not start, it
  went away during a call, or it did not answer in time. An agent may still show them to the model; a
  gateway reports them as an upstream failure.
"""

from __future__ import annotations

from fleetlm.errors import FleetError


class McpError(FleetError):
    """Something about an MCP server or one of its tools went wrong; the message says what, in one line."""


class McpToolError(McpError):
    """The tool ran and reported an error (an MCP result with isError): the message is the tool's own text."""


class McpUnknownToolError(McpToolError):
    """No configured server has a tool of that name."""


class McpArgumentsError(McpToolError):
    """The arguments are not a JSON object or do not match the tool's input schema, checked before sending."""


class McpConnectError(McpError):
    """The server could not be started or reached, or did not complete the MCP handshake in time."""


class McpDisconnectedError(McpError):
    """The server went away (exited, closed the connection) while a request was in flight."""


class McpTimeoutError(McpError):
    """A tool call did not finish within its time limit (the server is still connected)."""
