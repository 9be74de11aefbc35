"""MCP tools as the agent's `Tool`s: names, schemas, calls, and MCP failures as the agent's ToolError."""

from __future__ import annotations

import pytest

from fleetlm.mcp.client import McpTool, McpToolbox
from fleetlm.mcp.tools import agent_tool, agent_tools
from mcp_fixtures import echo_spec

# fleetlm.mcp imports without the agent package; only this adapter needs it.
agent_tools_module = pytest.importorskip("fleetlm.agent.tools")
Tool, ToolError = agent_tools_module.Tool, agent_tools_module.ToolError
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tools():
    box = McpToolbox({"echo": echo_spec()})
    yield {t.name: t for t in agent_tools(box)}
    box.close()


def test_every_tool_becomes_an_agent_tool(tools):
    assert set(tools) >= {"echo__add", "echo__echo", "echo__fail", "echo__dotted_name_tool"}
    add = tools["echo__add"]
    assert isinstance(add, Tool)
    assert add.description == "Add two integers."
    assert add.required == ["a", "b"]
    assert add.meta == {"mcp_server": "echo", "mcp_tool": "add"}
    assert tools["echo__dotted_name_tool"].meta["mcp_tool"] == "dotted.name-tool"
    assert add.openai_spec()["function"]["name"] == "echo__add"


def test_calls_go_to_the_mcp_server(tools):
    assert tools["echo__add"].call('{"a": 40, "b": 2}') == "42"
    assert tools["echo__echo"](text="hi") == "hi"


def test_mcp_failures_reach_the_agent_as_tool_errors(tools):
    with pytest.raises(ToolError, match="this tool always fails") as info:
        tools["echo__fail"].call({})
    assert type(info.value) is ToolError  # the MCP message itself, not wrapped as "<tool> failed: ..."


def test_a_timeout_reaches_the_agent_as_a_tool_error():
    spec = {**echo_spec(), "timeout_s": 0.5, "connect_timeout_s": 30}
    with McpToolbox({"echo": spec}) as box:
        (slow,) = [t for t in agent_tools(box) if t.name == "echo__slow"]
        with pytest.raises(ToolError, match="echo__slow: MCP server echo did not answer within 0.5 s"):
            slow.call({"seconds": 20})
        assert slow.call({"seconds": 0.01}) == "slept 0.01 s"


def test_a_tool_the_agent_cannot_describe_is_refused_by_agent_tool():
    bad = McpTool("echo__bad", "echo", "bad", "a tool with a broken schema",
                  {"type": "object", "properties": {"x": {"type": 5}}})
    with McpToolbox({"echo": echo_spec()}) as box:  # never connected: agent_tool does not call the server
        with pytest.raises(agent_tools_module.ToolDefinitionError, match="invalid parameters schema"):
            agent_tool(box, bad)
