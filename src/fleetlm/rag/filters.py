"""OpenAI's attribute filters (comparison eq ne gt gte lt lte in nin; compound and/or), compiled to SQL.

A filter is checked whole before any SQL is made, and a bad part is named by its path (for example
`filters.filters[1].value`), so the API can answer 400 saying which part is wrong. The SQL reads the
attributes, a JSON object in a TEXT column, with SQLite's json_extract; values travel as parameters, never
in the SQL text. Semantics, written down because OpenAI's docs leave them open: a file without the key
matches `ne` and `nin` and nothing else; `gt`/`gte`/`lt`/`lte` compare numbers with numbers and strings with
strings (ISO dates compare as strings), never across types; booleans equal only booleans.
"""

from __future__ import annotations

from typing import Any

from fleetlm.errors import FleetError

COMPARISONS = {"eq": "=", "ne": "IS NOT", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
LISTS = {"in", "nin"}
COMPOUNDS = {"and": " AND ", "or": " OR "}
MAX_DEPTH = 8
MAX_KEY_CHARS = 64
MAX_LIST = 100


class FilterError(FleetError):
    """A filter OpenAI's grammar refuses; `param` is the path of the bad part."""

    def __init__(self, message: str, param: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def compile_filter(node: Any, column: str, path: str = "filters") -> tuple[str, list]:
    """(SQL condition, parameters) for a filter over the JSON attributes in `column`."""
    return _compile(node, column, path, 0)


def _compile(node: Any, column: str, path: str, depth: int) -> tuple[str, list]:
    if depth > MAX_DEPTH:
        raise FilterError(f"filters nest at most {MAX_DEPTH} deep", path)
    if not isinstance(node, dict):
        raise FilterError("a filter must be an object with a `type`", path)
    kind = node.get("type")
    if kind in COMPOUNDS:
        return _compound(node, column, path, depth)
    if kind in COMPARISONS or kind in LISTS:
        return _comparison(node, column, path)
    known = ", ".join([*COMPARISONS, *LISTS, *COMPOUNDS])
    raise FilterError(f"unknown filter type {kind!r} (one of {known})", f"{path}.type")


def _compound(node: dict, column: str, path: str, depth: int) -> tuple[str, list]:
    extra = set(node) - {"type", "filters"}
    if extra:
        raise FilterError(f"unknown fields {sorted(extra)} in a compound filter", path)
    parts = node.get("filters")
    if not isinstance(parts, list) or not parts:
        raise FilterError("a compound filter needs a non-empty `filters` list", f"{path}.filters")
    sqls, params = [], []
    for i, part in enumerate(parts):
        sql, ps = _compile(part, column, f"{path}.filters[{i}]", depth + 1)
        sqls.append(f"({sql})")
        params.extend(ps)
    return COMPOUNDS[node["type"]].join(sqls), params


def _scalar(value: Any, path: str) -> Any:
    if isinstance(value, bool):
        return int(value)  # json_extract gives JSON true/false as 1/0
    if isinstance(value, int) and not -(2**63) <= value < 2**63:
        raise FilterError("an integer must fit in 64 bits", path)  # SQLite's integers do
    if isinstance(value, (int, float, str)):
        return value
    raise FilterError(f"a value must be a string, number or boolean, not {type(value).__name__}", path)


def _comparison(node: dict, column: str, path: str) -> tuple[str, list]:
    extra = set(node) - {"type", "key", "value"}
    if extra:
        raise FilterError(f"unknown fields {sorted(extra)} in a comparison filter", path)
    key, kind = node.get("key"), node["type"]
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS or '"' in key or "\\" in key:
        raise FilterError(
            f"`key` must be an attribute name of 1 to {MAX_KEY_CHARS} characters without quotes",
            f"{path}.key",
        )
    if "value" not in node:
        raise FilterError("a comparison filter needs a `value`", f"{path}.value")
    value = node["value"]
    attr = f"json_extract({column}, '$.\"{key}\"')"
    kind_of = f"json_type({column}, '$.\"{key}\"')"
    if kind in LISTS:
        if not isinstance(value, list) or len(value) > MAX_LIST:
            raise FilterError(f"`{kind}` needs a list of at most {MAX_LIST} values", f"{path}.value")
        items = [_scalar(v, f"{path}.value[{i}]") for i, v in enumerate(value)]
        if not items:
            return ("0", []) if kind == "in" else ("1", [])
        marks = ", ".join("?" * len(items))
        if kind == "in":
            return f"{attr} IN ({marks})", items
        return f"({attr} IS NULL OR {attr} NOT IN ({marks}))", items
    scalar = _scalar(value, f"{path}.value")
    if kind in ("eq", "ne"):
        # a boolean must equal a JSON boolean, not the number 1 (json_type tells them apart)
        if isinstance(value, bool):
            typed = f"({kind_of} IN ('true', 'false') AND {attr} = ?)"
            return (typed, [scalar]) if kind == "eq" else (f"NOT COALESCE({typed}, 0)", [scalar])
        if kind == "eq":
            return f"({kind_of} NOT IN ('true', 'false') AND {attr} = ?)", [scalar]
        return f"NOT COALESCE(({kind_of} NOT IN ('true', 'false') AND {attr} = ?), 0)", [scalar]
    if isinstance(value, bool):
        raise FilterError(f"`{kind}` compares numbers or strings, not booleans", f"{path}.value")
    types = "('integer', 'real')" if isinstance(value, (int, float)) else "('text')"
    return f"({kind_of} IN {types} AND {attr} {COMPARISONS[kind]} ?)", [scalar]
