"""fleetlm.agent.tools: the Tool dataclass, the `tool` decorator's schemas, the confined built-in tools."""

import json
import os
import shutil
from typing import Literal

import pytest

from fleetlm.agent.tools import (
    Tool,
    ToolArgumentError,
    ToolDefinitionError,
    ToolError,
    UnknownToolError,
    Workspace,
    builtin_tools,
    calculate,
    calculator_tool,
    file_tools,
    find_tool,
    python_tool,
    run_sql,
    sqlite_tool,
    tool,
)
from fleetlm.errors import FleetError


@tool
def book_flight(city: str, seats: int, cabin: Literal["economy", "business"] = "economy",
                note: str | None = None, tags: list[str] | None = None) -> dict:
    """Book a flight to a city.

    Args:
        city: where to fly
        seats: how many seats,
            at least one
        cabin: the cabin class
    Returns:
        the booking
    """
    return {"city": city, "seats": seats, "cabin": cabin, "note": note, "tags": tags}


# ---------------------------------------------------------------- the decorator and Tool


def test_decorator_builds_schema_from_hints_and_docstring():
    assert isinstance(book_flight, Tool) and book_flight.name == "book_flight"
    assert book_flight.description == "Book a flight to a city."
    p = book_flight.parameters
    assert p["type"] == "object" and p["required"] == ["city", "seats"] and p["additionalProperties"] is False
    assert p["properties"]["city"] == {"type": "string", "description": "where to fly"}
    assert p["properties"]["seats"] == {"type": "integer", "description": "how many seats, at least one"}
    assert p["properties"]["cabin"] == {"enum": ["economy", "business"], "type": "string",
                                        "description": "the cabin class", "default": "economy"}
    assert p["properties"]["tags"] == {"type": "array", "items": {"type": "string"}}
    spec = book_flight.openai_spec()
    assert spec == {"type": "function", "function": {
        "name": "book_flight", "description": "Book a flight to a city.", "parameters": p}}
    assert book_flight.signature() == ('book_flight(city: string, seats: integer, cabin: string = "economy", '
                                      'note: string = None, tags: array = None)')


def test_call_validates_and_returns_text():
    out = book_flight.call('{"city": "Oslo", "seats": 2, "note": null}')
    assert json.loads(out) == {"city": "Oslo", "seats": 2, "cabin": "economy", "note": None, "tags": None}
    assert json.loads(book_flight(city="Rome", seats=1, cabin="business"))["cabin"] == "business"


