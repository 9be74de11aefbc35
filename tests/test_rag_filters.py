import json

import apsw
import pytest

from fleetlm.rag.filters import FilterError, compile_filter

ROWS = {
    "a": {"team": "infra", "year": 2023, "public": True, "date": "2024-05-01"},
    "b": {"team": "ml", "year": 2024, "public": False, "date": "2024-06-30"},
    "c": {"team": "ml", "year": 2025.5},
    "d": {"year": "2024", "flag": 1},  # a string year and the number 1: neither is a number 2024 nor true
}


@pytest.fixture(scope="module")
def db():
    conn = apsw.Connection(":memory:")
    conn.execute("CREATE TABLE t(name TEXT, attributes TEXT)")
    for name, attrs in ROWS.items():
        conn.execute("INSERT INTO t VALUES (?, ?)", (name, json.dumps(attrs)))
    return conn


def matching(db, node) -> set[str]:
    sql, params = compile_filter(node, "attributes")
    return {r[0] for r in db.execute(f"SELECT name FROM t WHERE {sql}", params)}


def cmp(kind, key, value):
    return {"type": kind, "key": key, "value": value}


@pytest.mark.parametrize(
    "node, expected",
    [
        (cmp("eq", "team", "ml"), {"b", "c"}),
        (cmp("ne", "team", "ml"), {"a", "d"}),  # a file without the key matches ne
        (cmp("eq", "year", 2024), {"b"}),  # "2024" the string is not 2024 the number
        (cmp("gt", "year", 2023), {"b", "c"}),
        (cmp("gte", "year", 2023), {"a", "b", "c"}),
        (cmp("lt", "year", 2024), {"a"}),
        (cmp("lte", "date", "2024-05-31"), {"a"}),  # ISO dates compare as strings
        (cmp("eq", "public", True), {"a"}),
        (cmp("eq", "flag", True), set()),  # 1 is not true
        (cmp("ne", "public", True), {"b", "c", "d"}),
        (cmp("in", "team", ["infra", "ops"]), {"a"}),
        (cmp("nin", "team", ["infra"]), {"b", "c", "d"}),
        (cmp("in", "team", []), set()),
        ({"type": "and", "filters": [cmp("eq", "team", "ml"), cmp("gte", "year", 2025)]}, {"c"}),
        (
            {
                "type": "or",
                "filters": [
                    cmp("eq", "team", "infra"),
                    {"type": "and", "filters": [cmp("eq", "team", "ml"), cmp("eq", "public", False)]},
                ],
            },
            {"a", "b"},
        ),
    ],
)
def test_filters_select_the_right_rows(db, node, expected):
    assert matching(db, node) == expected


def test_values_travel_as_parameters_not_sql(db):
    sql, params = compile_filter(cmp("eq", "team", "x' OR 1=1 --"), "attributes")
    assert "OR 1=1" not in sql and params == ["x' OR 1=1 --"]
    assert matching(db, cmp("eq", "team", "x' OR 1=1 --")) == set()


@pytest.mark.parametrize(
    "node, path",
    [
        ("eq", "filters"),
        ({"type": "like", "key": "a", "value": 1}, "filters.type"),
        ({"type": "eq", "value": 1}, "filters.key"),
        ({"type": "eq", "key": 'a"b', "value": 1}, "filters.key"),
        ({"type": "eq", "key": "a"}, "filters.value"),
        ({"type": "eq", "key": "a", "value": {"x": 1}}, "filters.value"),
        ({"type": "in", "key": "a", "value": "x"}, "filters.value"),
        ({"type": "in", "key": "a", "value": ["x", None]}, "filters.value[1]"),
        ({"type": "gt", "key": "a", "value": True}, "filters.value"),
        ({"type": "and", "filters": []}, "filters.filters"),
        (
            {"type": "or", "filters": [cmp("eq", "a", 1), {"type": "eq", "key": "b", "value": [1]}]},
            "filters.filters[1].value",
        ),
        ({"type": "eq", "key": "a", "value": 1, "extra": 2}, "filters"),
        ({"type": "lt", "key": "a", "value": 2**64}, "filters.value"),
    ],
)
def test_bad_filters_name_the_bad_part(node, path):
    with pytest.raises(FilterError) as err:
        compile_filter(node, "attributes")
    assert err.value.param == path and path in str(err.value)


def test_nesting_is_bounded():
    node = cmp("eq", "a", 1)
    for _ in range(12):
        node = {"type": "and", "filters": [node]}
    with pytest.raises(FilterError, match="nest"):
        compile_filter(node, "attributes")
