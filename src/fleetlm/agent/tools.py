"""Tools an agent can call: `Tool`, the `tool` decorator (typed function -> JSON Schema), built-in tools.

A `Tool` is a name, a description, a JSON Schema object for its arguments and a `run` callable that returns
text. `Tool.call` is how the agent runs one: it parses and validates the model's arguments and turns every
failure into a `ToolError`, which the loop shows to the model as an observation instead of crashing.

The built-in tools are confined: `calculator` evaluates arithmetic with `ast` (no eval), the file tools see
one workspace folder only, `sql` runs one statement on one SQLite file with ATTACH and file-writing statements
refused, and `python` runs code in the bubblewrap sandbox (fleetlm.sandbox), never on the host.
"""

from __future__ import annotations

import ast
import inspect
import json
import math
import operator
import re
import sqlite3
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import jsonschema

from fleetlm.errors import FleetError

MAX_RESULT_CHARS = 8000  # a tool's answer goes back into the model's context: keep it bounded
NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")  # a Python identifier, so the code agent can call it


class ToolError(FleetError):
    """A tool call that failed: the tool raised, or the call was malformed. The model sees the message."""


class ToolArgumentError(ToolError):
    """The model's arguments are not a JSON object or do not match the tool's schema."""


class UnknownToolError(ToolError):
    """The model called a tool the agent does not have."""


class ToolDefinitionError(FleetError):
    """A tool that cannot be described (an untyped parameter, a bad name) or an unknown built-in tool."""


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON Schema object: {"type": "object", "properties": ..., "required": [...]}
    run: Callable[..., str]
    meta: dict = field(default_factory=dict)  # free-form (e.g. where an MCP tool came from); not sent

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name):
            raise ToolDefinitionError(f"tool name {self.name!r} must be an identifier of at most 64 chars")
        if self.parameters.get("type") != "object":
            raise ToolDefinitionError(f"tool {self.name}: parameters must be a JSON Schema of type object")
        try:
            jsonschema.validators.validator_for(self.parameters).check_schema(self.parameters)
        except jsonschema.SchemaError as exc:
            raise ToolDefinitionError(f"tool {self.name}: invalid parameters schema: {exc.message}") from exc

    def openai_spec(self) -> dict:
        """The tool as the `tools` entry of an OpenAI chat request."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}

    @property
    def required(self) -> list[str]:
        return list(self.parameters.get("required", []))

    @property
    def parameter_names(self) -> list[str]:
        return list(self.parameters.get("properties", {}))

    def signature(self) -> str:
        """A Python-like signature for prompts: `read_file(path: string)`."""
        props = self.parameters.get("properties", {})
        parts = []
        for name, schema in props.items():
            schema = schema if isinstance(schema, dict) else {}
            part = f"{name}: {schema.get('type', 'any')}"
            if name not in self.required:
                part += f" = {json.dumps(schema['default']) if 'default' in schema else 'None'}"
            parts.append(part)
        return f"{self.name}({', '.join(parts)})"

    def parse_arguments(self, arguments: str | dict | None) -> dict:
        """The model's arguments as a dict that matches the schema, or a ToolArgumentError saying why not."""
        if arguments is None or arguments == "":
            args: Any = {}
        elif isinstance(arguments, str):
            try:
                args = json.loads(arguments)
            except json.JSONDecodeError as exc:
                raise ToolArgumentError(f"arguments of {self.name} are not valid JSON: {exc.msg} "
                                        f"(at character {exc.pos})") from exc
        else:
            args = arguments
        if not isinstance(args, dict):
            raise ToolArgumentError(f"arguments of {self.name} must be a JSON object, "
                                    f"got {type(args).__name__}")
        # Models often send null for an optional argument they mean to leave out: leave it out.
        args = {k: v for k, v in args.items() if v is not None or k in self.required}
        try:
            jsonschema.validate(args, self.parameters)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            raise ToolArgumentError(f"arguments of {self.name} do not match its schema"
                                    f"{f' at {where}' if where else ''}: {exc.message}") from exc
        return args

    def call(self, arguments: str | dict | None = None) -> str:
        """Validate the arguments and run the tool; any failure is a ToolError (never another exception)."""
        args = self.parse_arguments(arguments)
        try:
            result = self.run(**args)
        except ToolError:
            raise
        except Exception as exc:  # the tool's own bug or refusal: the model reads it and may try otherwise
            raise ToolError(f"{self.name} failed: {type(exc).__name__}: {exc}") from exc
        return to_text(result)

    def __call__(self, **kwargs: Any) -> str:
        return self.call(kwargs)


