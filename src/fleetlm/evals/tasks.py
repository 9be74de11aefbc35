"""The task suite as a benchmark: records from `fleet tasks generate`, scored by tasks/evaluate.py."""

from __future__ import annotations

from pathlib import Path

from fleetlm.evals.harness import Benchmark, EvalItem
from fleetlm.tasks.evaluate import prompt_of
from fleetlm.tasks.evaluate import score as score_answer

MAX_TOKENS = 48
# The suite is scored by exact match on the reply's first line. The toy models were trained to answer bare;
# a real chat model explains itself unless told not to (Qwen2.5-Coder-0.5B scored 0/61 without this line,
# answering "The answer is 12." to "6 * 2 ="), so chat prompts carry the answer format as a system turn.
ANSWER_ONLY = "Reply with the answer only: one line, no explanation, no extra words."


def items(data: Path) -> list[EvalItem]:
    from fleetlm.tasks.base import TaskError
    from fleetlm.tasks.suite import prompt_messages, read_jsonl

    records = read_jsonl(data)
    if not records:
        raise TaskError(f"no records in {data}")
    return [EvalItem(id=str(r.get("id", i)), prompt=prompt_of(r), messages=answer_only(prompt_messages(r)),
                     domain=r["domain"],
                     data={"answer": str(r["answer"]), "check": r.get("check", "text"),
                           "level": int(r.get("level", 0))})
            for i, r in enumerate(records)]


def answer_only(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """The messages with the answer-format system turn first (kept if the record brings its own)."""
    if messages and messages[0].get("role") == "system":
        return messages
    return [{"role": "system", "content": ANSWER_ONLY}, *messages]


def score(item: EvalItem, reply: str, completion_mode: bool = False) -> tuple[float, str]:
    ok = score_answer(reply, item.data["answer"], item.data["check"])
    return (1.0, "correct") if ok else (0.0, f"expected {item.data['answer']!r}")


def benchmark(task_items: list[EvalItem], max_tokens: int = MAX_TOKENS) -> Benchmark:
    return Benchmark("tasks", task_items, score, max_tokens)
