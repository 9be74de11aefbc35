"""McpToolbox against real MCP servers run as subprocesses (tests/mcp_echo_server.py) over stdio and HTTP."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from fleetlm.errors import ConfigError
from fleetlm.mcp.client import AsyncMcpToolbox, McpToolbox, _result_text, split_name, tool_names
from fleetlm.mcp.errors import (
    McpArgumentsError,
    McpConnectError,
    McpDisconnectedError,
    McpError,
    McpTimeoutError,
    McpToolError,
    McpUnknownToolError,
)
from mcp_fixtures import ECHO_SERVER, descendants, echo_spec, free_port, http_server, wait_no_descendants

AGENT_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")   # fleetlm.agent.tools: an identifier
OPENAI_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

pytestmark = pytest.mark.timeout(120)


# ------------------------------------------------------------------------------------------------ names


def test_valid_names_are_kept_and_others_sanitised():
    names = tool_names("files", ["read_file", "get-weather", "dotted.name", "a/b c"])
    assert names == {"read_file": "files__read_file", "get-weather": "files__get_weather",
                     "dotted.name": "files__dotted_name", "a/b c": "files__a_b_c"}


def test_clashing_and_long_names_get_a_hash_of_the_original():
    names = tool_names("s", ["a_b", "a.b", "a-b", "x" * 100, "x" * 101])
    assert names["a_b"] == "s__a_b"                      # already valid: keeps its name
    assert names["a.b"] != names["a-b"] and names["a.b"].startswith("s__a_b_")
    assert len({*names.values()}) == 5
    for name in names.values():
        assert len(name) <= 64 and AGENT_NAME.match(name) and OPENAI_NAME.match(name)
        assert split_name(name)[0] == "s"
    # the same listing always gives the same names (the hash is of the tool's own name)
    assert tool_names("s", ["x" * 100, "a-b", "a.b", "a_b", "x" * 101]) == names


def test_split_name():
    assert split_name("srv__read_file") == ("srv", "read_file")
    assert split_name("srv__a__b") == ("srv", "a__b")
    assert split_name("plain") is None and split_name("__x") is None and split_name("srv__") is None


def test_result_text_joins_text_and_describes_other_content():
    text = SimpleNamespace(type="text", text="hello")
    image = SimpleNamespace(type="image", mime_type="image/png", data="AAAA")
    inside = SimpleNamespace(text="inside", uri="file:///a", mime_type=None)
    res = SimpleNamespace(type="resource", resource=inside)
    result = SimpleNamespace(content=[text, image, res], structured_content=None)
    assert _result_text(result) == "hello\n[image: image/png, 3 bytes]\ninside"
    assert _result_text(SimpleNamespace(content=[], structured_content={"n": 1})) == '{"n": 1}'


def test_bad_server_specs_are_config_errors():
    with pytest.raises(ConfigError, match="exactly one of command"):
        McpToolbox({"x": {"command": ["a"], "url": "http://h/mcp"}})
    with pytest.raises(ConfigError, match="prefixes its tools"):
        McpToolbox({"bad-name": echo_spec()})


# ------------------------------------------------------------------------------------------------ stdio


@pytest.fixture(scope="module")
def echo_box():
    box = McpToolbox({"echo": echo_spec()})
    yield box
    box.close()


def test_lists_tools_as_openai_entries(echo_box):
    tools = {t["function"]["name"]: t for t in echo_box.tools()}
    assert set(tools) == {"echo__add", "echo__echo", "echo__fail", "echo__slow", "echo__die",
                          "echo__dotted_name_tool"}
    add = tools["echo__add"]
    assert add["type"] == "function"
    assert add["function"]["description"] == "Add two integers."
    params = add["function"]["parameters"]
    assert params["type"] == "object" and params["required"] == ["a", "b"]
    assert params["properties"]["a"]["type"] == "integer"
    renamed = {t.name: t.tool for t in echo_box.list_tools()}
    assert renamed["echo__dotted_name_tool"] == "dotted.name-tool"


def test_calls_return_the_tools_text(echo_box):
    assert echo_box.call("echo__add", {"a": 2, "b": 40}) == "42"
    assert echo_box.call("echo__add", '{"a": 1, "b": 1}') == "2"     # a model's JSON string works too
    assert echo_box.call("echo__echo", {"text": "héllo\nworld"}) == "héllo\nworld"
    assert echo_box.call("echo__dotted_name_tool") == "dotted"       # called by its MCP name upstream


def test_a_tool_error_carries_the_tools_message(echo_box):
    with pytest.raises(McpToolError, match="this tool always fails") as info:
        echo_box.call("echo__fail", {})
    assert type(info.value) is McpToolError


def test_unknown_tools_and_servers(echo_box):
    with pytest.raises(McpUnknownToolError, match="has no tool 'echo__nope'.*echo__add"):
        echo_box.call("echo__nope", {})
    with pytest.raises(McpUnknownToolError, match="no MCP tool named 'other__add'"):
        echo_box.call("other__add", {})
    with pytest.raises(McpUnknownToolError, match="no MCP tool named 'add'"):
        echo_box.call("add", {})


@pytest.mark.parametrize("arguments, message", [
    ({"a": 1}, "'b' is a required property"),
    ({"a": "one", "b": 2}, "at a: 'one' is not of type 'integer'"),
    ('{"a": 1,', "not valid JSON"),
    ([1, 2], "must be a JSON object"),
])
def test_bad_arguments_are_refused_before_sending(echo_box, arguments, message):
    with pytest.raises(McpArgumentsError, match=re.escape(message)):
        echo_box.call("echo__add", arguments)
    assert issubclass(McpArgumentsError, McpToolError)   # an agent shows it to the model like a tool error


def test_a_slow_call_times_out_and_the_server_stays_usable(echo_box):
    start = time.monotonic()
    with pytest.raises(McpTimeoutError, match="did not answer within 0.5 s"):
        echo_box.call("echo__slow", {"seconds": 30}, timeout_s=0.5)
    assert time.monotonic() - start < 2.0
    assert echo_box.call("echo__slow", {"seconds": 0.01}) == "slept 0.01 s"


def test_calls_from_several_threads_run_at_once(echo_box):
    results: list[str] = []

    def one(i: int) -> None:
        results.append(echo_box.call("echo__slow", {"seconds": 1.0}))

    echo_box.call("echo__echo", {"text": "warm"})  # connected before the clock starts
    start = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["slept 1 s"] * 4
    assert time.monotonic() - start < 3.0  # one connection, requests multiplexed: not 4 s in a row


def test_a_server_that_dies_mid_call_is_a_typed_error_then_restarted():
    before = descendants()
    with McpToolbox({"echo": echo_spec()}) as box:
        assert box.call("echo__echo", {"text": "a"}) == "a"
        first = descendants() - before
        assert len(first) == 1
        start = time.monotonic()
        with pytest.raises(McpDisconnectedError, match="echo__die: MCP server echo exited during the call"):
            box.call("echo__die", {})
        assert time.monotonic() - start < 5.0
        assert box.call("echo__echo", {"text": "b"}) == "b"   # the next call starts the server again
        second = descendants() - before
        assert len(second) == 1 and second != first
    assert not wait_no_descendants(before, 2.0)


def test_a_server_that_exited_while_idle_is_started_again_for_the_next_call():
    before = descendants()
    with McpToolbox({"echo": echo_spec()}) as box:
        assert box.call("echo__echo", {"text": "a"}) == "a"
        (pid,) = descendants() - before
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while pid in descendants() and time.monotonic() < deadline:
            time.sleep(0.05)
        # "while idle": give the reader of its stderr a moment to see it closed (a call that races the very
        # instant of death gets McpDisconnectedError instead, and the call after it restarts the server)
        time.sleep(0.5)
        assert box.call("echo__echo", {"text": "b"}) == "b"
        assert pid not in descendants() and len(descendants() - before) == 1
    assert not wait_no_descendants(before, 2.0)


def test_a_command_that_does_not_exist():
    with McpToolbox({"ghost": {"command": ["/nonexistent/mcp-server"]}}) as box:
        with pytest.raises(McpConnectError, match="command not found: '/nonexistent/mcp-server'"):
            box.tools()


def test_a_server_that_exits_at_start_says_what_it_wrote():
    before = descendants()
    start = time.monotonic()
    with McpToolbox({"quits": echo_spec("exit", timeout_s=20)}) as box:
        with pytest.raises(McpConnectError, match=r"exited during start-up .*refusing to start \(asked to\)"):
            box.call("quits__add", {"a": 1, "b": 2})
    assert time.monotonic() - start < 20
    assert not wait_no_descendants(before, 2.0)


def test_a_server_that_never_answers_the_handshake_times_out_and_is_killed():
    before = descendants()
    silent = {"command": [sys.executable, "-c", "import time; time.sleep(600)"], "timeout_s": 1.5}
    start = time.monotonic()
    with McpToolbox({"silent": silent}) as box:
        with pytest.raises(McpConnectError, match="did not complete the MCP handshake within 1.5 s"):
            box.tools()
        # the error comes only once the process is gone (stdin closed, then its process group killed)
        assert not descendants() - before
    assert time.monotonic() - start < 1.5 + 8
    assert not wait_no_descendants(before, 1.0)


def test_unset_environment_variable_in_env():
    spec = {**echo_spec(), "env": {"TOKEN": "${FLEET_TEST_SURELY_UNSET}"}}
    with McpToolbox({"echo": spec}) as box:
        with pytest.raises(McpConnectError, match="FLEET_TEST_SURELY_UNSET is not set"):
            box.tools()


def test_env_reaches_the_server(monkeypatch):
    monkeypatch.setenv("FLEET_TEST_GREETING", "hi there")
    script = ("import os\nfrom mcp.server.mcpserver import MCPServer\napp = MCPServer('env')\n"
              "@app.tool()\ndef greeting() -> str:\n    return os.environ['GREETING']\napp.run()\n")
    spec = {"command": [sys.executable, "-c", script], "env": {"GREETING": "${FLEET_TEST_GREETING}!"}}
    with McpToolbox({"env": spec}) as box:
        assert box.call("env__greeting") == "hi there!"


def test_close_stops_every_server_and_the_toolbox_refuses_more_calls():
    before = descendants()
    box = McpToolbox({"one": echo_spec(), "two": echo_spec()})
    assert {t["function"]["name"] for t in box.tools()} >= {"one__add", "two__add"}
    assert len(descendants() - before) == 2
    box.close()
    assert not wait_no_descendants(before, 1.0)
    with pytest.raises(McpError, match="closed"):
        box.call("one__add", {"a": 1, "b": 2})
    box.close()  # twice is fine


# ------------------------------------------------------------------------------------------------ async API


def test_async_toolbox_in_an_event_loop():
    before = descendants()

    async def main() -> tuple[list[str], list[str], float]:
        async with AsyncMcpToolbox({"echo": echo_spec()}) as box:
            names = [t["function"]["name"] for t in await box.tools()]
            start = time.monotonic()
            answers = await asyncio.gather(*(box.call("echo__add", {"a": i, "b": i}) for i in range(5)),
                                           box.call("echo__slow", {"seconds": 0.5}))
            took = time.monotonic() - start
            with pytest.raises(McpTimeoutError):
                await box.call("echo__slow", {"seconds": 10}, timeout_s=0.3)
            return names, answers, took

    names, answers, took = asyncio.run(main())
    assert "echo__add" in names
    assert answers == ["0", "2", "4", "6", "8", "slept 0.5 s"]
    assert took < 3.0
    assert not wait_no_descendants(before, 1.0)


def test_async_toolbox_closed_from_another_task_than_it_connected_in():
    async def main() -> str:
        box = AsyncMcpToolbox({"echo": echo_spec()})
        answer = await asyncio.create_task(box.call("echo__echo", {"text": "from a task"}))
        await asyncio.create_task(box.aclose())  # the gateway's shutdown runs in another task than requests
        return answer

    before = descendants()
    assert asyncio.run(main()) == "from a task"
    assert not wait_no_descendants(before, 1.0)


# ------------------------------------------------------------------------------------------------ HTTP


@pytest.fixture(scope="module")
def http_echo():
    port = free_port()
    with http_server([sys.executable, str(ECHO_SERVER), "http", str(port)], port) as proc:
        yield f"http://127.0.0.1:{port}/mcp", proc


def test_streamable_http_lists_and_calls(http_echo):
    url, _ = http_echo
    with McpToolbox({"web": {"url": url, "headers": {"X-Client": "fleetlm-test"}, "timeout_s": 10}}) as box:
        assert "web__add" in {t["function"]["name"] for t in box.tools()}
        assert box.call("web__add", {"a": 20, "b": 22}) == "42"
        with pytest.raises(McpToolError, match="this tool always fails"):
            box.call("web__fail", {})
        with pytest.raises(McpArgumentsError):
            box.call("web__add", {"a": 1})
        start = time.monotonic()
        with pytest.raises(McpTimeoutError):
            box.call("web__slow", {"seconds": 30}, timeout_s=0.5)
        assert time.monotonic() - start < 2.0
        assert box.call("web__echo", {"text": "still fine"}) == "still fine"


def test_streamable_http_unreachable_and_wrong_path(http_echo):
    url, _ = http_echo
    dead = f"http://127.0.0.1:{free_port()}/mcp"
    with McpToolbox({"dead": {"url": dead, "timeout_s": 5},
                     "wrong": {"url": url.replace("/mcp", "/nothing"), "timeout_s": 5}}) as box:
        with pytest.raises(McpConnectError, match=f"cannot reach {re.escape(dead)}"):
            box.tools(["dead"])
        with pytest.raises(McpConnectError, match="answered the handshake with error"):
            box.tools(["wrong"])


def test_streamable_http_server_killed_mid_call():
    port = free_port()
    with http_server([sys.executable, str(ECHO_SERVER), "http", str(port)], port) as proc:
        with McpToolbox({"web": {"url": f"http://127.0.0.1:{port}/mcp", "timeout_s": 20}}) as box:
            box.tools()
            threading.Timer(0.5, proc.kill).start()
            start = time.monotonic()
            with pytest.raises(McpDisconnectedError, match="web__slow: MCP server web closed the connection"):
                box.call("web__slow", {"seconds": 10})
            assert time.monotonic() - start < 5.0
            with pytest.raises(McpConnectError, match="cannot reach"):
                box.call("web__echo", {"text": "x"})