def to_text(value: Any, limit: int = MAX_RESULT_CHARS) -> str:
    """A tool's result as bounded text (non-strings as JSON when they can be)."""
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = str(value)
    if len(text) > limit:
        text = text[:limit] + f"\n[truncated: {len(text) - limit} more characters]"
    return text


def find_tool(tools: Iterable[Tool], name: str) -> Tool:
    by_name = {t.name: t for t in tools}
    if name not in by_name:
        raise UnknownToolError(f"there is no tool named {name!r}; the tools are: "
                               f"{', '.join(sorted(by_name))}")
    return by_name[name]


# ---------------------------------------------------------------- the decorator

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema_of(annotation: Any, where: str) -> tuple[dict, bool]:
    """(JSON Schema of a type hint, whether None is allowed)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}, False
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _schema_of(rest[0], where)[0], len(rest) < len(args)
        return {"anyOf": [_schema_of(a, where)[0] for a in rest]}, len(rest) < len(args)
    if origin is Literal:
        kinds = {_SCALARS.get(type(a)) for a in args}
        schema: dict = {"enum": list(args)}
        if len(kinds) == 1 and None not in kinds:
            schema["type"] = kinds.pop()
        return schema, False
    if annotation is list or origin is list:
        items = {"items": _schema_of(args[0], where)[0]} if args else {}
        return {"type": "array", **items}, False
    if annotation is dict or origin is dict:
        return {"type": "object"}, False
    raise ToolDefinitionError(f"{where}: type {annotation!r} has no JSON Schema here "
                              f"(use str, int, float, bool, list[...], dict, Literal[...] or X | None)")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from a docstring with an optional Google-style Args:."""
    lines = doc.splitlines()
    head, params, current = [], {}, None
    in_args = False
    for line in lines:
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if in_args and stripped in ("Returns:", "Raises:", "Examples:"):
            in_args = False
            current = None
            continue
        if in_args:
            m = re.match(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", stripped)
            if m:
                current = m.group(1)
                params[current] = m.group(2)
            elif current and stripped:
                params[current] += " " + stripped
        elif not params:
            head.append(line)
    return "\n".join(head).strip(), params


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None):
    """Build a Tool from a typed function: its docstring is the description, its type hints the schema.

    Use as `@tool` or `@tool(name="other_name")`. Every parameter needs a type hint; a parameter with a
    default (or typed `X | None`) is optional.
    """
    def build(func: Callable) -> Tool:
        tool_name = name or func.__name__
        try:
            hints = typing.get_type_hints(func)
        except Exception as exc:
            raise ToolDefinitionError(f"tool {tool_name}: cannot read its type hints: {exc}") from exc
        summary, docs = _parse_docstring(inspect.getdoc(func) or "")
        properties, required = {}, []
        for pname, param in inspect.signature(func).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                raise ToolDefinitionError(f"tool {tool_name}: *args/**kwargs cannot be described")
            if pname not in hints:
                raise ToolDefinitionError(f"tool {tool_name}: parameter {pname!r} has no type hint")
            schema, nullable = _schema_of(hints[pname], f"tool {tool_name}, parameter {pname}")
            if pname in docs:
                schema["description"] = docs[pname]
            if param.default is not param.empty:
                if param.default is not None:
                    schema["default"] = param.default
            elif not nullable:
                required.append(pname)
            properties[pname] = schema
        parameters = {"type": "object", "properties": properties, "required": required,
                      "additionalProperties": False}
        desc = description or summary
        if not desc:
            raise ToolDefinitionError(f"tool {tool_name}: give it a docstring or a description")
        return Tool(tool_name, desc, parameters, func)

    return build(fn) if fn is not None else build


# ---------------------------------------------------------------- calculator

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS: dict[str, Callable] = {"abs": abs, "round": round, "min": min, "max": max, "sqrt": math.sqrt,
                                   "floor": math.floor, "ceil": math.ceil, "log": math.log, "exp": math.exp}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPRESSION_CHARS = 500
MAX_INT_BITS = 4096  # bounds the work: 9**9**9 would otherwise run for minutes


def _check_size(value: Any) -> Any:
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ToolError(f"result too large (over {MAX_INT_BITS} bits)")
    return value


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in _CONSTANTS:
        return _CONSTANTS[node.id]
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(left) > 1 and \
                abs(right) * math.log2(abs(left)) > MAX_INT_BITS:
            raise ToolError(f"result too large (over {MAX_INT_BITS} bits)")
        return _check_size(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitXor):
        raise ToolError("^ is not a power here: write ** (2**10)")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCTIONS \
            and not node.keywords:
        return _check_size(_FUNCTIONS[node.func.id](*[_evaluate(a) for a in node.args]))
    allowed = "numbers, + - * / // % **, parentheses, pi, e and " + ", ".join(_FUNCTIONS)
    raise ToolError(f"not allowed in an arithmetic expression: {ast.unparse(node)[:60]!r} "
                    f"(allowed: {allowed})")


