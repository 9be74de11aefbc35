"""The MCP error families: about one call (shown to the model) or about the server; all are FleetErrors."""

from __future__ import annotations

import pytest

from fleetlm.errors import FleetError
from fleetlm.mcp import errors


@pytest.mark.parametrize("cls", [errors.McpToolError, errors.McpUnknownToolError, errors.McpArgumentsError])
def test_call_errors_are_tool_errors(cls):
    assert issubclass(cls, errors.McpToolError) and issubclass(cls, FleetError)


@pytest.mark.parametrize("cls", [errors.McpConnectError, errors.McpDisconnectedError, errors.McpTimeoutError])
def test_server_errors_are_not_tool_errors(cls):
    assert issubclass(cls, errors.McpError) and issubclass(cls, FleetError)
    assert not issubclass(cls, errors.McpToolError)


def test_the_message_is_the_whole_text():
    assert str(errors.McpToolError("division by zero")) == "division by zero"
