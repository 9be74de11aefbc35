import time

import pytest

from fleetlm.route.checks import (
    CheckResult,
    applicable_checks,
    check_chain,
    code_check,
    equations,
    final_number,
    json_check,
    math_check,
    prompt_examples,
    response_schema,
    tool_call_check,
)

HUMANEVAL_STYLE = '''from typing import List


def below_zero(operations: List[int]) -> bool:
    """ You're given a list of deposit and withdrawal operations on a bank account that starts with
    zero balance. Detect if at any point the balance falls below zero.
    >>> below_zero([1, 2, 3])
    False
    >>> below_zero([1, 2, -4, 5])
    True
    >>> below_zero([-1])
    True
    """
'''

CORRECT = '''Here is the function:

```python
def below_zero(operations: List[int]) -> bool:
    balance = 0
    for op in operations:
        balance += op
        if balance < 0:
            return True
    return False
```
'''

OFF_BY_ONE = CORRECT.replace("balance < 0", "balance < -1")
LOOPS = CORRECT.replace("    balance = 0\n", "    balance = 0\n    while True:\n        pass\n")

INLINE_STYLE = '''
def will_it_fly(q, w):
    """Return True if the list q is a palindrome and its sum is at most w.
    Example:
    will_it_fly([1, 2], 5) ➞ False
    will_it_fly([3, 2, 3], 9) ➞ True
    will_it_fly([3], 5) ➞ True
    """
'''

def test_check_result_is_a_typed_record():
    r = json_check('{"a": 1}')
    assert isinstance(r, CheckResult) and r.name == "json" and r.passed and r.seconds >= 0
    assert r.to_dict()["name"] == "json" and r.summary().startswith("json passed")


# ---- examples from the prompt ------------------------------------------------------------------------


def test_doctest_examples_are_read_from_the_prompt_without_the_closing_quotes():
    examples = prompt_examples(HUMANEVAL_STYLE, "below_zero")
    assert [e.source for e in examples] == ["below_zero([1, 2, 3])", "below_zero([1, 2, -4, 5])",
                                            "below_zero([-1])"]
    assert [e.want for e in examples] == ["False", "True", "True"] and all(e.literal for e in examples)


def test_inline_examples_need_literal_arguments_and_values():
    examples = prompt_examples(INLINE_STYLE, "will_it_fly")
    assert [(e.source, e.want) for e in examples] == [
        ("will_it_fly([1, 2], 5)", "False"),
        ("will_it_fly([3, 2, 3], 9)", "True"),
        ("will_it_fly([3], 5)", "True"),
    ]
    prose = 'def is_happy(s):\n    """is_happy(a) => False\n    tri(1) = 3\n    """\n'
    assert prompt_examples(prose, "is_happy") == []


def test_code_that_does_not_parse_fails_without_running():
    r = code_check(HUMANEVAL_STYLE, "```python\ndef below_zero(operations):\n    return (\n```")
    assert not r.passed and r.detail.startswith("does not parse")


def test_code_without_examples_in_the_prompt_is_parse_only():
    prompt = "Write a Python function add(a, b) that returns the sum of a and b."
    r = code_check(prompt, "```python\ndef add(a, b):\n    return a + b\n```")
    assert r.passed and "parse-only" in r.detail


def test_code_missing_the_asked_function_fails():
    r = code_check(HUMANEVAL_STYLE, "```python\ndef something_else(x):\n    return x\n```")
    # the answer is taken as the body of below_zero (completion style): it parses, then fails its examples
    # or, without a sandbox, is not accepted
    assert not r.passed


def test_a_correct_solution_passes_its_prompts_examples():
    pytest.importorskip("fleetlm.sandbox")
    r = code_check(HUMANEVAL_STYLE, CORRECT)
    assert r.passed, r.detail
    assert r.detail == "passed 3/3 prompt examples"


def test_a_function_body_completion_passes_too():
    pytest.importorskip("fleetlm.sandbox")
    body = (
        "    total = 0\n    for x in operations:\n        total += x\n"
        "        if total < 0:\n            return True\n"
    )
    r = code_check(HUMANEVAL_STYLE, body + "    return False\n")
    assert r.passed, r.detail


def test_a_body_completion_of_a_wrapped_prompt_runs_the_prompts_code():
    pytest.importorskip("fleetlm.sandbox")
    body = "    return any(sum(operations[:i + 1]) < 0 for i in range(len(operations)))\n"
    for prompt in (f"Complete this function.\n\n{HUMANEVAL_STYLE}",
                   f"Complete the code below:\n```python\n{HUMANEVAL_STYLE}```\nOnly the body, please."):
        r = code_check(prompt, body)
        assert r.passed, r.detail


def test_an_off_by_one_fails_with_the_example_it_got_wrong():
    pytest.importorskip("fleetlm.sandbox")
    r = code_check(HUMANEVAL_STYLE, OFF_BY_ONE)
    assert not r.passed
    assert "failed 2/3" in r.detail and "below_zero([1, 2, -4, 5]) gave False, expected True" in r.detail


def test_inline_examples_run_too():
    pytest.importorskip("fleetlm.sandbox")
    good = "```python\ndef will_it_fly(q, w):\n    return q == q[::-1] and sum(q) <= w\n```"
    bad = "```python\ndef will_it_fly(q, w):\n    return sum(q) <= w\n```"
    assert code_check(INLINE_STYLE, good).passed
    r = code_check(INLINE_STYLE, bad)
    assert not r.passed and "will_it_fly([1, 2], 5) gave True, expected False" in r.detail


