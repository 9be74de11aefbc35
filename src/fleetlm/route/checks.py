"""Cascade checks: does a cheap model's answer hold up? Code runs its prompt's own examples, math re-checks.

Each check is a plain function returning a `CheckResult(name, passed, detail, seconds)`:

- `code_check(prompt, answer)`: the answer's code must parse, and pass the examples written in the PROMPT
  (doctest `>>> f(x)` + expected output, and the inline `f(x) == y` / `f(x) ➞ y` / `f(x) => y` style most
  HumanEval prompts use), run in `fleetlm.sandbox`. A benchmark's hidden tests are never used. No examples
  in the prompt: parse-only, and the detail says so.
- `math_check(answer, samples)`: a final number exists; every `a op b = c` claim in the reasoning re-checks
  with an ast-based calculator (route.features.safe_eval, no eval()); optionally other samples' final
  numbers agree with it.
- `json_check(answer, schema)`: the answer parses as JSON and matches the JSON Schema (`jsonschema`).
- `tool_call_check(tool_calls, tools)`: each call names a declared function and its arguments parse and
  match that function's parameters schema.

`applicable_checks` decides from a request's parts which of them apply (see docs/ROUTING.md).
"""

from __future__ import annotations

import ast
import json
import math
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from fleetlm.errors import FleetError
from fleetlm.route.features import CalcError, safe_eval

CHECK_NAMES = ("code", "math", "json", "tool")
CODE_TIMEOUT_S = 5.0  # for all of a prompt's examples together
CODE_MEMORY_MB = 512
_MAX_TEXT = 20_000  # bounds regex work on a runaway answer


@dataclass(frozen=True)
class CheckResult:
    """What one check found: `detail` is one line, `seconds` the check's own wall time."""

    name: str
    passed: bool
    detail: str
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "seconds": round(self.seconds, 4)}

    def summary(self) -> str:
        return f"{self.name} {'passed' if self.passed else 'failed'}: {self.detail}"


def _timed(name: str, fn: Callable[[], tuple[bool, str]]) -> CheckResult:
    start = time.perf_counter()
    passed, detail = fn()
    return CheckResult(name, passed, detail, time.perf_counter() - start)


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---- code --------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_DEF = re.compile(r"^[ \t]*def[ \t]+([A-Za-z_]\w*)[ \t]*\(", re.MULTILINE)
# inline examples: name(args) == value, ==> value, => value, -> value, ➞ value, returns value, should return
# (a bare "=" is left out: prompts use it for definitions, "tri(1) = 3")
_INLINE_SEP = re.compile(r"\s*(?:==>|==|=>|->|➞|#?\s*(?:should\s+)?returns?:?)\s*")


@dataclass(frozen=True)
class Example:
    """One example from a prompt: `source` is Python to evaluate, `want` the expected value or output."""

    source: str
    want: str
    literal: bool  # `want` is a Python literal (compared by value), else compared as printed text


