"""GSM8K from recorded answers: gold is the final number of a recorded answer marked correct.

The folder layout (RouteLLM's gsm8k data): `gsm8k_responses.csv` with a `prompt` column, one True/False
column per model and its `<model>_response` column, and `contaminated_prompts.jsonl` (questions seen in
training, dropped). A question keeps its place only if some recorded answer is marked correct and all the
correct ones end in the same number. The model is asked to reason step by step and end with
"The answer is N"; a reply scores 1 when its final number equals the gold number.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
from decimal import Decimal, InvalidOperation
from pathlib import Path

from fleetlm.evals.harness import Benchmark, EvalError, EvalItem
from fleetlm.jsonl import iter_jsonl

DEFAULT_DATA = Path("/work/shared/data/routellm/gsm8k")
DATA_ENV = "FLEET_GSM8K_DATA"
RESPONSES = "gsm8k_responses.csv"
CONTAMINATED = "contaminated_prompts.jsonl"
MAX_TOKENS = 512

INSTRUCTION = ("{question}\n\nSolve the problem step by step. End with a last line of the form "
               "\"The answer is N\", where N is the final number alone.")

_NUMBER = r"[-\u2212]?\s?\$?\s?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_NUMBER_RE = re.compile(_NUMBER)
_MARKED = [re.compile(r"answer\s+is\s*[:=]?\s*\**\s*(" + _NUMBER + ")", re.I),
           re.compile(r"####\s*(" + _NUMBER + ")"),
           re.compile(r"\\boxed\{\s*(" + _NUMBER + r")\s*\}")]


def parse_number(text: str) -> Decimal | None:
    """"$1,234.50" -> 1234.50; "−3" -> -3; None when it is not a number."""
    s = text.replace("\u2212", "-").replace("$", "").replace(",", "").replace(" ", "").rstrip(".")
    if s in ("", "-", "."):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def final_number(text: str) -> Decimal | None:
    """A reply's answer: after its last "The answer is", "####" or \\boxed{}, else its last number."""
    for pattern in _MARKED:
        marked = pattern.findall(text)
        if marked:
            return parse_number(marked[-1])
    numbers = _NUMBER_RE.findall(text)
    return parse_number(numbers[-1]) if numbers else None


def same_number(a: Decimal | None, b: Decimal | None) -> bool:
    return a is not None and b is not None and a == b


def extract_question(prompt: str) -> str:
    """The last question of a prompt; a few-shot preamble ("Question: ... Answer: ...") is dropped."""
    parts = re.split(r"(?:^|\n)\s*(?:Question|Q)\s*:\s*", prompt)
    question = parts[-1] if len(parts) > 1 else prompt
    question = re.split(r"\n\s*(?:Answer|A)\s*:", question)[0]
    return question.strip()


def _normalized(text: str) -> str:
    return " ".join(text.replace("\u2019", "'").split())


def data_dir(data: str | Path | None) -> Path:
    path = Path(data or os.environ.get(DATA_ENV) or DEFAULT_DATA)
    if not (path / RESPONSES).is_file():
        raise EvalError(f"no GSM8K data: {path / RESPONSES} not found (give --data DIR with {RESPONSES})")
    return path


def _contaminated(folder: Path) -> set[str]:
    path = folder / CONTAMINATED
    if not path.is_file():
        return set()
    seen = set()
    for _, row in iter_jsonl(path, EvalError, "contaminated prompts"):
        if not isinstance(row, dict):
            continue
        seen |= {_normalized(row[k]) for k in ("eval_prompt", "train_prompt") if isinstance(row.get(k), str)}
    return seen


def load(data: str | Path | None = None) -> tuple[list[EvalItem], dict[str, int]]:
    """The kept items and how many rows were dropped for each reason."""
    folder = data_dir(data)
    contaminated = _contaminated(folder)
    with (folder / RESPONSES).open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        models = [c for c in columns if f"{c}_response" in columns]
        if "prompt" not in columns or not models:
            raise EvalError(f"{folder / RESPONSES}: want columns prompt, <model> and <model>_response")
        rows = list(reader)
    dropped = {"contaminated": 0, "no_correct_answer": 0, "correct_answers_disagree": 0}
    kept: list[EvalItem] = []
    for row in rows:
        question = extract_question(row["prompt"])
        if _normalized(question) in contaminated or _normalized(row["prompt"]) in contaminated:
            dropped["contaminated"] += 1
            continue
        golds = [final_number(row[f"{m}_response"] or "") for m in models
                 if str(row[m]).strip().lower() == "true"]
        golds = [g for g in golds if g is not None]
        if not golds:
            dropped["no_correct_answer"] += 1
            continue
        if any(g != golds[0] for g in golds):
            dropped["correct_answers_disagree"] += 1
            continue
        item_id = "gsm8k-" + hashlib.sha256(_normalized(question).encode()).hexdigest()[:12]
        kept.append(EvalItem(id=item_id, prompt=question, domain="math",
                             messages=[{"role": "user", "content": INSTRUCTION.format(question=question)}],
                             data={"gold": str(golds[0])}))
    return kept, dropped


def score(item: EvalItem, reply: str, completion_mode: bool = False) -> tuple[float, str]:
    got = final_number(reply)
    gold = Decimal(item.data["gold"])
    if got is None:
        return 0.0, f"no number (gold {gold})"
    return (1.0, f"{got} = gold") if same_number(got, gold) else (0.0, f"{got} != gold {gold}")


def benchmark(items: list[EvalItem]) -> Benchmark:
    return Benchmark("gsm8k", items, score, MAX_TOKENS, ["\n\nQuestion:"])
