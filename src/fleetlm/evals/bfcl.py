"""BFCL v4 offline: the Berkeley Function-Calling Leaderboard's single-turn categories, our own matcher.

Data. The `bfcl-eval` package (Apache-2.0; installed with `pip install --no-deps`, since its dependencies are
provider SDKs) ships each category's questions (`data/BFCL_v4_<stem>.json`, one JSON object a line: `id`,
`question` (a list of turns, each a list of messages; single-turn categories have one), `function` (the
function docs)) and the possible answers (`data/possible_answer/BFCL_v4_<stem>.json`: `ground_truth`, a
list of `{function name: {param: [allowed values]}}`). Only those JSON files are read: the package's checker
imports the provider SDKs, so it is never imported.

Tools. A BFCL function doc is close to an OpenAI tool, but its types are Python's ("dict", "float", "tuple",
"any"), and its names may hold dots ("math.factorial"), which OpenAI's name rule (^[A-Za-z0-9_-]{1,64}$)
forbids. `to_tools` maps the types to JSON Schema as BFCL's own OpenAI handler does (dict -> object, float ->
number, tuple -> array, any -> string, because the matcher wants a string there) and replaces dots by "_"
(also as BFCL's handler does); calls are mapped back to BFCL's names before scoring. It also repairs what a
grammar compiler would reject or find unsatisfiable: an `enum` on an array constrains its items, an enum or
default that does not fit the declared type is dropped, `required` keeps only listed properties, and keywords
that are not JSON Schema ("optional") are left out.

Matching (`match_call`), BFCL's AST rules (its documentation and checker, re-implemented):
- the function name must be the expected one; every `required` parameter present; no parameter that the doc
  or the possible answer does not name; a parameter of the answer that is left out must have "" among its
  values (BFCL's mark for "optional, may be omitted");
- a value must have the declared type (Python's: bool is not an int), an int is accepted for a float; a value
  of the possible answers' own type is accepted where the doc's type differs (BFCL's "variable" rule);
- then it must equal one of the allowed values: strings after BFCL's normalisation (spaces and , . / - _ * ^
  removed, lower case, ' -> "), lists element by element in order, dicts key by key (each key's allowed values
  listed, "" again meaning it may be missing), numbers by value.
Where we differ from BFCL's checker, on purpose: the comparison recurses to any depth (BFCL normalises strings
one level deep) and an int is accepted for a float inside lists too (BFCL only at the top level), so a few
nested answers BFCL rejects pass here; parallel categories need a one-to-one matching of calls to expected
calls in any order, found exactly (BFCL matches greedily, which can miss a matching that exists).
Categories: simple and multiple need exactly one call, parallel ones exactly as many calls as expected;
irrelevance (and live_irrelevance) is correct iff the reply makes no tool call; live_relevance iff it makes at
least one well-formed call; live_* are scored like their non-live counterparts.

Outcomes. Each reply is one of: "call" (tool calls whose names are tools and whose arguments are JSON objects
valid for the tool's schema), "malformed" (tool calls that fail that, or a text reply that tried to call: it
starts like JSON or a <tool_call> tag, or writes a tool's name followed by "(" or as a "name" value), "text"
(a plain answer), "empty", or "error" (the endpoint refused this request, e.g. a schema it cannot compile).
As in BFCL's function-calling mode, only tool calls count as calls: a malformed text call is no call (so it is
wrong for AST categories and right for irrelevance); the malformed count says how often it happened.

Transport. Every request goes through the OpenAI API with `tools` and tool_choice "auto", greedy, and, when
asked, `"constrained_decoding": true|false` (our gateway's switch for grammar-constrained tool calls; false is
the unconstrained baseline; other endpoints may reject the field, so nothing is sent by default). A URL is
called directly. A local model (catalog name, .gguf, checkpoint dir) is served by our gateway's own app
(`create_app` on a one-model fleet, `--engine` chosen explicitly so nothing is measured) on a loopback port in
a thread of this process: the harness's local runners take plain messages only, and the gateway is where
tools are rendered into the prompt and calls are parsed back (serve/tools.py), so going through it scores
what a client of `fleet serve` gets.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fleetlm.evals.harness import EvalError, EvalItem, ItemResult, Reply, routing_row, select

# Our category name -> (the file stem in bfcl-eval's data folder, how it is scored).
CATEGORIES: dict[str, tuple[str, str]] = {
    "simple": ("simple_python", "ast"),
    "multiple": ("multiple", "ast"),
    "parallel": ("parallel", "ast"),
    "parallel_multiple": ("parallel_multiple", "ast"),
    "irrelevance": ("irrelevance", "irrelevance"),
    "live_simple": ("live_simple", "ast"),
    "live_multiple": ("live_multiple", "ast"),
    "live_parallel": ("live_parallel", "ast"),
    "live_parallel_multiple": ("live_parallel_multiple", "ast"),
    "live_irrelevance": ("live_irrelevance", "irrelevance"),
    "live_relevance": ("live_relevance", "relevance"),
}
DEFAULT_CATEGORIES = ("simple", "multiple", "parallel", "parallel_multiple", "irrelevance", "live_simple",
                      "live_multiple")
ALIASES = {"simple_python": "simple"}
MAX_TOKENS = 256  # a few calls fit; a model that answers in prose is cut there (its answer is wrong anyway)
KINDS = ("call", "malformed", "text", "empty", "error")
BFCL_PACKAGE = "bfcl-eval==2026.3.23"

_OPENAI_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


# ---------------------------------------------------------------------------------------------- the data


def data_dir() -> Path:
    """bfcl-eval's data folder, found without importing the package (its __init__ may pull in SDKs)."""
    import importlib.util

    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvalError(f"BFCL needs the bfcl-eval package: pip install --no-deps {BFCL_PACKAGE}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (folder / "possible_answer").is_dir():
        raise EvalError(f"{folder}: no BFCL data (expected BFCL_v4_*.json and possible_answer/)")
    return folder


def parse_categories(text: str | Sequence[str] | None) -> list[str]:
    """'simple,parallel' (or a list) -> category names in the order given; None or '' -> the default seven."""
    if text is None or text == "":
        return list(DEFAULT_CATEGORIES)
    names = [c.strip() for c in (text.split(",") if isinstance(text, str) else text) if c.strip()]
    if names == ["all"]:
        return list(CATEGORIES)
    out = []
    for name in names:
        name = ALIASES.get(name, name)
        if name not in CATEGORIES:
            raise EvalError(f"unknown BFCL category {name!r}; expected some of {', '.join(CATEGORIES)} "
                            "(or all)")
        if name not in out:
            out.append(name)
    return out


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(category: str, folder: Path | None = None) -> list[EvalItem]:
    """Every item of one category: messages, tools, BFCL's function docs and possible answers."""
    category = ALIASES.get(category, category)
    if category not in CATEGORIES:
        raise EvalError(f"unknown BFCL category {category!r}; expected one of {', '.join(CATEGORIES)}")
    stem, scoring = CATEGORIES[category]
    folder = folder or data_dir()
    questions = _jsonl(folder / f"BFCL_v4_{stem}.json")
    answers: dict[str, Any] = {}
    if scoring == "ast":
        answer_file = folder / "possible_answer" / f"BFCL_v4_{stem}.json"
        answers = {a["id"]: a["ground_truth"] for a in _jsonl(answer_file)}
    items = []
    for q in questions:
        messages = [dict(m) for turn in q["question"] for m in turn]
        tools, names = to_tools(q["function"])
        prompt = "\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "user")
        items.append(EvalItem(id=f"bfcl/{q['id']}", prompt=prompt, messages=messages, domain=category,
                              data={"category": category, "scoring": scoring, "functions": q["function"],
                                    "tools": tools, "names": names, "answer": answers.get(q["id"])}))
    if scoring == "ast" and any(it.data["answer"] is None for it in items):
        raise EvalError(f"BFCL {category}: some questions have no possible answer")
    return items


def load_items(categories: Sequence[str], *, split: str = "all", limit: int | None = None,
               seed: int | None = None, folder: Path | None = None) -> list[EvalItem]:
    """The items of several categories; `limit` and `seed` apply per category (harness.select)."""
    out: list[EvalItem] = []
    for category in categories:
        out += select(load(category, folder), split=split, limit=limit, seed=seed)
    return out


# ---------------------------------------------------------------------------------------------- tools

# BFCL's types (Python's, and Java's in a few live docs) -> JSON Schema's. "any" is a string, as BFCL maps it:
# its matcher expects a str there.
JSON_TYPES = {
    "string": "string", "integer": "integer", "float": "number", "number": "number", "double": "number",
    "boolean": "boolean", "bool": "boolean", "array": "array", "list": "array", "tuple": "array",
    "dict": "object", "object": "object", "any": "string", "long": "integer", "short": "integer",
    "byte": "integer", "char": "string",
}
_KEPT = ("description", "minimum", "maximum", "minItems", "maxItems")
_FORMATS = {"date", "date-time", "time", "email", "uri", "uuid"}
_FITS = {"string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
         "object": (dict,)}


def _fits(value: Any, json_type: str) -> bool:
    if isinstance(value, bool) and json_type in ("integer", "number"):
        return False
    return isinstance(value, _FITS[json_type])


def to_schema(param: dict[str, Any]) -> dict[str, Any]:
    """One BFCL parameter doc as JSON Schema (recursively through properties and items)."""
    json_type = JSON_TYPES.get(str(param.get("type", "string")), "string")
    out: dict[str, Any] = {"type": json_type}
    out.update({k: param[k] for k in _KEPT if k in param})
    if param.get("format") in _FORMATS:
        out["format"] = param["format"]
    items = param.get("items")
    if json_type == "array":
        out["items"] = to_schema(items) if isinstance(items, dict) else {}
    enum = param.get("enum")
    if isinstance(enum, list) and enum:
        if json_type == "array":  # BFCL puts an item enum on the array itself
            if "enum" not in out["items"]:
                item_type = out["items"].get("type")
                kept = [v for v in enum if item_type is None or _fits(v, item_type)]
                if kept:
                    out["items"]["enum"] = kept
        else:
            kept = [v for v in enum if _fits(v, json_type)]
            if kept:
                out["enum"] = kept
    if "default" in param and _fits(param["default"], json_type):
        out["default"] = param["default"]
    if json_type == "object":
        props = param.get("properties")
        if isinstance(props, dict):
            out["properties"] = {k: to_schema(v if isinstance(v, dict) else {}) for k, v in props.items()}
            required = param.get("required")
            if isinstance(required, list):
                listed = [r for r in dict.fromkeys(required) if isinstance(r, str) and r in props]
                if listed:
                    out["required"] = listed
    return out


def openai_name(name: str) -> str:
    return name.replace(".", "_")


def to_tools(functions: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """OpenAI `tools` for BFCL function docs, and {tool name: BFCL name} to map calls back."""
    tools, names = [], {}
    for fn in functions:
        name = openai_name(fn["name"])
        if not _OPENAI_NAME.match(name) or name in names:
            raise EvalError(f"BFCL function {fn['name']!r} has no unique OpenAI name")
        params = to_schema({**fn.get("parameters", {}), "type": "dict"})
        params.setdefault("properties", {})
        described = {"name": name, "description": fn.get("description", ""), "parameters": params}
        tools.append({"type": "function", "function": described})
        names[name] = fn["name"]
    return tools, names


# ---------------------------------------------------------------------------------------------- matching

_PY_TYPES: dict[str, type] = {"string": str, "integer": int, "float": float, "number": float, "double": float,
                              "boolean": bool, "bool": bool, "array": list, "list": list, "tuple": list,
                              "dict": dict, "object": dict, "any": str, "long": int, "char": str}
_STRIP = re.compile(r"[ ,./\-_*^]")


def standardize(text: str) -> str:
    """BFCL's string normalisation: no spaces or , . / - _ * ^, lower case, single quotes as double."""
    return _STRIP.sub("", text).lower().replace("'", '"')


def _has_type(value: Any, py: type) -> bool:
    if py is float:
        return type(value) in (int, float)  # an int is accepted for a float
    return type(value) is py  # exact: True is not an int, 1 is not a float


def _is_spec(answer: dict[str, Any]) -> bool:
    """A possible answer's dict lists each key's allowed values; anything else is a literal dict."""
    return all(isinstance(v, list) for v in answer.values())


def value_matches(value: Any, allowed: Any) -> bool:
    """Whether `value` is the possible value `allowed`, under BFCL's comparison rules."""
    if isinstance(allowed, str):
        return isinstance(value, str) and standardize(value) == standardize(allowed)
    if isinstance(allowed, bool) or isinstance(value, bool):
        return type(value) is type(allowed) and value == allowed
    if isinstance(allowed, (int, float)):
        return type(value) in (int, float) and value == allowed
    if isinstance(allowed, list):
        return (isinstance(value, list) and len(value) == len(allowed)
                and all(value_matches(v, a) for v, a in zip(value, allowed, strict=True)))
    if isinstance(allowed, dict):
        if not isinstance(value, dict):
            return False
        if _is_spec(allowed):
            given = all(k in allowed and any(value_matches(v, a) for a in allowed[k])
                        for k, v in value.items())
            return given and all(k in value or "" in vals for k, vals in allowed.items())
        return value.keys() == allowed.keys() and all(value_matches(value[k], allowed[k]) for k in value)
    return value == allowed


def _answer_type(allowed: list[Any]) -> type | None:
    return next((type(a) for a in allowed if a != ""), None)


def check_param(name: str, value: Any, doc: dict[str, Any], allowed: list[Any]) -> str | None:
    """None when `value` is allowed for parameter `name`, else why not."""
    py = _PY_TYPES.get(str(doc.get("type")))
    if py is not None and not _has_type(value, py):
        if _answer_type(allowed) is type(value):  # BFCL's variable rule: the answer's own type
            return None if value in allowed else f"{name}: {value!r} is not one of {allowed!r}"
        return f"{name}: expected {doc.get('type')}, got {type(value).__name__} {value!r}"
    if py is list and isinstance(doc.get("items"), dict):
        item_py = _PY_TYPES.get(str(doc["items"].get("type")))
        seen = {type(x) for a in allowed if isinstance(a, list) for x in a}
        bad = [v for v in value if item_py is not None and not _has_type(v, item_py) and type(v) not in seen]
        if bad:
            return f"{name}: items must be {doc['items'].get('type')}, got {bad[0]!r}"
    if any(value_matches(value, a) for a in allowed):
        return None
    return f"{name}: {value!r} is not one of {allowed!r}"


def match_call(docs: dict[str, dict[str, Any]], name: str, args: Any, answer: dict[str, Any]) -> str | None:
    """None when the call `name(**args)` is the expected `answer` ({function: {param: allowed}}), else why."""
    expected, params = next(iter(answer.items()))
    if name != expected:
        return f"wrong function: {name}, expected {expected}"
    if not isinstance(args, dict):
        return f"{name}: arguments are not a JSON object"
    schema = docs[expected].get("parameters", {})
    props = schema.get("properties", {})
    for req in schema.get("required", []):
        if req not in args:
            return f"{name}: missing required parameter {req}"
    for param, value in args.items():
        if param not in props or param not in params:
            return f"{name}: unexpected parameter {param}"
        why = check_param(param, value, props[param], params[param])
        if why:
            return f"{name}: {why}"
    for param, allowed in params.items():
        if param not in args and "" not in allowed:
            return f"{name}: missing parameter {param}"
    return None


def _perfect_matching(ok: list[list[bool]]) -> bool:
    """Whether every expected call (column) gets its own model call (row): Kuhn's augmenting paths."""
    owner: dict[int, int] = {}

    def place(row: int, seen: set[int]) -> bool:
        for col, fits in enumerate(ok[row]):
            if fits and col not in seen:
                seen.add(col)
                if col not in owner or place(owner[col], seen):
                    owner[col] = row
                    return True
        return False

    return all(place(row, set()) for row in range(len(ok)))


def match_calls(functions: Sequence[dict[str, Any]], calls: Sequence[tuple[str, Any]],
                answers: Sequence[dict[str, Any]]) -> str | None:
    """None when the calls are the expected ones, one each, in any order; else why not."""
    if len(calls) != len(answers):
        return f"{len(calls)} call(s), expected {len(answers)}"
    docs = {fn["name"]: fn for fn in functions}
    reasons = [[match_call(docs, name, args, answer) for answer in answers] for name, args in calls]
    if _perfect_matching([[r is None for r in row] for row in reasons]):
        return None
    if len(answers) == 1:
        return reasons[0][0]
    for col, answer in enumerate(answers):
        if all(row[col] is not None for row in reasons):
            expected = next(iter(answer))
            near = next((row[col] for row in reasons if not row[col].startswith("wrong function")),
                        reasons[0][col])
            return f"no call matches expected call {col + 1} ({expected}): {near}"
    return "the calls cannot be paired one to one with the expected calls"


# ---------------------------------------------------------------------------------------------- replies


@dataclass
class Outcome:
    """What one reply did: its calls (BFCL names; arguments None when not a JSON object) and its kind."""

    kind: str
    calls: list[tuple[str, Any]] = field(default_factory=list)
    text: str = ""
    why: str = ""

    def record(self) -> str:
        """The routing row's response: the calls as JSON, else the text."""
        if self.calls:
            return json.dumps([{"name": n, "arguments": a} for n, a in self.calls], ensure_ascii=False)
        return self.text


_CALL_START = ("{", "[", "<tool_call>", "<function", "```json", "```\n{", "```\n[")


def looks_like_call(text: str, names: dict[str, str]) -> bool:
    """A text reply that tried to call a tool: JSON-like, a <tool_call> tag, name(...) or "name": "<tool>"."""
    body = text.strip()
    if body.startswith(_CALL_START):
        return True
    for name in {*names, *names.values()}:
        if re.search(rf"(?<![\w.]){re.escape(name)}\s*\(", body) or re.search(
                rf'"name"\s*:\s*"{re.escape(name)}"', body):
            return True
    return False


def read_reply(message: dict[str, Any], item: EvalItem) -> Outcome:
    """Classify one chat completion message (OpenAI's shape) against the item's tools."""
    import jsonschema

    names: dict[str, str] = item.data["names"]
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in item.data["tools"]}
    text = message.get("content") or ""
    raw_calls = message.get("tool_calls") or []
    if not raw_calls:
        if not text.strip():
            return Outcome("empty", text=text, why="empty reply")
        if looks_like_call(text, names):
            return Outcome("malformed", text=text, why="tried to call in text, not a tool call")
        return Outcome("text", text=text, why="answered in text")
    calls, problems = [], []
    for call in raw_calls:
        fn = call.get("function") or {}
        tool = str(fn.get("name", ""))
        args: Any = fn.get("arguments")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                args = None
        if not isinstance(args, dict):
            args = None
            problems.append(f"{tool}: arguments are not a JSON object")
        if tool not in names:
            problems.append(f"{tool}: not a tool")
        elif args is not None and not jsonschema.Draft202012Validator(schemas[tool]).is_valid(args):
            problems.append(f"{tool}: arguments do not match its schema")
        calls.append((names.get(tool, tool), args))
    if problems:
        return Outcome("malformed", calls, text, "; ".join(problems))
    return Outcome("call", calls, text)


def score(item: EvalItem, outcome: Outcome) -> tuple[float, str]:
    """(1.0 or 0.0, why) for one item's outcome, by its category's rule."""
    scoring = item.data["scoring"]
    if outcome.kind == "error":
        return 0.0, outcome.why
    if scoring == "irrelevance":
        made = bool(outcome.calls)
        return (0.0, "made a tool call") if made else (1.0, f"no tool call ({outcome.kind})")
    if scoring == "relevance":
        if outcome.kind == "call":
            return 1.0, "made a call"
        return 0.0, f"no well-formed call: {outcome.why}"
    if not outcome.calls:
        return 0.0, outcome.why
    why = match_calls(item.data["functions"], outcome.calls, item.data["answer"])
    return (0.0, why) if why else (1.0, "matched")


# ---------------------------------------------------------------------------------------------- running


class ToolsClient:
    """Chat requests with tools to an OpenAI-compatible API, a few at once (through the harness's runner)."""

    def __init__(self, base_url: str, model: str, concurrency: int = 4,
                 constrained: bool | None = None, timeout_s: float = 600.0) -> None:
        from fleetlm.evals.runners import OpenAIRunner

        self.runner = OpenAIRunner(base_url, model, concurrency=concurrency, timeout_s=timeout_s)
        self.batch_size = self.runner.batch_size
        self.constrained = constrained

    def body(self, item: EvalItem, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.runner.model, "messages": item.messages,
                                "max_tokens": max_tokens, "temperature": 0.0}
        if item.data["tools"]:  # live_irrelevance has items with no function at all
            body.update(tools=item.data["tools"], tool_choice="auto")
        if self.constrained is not None:
            body["constrained_decoding"] = self.constrained
        return body

    def ask(self, item: EvalItem, max_tokens: int) -> tuple[Reply, Outcome]:
        start = time.perf_counter()
        try:
            out, seconds = self.runner._post("/chat/completions", self.body(item, max_tokens))
        except EvalError as exc:
            # A 4xx is this request's problem (a schema the endpoint cannot take): the item scores 0 and the
            # run goes on. Anything else (unreachable, 5xx after retries) stops the run.
            if re.search(r" answered 4\d\d: ", str(exc)):
                return Reply("", None, None, time.perf_counter() - start), Outcome("error", why=str(exc))
            raise
        try:
            message = out["choices"][0]["message"]
        except (KeyError, IndexError, TypeError) as exc:
            raise EvalError(f"{self.runner.base_url}: not a chat completion: {str(out)[:200]}") from exc
        usage = out.get("usage") or {}
        outcome = read_reply(message, item)
        reply = Reply(outcome.record(), usage.get("prompt_tokens"), usage.get("completion_tokens"), seconds)
        return reply, outcome


@dataclass
class BfclResult(ItemResult):
    outcome: Outcome = field(default_factory=lambda: Outcome("empty"))


def run(items: Sequence[EvalItem], client: ToolsClient, *, model: str, max_tokens: int = MAX_TOKENS,
        out: IO[str] | None = None, progress: bool = True) -> list[BfclResult]:
    """Ask every item, score it, write its routing-data row (with the outcome under "bfcl") to `out`."""
    from tqdm import tqdm

    results: list[BfclResult] = []
    with tqdm(total=len(items), desc=f"bfcl {model}", unit="item", disable=not progress) as bar, \
            ThreadPoolExecutor(client.batch_size) as pool:
        for start in range(0, len(items), client.batch_size):
            batch = items[start:start + client.batch_size]
            for item, (reply, outcome) in zip(batch, pool.map(lambda it: client.ask(it, max_tokens), batch),
                                              strict=True):
                value, why = score(item, outcome)
                result = BfclResult(item, reply, value, why, outcome)
                results.append(result)
                if out is not None:
                    row = routing_row(result, model, "bfcl")
                    row["bfcl"] = {"category": item.domain, "kind": outcome.kind,
                                   "constrained_decoding": client.constrained}
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                    out.flush()
            bar.update(len(batch))
            bar.set_postfix(acc=f"{sum(r.score for r in results) / len(results):.3f}")
    return results


def summarize(results: Sequence[BfclResult], *, model: str, engine: str, seconds: float,
              constrained: bool | None) -> dict[str, Any]:
    """The harness's summary (categories as domains), plus each category's outcome kinds and malformed count.
    """
    from fleetlm.evals.harness import summarize as base

    summary = base(results, bench="bfcl", model=model, engine=engine, seconds=seconds)
    for category, entry in summary["domains"].items():
        kinds = {k: sum(r.outcome.kind == k for r in results if r.item.domain == category) for k in KINDS}
        entry.update(kinds=kinds, malformed=kinds["malformed"])
    summary["malformed"] = sum(r.outcome.kind == "malformed" for r in results)
    summary["kinds"] = {k: sum(r.outcome.kind == k for r in results) for k in KINDS}
    summary["constrained_decoding"] = constrained
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """One row per category then "all": n, correct, accuracy, malformed calls, text replies, errors."""
    head = ["category", "n", "correct", "acc %", "malformed", "text", "errors"]
    rows = []
    for category, v in summary["domains"].items():
        k = v["kinds"]
        rows.append([category, str(v["n"]), f"{v['correct']:g}", f"{100 * v['accuracy']:.1f}",
                     str(k["malformed"]), str(k["text"] + k["empty"]), str(k["error"])])
    k, acc = summary["kinds"], summary["accuracy"]
    rows.append(["all", str(summary["n"]), f"{summary['correct']:g}",
                 "-" if acc is None else f"{100 * acc:.1f}", str(k["malformed"]), str(k["text"] + k["empty"]),
                 str(k["error"])])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        cells = enumerate(zip(r, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in cells)

    modes = {None: "endpoint default", True: "constrained", False: "unconstrained"}
    mode = modes[summary["constrained_decoding"]]
    title = (f"bfcl  model {summary['model']}  engine {summary['engine']}  {mode}  "
             f"{summary['seconds']:.0f} s, {summary['completion_tokens']} tokens")
    return "\n".join([title, line(head), "  ".join("-" * w for w in widths), *[line(r) for r in rows]])


# ---------------------------------------------------------------------------------------------- local models


def local_fleet(ref: str, engine: str = "fleetlm", dtype: str = "bf16") -> tuple[Any, str]:
    """A one-model fleet for a local model reference (catalog name, .gguf, checkpoint dir), and its name.

    The engine is set and the price given, so the gateway measures nothing before it serves."""
    from fleetlm.catalog import resolve_model
    from fleetlm.config import parse_config
    from fleetlm.errors import FleetError

    try:
        model = resolve_model(ref)
    except FleetError as exc:
        raise EvalError(str(exc)) from exc
    if model.kind == "url":
        raise EvalError(f"{ref} is a URL: call it directly")
    if engine not in ("fleetlm", "llama_cpp"):
        raise EvalError(f"unknown --engine {engine!r}; expected fleetlm or llama_cpp")
    if model.kind == "gguf":
        spec: dict[str, Any] = {"gguf": model.location, "engine": engine}
    else:
        if engine != "fleetlm":
            raise EvalError(f"--engine {engine} needs a GGUF model; {ref} is a checkpoint directory")
        spec = {"path": model.location, "dtype": dtype}
    spec["price"] = {"input": 0.0, "output": 0.0}
    name = re.sub(r"[^A-Za-z0-9._-]", "-", model.name) or "model"
    return parse_config({"models": {name: spec}}, "the bfcl eval's fleet"), name


@contextlib.contextmanager
def local_gateway(ref: str, engine: str = "fleetlm", dtype: str = "bf16",
                  start_timeout_s: float = 600.0) -> Iterator[tuple[str, str]]:
    """Our gateway's app on a one-model fleet, on a loopback port in a thread: (base URL, model name)."""
    import socket

    import uvicorn

    from fleetlm.serve.app import create_app
    from fleetlm.serve.backends import build_backends
    from fleetlm.serve.store import UsageStore

    config, name = local_fleet(ref, engine, dtype)
    with tempfile.TemporaryDirectory(prefix="fleet-bfcl-") as tmp:
        store = UsageStore(f"sqlite:///{Path(tmp) / 'usage.db'}")
        app = create_app(config, store, build_backends(config))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                               access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise EvalError(f"the in-process gateway for {ref} did not start")
            time.sleep(0.05)
        try:
            yield f"http://127.0.0.1:{port}/v1", name
        finally:
            server.should_exit = True
            thread.join(timeout=60)


def evaluate(model_ref: str, *, categories: Sequence[str], engine: str = "fleetlm", dtype: str = "bf16",
             split: str = "all", limit: int | None = None, seed: int | None = None, concurrency: int = 4,
             max_tokens: int = MAX_TOKENS, name: str | None = None, constrained: bool | None = None,
             out: IO[str] | None = None, progress: bool = True) -> tuple[dict[str, Any], list[BfclResult]]:
    """`fleet eval --bench bfcl`: load, ask (a URL directly, a local model through our gateway), score."""
    from fleetlm.catalog import resolve_model
    from fleetlm.errors import FleetError
    from fleetlm.evals.harness import timed

    if max_tokens < 1:
        raise EvalError(f"--max-tokens must be >= 1, got {max_tokens}")
    if concurrency < 1:
        raise EvalError(f"--concurrency must be >= 1, got {concurrency}")
    items = load_items(categories, split=split, limit=limit, seed=seed)
    if not items:
        raise EvalError(f"no BFCL items in split {split!r}")
    try:
        ref = resolve_model(model_ref)
    except FleetError as exc:
        raise EvalError(str(exc)) from exc
    with contextlib.ExitStack() as stack:
        if ref.kind == "url":
            base_url, upstream, engine_name = ref.location, ref.name, "api"
        else:
            base_url, upstream = stack.enter_context(local_gateway(model_ref, engine, dtype))
            engine_name = f"gateway/{engine}"
        client = ToolsClient(base_url, upstream, concurrency=concurrency, constrained=constrained)
        model = name or upstream
        results, seconds = timed(lambda: run(items, client, model=model, max_tokens=max_tokens, out=out,
                                             progress=progress))
    summary = summarize(results, model=model, engine=engine_name, seconds=seconds, constrained=constrained)
    summary.update(split=split, limit=limit, seed=seed, categories=list(categories))
    return summary, results
