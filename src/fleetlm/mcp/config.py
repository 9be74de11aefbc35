"""The `mcp_servers:` section of fleet.yaml: MCP servers by name: a stdio command or a streamable HTTP URL.

```yaml
mcp_servers:
  files:                      # its tools are named files__<tool>
    command: [npx, -y, "@modelcontextprotocol/server-filesystem", /srv/data]
    env: {LOG_LEVEL: warn}
  search:
    url: http://127.0.0.1:9000/mcp
    headers: {Authorization: "Bearer ${SEARCH_TOKEN}"}
    timeout_s: 60             # each tool call; connect_timeout_s (default: the same) bounds the start
```

Values of `env` and `headers` may name environment variables as `${NAME}`, so secrets stay out of the file;
they are read when the server is connected, and an unset one is a ConfigError.
"""

from __future__ import annotations

import os
import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from fleetlm.errors import ConfigError

# A server's name starts every tool name (`<server>__<tool>`), and those names must pass both OpenAI's rule
# (^[A-Za-z0-9_-]{1,64}$) and the agent's (a Python identifier: the code agent calls tools as functions). So a
# server name is an identifier without "__" (the split point back to the server), short enough to leave room.
SERVER_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9]*(?:_[A-Za-z0-9]+)*$")
MAX_SERVER_NAME = 24
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def check_server_name(name: str) -> str:
    if not SERVER_NAME.match(name) or len(name) > MAX_SERVER_NAME:
        raise ValueError(
            f"MCP server name {name!r} must be 1-{MAX_SERVER_NAME} letters, digits and single '_' (a letter "
            "first, no '_' last): it prefixes its tools' names as <server>__<tool>"
        )
    return name


ServerName = Annotated[str, AfterValidator(check_server_name)]


class McpServerSpec(BaseModel):
    """One MCP server: `command` (stdio: a subprocess we start) or `url` (streamable HTTP), not both."""

    # A typo in fleet.yaml should fail loudly, not be silently ignored.
    model_config = ConfigDict(extra="forbid")

    command: list[str] | None = Field(None, description="stdio: the program and its first arguments")
    args: list[str] = Field(default_factory=list, description="stdio: more arguments, after command's")
    env: dict[str, str] = Field(default_factory=dict, description="stdio: added to HOME, PATH, USER, ...")
    cwd: str | None = Field(None, description="stdio: working directory of the server")
    url: str | None = Field(None, description="streamable HTTP: the endpoint, e.g. http://host:8000/mcp")
    headers: dict[str, str] = Field(default_factory=dict,
                                    description="streamable HTTP: sent with each request")
    timeout_s: float = Field(30.0, gt=0, le=3600, description="seconds for each tool call (and to connect)")
    connect_timeout_s: float | None = Field(
        None, gt=0, le=3600,
        description="seconds to start or reach the server, hand-shake and list its tools; default timeout_s")

    @model_validator(mode="before")
    @classmethod
    def _command_may_be_a_string(cls, data: object) -> object:
        # `command: my-server` reads better in YAML than a one-item list; both mean the same.
        if isinstance(data, dict) and isinstance(data.get("command"), str):
            data = {**data, "command": [data["command"]]}
        return data

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of command (stdio) and url (streamable HTTP)")
        if self.command is not None:
            if not self.command or not self.command[0]:
                raise ValueError("command is empty: give the program to run")
            if self.headers:
                raise ValueError("headers are for a url server; a command server takes env")
        else:
            if not self.url or not self.url.startswith(("http://", "https://")):
                raise ValueError(f"url must be an http(s) URL, got {self.url!r}")
            if self.args or self.env or self.cwd:
                raise ValueError("args, env and cwd are for a command server, not a url one")
        return self

    @property
    def handshake_timeout_s(self) -> float:
        return self.connect_timeout_s if self.connect_timeout_s is not None else self.timeout_s

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"

    def argv(self) -> list[str]:
        assert self.command is not None, "argv() of a url server"
        return [*self.command, *self.args]

    def resolved_env(self) -> dict[str, str]:
        return {k: expand_env(v, f"env.{k}") for k, v in self.env.items()}

    def resolved_headers(self) -> dict[str, str]:
        return {k: expand_env(v, f"headers.{k}") for k, v in self.headers.items()}


McpServers = dict[ServerName, McpServerSpec]


def expand_env(value: str, where: str) -> str:
    """`value` with each `${NAME}` replaced by that environment variable; an unset one is a ConfigError."""

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"mcp_servers {where}: environment variable {name} is not set")
        return os.environ[name]

    return _ENV_REF.sub(sub, value)


def parse_servers(data: object, source: str = "mcp_servers") -> dict[str, McpServerSpec]:
    """Validate an `mcp_servers` mapping (name -> spec dict or McpServerSpec); a bad one is a ConfigError."""
    from pydantic import TypeAdapter, ValidationError

    if data is None:
        return {}
    try:
        return TypeAdapter(McpServers).validate_python(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"] if p != "[key]") or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: {where}: {msg}") from None


def load_servers(path: str | os.PathLike[str]) -> dict[str, McpServerSpec]:
    """The `mcp_servers` of a fleet.yaml (validated whole, as `fleet serve` would), or of a file holding only
    that section."""
    from pathlib import Path

    from fleetlm.config import load_config, read_config_yaml

    path = Path(path)
    data = read_config_yaml(path)
    if isinstance(data, dict) and "models" in data:
        return load_config(path).mcp_servers
    if not isinstance(data, dict) or set(data) - {"mcp_servers"}:
        raise ConfigError(f"{path}: expected a fleet.yaml, or a mapping with only an 'mcp_servers' section")
    return parse_servers(data.get("mcp_servers"), f"{path}: mcp_servers")
