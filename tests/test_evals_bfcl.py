import json
import re

import pytest
import typer
from typer.testing import CliRunner

pytest.importorskip("bfcl_eval", reason="needs bfcl-eval's data: pip install --no-deps bfcl-eval==2026.3.23")

from fake_openai import UpstreamServer  # noqa: E402
from fleetlm.errors import FleetError  # noqa: E402
from fleetlm.evals import bfcl  # noqa: E402
from fleetlm.evals.commands import register  # noqa: E402

SIZES = {"simple": 400, "multiple": 200, "parallel": 200, "parallel_multiple": 200, "irrelevance": 240,
         "live_simple": 258, "live_multiple": 1053}


@pytest.fixture(scope="module")
def items():
    """Every item of the default seven categories, by its BFCL id."""
    return {it.id.removeprefix("bfcl/"): it for c in bfcl.DEFAULT_CATEGORIES for it in bfcl.load(c)}


def call(name, **args):
    """A chat completion message with one tool call, as an OpenAI endpoint sends it."""
    return calls((name, args))


def calls(*pairs):
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"c{i}", "type": "function", "function": {"name": n, "arguments": json.dumps(a)}}
        for i, (n, a) in enumerate(pairs)]}


def scored(item, message):
    outcome = bfcl.read_reply(message, item)
    value, why = bfcl.score(item, outcome)
    return value, why, outcome.kind


# ------------------------------------------------------------------------------------------------ loading


def test_every_default_category_loads_with_its_answers(items):
    assert list(bfcl.DEFAULT_CATEGORIES) == list(SIZES)
    for category, size in SIZES.items():
        got = [it for it in items.values() if it.domain == category]
        assert len(got) == size, category
        first = got[0]
        assert first.messages and first.messages[-1]["role"] == "user" and first.prompt
        assert first.data["tools"] and len(first.data["tools"]) == len(first.data["functions"])
        if category != "irrelevance":
            assert isinstance(first.data["answer"], list) and first.data["answer"]
    assert items["simple_python_0"].prompt.startswith("Find the area of a triangle")
    for extra in ("live_parallel", "live_parallel_multiple", "live_irrelevance", "live_relevance"):
        assert bfcl.load(extra), extra


def test_tools_are_valid_openai_tools(items):
    from jsonschema import Draft202012Validator

    name_rule = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
    schemas = {}
    for it in items.values():
        for tool, fn in zip(it.data["tools"], it.data["functions"], strict=True):
            assert tool["type"] == "function"
            name = tool["function"]["name"]
            assert name_rule.match(name) and it.data["names"][name] == fn["name"]
            params = tool["function"]["parameters"]
            assert params["type"] == "object" and isinstance(params["properties"], dict)
            schemas[json.dumps(params, sort_keys=True)] = params
    for params in schemas.values():
        Draft202012Validator.check_schema(params)  # raises SchemaError on an invalid schema
    types = set()

    def walk(schema):
        assert "optional" not in schema  # BFCL's own keyword, not JSON Schema's
        types.add(schema.get("type"))
        for sub in (schema.get("properties") or {}).values():
            walk(sub)
        if schema.get("items"):
            walk(schema["items"])

    for params in schemas.values():
        walk(params)
    assert types <= {"object", "string", "integer", "number", "boolean", "array"}, types


def test_bfcl_types_become_json_schema():
    schema = bfcl.to_schema({"type": "dict", "properties": {
        "x": {"type": "float", "description": "a float", "default": 0.0},
        "pt": {"type": "tuple", "items": {"type": "float"}},
        "tags": {"type": "array", "items": {"type": "string"}, "enum": ["a", "b"]},
        "n": {"type": "integer", "enum": ["1", "2"], "default": ""},
        "v": {"type": "any", "optional": True}}, "required": ["x", "ghost"]})
    assert schema == {"type": "object", "required": ["x"], "properties": {
        "x": {"type": "number", "description": "a float", "default": 0.0},
        "pt": {"type": "array", "items": {"type": "number"}},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}},
        "n": {"type": "integer"},
        "v": {"type": "string"}}}
    tools, names = bfcl.to_tools([{"name": "math.factorial", "description": "n!", "parameters": {
        "type": "dict", "properties": {"number": {"type": "integer"}}, "required": ["number"]}}])
    assert tools[0]["function"]["name"] == "math_factorial" and names == {"math_factorial": "math.factorial"}


def test_categories_parse_and_bad_ones_are_clear_errors():
    assert bfcl.parse_categories(None) == list(bfcl.DEFAULT_CATEGORIES)
    assert bfcl.parse_categories("parallel, simple_python,parallel") == ["parallel", "simple"]
    assert bfcl.parse_categories("all") == list(bfcl.CATEGORIES)
    with pytest.raises(FleetError, match="unknown BFCL category 'sql'"):
        bfcl.parse_categories("simple,sql")