def test_an_infinite_loop_fails_within_the_time_limit():
    pytest.importorskip("fleetlm.sandbox")
    start = time.perf_counter()
    r = code_check(HUMANEVAL_STYLE, LOOPS, timeout_s=1.0)
    assert not r.passed and "did not finish within 1 s" in r.detail
    assert time.perf_counter() - start < 8


def test_code_that_crashes_on_import_fails():
    pytest.importorskip("fleetlm.sandbox")
    crash = "```python\nimport sys\nsys.exit(0)\ndef below_zero(o):\n    return False\n```"
    r = code_check(HUMANEVAL_STYLE, crash)
    assert not r.passed and "failed before its examples ran" in r.detail


# ---- math -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chain",
    [
        "3 * 4 = 12",
        "$1,200 × 12% = $144",
        "2/3 = 0.67",
        "(5 + 3) * 2 = 16",
        "3 * 4 = 12 + 5 = 17",  # the running result goes on
        "20 ÷ 4 = 5",
        "7 x 8 = 56",
        "1,000 - 250 = 750",
        "2 ** 10 = 1024",
    ],
)
def test_the_calculator_accepts_right_arithmetic(chain):
    assert check_chain(chain) == (True, "")


@pytest.mark.parametrize(
    "chain",
    [
        "3 * 4 = 13",
        "425 / 5 + 17 = 91 + 17 = 108",
        "100 * 1.07 = 107.5",
        "2/3 = 0.6",
        "5 * 75 + 120 = 675 + 120",
    ],
)
def test_the_calculator_catches_wrong_arithmetic(chain):
    verdict = check_chain(chain)
    assert verdict is not None and verdict[0] is False


def test_algebra_and_prose_are_not_read_as_claims():
    text = "10% of $700 = 0.10 * $700 = $70\n10 = 100 - 9X\n3S + 9 - 9 = 27 - 9\nC + 25 = (1/3) * Wendy's age"
    assert [check_chain(e) for e in equations(text)] == [(True, "")]  # only 0.10 * $700 = $70 is a claim


def test_final_number_markers_and_fallback():
    assert final_number("so 540 in all\n#### 540") == (540.0, "marked")
    assert final_number("The answer is $1,250.") == (1250.0, "marked")
    assert final_number("He runs 540 meters a week.") == (540.0, "last line")
    assert final_number("I am not sure.")[0] is None


def test_math_check_on_a_recorded_style_answer():
    good = "3 x 60 = <<3*60=180>>180 meters a session.\n180 x 3 = <<180*3=540>>540 meters.\n#### 540"
    r = math_check(good)
    assert r.passed and "final 540" in r.detail and "2 equations re-checked" in r.detail
    bad = good.replace("<<180*3=540>>540", "<<180*3=560>>560").replace("#### 540", "#### 560")
    r = math_check(bad)
    assert not r.passed and "180*3 = 560" in r.detail
    assert not math_check("Let me think about it.").passed


def test_math_samples_must_agree():
    assert math_check("#### 12", samples=["so #### 12"]).passed
    r = math_check("#### 12", samples=["#### 13"])
    assert not r.passed and "samples disagree" in r.detail


# ---- JSON and tools ---------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


def test_json_check():
    assert json_check('{"name": "Ada", "age": 36}', SCHEMA).passed
    r = json_check('{"name": "Ada", "age": "36"}', SCHEMA)
    assert not r.passed and r.detail.startswith("age:")
    r = json_check('{"name": "Ada"}', SCHEMA)
    assert not r.passed and "'age' is a required property" in r.detail
    assert not json_check("Sure! {\"name\": 1}").passed
    assert json_check("[1, 2]").passed  # no schema: parsing is the check
    assert "schema itself is invalid" in json_check("{}", {"type": "nonsense"}).detail


def test_tool_call_check():
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    call = {"id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    assert tool_call_check([call], tools).passed
    wrong_args = {**call, "function": {"name": "get_weather", "arguments": '{"town": "Oslo"}'}}
    assert "'city' is a required property" in tool_call_check([wrong_args], tools).detail
    broken = {**call, "function": {"name": "get_weather", "arguments": '{"city": '}}
    assert "not JSON" in tool_call_check([broken], tools).detail
    unknown = {**call, "function": {"name": "launch", "arguments": "{}"}}
    assert "undeclared function 'launch'" in tool_call_check([unknown], tools).detail
    assert tool_call_check(None, tools).passed
    assert not tool_call_check(None, tools, required=True).passed


# ---- which checks apply -----------------------------------------------------------------------------


def test_applicable_checks_follow_the_request():
    assert applicable_checks("hi", tools=[{"type": "function"}]) == ["tool"]
    assert applicable_checks("hi", response_format={"type": "json_object"}) == ["json"]
    assert applicable_checks("hi", response_format={"type": "text"}) == []
    assert applicable_checks(HUMANEVAL_STYLE) == ["code"]
    assert applicable_checks("Write a Python function that reverses a string.") == ["code"]
    gsm = "James runs 3 sprints 3 times a week. He runs 60 meters each sprint. How many meters a week?"
    assert applicable_checks(gsm) == ["math"]
    assert applicable_checks(gsm, enabled=["code"]) == []
    assert applicable_checks("Tell me a joke about cats.") == []


def test_response_schema():
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    assert response_schema(fmt) == SCHEMA
    assert response_schema({"type": "json_object"}) is None and response_schema(None) is None