def extract_code(answer: str) -> str:
    """The code in an answer: its fenced blocks (python ones first) joined, else the whole answer."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(answer[:_MAX_TEXT])]
    if not blocks:
        return answer.strip("\n")
    python = [b for lang, b in blocks if lang in ("python", "py", "python3", "")]
    return "\n\n".join(python or [b for _, b in blocks]).strip("\n")


def entry_point(prompt: str) -> str | None:
    """The function a code prompt asks for: the last `def name(` it contains (HumanEval's entry point)."""
    names = _DEF.findall(prompt)
    return names[-1] if names else None


def _literal(text: str) -> Any:
    text = text.strip().rstrip(".").strip()
    text = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", text))
    return ast.literal_eval(text)


def prompt_examples(prompt: str, name: str | None = None) -> list[Example]:
    """The examples a prompt carries: doctest blocks (stdlib doctest's parser), else inline `name(...) sep
    value` lines for the entry function whose arguments and value are plain Python literals."""
    import doctest

    found = []
    # each docstring (or fenced block) on its own: a closing quote or fence right under an example's output
    # is not part of it, and one block with odd indentation must not lose the others' examples
    for block in re.split(r"^.*(?:\"\"\"|\'\'\'|```).*$", prompt, flags=re.MULTILINE):
        try:
            found += doctest.DocTestParser().get_examples(block)
        except ValueError:  # inconsistent indentation inside this block: no usable examples in it
            continue
    out = []
    for ex in found:
        # a docstring's closing quotes follow its last example's output: they are not part of it
        want = re.split(r"^\s*(?:\"\"\"|\'\'\')", ex.want, maxsplit=1, flags=re.MULTILINE)[0].strip()
        try:
            _literal(want)
            literal = bool(want)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            literal = False
        out.append(Example(ex.source.strip(), want, literal))
    if out or name is None:
        return out
    call = re.compile(rf"(?<![\w.]){re.escape(name)}\(")
    for line in prompt.splitlines():
        line = line.strip().lstrip("*-> ").strip()
        m = call.match(line)
        if m is None:
            continue
        end = _call_end(line, m.end() - 1)
        if end is None:
            continue
        source, rest = line[:end], line[end:]
        sep = _INLINE_SEP.match(rest)
        if sep is None or not rest[sep.end() :].strip():
            continue
        try:
            tree = ast.parse(source, mode="eval")
            assert isinstance(tree.body, ast.Call)
            for arg in [*tree.body.args, *(k.value for k in tree.body.keywords)]:
                ast.literal_eval(arg)  # arguments must be literals: `is_happy(a)` is prose, not an example
            value = _literal(rest[sep.end() :])
        except (ValueError, SyntaxError, TypeError, AssertionError, MemoryError, RecursionError):
            continue
        out.append(Example(source, repr(value), True))
    return out


def _call_end(line: str, open_at: int) -> int | None:
    """Index just past the parenthesis that closes the one at `open_at` (strings respected), or None."""
    depth, quote, i = 0, "", open_at
    while i < len(line):
        c = line[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = ""
        elif c in "'\"":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _prompt_imports(prompt: str) -> str:
    """The prompt's top-level import lines (HumanEval's `from typing import List`), for an answer that
    restates the function without them."""
    return "\n".join(
        line for line in prompt.splitlines() if re.match(r"(?:from\s+\S+\s+)?import\s+\w", line)
    )


def candidate_program(prompt: str, answer: str) -> tuple[str, str | None]:
    """(program to run, entry function): the answer's code, or the prompt followed by the answer when the
    answer is only a function body (completion style)."""
    code = extract_code(answer)
    name = entry_point(prompt)
    if name is not None and not re.search(rf"^[ \t]*def[ \t]+{re.escape(name)}[ \t]*\(", code, re.MULTILINE):
        body = code if code.startswith((" ", "\t")) or not code.strip() else _indent(code)
        return _prompt_code(prompt).rstrip("\n") + "\n" + body + "\n", name
    imports = _prompt_imports(prompt)
    return (imports + "\n\n" + code + "\n") if imports else code + "\n", name


def _prompt_code(prompt: str) -> str:
    """The code a prompt carries: its fenced blocks, else everything from its first line of code on
    ("Complete this function:\n\ndef f(x):..." -> "def f(x):...")."""
    if _FENCE.search(prompt):
        return extract_code(prompt)
    start = re.search(r"^(?:from\s|import\s|def\s|class\s|@)", prompt, re.MULTILINE)
    return prompt[start.start() :] if start else prompt


def _indent(code: str) -> str:
    return "\n".join(("    " + line) if line.strip() else line for line in code.splitlines())


_RUNNER = r'''
import ast as _ast, contextlib as _cl, io as _io, json as _json, math as _math, sys as _sys
_EXAMPLES = _json.loads(%(examples)r)
_ns = {"__name__": "__candidate__"}
exec(compile(%(program)r, "<answer>", "exec"), _ns)

def _same(a, b):
    # Python's == (what a test would assert), with a tolerance for floats
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return _math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-6)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b

_out = []
for _ex in _EXAMPLES:
    _buf = _io.StringIO()
    try:
        with _cl.redirect_stdout(_buf):
            try:
                _code = compile(_ex["source"], "<example>", "eval")
            except SyntaxError:
                exec(compile(_ex["source"], "<example>", "exec"), _ns)
                _got = None
            else:
                _got = eval(_code, _ns)
    except Exception as _e:
        _out.append([False, "%%s raised %%s: %%s" %% (_ex["source"], type(_e).__name__, str(_e)[:80])])
        continue
    _printed = _buf.getvalue().strip()
    if _ex["literal"]:
        _ok = _same(_got, _ast.literal_eval(_ex["want"]))
        _shown = repr(_got)
    elif not _ex["want"] and _got is not None:  # ">>> f(x) == y" with no output line: it must hold
        _ok = bool(_got)
        _shown = repr(_got)
    elif _got is None:
        _ok = _printed == _ex["want"]
        _shown = _printed
    else:
        _ok = repr(_got) == _ex["want"] or str(_got) == _ex["want"]
        _shown = repr(_got)
    _out.append([_ok, "%%s gave %%s, expected %%s" %% (_ex["source"], _shown[:80], _ex["want"][:80])])
print("\n%(marker)s" + _json.dumps(_out))
'''


def code_check(
    prompt: str, answer: str, *, timeout_s: float = CODE_TIMEOUT_S, memory_mb: int = CODE_MEMORY_MB
) -> CheckResult:
    """The answer's code parses and passes the examples in its own prompt (run in fleetlm.sandbox)."""

    def run() -> tuple[bool, str]:
        program, name = candidate_program(prompt, answer)
        if not program.strip():
            return False, "no code in the answer"
        try:
            ast.parse(program)
        except SyntaxError as exc:
            return False, f"does not parse: {exc.msg} (line {exc.lineno})"
        except (ValueError, MemoryError, RecursionError) as exc:
            return False, f"does not parse: {type(exc).__name__}"
        if name is not None and not re.search(rf"def\s+{re.escape(name)}\s*\(", program):
            return False, f"parses, but defines no function {name}()"
        examples = prompt_examples(prompt, name)
        if not examples:
            return True, "parses; the prompt has no examples to run (parse-only)"
        try:
            from fleetlm.sandbox import run_python
        except ImportError:
            return False, "parses; examples not run: fleetlm.sandbox is not available"
        marker = f"__fleet_examples_{secrets.token_hex(8)}__:"
        source = _RUNNER % {
            "examples": json.dumps([asdict(e) for e in examples]),
            "program": program,
            "marker": marker,
        }
        try:
            result = run_python(source, timeout_s=timeout_s, memory_mb=memory_mb, stdin="")
        except FleetError as exc:  # no bubblewrap here, or it cannot start: the examples cannot be run
            return False, f"parses; examples not run: {_one_line(str(exc), 100)}"
        if result.timed_out:
            return False, f"examples did not finish within {timeout_s:g} s ({_one_line(result.reason, 80)})"
        report = None
        for line in reversed(result.stdout.splitlines()):
            if line.startswith(marker):
                report = json.loads(line[len(marker) :])
                break
        if report is None:
            tail = result.stderr.strip().splitlines()[-1:] or [result.reason]
            return False, f"the code failed before its examples ran: {_one_line(tail[0], 120)}"
        failed = [detail for ok, detail in report if not ok]
        n = len(report)
        if failed:
            return False, f"failed {len(failed)}/{n} prompt examples: {_one_line(failed[0], 120)}"
        return True, f"passed {n}/{n} prompt examples"

    return _timed("code", run)


# ---- math --------------------------------------------------------------------------------------------

_NUM = r"-?\$?\d[\d,]*(?:\.\d+)?%?"
_OP = r"(?:[-+*/×÷x^]|\*\*)"
_TERM = rf"\(*\s*{_NUM}\s*\)*"
_EXPR = rf"{_TERM}(?:\s*{_OP}\s*{_TERM})*"
_CHAIN = re.compile(rf"(?<![\w.]){_EXPR}(?:\s*=\s*{_EXPR})+")
_ANNOTATION = re.compile(r"<<([^<>]*)>>")  # GSM8K's calculator annotations: <<3*60=180>>
_FINAL_MARK = re.compile(
    rf"(?:####|answer is|answer:|\\boxed\{{|final answer[^\d\-$]{{0,20}})\s*\**\s*\$?\s*({_NUM})",
    re.IGNORECASE,
)
_ANY_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def parse_number(text: str) -> float:
    text = text.strip().replace(",", "").replace("$", "")
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def final_number(answer: str) -> tuple[float | None, str]:
    """(final number, where it was found): after ####, "answer is", "answer:", \\boxed{}, "final answer";
    else the last number of the last non-empty line."""
    text = answer[:_MAX_TEXT]
    marked = _FINAL_MARK.findall(text)
    if marked:
        try:
            return parse_number(marked[-1].rstrip("%")), "marked"
        except ValueError:
            pass
    lines = [ln for ln in text.splitlines() if ln.strip()]
    numbers = _ANY_NUMBER.findall(lines[-1]) if lines else []
    if numbers:
        try:
            return parse_number(numbers[-1]), "last line"
        except ValueError:
            pass
    return None, "none"


def _arith(expr: str) -> float:
    expr = expr.strip()
    if not re.search(r"\d", expr):
        raise CalcError("no number")
    expr = re.sub(r"(\d[\d,]*(?:\.\d+)?)\s*%", r"(\1/100)", expr)  # 12% -> (12/100)
    return safe_eval(expr)


def _decimals(side: str) -> int:
    m = re.search(r"\.(\d+)\s*%?\s*\)*\s*$", side.strip())
    return len(m.group(1)) if m else 0


def _agrees(value: float, claimed: float, shown: str) -> bool:
    """A claimed result agrees when it is the true value rounded to the decimals it shows (2/3 = 0.67)."""
    tolerance = 0.5 * 10 ** -_decimals(shown) + 1e-9 * max(1.0, abs(value))
    if shown.strip().endswith("%"):
        tolerance /= 100
    return abs(value - claimed) <= tolerance or math.isclose(value, claimed, rel_tol=1e-6)


def check_chain(chain: str) -> tuple[bool, str] | None:
    """Re-check 'a op b = c (= d ...)'. A side that starts with the previous side's value and goes on
    ("3 * 4 = 12 + 5 = 17") carries the running result forward, so the chain restarts there.
    None when fewer than two sides are arithmetic (nothing to check)."""
    sides = [s.strip().rstrip(".") for s in chain.split("=")]
    values: list[float | None] = []
    for side in sides:
        try:
            values.append(_arith(side))
        except CalcError:
            values.append(None)
    if sum(v is not None for v in values) < 2 or not any(re.search(_OP, s.lstrip("-")) for s in sides):
        return None
    for i in range(len(sides) - 1):
        left, right = values[i], values[i + 1]
        if left is None or right is None:
            continue
        head = re.match(rf"\s*\(*\s*({_NUM})\s*{_OP}", sides[i + 1])
        if head is not None and re.search(_OP, sides[i + 1].lstrip("-")[1:]):
            try:
                if _agrees(left, parse_number(head.group(1)), head.group(1)):
                    continue  # "= 12 + 5": the running result goes on
            except ValueError:
                pass
        percent = re.fullmatch(rf"\s*({_NUM[:-2]})\s*%\s*", sides[i + 1])
        if percent is not None and _agrees(left, parse_number(percent.group(1)), percent.group(1)):
            continue  # "0.1 * 100 = 10%": a percentage written as the number of percent
        if not _agrees(left, right, sides[i + 1]):
            return False, f"{sides[i]} = {sides[i + 1]} (it is {left:g})"
    return True, ""


_LATEX_OPS = (("\\*", "*"), ("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"))


def _clean_edges(text: str, start: int, end: int) -> bool:
    """A chain is a whole claim only when no operator, "of" or variable touches it: "3S + 9 - 9 = 27 - 9",
    "10% of $700 = 0.10 * $700" and "10 = 100 - 9X" are parts of algebra or prose, not arithmetic claims."""
    before, after = text[:start].rstrip(), text[end:]
    if before[-1:] and before[-1] in "+-*/×÷^(\\" or re.search(r"\bof$", before, re.IGNORECASE):
        return False
    if re.match(r"[A-Za-z(]", after) or re.match(r"\s*(?:[-+*/×÷^(]|\*\*)\s*[\w$(]", after):
        return False
    return not re.search(r"[A-Za-z]$", before) or re.search(r"\s$", text[:start]) is not None


def equations(answer: str) -> list[str]:
    """Every calculator annotation and whole inline equation chain in an answer, as text."""
    text = answer[:_MAX_TEXT]
    for latex, op in _LATEX_OPS:
        text = text.replace(latex, op)
    found = [m.group(1) for m in _ANNOTATION.finditer(text)]
    plain = _ANNOTATION.sub(" ", text)
    pos = 0
    while (m := _CHAIN.search(plain, pos)) is not None:
        claim = m.group(0).rstrip()  # a term's trailing blanks are not part of it: "= 8 apples"
        if _clean_edges(plain, m.start(), m.start() + len(claim)):
            found.append(claim)
            pos = m.end()
        else:  # "10% of $700 = 0.10 * $700 = $70": what follows the first "=" may still be a whole claim
            pos = plain.index("=", m.start()) + 1
    # "3 x 60 = <<3*60=180>>180": the annotation and the visible step are one claim
    seen: set[str] = set()
    unique = []
    for e in found:
        key = re.sub(r"[\s$,]", "", e).replace("×", "*").replace("x", "*")
        if key not in seen:
            seen.add(key)
            unique.append(e)
    return unique


def math_check(answer: str, samples: Iterable[str] | None = None) -> CheckResult:
    """A final number exists, the arithmetic in the reasoning re-checks, and other samples agree."""

    def run() -> tuple[bool, str]:
        final, where = final_number(answer)
        if final is None:
            return False, "no final number"
        checked = 0
        for eq in equations(answer):
            verdict = check_chain(eq)
            if verdict is None:
                continue
            checked += 1
            if not verdict[0]:
                return False, f"arithmetic does not re-check: {_one_line(verdict[1], 100)}"
        detail = f"final {final:g} ({where}); {checked} equation{'s' * (checked != 1)} re-checked"
        others = [final_number(s)[0] for s in samples or []]
        if others:
            agree = sum(o is not None and math.isclose(o, final, rel_tol=1e-6, abs_tol=1e-6) for o in others)
            if agree < len(others):
                shown = ", ".join("none" if o is None else f"{o:g}" for o in others)
                return False, f"{detail}; samples disagree: {final:g} vs {shown}"
            detail += f"; {len(others) + 1} samples agree"
        return True, detail

    return _timed("math", run)


# ---- JSON and tool calls -----------------------------------------------------------------------------


def _schema_errors(instance: Any, schema: dict) -> str | None:
    """None when `instance` matches `schema`, else one line about the first error."""
    import jsonschema

    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"the schema itself is invalid: {_one_line(exc.message, 100)}"
    error = jsonschema.exceptions.best_match(cls(schema).iter_errors(instance))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(root)"
    return f"{where}: {_one_line(error.message, 120)}"


def json_check(answer: str, schema: dict | None = None) -> CheckResult:
    """The answer is JSON (nothing around it but whitespace) and matches `schema` when one is given."""

    def run() -> tuple[bool, str]:
        try:
            value = json.loads(answer)
        except (ValueError, TypeError) as exc:
            return False, f"not JSON: {_one_line(str(exc), 100)}"
        if schema is None:
            return True, f"parses (a JSON {type(value).__name__}); no schema given"
        problem = _schema_errors(value, schema)
        return (True, "parses and matches the schema") if problem is None else (False, problem)

    return _timed("json", run)


def _function(spec: Any) -> dict:
    """A tool declaration as a plain dict {"name", "parameters"} (pydantic Tool models too)."""
    if hasattr(spec, "model_dump"):
        spec = spec.model_dump(exclude_none=True)
    return dict(spec.get("function", spec)) if isinstance(spec, dict) else {}


def tool_call_check(tool_calls: list[Any] | None, tools: list[Any], *, required: bool = False) -> CheckResult:
    """Every tool call names a declared function; its arguments parse and match its parameters schema."""

    def run() -> tuple[bool, str]:
        declared = {f.get("name"): f for f in map(_function, tools or [])}
        calls = tool_calls or []
        if not calls:
            return (False, "no tool call, but one is required") if required else (True, "no tool call made")
        for call in calls:
            if hasattr(call, "model_dump"):
                call = call.model_dump(exclude_none=True)
            fn = call.get("function") or {}
            name = fn.get("name")
            if name not in declared:
                return False, f"calls an undeclared function {name!r}"
            try:
                args = json.loads(fn.get("arguments") or "{}")
            except (ValueError, TypeError) as exc:
                return False, f"{name}: arguments are not JSON ({_one_line(str(exc), 80)})"
            params = declared[name].get("parameters")
            if params:
                problem = _schema_errors(args, params)
                if problem is not None:
                    return False, f"{name}: {problem}"
            elif not isinstance(args, dict):
                return False, f"{name}: arguments are not a JSON object"
        return True, f"{len(calls)} tool call{'s' * (len(calls) != 1)} match their schemas"

    return _timed("tool", run)


# ---- which checks apply ------------------------------------------------------------------------------

_CODE_REQUEST = re.compile(
    r"\b(write|implement|complete|fix|create|define)\b[^.?!\n]{0,60}\b(function|program|script|code|class|"
    r"method)\b|```python|^\s*def\s+\w+\s*\(",
    re.IGNORECASE | re.MULTILINE,
)
_MATH_QUESTION = re.compile(
    r"\b(how (many|much|long|far|old|fast|tall|big|often|high|heavy|wide|deep)|"
    r"what(?:'s|\s+(?:\w+\s+)?(?:is|are|was|were|will|would|should|does|do|did)\b|\s+percent\w*|\s+fraction)|"
    r"calculate|compute|find|total|in all|altogether|left|remain\w*|average|sum)\b",
    re.IGNORECASE,
)
_NUMBER_WORD = re.compile(
    r"\b(one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|twenty|thirty|forty|fifty|hundred|"
    r"thousand|half|twice|double|triple|thrice|third|quarter|dozen|percent)\b",
    re.IGNORECASE,
)


def applicable_checks(
    prompt: str,
    *,
    response_format: dict | None = None,
    tools: list[Any] | None = None,
    enabled: Iterable[str] = CHECK_NAMES,
) -> list[str]:
    """Which of the enabled checks apply to a request, decided from the request alone:
    tools -> tool; response_format json_object/json_schema -> json; a function signature or a request for
    code -> code; a word problem (two or more quantities, in digits or words, and a quantity asked for)
    -> math."""
    enabled = set(enabled)
    out = []
    if tools and "tool" in enabled:
        out.append("tool")
    wants_json = bool(response_format) and response_format.get("type") in ("json_object", "json_schema")
    if wants_json and "json" in enabled:
        out.append("json")
    if out:
        return out
    text = prompt[:_MAX_TEXT]
    if "code" in enabled and _CODE_REQUEST.search(text):
        return ["code"]
    quantities = len(_ANY_NUMBER.findall(text)) + len(_NUMBER_WORD.findall(text))
    if "math" in enabled and quantities >= 2 and _MATH_QUESTION.search(text):
        return ["math"]
    return []


def response_schema(response_format: dict | None) -> dict | None:
    """The JSON Schema a response_format asks for (json_schema's `schema`), None for json_object/text."""
    if not response_format or response_format.get("type") != "json_schema":
        return None
    spec = response_format.get("json_schema") or {}
    schema = spec.get("schema")
    return schema if isinstance(schema, dict) else None