# ------------------------------------------------------------------------------------------------ matching


def test_simple_correct_call_passes_and_each_kind_of_mistake_fails(items):
    it = items["simple_python_0"]  # calculate_triangle_area(base=10, height=5, unit in ["units", ""])
    assert scored(it, call("calculate_triangle_area", base=10, height=5)) == (1.0, "matched", "call")
    assert scored(it, call("calculate_triangle_area", base=10, height=5, unit="Units"))[0] == 1.0
    value, why, kind = scored(it, call("calculate_triangle_area", base=11, height=5))
    assert value == 0.0 and kind == "call" and "base: 11 is not one of [10]" in why
    value, why, _ = scored(it, call("calculate_triangle_area", base=10))
    assert value == 0.0 and "missing required parameter height" in why
    value, why, kind = scored(it, call("calculate_triangle_area", base=10, height=5, color="red"))
    assert value == 0.0 and kind == "call" and "unexpected parameter color" in why
    value, why, kind = scored(it, call("calculate_circle_area", radius=10))
    assert value == 0.0 and kind == "malformed" and "wrong function" in why
    value, why, _ = scored(it, call("calculate_triangle_area", base="10", height=5))
    assert value == 0.0 and "expected integer, got str" in why
    value, why, _ = scored(it, calls(("calculate_triangle_area", {"base": 10, "height": 5}),
                                     ("calculate_triangle_area", {"base": 10, "height": 5})))
    assert value == 0.0 and "2 call(s), expected 1" in why


def test_dotted_names_are_mapped_back(items):
    it = items["simple_python_1"]  # math.factorial(number=5), sent as math_factorial
    assert [t["function"]["name"] for t in it.data["tools"]] == ["math_factorial"]
    outcome = bfcl.read_reply(call("math_factorial", number=5), it)
    assert outcome.calls == [("math.factorial", {"number": 5})] and bfcl.score(it, outcome)[0] == 1.0
    assert json.loads(outcome.record()) == [{"name": "math.factorial", "arguments": {"number": 5}}]


def test_bfcl_type_rules(items):
    # height int [150], initial_velocity int [0, ""], gravity float [9.81, ""]
    velocity = items["simple_python_25"]
    assert scored(velocity, call("calculate_final_velocity", height=150, gravity=9.81))[0] == 1.0
    assert scored(velocity, call("calculate_final_velocity", height=150.0))[0] == 0.0  # a float is no int
    primes = items["simple_python_17"]  # number int [450], formatted bool [True, ""]
    assert scored(primes, call("get_prime_factors", number=450, formatted=True))[0] == 1.0
    assert scored(primes, call("get_prime_factors", number=450, formatted=1))[0] == 0.0  # 1 is no bool
    area = items["simple_python_13"]  # interval: array of float [[1.0, 3.0]]
    assert scored(area, call("calculate_area_under_curve", function="x**2", interval=[1, 3]))[0] == 1.0
    assert scored(area, call("calculate_area_under_curve", function="lambda x: x**2", interval=[1.0, 3.0],
                             method="Trapezoidal"))[0] == 1.0
    assert scored(area, call("calculate_area_under_curve", function="x**2", interval=[3.0, 1.0]))[0] == 0.0
    route = items["simple_python_37"]  # stops: either order listed, each a list compared in order
    for stops in (["Santa Barbara", "Monterey"], ["monterey", "santa-barbara"]):
        assert scored(route, call("route_estimate_time", start_location="San Francisco",
                                  end_location="Los Angeles", stops=stops))[0] == 1.0
    assert scored(route, call("route_estimate_time", start_location="San Francisco",
                              end_location="Los Angeles", stops=["Monterey"]))[0] == 0.0
    assert bfcl.standardize("April 1, 2024") == bfcl.standardize("april 1 2024") == "april12024"


def test_dict_parameters_are_compared_key_by_key(items):
    # conditions: {department: ["Science"], school: ["Bluebird High School", "Bluebird HS"]}
    it = items["simple_python_89"]
    base = {"database_name": "StudentDB", "table_name": "students"}
    ok = {"department": "science", "school": "Bluebird HS"}
    assert scored(it, call("db_fetch_records", **base, conditions=ok))[0] == 1.0
    value, why, _ = scored(it, call("db_fetch_records", **base, conditions={"department": "Science"}))
    assert value == 0.0 and "conditions" in why
    value, _, _ = scored(it, call("db_fetch_records", **base, conditions={**ok, "grade": "A"}))
    assert value == 0.0


