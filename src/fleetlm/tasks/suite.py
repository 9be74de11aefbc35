"""The registry of domains, the hash splits and `generate`, which turns tasks into chat records.

A record is `{"id", "domain", "level", "split", "kind", "check", "messages": [user], "answer"}`: append
`{"role": "assistant", "content": answer}` to train on it, or score a model's reply against `answer`.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from fleetlm.jsonl import iter_jsonl
from fleetlm.tasks import arithmetic, classification, conversion, facts, strings
from fleetlm.tasks.base import Task, TaskError

DOMAINS: dict[str, ModuleType] = {
    m.DOMAIN: m for m in (arithmetic, strings, conversion, facts, classification)}
SPLITS = ("train", "dev", "test")
# Share of the question space each split owns, by hash; the rest after train and dev is test.
SPLIT_SHARES = {"train": 0.8, "dev": 0.1}


def split_of(domain: str, question: str) -> str:
    """The split a question belongs to, forever: a hash of the canonical question, so splits never overlap
    whatever the seed, the order or the number drawn."""
    digest = hashlib.sha256(f"{domain}\n{question}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < SPLIT_SHARES["train"]:
        return "train"
    return "dev" if u < SPLIT_SHARES["train"] + SPLIT_SHARES["dev"] else "test"


def task_id(domain: str, question: str) -> str:
    return f"{domain}-{hashlib.sha256(question.encode()).hexdigest()[:12]}"


def levels_of(domain: str) -> tuple[int, ...]:
    return domain_module(domain).LEVELS


def domain_module(domain: str) -> ModuleType:
    if domain not in DOMAINS:
        raise TaskError(f"unknown domain {domain!r}; expected one of {', '.join(DOMAINS)}")
    return DOMAINS[domain]


def to_record(task: Task, system: str | None = None) -> dict[str, Any]:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": task.question}]
    return {"id": task_id(task.domain, task.question), "domain": task.domain, "level": task.level,
            "split": split_of(task.domain, task.question), "kind": task.kind, "check": task.check,
            "messages": messages, "answer": task.answer}


def with_answer(record: dict[str, Any]) -> dict[str, Any]:
    """The record as a training conversation: the gold answer appended as the assistant turn."""
    answer = {"role": "assistant", "content": record["answer"]}
    return {**record, "messages": prompt_messages(record) + [answer]}


def prompt_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    """The messages a model is asked with: any trailing assistant turn (a training answer) removed."""
    messages = list(record["messages"])
    while messages and messages[-1].get("role") == "assistant":
        messages.pop()
    return messages


def _sampler(domain: str, world_seed: int) -> Callable[[random.Random, int], Task]:
    module = domain_module(domain)
    if domain == "facts":
        return lambda rng, level: module.generate(rng, level, world_seed=world_seed)
    return module.generate


def generate(domains: Sequence[str] | None = None, n: int = 100, seed: int = 0,
             levels: Sequence[int] | None = None, split: str = "train", unique: bool = True,
             world_seed: int = 0, system: str | None = None, max_tries: int = 200,
             answers: bool = False) -> list[dict[str, Any]]:
    """`n` records per domain, spread evenly over the levels, drawn only from `split` ("all": any split).

    With `unique`, a question appears at most once per domain; a level whose question space (in that split) is
    smaller than its share yields fewer records rather than looping forever (`max_tries` draws per record).
    With `answers`, each conversation ends with the gold answer as the assistant turn (training data).
    """
    if split not in (*SPLITS, "all"):
        raise TaskError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)} or all")
    if n < 0:
        raise TaskError(f"n must be >= 0, got {n}")
    records: list[dict[str, Any]] = []
    for domain in domains or list(DOMAINS):
        known = levels_of(domain)
        domain_levels = known if levels is None else [lv for lv in levels if lv in known]
        if not domain_levels and domains is None:
            continue  # every domain by default: those without the asked levels (classification > 3) sit out
        if not domain_levels:
            raise TaskError(f"domain {domain!r} has none of levels {list(levels or [])}; it has {known}")
        sample = _sampler(domain, world_seed)
        seen: set[str] = set()  # per domain: nested facts worlds can draw one question at two levels
        for i, level in enumerate(domain_levels):
            want = n // len(domain_levels) + (1 if i < n % len(domain_levels) else 0)
            rng = random.Random(f"{seed}:{domain}:{level}")
            got = 0
            for _ in range(want * max_tries):
                if got == want:
                    break
                task = sample(rng, level)
                if (split != "all" and split_of(domain, task.question) != split) or (
                        unique and task.question in seen):
                    continue
                seen.add(task.question)
                record = to_record(task, system)
                records.append(with_answer(record) if answers else record)
                got += 1
    if levels is not None and not records and n > 0 and domains is None:
        raise TaskError(f"no domain has levels {list(levels)}")
    return records


def parse_levels(text: str | None) -> list[int] | None:
    """"1,3,5" or "2-4" (or a mix) to a list of ints; None or "" means every level."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.strip().partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError as exc:
        raise TaskError(f"bad --levels {text!r}: use e.g. 1,2,3 or 2-5") from exc
    return out


def write_jsonl(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Task records from a JSONL file, with a one-line TaskError for a missing file or a bad line."""
    records = []
    for where, rec in iter_jsonl(path, TaskError):
        missing = [k for k in ("messages", "answer", "domain") if not isinstance(rec, dict) or k not in rec]
        if missing:
            raise TaskError(f"{where}: record lacks {', '.join(missing)}")
        records.append(rec)
    return records


def write_documents(out_dir: str | Path, world_seed: int = 0, level: int = max(facts.LEVELS)) -> Path:
    """The facts world as documents: one .txt per entity plus docs.jsonl, for retrieval later."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = facts.documents(world_seed, level)
    for d in docs:
        (out / f"{d['id']}.txt").write_text(f"{d['title']}\n\n{d['text']}\n")
    return write_jsonl(docs, out / "docs.jsonl")
