"""Distillation data from the gateway's usage log: one domain's prompts and the answers a model gave them.

The gateway stores prompts and answers only when fleet.yaml says `log_content: true`. A usage log here is a
SQLite file (the gateway's default storage), any SQLAlchemy URL the gateway accepts, or a JSONL export (one
logged request per line, the columns of the `requests` table). Kept: successful chat requests whose last
user turn is one of the domain's prompts, answered by `model` when given. The domain's split of each prompt
decides its use: train rows teach the student, dev rows are kept aside to score the expert against the
teacher's logged answers (the router's refit data), and test prompts are dropped (they are held out).
A conversation logged more than once counts once, with its latest answer (a repeated request should not
weigh more in training than another).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from fleetlm.errors import ConfigError
from fleetlm.train.data import DataError, read_jsonl


@dataclass
class LoggedAnswer:
    request_id: str
    messages: list[dict[str, Any]]  # the conversation the model answered
    answer: str  # what it answered (the first choice)
    model: str  # the model that answered
    split: str  # the domain's split of the prompt


def read_log(source: str | Path) -> list[dict[str, Any]]:
    """Every logged request of a usage log (SQLite file, SQLAlchemy URL or JSONL export), oldest first."""
    text = str(source)
    if "://" not in text:
        path = Path(text)
        if not path.is_file():
            raise DataError(f"usage log not found: {path}")
        if path.suffix == ".jsonl":
            return read_jsonl(path)
        text = f"sqlite:///{path.resolve()}"
    from fleetlm.serve.store import UsageStore

    store = UsageStore(text)
    try:
        return store.requests()
    finally:
        store.close()


def _last_user(messages: list[dict[str, Any]]) -> str:
    users = [m for m in messages if m.get("role") == "user"]
    content = users[-1].get("content") if users else None
    if isinstance(content, list):  # content parts: the text ones
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else ""


def domain_answers(rows: list[dict[str, Any]], domain: ModuleType, model: str | None = None
                   ) -> tuple[list[LoggedAnswer], Counter]:
    """The domain's logged answers and a count of why the other rows were skipped."""
    kept: dict[str, LoggedAnswer] = {}  # by conversation and model; a later row replaces an earlier one
    skipped: Counter = Counter()
    for row in rows:
        if row.get("endpoint") != "chat" or int(row.get("status") or 0) != 200:
            skipped["not a successful chat request"] += 1
            continue
        if row.get("prompt") is None or row.get("response") is None:
            skipped["no content logged (log_content off)"] += 1
            continue
        try:
            messages = json.loads(row["prompt"])
        except (TypeError, json.JSONDecodeError):
            skipped["unreadable prompt"] += 1
            continue
        if not isinstance(messages, list) or not domain.matches(_last_user(messages)):
            skipped["another domain"] += 1
            continue
        if model is not None and row.get("model_used") != model:
            skipped[f"answered by another model than {model}"] += 1
            continue
        split = domain.split_of(domain.message_of(_last_user(messages)))
        if split == "test":
            skipped["held-out (test split) prompt"] += 1
            continue
        key = json.dumps([messages, row.get("model_used")], sort_keys=True)
        if key in kept:
            skipped["repeated conversation (the latest answer kept)"] += 1
        kept[key] = LoggedAnswer(str(row.get("request_id")), messages, str(row["response"]),
                                 str(row.get("model_used")), split)
    return list(kept.values()), skipped


def usage_records(source: str | Path, domain: ModuleType, model: str | None = None
                  ) -> tuple[list[LoggedAnswer], Counter]:
    """The domain's logged answers of a usage log; a clear error when none is usable."""
    answers, skipped = domain_answers(read_log(source), domain, model)
    if not answers:
        why = ", ".join(f"{n} {reason}" for reason, n in skipped.most_common()) or "the log is empty"
        raise ConfigError(f"no logged {domain.DOMAIN} answers to learn from in {source} ({why}); serve the "
                          f"domain's traffic with log_content: true in fleet.yaml")
    return answers, skipped


def chat_rows(answers: list[LoggedAnswer]) -> list[dict[str, Any]]:
    """Chat JSONL rows (the loop's format): the logged conversation with the logged answer appended."""
    return [{"id": a.request_id, "source": a.model, "split": a.split,
             "messages": [*a.messages, {"role": "assistant", "content": a.answer}]} for a in answers]