def test_parallel_calls_match_in_any_order(items):
    it = items["parallel_0"]  # spotify.play: Taylor Swift 20 min, Maroon 5 15 min
    swift = ("spotify_play", {"artist": "Taylor Swift", "duration": 20})
    maroon = ("spotify_play", {"artist": "Maroon 5", "duration": 15})
    assert scored(it, calls(swift, maroon))[0] == 1.0
    assert scored(it, calls(maroon, swift))[0] == 1.0
    value, why, _ = scored(it, calls(swift, ("spotify_play", {"artist": "Maroon 5", "duration": 20})))
    assert value == 0.0 and "no call matches expected call 2" in why
    assert scored(it, calls(swift))[0] == 0.0
    assert scored(it, calls(swift, swift))[0] == 0.0  # one call cannot stand for two


def test_parallel_matching_is_exact_where_greedy_pairing_fails():
    # The first call fits both expected calls, the second only the first: a greedy pass that gives the first
    # expected call to the first call misses the pairing that exists.
    fn = {"name": "f", "parameters": {"type": "dict", "properties": {"x": {"type": "integer"}},
                                      "required": []}}
    answers = [{"f": {"x": [1, 2]}}, {"f": {"x": [1, ""]}}]
    assert bfcl.match_calls([fn], [("f", {"x": 1}), ("f", {"x": 2})], answers) is None
    assert bfcl.match_calls([fn], [("f", {"x": 2}), ("f", {"x": 2})], answers) is not None


def test_multiple_needs_the_right_one_of_several_functions(items):
    it = next(i for i in items.values() if i.domain == "multiple")
    (expected, params), = it.data["answer"][0].items()
    others = [name for name, original in it.data["names"].items() if original != expected]
    right = bfcl.openai_name(expected)
    args = {k: v[0] for k, v in params.items() if v[0] != ""}
    assert scored(it, call(right, **args))[0] == 1.0
    value, why, _ = scored(it, call(others[0], **args))
    assert value == 0.0 and "wrong function" in why


def test_irrelevance_is_correct_iff_no_tool_call(items):
    it = items["irrelevance_0"]  # the triangle's area, with only a BMI function on offer
    assert scored(it, {"role": "assistant", "content": "The area is 25 square meters."}) == (
        1.0, "no tool call (text)", "text")
    assert scored(it, call("determine_body_mass_index", weight=10, height=5))[0] == 0.0
    # a call the endpoint could not parse is no call, as in BFCL's function-calling mode, but it is counted
    value, _, kind = scored(it, {"role": "assistant", "content": '{"name": "determine_body_mass_index"'})
    assert value == 1.0 and kind == "malformed"


def test_reply_kinds(items):
    it = items["simple_python_0"]
    text = {"role": "assistant", "content": "The area is 25."}
    assert bfcl.read_reply(text, it).kind == "text"
    assert bfcl.read_reply({"role": "assistant", "content": "  "}, it).kind == "empty"
    for tried in ('[calculate_triangle_area(base=10, height=5)]', '<tool_call>\n{"name": "x"}',
                  'I will call calculate_triangle_area(base=10, height=5).',
                  'Here: {"name": "calculate_triangle_area", "arguments": {}}'):
        assert bfcl.read_reply({"role": "assistant", "content": tried}, it).kind == "malformed", tried
    bad_json = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function",
         "function": {"name": "calculate_triangle_area", "arguments": "{base: 1"}}]}
    outcome = bfcl.read_reply(bad_json, it)
    assert outcome.kind == "malformed" and bfcl.score(it, outcome)[0] == 0.0
    wrong_type = bfcl.read_reply(call("calculate_triangle_area", base="ten", height=5), it)
    assert wrong_type.kind == "malformed" and "do not match its schema" in wrong_type.why


# ------------------------------------------------------------------------------------------------ end to end


def build(allowed):
    """One value the possible answers allow: the first listed, dicts and lists built inside."""
    if isinstance(allowed, dict) and bfcl._is_spec(allowed):
        return {k: build(next(v for v in vals if v != "")) for k, vals in allowed.items()
                if any(v != "" for v in vals)}
    if isinstance(allowed, list):
        return [build(v) for v in allowed]
    return allowed


def right_calls(item):
    """The expected calls, built from the possible answers, in reverse order (order must not matter)."""
    out = []
    for answer in reversed(item.data["answer"]):
        (name, params), = answer.items()
        args = {p: build(next(v for v in vals if v != "")) for p, vals in params.items() if vals != [""]
                and any(v != "" for v in vals)}
        out.append((bfcl.openai_name(name), args))
    return out


SAMPLES = {"string": "x", "integer": 1, "number": 1.5, "boolean": True, "array": [], "object": {}}


