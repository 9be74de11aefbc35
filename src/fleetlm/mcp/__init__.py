"""MCP (Model Context Protocol): tools from MCP servers for agents and the gateway, and fleetlm's own tools
served as an MCP server.

- `fleetlm.mcp.config`: the `mcp_servers:` section of fleet.yaml (a stdio command or a streamable HTTP URL).
- `fleetlm.mcp.client`: `McpToolbox` (sync) and `AsyncMcpToolbox`: every server's tools as OpenAI `tools`
  entries named `<server>__<tool>`, and `call(name, arguments) -> str`.
- `fleetlm.mcp.server`: `run_python` (the bubblewrap sandbox) as an MCP server over stdio or HTTP.
- `fleetlm.mcp.tools`: the toolbox's tools as `fleetlm.agent.tools.Tool`s for the agent loop.

This package's `__init__` imports nothing, so `fleetlm.config` can use `fleetlm.mcp.config` without loading
the `mcp` SDK.
"""
