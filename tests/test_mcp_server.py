"""fleetlm's MCP server: `fleet mcp serve` as a subprocess (stdio, HTTP), run_python called through it."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import pytest
from mcp import Client

from fleetlm.mcp.client import McpToolbox
from fleetlm.mcp.errors import McpArgumentsError, McpToolError
from fleetlm.mcp.server import MAX_TIMEOUT_S, build_server
from mcp_fixtures import FLEET, descendants, free_port, http_server, wait_no_descendants

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
pytestmark = pytest.mark.timeout(180)

# `fleet` imports every capability: on a busy 2-core machine its start takes several seconds.
SERVE = {"command": [FLEET, "mcp", "serve"], "timeout_s": 90}


def test_the_server_lists_run_python_with_its_limits():
    async def main():
        async with Client(build_server()) as client:  # in-process: the SDK's own test path
            return (await client.list_tools()).tools

    (tool,) = asyncio.run(main())
    assert tool.name == "run_python"
    assert "sandbox" in tool.description
    props = tool.input_schema["properties"]
    assert tool.input_schema["required"] == ["code"]
    assert props["timeout_s"]["maximum"] == MAX_TIMEOUT_S and props["memory_mb"]["minimum"] == 32


@pytest.fixture(scope="module")
def served():
    before = descendants()
    box = McpToolbox({"fleet": SERVE})
    yield box
    box.close()
    assert not wait_no_descendants(before, 2.0)


@needs_bwrap
def test_run_python_over_stdio(served):
    assert [t["function"]["name"] for t in served.tools()] == ["fleet__run_python"]
    out = json.loads(served.call("fleet__run_python", {"code": "import sys\nprint(6 * 7)\nsys.exit(3)"}))
    assert out["stdout"] == "42\n" and out["exit_status"] == 3 and out["timed_out"] is False
    echo = json.loads(served.call("fleet__run_python",
                                  {"code": "print(input()[::-1])", "stdin": "abc\n"}))
    assert echo["stdout"] == "cba\n" and echo["exit_status"] == 0


@needs_bwrap
def test_run_python_is_sandboxed_and_limited(served):
    net = json.loads(served.call("fleet__run_python", {
        "code": "import socket\nsocket.create_connection(('127.0.0.1', 22), 2)"}))
    assert net["exit_status"] != 0 and ("unreachable" in net["stderr"] or "refused" in net["stderr"])
    start = time.monotonic()
    spin = json.loads(served.call("fleet__run_python", {"code": "while True: pass", "timeout_s": 1}))
    assert spin["timed_out"] is True and spin["exit_status"] is None
    assert time.monotonic() - start < 10
    here = str(Path(__file__).resolve().parent)  # the host's files, this repository among them, are not there
    code = f"import os\nprint(os.path.exists({here!r}))"
    files = json.loads(served.call("fleet__run_python", {"code": code}))
    assert files["stdout"] == "False\n"


def test_run_python_limits_are_checked_before_running(served):
    with pytest.raises(McpArgumentsError, match="greater than the maximum"):
        served.call("fleet__run_python", {"code": "print(1)", "timeout_s": MAX_TIMEOUT_S + 1})
    with pytest.raises(McpArgumentsError, match="'code' is a required property"):
        served.call("fleet__run_python", {})


def test_without_bwrap_the_tool_says_so_and_runs_nothing(tmp_path):
    # A PATH without bwrap (the server's own interpreter is named by absolute path, so it still starts).
    marker = tmp_path / "ran"
    spec = {**SERVE, "env": {"PATH": str(tmp_path)}}
    with McpToolbox({"fleet": spec}) as box:
        with pytest.raises(McpToolError, match="sandbox is not available.*bubblewrap is not installed"):
            box.call("fleet__run_python", {"code": f"open({str(marker)!r}, 'w').write('x')"})
    assert not marker.exists()


@needs_bwrap
def test_run_python_over_streamable_http():
    port = free_port()
    with http_server([FLEET, "mcp", "serve", "--transport", "http", "--port", str(port)], port, ready_s=90):
        with McpToolbox({"fleet": {"url": f"http://127.0.0.1:{port}/mcp", "timeout_s": 30}}) as box:
            out = json.loads(box.call("fleet__run_python", {"code": "print(sum(range(10)))"}))
            assert out["stdout"] == "45\n" and out["exit_status"] == 0
