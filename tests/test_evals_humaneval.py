import pytest

from fleetlm.evals import humaneval
from fleetlm.sandbox import sandbox_available

needs_sandbox = pytest.mark.skipif(not sandbox_available(), reason="bubblewrap cannot create namespaces here")


@pytest.fixture(scope="module")
def problems():
    return {p["task_id"]: p for p in humaneval.load_problems()}


def item(problems, task_id):
    return next(it for it in humaneval.items([problems[task_id]]))


def test_all_164_problems_load_as_chat_items(problems):
    items = humaneval.items(list(problems.values()))
    assert len(items) == 164 and len({it.id for it in items}) == 164
    first = items[0]
    assert first.id == "HumanEval/0" and first.domain == "code" and first.completion == first.prompt
    ask = first.messages[0]["content"]
    assert "def has_close_elements" in ask and "```python" in ask


def test_extraction_prefers_the_block_that_defines_the_function():
    reply = ("Here is a helper:\n```python\nprint('hi')\n```\nand the answer:\n```python\n"
             "def add(a, b):\n    return a + b\n\nif __name__ == '__main__':\n    print(add(input(), 2))\n"
             "```\nIt adds.")
    code, defines = humaneval.extract_solution(reply, "add")
    assert defines and code.strip() == "def add(a, b):\n    return a + b"
    unterminated = "```python\ndef add(a, b):\n    return a + b\n"
    assert humaneval.extract_solution(unterminated, "add") == ("def add(a, b):\n    return a + b", True)
    body = "    return a + b\n"
    assert humaneval.extract_solution(body, "add") == ("    return a + b", False)


@needs_sandbox
def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    for task_id in ("HumanEval/0", "HumanEval/10", "HumanEval/38"):  # 10 and 38 call helpers in the prompt
        p = problems[task_id]
        it = item(problems, task_id)
        full = f"Sure:\n```python\n{p['prompt']}{p['canonical_solution']}```\nDone."
        assert humaneval.score(it, full) == (1.0, "exit 0"), task_id
        assert humaneval.score(it, p["canonical_solution"], completion_mode=True)[0] == 1.0
        body_only = f"```python\n{p['canonical_solution']}```"  # a body continuing the prompt
        assert humaneval.score(it, body_only)[0] == 1.0
    it = item(problems, "HumanEval/0")
    wrong = "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```"
    score, detail = humaneval.score(it, wrong)
    assert score == 0.0 and "AssertionError" in detail


@needs_sandbox
def test_malformed_missing_and_looping_code_fails(problems, monkeypatch):
    it = item(problems, "HumanEval/2")
    assert humaneval.score(it, "")[0] == 0.0
    assert humaneval.score(it, "I cannot solve this.")[0] == 0.0
    score, detail = humaneval.score(it, "```python\ndef truncate_number(number:\n    return\n```")
    assert score == 0.0 and "SyntaxError" in detail
    monkeypatch.setattr(humaneval, "TIMEOUT_S", 1.5)
    score, detail = humaneval.score(it, "```python\ndef truncate_number(number):\n    while True:\n"
                                        "        pass\n```")
    assert score == 0.0 and "timed out" in detail


@needs_sandbox
def test_solutions_cannot_reach_the_network(problems):
    it = item(problems, "HumanEval/2")
    sneaky = ("```python\ndef truncate_number(number):\n    import urllib.request\n"
              "    urllib.request.urlopen('http://1.1.1.1', timeout=3)\n    return number % 1.0\n```")
    score, detail = humaneval.score(it, sneaky)
    assert score == 0.0 and "unreachable" in detail.lower()