def format_number(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return format(value, ".12g") if isinstance(value, float) else str(value)


def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression safely: numbers, operators and a few math functions, nothing else."""
    expression = expression.strip()
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        raise ToolError(f"not an arithmetic expression: {exc.msg}") from exc
    try:
        return format_number(_evaluate(tree))
    except ZeroDivisionError as exc:
        raise ToolError("division by zero") from exc
    except (OverflowError, ValueError, TypeError) as exc:
        raise ToolError(f"cannot compute it: {exc}") from exc


def calculator_tool() -> Tool:
    @tool(name="calculator")
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression exactly and return the number.

        Args:
            expression: e.g. "(17 + 5) * 3 / 4", "2**10", "sqrt(2)"; operators + - * / // % ** and abs,
                round, min, max, sqrt, floor, ceil, log, exp, pi, e.
        """
        return calculate(expression)

    return calculator


# ---------------------------------------------------------------- files in a workspace

MAX_READ_CHARS = 64 * 1024
MAX_WRITE_CHARS = 1024 * 1024
MAX_FILES = 1000
MAX_LISTED = 200


class Workspace:
    """A private folder; every path a tool is given is resolved inside it (symlinks included) or refused."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, relative: str) -> Path:
        if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
            raise ToolError("give a file path relative to the workspace, e.g. notes/todo.txt")
        # A leading / means the workspace's root to a model; it can never mean the host's.
        candidate = (self.root / relative.strip().lstrip("/")).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise ToolError(f"{relative!r} is outside the workspace")
        return candidate

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix() or "."

    def read(self, path: str) -> str:
        p = self.path(path)
        if not p.is_file():
            folder = " (it is a folder)" if p.is_dir() else ""
            raise ToolError(f"no file {path!r} in the workspace{folder}")
        with p.open("r", encoding="utf-8", errors="replace") as f:
            text = f.read(MAX_READ_CHARS + 1)
        return text if len(text) <= MAX_READ_CHARS else text[:MAX_READ_CHARS] + "\n[truncated]"

    def write(self, path: str, content: str) -> str:
        if len(content) > MAX_WRITE_CHARS:
            raise ToolError(f"content longer than {MAX_WRITE_CHARS} characters")
        p = self.path(path)
        if p == self.root or p.is_dir():
            raise ToolError(f"{path!r} is a folder")
        if not p.exists() and sum(1 for _ in self.root.rglob("*")) >= MAX_FILES:
            raise ToolError(f"the workspace already holds {MAX_FILES} entries")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(content, encoding="utf-8")
        return f"wrote {len(content)} characters to {self.relative(p)}"

    def list(self, path: str = ".") -> str:
        p = self.path(path)
        if not p.is_dir():
            raise ToolError(f"no folder {path!r} in the workspace")
        entries = sorted(p.rglob("*"))
        lines = [f"{self.relative(e)}/" if e.is_dir() else f"{self.relative(e)} ({e.stat().st_size} bytes)"
                 for e in entries[:MAX_LISTED]]
        if len(entries) > MAX_LISTED:
            lines.append(f"[{len(entries) - MAX_LISTED} more entries]")
        return "\n".join(lines) if lines else "(empty)"


def file_tools(workspace: Workspace | str | Path) -> list[Tool]:
    ws = workspace if isinstance(workspace, Workspace) else Workspace(workspace)

    @tool
    def read_file(path: str) -> str:
        """Read a text file from the workspace.

        Args:
            path: the file's path relative to the workspace, e.g. data/report.txt
        """
        return ws.read(path)

    @tool
    def write_file(path: str, content: str) -> str:
        """Write (create or replace) a text file in the workspace; folders are created as needed.

        Args:
            path: the file's path relative to the workspace
            content: the whole new text of the file
        """
        return ws.write(path, content)

    @tool
    def list_files(path: str = ".") -> str:
        """List the files and folders in the workspace (recursively), with their sizes.

        Args:
            path: a folder relative to the workspace (default: the workspace itself)
        """
        return ws.list(path)

    return [read_file, write_file, list_files]


# ---------------------------------------------------------------- SQLite

MAX_ROWS = 50
SQL_SECONDS = 5.0
_ALLOWED_PRAGMAS = {"table_info", "table_list", "index_list", "index_info", "foreign_key_list"}


def _authorizer(action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
    # ATTACH (and VACUUM INTO, which attaches its target) would read or write files outside the workspace;
    # pragmas can change how the file is written (writable_schema, journal_mode): only the read-only ones.
    if action in (sqlite3.SQLITE_ATTACH, sqlite3.SQLITE_DETACH):
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() not in _ALLOWED_PRAGMAS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _schema(conn: sqlite3.Connection) -> str:
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        tables = [r[0] for r in rows]
        parts = []
        for t in tables[:20]:
            cols = [f"{c[1]} {c[2]}".strip() for c in conn.execute(f"PRAGMA table_info({json.dumps(t)})")]
            parts.append(f"{t}({', '.join(cols)})")
    except sqlite3.Error:
        return "(unreadable)"
    return "; ".join(parts) or "(none)"


def run_sql(db_path: str | Path, statement: str, *, max_rows: int = MAX_ROWS,
            seconds: float = SQL_SECONDS) -> str:
    """Run one SQL statement; rows come back as JSON lines under a `columns:` line, changes are committed."""
    if not statement.strip():
        raise ToolError("give one SQL statement")
    conn = sqlite3.connect(str(db_path), timeout=seconds)
    try:
        conn.set_authorizer(_authorizer)
        deadline = time.monotonic() + seconds
        # Returning True aborts the statement: a runaway recursive query stops at the deadline.
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        try:
            cur = conn.execute(statement)
            if cur.description is None:
                conn.commit()
                return f"ok ({cur.rowcount if cur.rowcount >= 0 else 0} rows changed)"
            rows = cur.fetchmany(max_rows + 1)
        except sqlite3.Error as exc:
            if time.monotonic() > deadline:
                raise ToolError(f"the statement ran longer than {seconds:g} s and was stopped") from exc
            # A model that guessed a name wrong needs the real ones to try again (it cannot see the file).
            unknown = re.search(r"no such (column|table)", str(exc))
            hint = f"; the tables are: {_schema(conn)}" if unknown else ""
            raise ToolError(f"SQL error: {exc}{hint}") from exc
        columns = [d[0] for d in cur.description]
        lines = ["columns: " + ", ".join(columns)]
        lines += [json.dumps(list(r), ensure_ascii=False, default=str) for r in rows[:max_rows]]
        lines.append(f"({len(rows) if len(rows) <= max_rows else f'more than {max_rows}'} rows)")
        return "\n".join(lines)
    finally:
        conn.close()


def sqlite_tool(db_path: str | Path) -> Tool:
    path = Path(db_path)

    @tool(name="sql")
    def sql(query: str) -> str:
        """Run one SQL statement on the SQLite database and return its rows (or how many rows changed).

        Args:
            query: one SQLite statement, e.g. SELECT name FROM sqlite_master WHERE type='table'
        """
        return run_sql(path, query)

    return sql


# ---------------------------------------------------------------- python in the sandbox


def python_tool(timeout_s: float = 10.0, memory_mb: int = 256) -> Tool:
    """Python in the bubblewrap sandbox (no network, no host files); SandboxError if it cannot run here."""
    from fleetlm.sandbox import check_sandbox, run_python

    check_sandbox()  # fail when the agent is built, not on a call: a missing sandbox is not the model's fault

    @tool(name="python")
    def python(code: str) -> str:
        """Run a Python program in an isolated sandbox (no network, no host files) and return its output.

        Args:
            code: a complete Python program; print what you want to see
        """
        result = run_python(code, timeout_s=timeout_s, memory_mb=memory_mb)
        if not result.passed:
            tail = "\n".join(result.stderr.strip().splitlines()[-8:])
            raise ToolError(f"the program failed ({result.reason})\nstdout:\n{result.stdout[-2000:]}\n"
                            f"stderr:\n{tail}")
        return result.stdout if result.stdout.strip() else "(no output; print what you want to see)"

    return python


BUILTIN_TOOLS = ("calculator", "files", "sqlite", "python")


def builtin_tools(names: Iterable[str], workspace: Workspace | str | Path | None = None,
                  db_path: str | Path | None = None) -> list[Tool]:
    """The named built-in tools (calculator, files, sqlite, python); files and sqlite need a workspace."""
    tools: list[Tool] = []
    ws = workspace if workspace is None or isinstance(workspace, Workspace) else Workspace(workspace)
    for name in names:
        if name == "calculator":
            tools.append(calculator_tool())
        elif name in ("files", "sqlite"):
            if ws is None:
                raise ToolDefinitionError(f"the {name} tools need a workspace folder")
            tools += file_tools(ws) if name == "files" else [sqlite_tool(db_path or ws.root / "data.sqlite")]
        elif name == "python":
            tools.append(python_tool())
        else:
            raise ToolDefinitionError(f"unknown built-in tool {name!r}; choose from "
                                      f"{', '.join(BUILTIN_TOOLS)}")
    return tools