@pytest.mark.parametrize("arguments, words", [
    ('{"city": "Oslo"', "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"city": "Oslo"}', "'seats' is a required property"),
    ('{"city": "Oslo", "seats": "two"}', "at seats"),
    ('{"city": "Oslo", "seats": 1, "cabin": "first"}', "at cabin"),
    ('{"city": "Oslo", "seats": 1, "pets": 3}', "Additional properties"),
])
def test_malformed_arguments_are_typed_errors(arguments, words):
    with pytest.raises(ToolArgumentError, match=words):
        book_flight.call(arguments)


def test_a_raising_tool_becomes_a_tool_error():
    @tool
    def explode(x: int) -> str:
        """Always fails."""
        raise RuntimeError(f"boom {x}")

    with pytest.raises(ToolError, match="explode failed: RuntimeError: boom 3") as info:
        explode.call({"x": 3})
    assert isinstance(info.value, FleetError) and not isinstance(info.value, ToolArgumentError)


def test_long_results_are_truncated():
    @tool
    def big() -> str:
        """A lot of text."""
        return "x" * 20000

    out = big.call(None)
    assert len(out) < 9000 and out.endswith("more characters]")


@pytest.mark.parametrize("make, words", [
    (lambda: Tool("bad name", "d", {"type": "object"}, lambda: ""), "identifier"),
    (lambda: Tool("ok", "d", {"type": "array"}, lambda: ""), "type object"),
    (lambda: Tool("ok", "d", {"type": "object", "properties": {"a": {"type": "nope"}}}, lambda: ""),
     "invalid parameters schema"),
])
def test_bad_tool_definitions(make, words):
    with pytest.raises(ToolDefinitionError, match=words):
        make()


def test_decorator_refuses_untyped_and_undescribed_functions():
    def untyped(x):
        """Doc."""

    def undocumented(x: int) -> str:
        return ""

    def odd(x: set) -> str:
        """Doc."""

    with pytest.raises(ToolDefinitionError, match="no type hint"):
        tool(untyped)
    with pytest.raises(ToolDefinitionError, match="docstring"):
        tool(undocumented)
    with pytest.raises(ToolDefinitionError, match="has no JSON Schema"):
        tool(odd)
    assert tool(undocumented, description="given").description == "given"


def test_find_tool_names_the_choices():
    tools = [calculator_tool(), book_flight]
    assert find_tool(tools, "calculator").name == "calculator"
    with pytest.raises(UnknownToolError, match="book_flight, calculator"):
        find_tool(tools, "weather")


# ---------------------------------------------------------------- calculator


@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", "7"), ("(17 + 5) * 3 / 4", "16.5"), ("2**10", "1024"), ("7 // 2", "3"), ("-7 % 3", "2"),
    ("6 / 3", "2"), ("sqrt(16)", "4"), ("round(2.567, 2)", "2.57"), ("max(3, 9, 4)", "9"),
    ("0.1 + 0.2", "0.3"),
    ("10**20", "100000000000000000000"), ("2 * pi", "6.28318530718"),
])
def test_calculator_values(expression, value):
    assert calculate(expression) == value
    assert calculator_tool().call({"expression": expression}) == value


@pytest.mark.parametrize("expression, words", [
    ("__import__('os').system('true')", "not allowed"),
    ("open('/etc/passwd')", "not allowed"),
    ("(1).__class__", "not allowed"),
    ("[1, 2]", "not allowed"),
    ("x + 1", "not allowed"),
    ("1 / 0", "division by zero"),
    ("9**9**9", "too large"),
    ("2 ^ 3", "write \\*\\*"),
    ("1 +", "not an arithmetic expression"),
    ("sqrt(-1)", "cannot compute"),
    ("1+" * 300 + "1", "longer than"),
])
def test_calculator_refuses(expression, words):
    with pytest.raises(ToolError, match=words):
        calculate(expression)


# ---------------------------------------------------------------- files


def test_files_read_write_list_inside_the_workspace(tmp_path):
    read, write, listing = file_tools(tmp_path / "ws")
    assert write.call({"path": "notes/a.txt", "content": "hello"}) == "wrote 5 characters to notes/a.txt"
    assert read.call({"path": "notes/a.txt"}) == "hello"
    assert read.call({"path": "/notes/a.txt"}) == "hello"  # a leading / is the workspace's root
    assert listing.call({}) == "notes/\nnotes/a.txt (5 bytes)"
    assert listing.call({"path": "notes"}) == "notes/a.txt (5 bytes)"
    assert (tmp_path / "ws" / "notes" / "a.txt").read_text() == "hello"