def valid_args(schema):
    """Arguments that satisfy a tool's parameters: each required one, its enum's first value or a sample."""
    props = schema.get("properties", {})
    return {name: props[name].get("enum", [SAMPLES[props[name]["type"]]])[0]
            for name in schema.get("required", [])}


@pytest.fixture(scope="module")
def app():
    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    return app


def test_fleet_eval_bench_bfcl_against_an_openai_endpoint(app, tmp_path):
    first3 = {c: bfcl.load(c)[:3] for c in bfcl.DEFAULT_CATEGORIES}
    by_prompt = {json.dumps(it.messages): (c, i, it) for c, its in first3.items() for i, it in enumerate(its)}

    def script(body):
        # item 0 of each category: the right calls; item 1: a wrong one (an extra parameter, or, for
        # irrelevance, any call); item 2: a call written as broken text.
        category, index, item = by_prompt[json.dumps(body["messages"])]
        if index == 2:
            return {"content": '{"name": "' + body["tools"][0]["function"]["name"] + '", "arguments": {'}
        if category == "irrelevance":
            tool = body["tools"][0]["function"]
            return {"content": "I cannot help with that."} if index == 0 else calls(
                (tool["name"], valid_args(tool["parameters"])))
        pairs = right_calls(item)
        if index == 1:
            pairs[0] = (pairs[0][0], {**pairs[0][1], "not_a_parameter": 1})
        return calls(*pairs)

    out, summary_path = tmp_path / "bfcl.jsonl", tmp_path / "bfcl.json"
    with UpstreamServer() as up:
        up.tool_script = script
        result = CliRunner().invoke(app, ["eval", "--bench", "bfcl", "--model", f"{up.base_url}#toolcall",
                                          "--limit", "3", "--unconstrained", "--out", str(out),
                                          "--json", str(summary_path), "--no-progress"])
        assert result.exit_code == 0, result.output
        bodies = list(up.payloads)
    assert len(bodies) == 21
    assert all(b["tool_choice"] == "auto" and b["tools"] and b["constrained_decoding"] is False
               and b["temperature"] == 0.0 for b in bodies)
    summary = json.loads(summary_path.read_text())
    assert summary["n"] == 21 and summary["correct"] == 8 and summary["malformed"] == 7
    assert summary["constrained_decoding"] is False and summary["engine"] == "api"
    for category, entry in summary["domains"].items():
        want = 2 if category == "irrelevance" else 1
        assert (entry["n"], entry["correct"], entry["malformed"]) == (3, want, 1), category
        assert entry["kinds"]["call"] == (1 if category == "irrelevance" else 2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows[:3]] == [f"bfcl/simple_python_{i}" for i in range(3)]
    assert [r["scores"]["toolcall"] for r in rows[:3]] == [1.0, 0.0, 0.0]
    assert rows[0]["domain"] == "simple" and rows[0]["bench"] == "bfcl" and rows[0]["bfcl"]["kind"] == "call"
    assert json.loads(rows[0]["responses"]["toolcall"])[0]["name"] == "calculate_triangle_area"
    assert "unexpected parameter not_a_parameter" in rows[1]["detail"]["toolcall"]
    assert rows[2]["bfcl"]["kind"] == "malformed"
    assert re.search(r"^all\s+21\s+8\s+38\.1\s+7\b", result.output, re.M), result.output


def test_bfcl_options_are_checked(app):
    result = CliRunner().invoke(app, ["eval", "--bench", "bfcl", "--model", "http://127.0.0.1:9/v1#m",
                                      "--category", "sql", "--no-progress"])
    assert isinstance(result.exception, FleetError) and "unknown BFCL category 'sql'" in str(result.exception)
    result = CliRunner().invoke(app, ["eval", "--bench", "gsm8k", "--model", "x", "--category", "simple"])
    assert isinstance(result.exception, FleetError) and "for --bench bfcl" in str(result.exception)


def test_a_refused_request_scores_zero_and_the_run_goes_on_but_a_broken_endpoint_stops_it():
    from fleetlm.evals.harness import EvalError

    with UpstreamServer() as up:
        summary, results = bfcl.evaluate(f"{up.base_url}#badreq", categories=["simple"], limit=2,
                                         progress=False)
        assert up.calls["badreq"] == 2  # a 400 is not retried
        assert all("constrained_decoding" not in b for b in up.payloads)  # nothing sent by default
        assert summary["kinds"]["error"] == 2 and summary["correct"] == 0
        assert "answered 400: context too long" in results[0].detail
        with pytest.raises(EvalError, match="answered 500"):
            bfcl.evaluate(f"{up.base_url}#broken", categories=["simple"], limit=1, progress=False)
