"""MCP tools for the agent loop: each tool of an `McpToolbox` as a `fleetlm.agent.tools.Tool`.

`agent_tools(box)` lists the servers' tools (connecting to them) and wraps each one: its name is the exposed
`<server>__<tool>` (an identifier, as the code agent needs), its parameters the tool's input schema, and
`run(**arguments)` calls it through the toolbox. Every MCP failure (the tool's own error, bad arguments, a
timeout, a server that went away) becomes the agent's `ToolError` carrying the message, which the loop
shows to the model as an observation.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from fleetlm.mcp.client import McpTool, McpToolbox
from fleetlm.mcp.errors import McpError

log = logging.getLogger(__name__)


def _runner(box: McpToolbox, name: str, tool_error: type[Exception]) -> Any:
    def run(**arguments: Any) -> str:
        try:
            return box.call(name, arguments)
        except McpError as exc:
            raise tool_error(str(exc)) from exc

    return run


def agent_tool(box: McpToolbox, tool: McpTool) -> Any:
    """One MCP tool as an agent `Tool` whose `run` calls it through `box`."""
    # Imported here: fleetlm.mcp works without the agent package, which only this adapter needs.
    from fleetlm.agent.tools import Tool, ToolError

    return Tool(name=tool.name, description=tool.description, parameters=tool.parameters,
                run=_runner(box, tool.name, ToolError),
                meta={"mcp_server": tool.server, "mcp_tool": tool.tool})


def agent_tools(box: McpToolbox, servers: Iterable[str] | None = None) -> list[Any]:
    """The tools of the given servers (default: all) as agent `Tool`s; one the agent cannot describe (a
    schema it rejects) is left out with a warning rather than failing the rest."""
    from fleetlm.agent.tools import ToolDefinitionError

    tools = []
    for tool in box.list_tools(servers):
        try:
            tools.append(agent_tool(box, tool))
        except ToolDefinitionError as exc:
            log.warning("MCP tool %s left out: %s", tool.name, exc)
    return tools
