"""`fleet mcp`: serve fleetlm's own tools as an MCP server; list the tools of a fleet.yaml's MCP servers."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fleetlm.mcp.errors import McpError

mcp_app = typer.Typer(
    name="mcp",
    help="MCP: fleetlm's tools as an MCP server, and the tools of the MCP servers named in fleet.yaml.",
    no_args_is_help=True,
)

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@mcp_app.command("serve")
def serve_command(
    transport: str = typer.Option("stdio", "--transport", help="stdio (for a client that starts us) or http "
                                                               "(streamable HTTP at /mcp)."),
    host: str = typer.Option("127.0.0.1", "--host", help="http: the address to listen on."),
    port: int = typer.Option(8765, "--port", help="http: the port to listen on."),
) -> None:
    """Serve fleetlm's tools (run_python: the bubblewrap sandbox) as an MCP server."""
    from fleetlm.mcp.server import serve

    if transport not in ("stdio", "http"):
        raise McpError(f"--transport must be stdio or http, got {transport!r}")
    if transport == "http":
        if not 1 <= port <= 65535:
            raise McpError(f"--port must be 1-65535, got {port}")
        if host not in _LOOPBACK:
            typer.echo(f"warning: serving on {host} without authentication: anyone who reaches the port can "
                       "run code in the sandbox", err=True)
    serve("stdio" if transport == "stdio" else "http", host=host, port=port)


@mcp_app.command("tools")
def tools_command(
    config: Path = typer.Option(Path("fleet.yaml"), "--config", help="A fleet.yaml with mcp_servers."),
    server: list[str] = typer.Option(None, "--server", help="Only this server (repeatable)."),
    as_json: bool = typer.Option(False, "--json", help="Print the OpenAI tools entries as JSON."),
) -> None:
    """Connect to each MCP server of the config and list its tools by the names models call them."""
    from fleetlm.mcp.client import McpToolbox
    from fleetlm.mcp.config import load_servers

    servers = load_servers(config)
    names = list(server or servers)
    unknown = [n for n in names if n not in servers]
    if unknown:
        raise McpError(f"{config}: no MCP server {', '.join(map(repr, unknown))} (it has: "
                       f"{', '.join(servers) or 'none'})")
    if not names:
        typer.echo(f"{config} names no mcp_servers", err=True)
        return
    entries, failed = [], False
    with McpToolbox(servers) as box:
        for name in names:
            try:
                tools = box.list_tools([name])
            except McpError as exc:  # one server down should not hide the others' tools
                typer.echo(f"error: {exc}", err=True)
                failed = True
                continue
            entries += [t.openai() for t in tools]
            if as_json:
                continue
            spec = servers[name]
            typer.echo(f"{name} ({spec.url or ' '.join(spec.argv())}): {len(tools)} tools")
            width = max((len(t.name) for t in tools), default=0)
            for t in tools:
                renamed = f" [MCP name: {t.tool}]" if f"{name}__{t.tool}" != t.name else ""
                summary = (t.description.strip().splitlines() or [""])[0]
                typer.echo(f"  {t.name.ljust(width)}  {summary}{renamed}")
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
    if failed:
        raise typer.Exit(2)


def register(app: typer.Typer) -> None:
    app.add_typer(mcp_app, name="mcp")