def test_files_cannot_leave_the_workspace(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    ws = tmp_path / "ws"
    read, write, listing = file_tools(ws)
    os.symlink(secret, ws / "link.txt")
    os.symlink(tmp_path, ws / "up")
    escapes = ["../secret.txt", "a/../../secret.txt", "link.txt", "up/secret.txt", str(secret)]
    for path in escapes:
        with pytest.raises(ToolError):
            read.call({"path": path})
    with pytest.raises(ToolError, match="outside the workspace"):
        write.call({"path": "../evil.txt", "content": "x"})
    with pytest.raises(ToolError, match="outside the workspace"):
        listing.call({"path": "up"})
    assert not (tmp_path / "evil.txt").exists() and secret.read_text() == "top secret"
    with pytest.raises(ToolError, match="no file"):
        read.call({"path": "missing.txt"})
    with pytest.raises(ToolError, match="relative"):
        read.call({"path": " "})


# ---------------------------------------------------------------- sqlite


def test_sql_creates_inserts_and_selects(tmp_path):
    sql = sqlite_tool(tmp_path / "db.sqlite")
    assert sql.call({"query": "CREATE TABLE t (name TEXT, n INTEGER)"}).startswith("ok")
    assert sql.call({"query": "INSERT INTO t VALUES ('a', 1), ('b', 2)"}) == "ok (2 rows changed)"
    out = sql.call({"query": "SELECT name, n FROM t ORDER BY n"})
    assert out == 'columns: name, n\n["a", 1]\n["b", 2]\n(2 rows)'
    assert "table_info" in run_sql.__globals__["_ALLOWED_PRAGMAS"]
    assert '"name"' in sql.call({"query": "PRAGMA table_info(t)"})


def test_sql_refuses_other_files_and_bad_sql(tmp_path):
    sql = sqlite_tool(tmp_path / "db.sqlite")
    other = tmp_path / "other.db"
    for statement in [f"ATTACH DATABASE '{other}' AS o", f"VACUUM INTO '{other}'",
                      "PRAGMA writable_schema = 1"]:
        with pytest.raises(ToolError, match="not authorized|authorization denied"):
            sql.call({"query": statement})
    assert not other.exists()
    with pytest.raises(ToolError, match="SQL error"):
        sql.call({"query": "SELEC 1"})
    with pytest.raises(ToolError, match="SQL error"):
        sql.call({"query": "SELECT 1; SELECT 2"})


def test_a_wrong_name_gets_the_schema_back(tmp_path):
    sql = sqlite_tool(tmp_path / "db.sqlite")
    sql.call({"query": "CREATE TABLE employees (name TEXT, dept TEXT, salary INTEGER)"})
    with pytest.raises(ToolError, match=r"no such column: department; the tables are: "
                                        r"employees\(name TEXT, dept TEXT, salary INTEGER\)$"):
        sql.call({"query": "SELECT department FROM employees"})
    with pytest.raises(ToolError, match=r"no such table: staff; the tables are: employees\("):
        sql.call({"query": "SELECT * FROM staff"})


def test_sql_stops_a_runaway_query(tmp_path):
    endless = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    with pytest.raises(ToolError, match="longer than 0.2 s"):
        run_sql(tmp_path / "db.sqlite", endless, seconds=0.2)


def test_sql_caps_rows(tmp_path):
    db = tmp_path / "db.sqlite"
    out = run_sql(db, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c LIMIT 80) "
                      "SELECT x FROM c")
    assert out.count("\n") == 51 and out.endswith("(more than 50 rows)")


# ---------------------------------------------------------------- built-ins and python


def test_builtin_tools_by_group(tmp_path):
    names = [t.name for t in builtin_tools(["calculator", "files", "sqlite"], tmp_path)]
    assert names == ["calculator", "read_file", "write_file", "list_files", "sql"]
    with pytest.raises(ToolDefinitionError, match="choose from"):
        builtin_tools(["weather"], tmp_path)
    with pytest.raises(ToolDefinitionError, match="need a workspace"):
        builtin_tools(["files"])
    assert Workspace(tmp_path).path(".") == tmp_path.resolve()


@pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed")
def test_python_tool_runs_in_the_sandbox():
    py = python_tool(timeout_s=10)
    assert py.call({"code": "print(sum(range(10)))"}).strip() == "45"
    assert "no output" in py.call({"code": "x = 1"})
    # The host's files are not there: the repository (and this test file) is invisible inside.
    with pytest.raises(ToolError, match="FileNotFoundError"):
        py.call({"code": f"open({__file__!r}).read()"})
    with pytest.raises(ToolError, match="failed"):
        py.call({"code": "raise SystemExit(3)"})
