"""Normalized exact match per answer kind, accuracy per domain and level, and routing data.

A tiny model's reply is judged on its first non-empty line, lightly normalized (whitespace, quotes, a
final period; thousands separators and number formats for numbers; case except where case is the task).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from fleetlm.tasks.base import CHECKS, TaskError

_QUOTES = "\"'`"


def _first_line(text: str) -> str:
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def normalize(text: str, check: str = "text") -> str:
    """The canonical form two answers are compared in; `check` is the record's "check" field."""
    if check not in CHECKS:
        raise TaskError(f"unknown check {check!r}; expected one of {', '.join(CHECKS)}")
    s = _first_line(text)
    s = s.strip(_QUOTES).strip()
    s = s[:-1].rstrip() if s.endswith(".") and check != "number" else s
    s = " ".join(s.split())
    if check == "number":
        s = s.rstrip(".").replace(",", "").replace("_", "").replace(" ", "")
        try:
            d = Decimal(s)
        except InvalidOperation:
            return s.lower()
        # 3000, 3000.0 and 3e3 are one number; normalize() alone would print 3E+3.
        out = format(d.normalize(), "f")
        return "0" if out == "-0" else out
    if check == "words":
        words = s.lower().replace("-", " ").replace(",", " ").split()
        return " ".join(w for w in words if w != "and")
    return s if check == "text_cs" else s.casefold()


def score(prediction: str, answer: str, check: str = "text") -> bool:
    return normalize(prediction, check) == normalize(answer, check)


@dataclass
class EvalReport:
    """Correct / total per (domain, level); accuracy in [0, 1] at any grouping."""

    cells: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    model: str | None = None
    data: str | None = None

    def add(self, domain: str, level: int, correct: bool) -> None:
        cell = self.cells.setdefault((domain, int(level)), [0, 0])
        cell[0] += int(correct)
        cell[1] += 1

    def counts(self, domain: str | None = None, level: int | None = None) -> tuple[int, int]:
        picked = [c for (d, lv), c in self.cells.items()
                  if (domain is None or d == domain) and (level is None or lv == level)]
        return sum(c[0] for c in picked), sum(c[1] for c in picked)

    def accuracy(self, domain: str | None = None, level: int | None = None) -> float | None:
        correct, total = self.counts(domain, level)
        return correct / total if total else None

    @property
    def domains(self) -> list[str]:
        return sorted({d for d, _ in self.cells})

    @property
    def levels(self) -> list[int]:
        return sorted({lv for _, lv in self.cells})

    def to_dict(self) -> dict[str, Any]:
        correct, total = self.counts()
        domains = {}
        for d in self.domains:
            dc, dt = self.counts(d)
            levels = {str(lv): {"correct": c[0], "n": c[1], "accuracy": c[0] / c[1]}
                      for (dd, lv), c in sorted(self.cells.items()) if dd == d}
            domains[d] = {"correct": dc, "n": dt, "accuracy": dc / dt, "levels": levels}
        return {"model": self.model, "data": self.data, "correct": correct, "n": total,
                "accuracy": correct / total if total else None, "domains": domains}


def score_records(records: Sequence[Mapping[str, Any]], predictions: Sequence[str],
                  report: EvalReport | None = None) -> tuple[EvalReport, list[bool]]:
    """Score one prediction per record (same order) into a report; returns it and the per-record marks."""
    if len(records) != len(predictions):
        raise TaskError(f"{len(predictions)} predictions for {len(records)} records")
    report = report or EvalReport()
    marks = []
    for rec, pred in zip(records, predictions, strict=True):
        ok = score(pred, str(rec["answer"]), rec.get("check", "text"))
        report.add(rec["domain"], int(rec.get("level", 0)), ok)
        marks.append(ok)
    return report, marks


def format_table(report: EvalReport) -> str:
    """Accuracy in percent, one row per domain, one column per level, then the row's total and count."""
    levels = report.levels
    head = ["domain"] + [f"L{lv}" for lv in levels] + ["all", "n"]
    rows = []
    for d in report.domains + ["all"]:
        dom = None if d == "all" else d
        cells = []
        for lv in levels:
            acc = report.accuracy(dom, lv)
            cells.append("-" if acc is None else f"{100 * acc:.1f}")
        acc = report.accuracy(dom)
        rows.append([d] + cells + ["-" if acc is None else f"{100 * acc:.1f}", str(report.counts(dom)[1])])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def prompt_of(record: Mapping[str, Any]) -> str:
    users = [m["content"] for m in record["messages"] if m.get("role") == "user"]
    if not users:
        raise TaskError(f"record {record.get('id')!r} has no user message")
    return users[-1]


def evaluate_model(model_dir: str | Path, records: Sequence[Mapping[str, Any]], dtype: str = "f32",
                   batch_size: int = 32, max_tokens: int = 48, progress: bool = True
                   ) -> tuple[EvalReport, list[str]]:
    """Greedy replies of a local checkpoint to every record, batched, and their scores."""
    from tqdm import tqdm

    from fleetlm.engine import Engine
    from fleetlm.tasks.suite import prompt_messages

    if batch_size < 1:
        raise TaskError(f"batch size must be >= 1, got {batch_size}")
    engine = Engine.load(model_dir, dtype=dtype)
    report = EvalReport(model=str(model_dir))
    predictions: list[str] = []
    with tqdm(total=len(records), desc=f"eval {Path(model_dir).name}", unit="q", disable=not progress) as bar:
        for start in range(0, len(records), batch_size):
            batch = records[start:start + batch_size]
            # A training file's gold assistant turn is dropped, so the model never sees the answer.
            conversations = [prompt_messages(r) for r in batch]
            replies = engine.chat(conversations, max_tokens=max_tokens, temperature=0.0)
            score_records(batch, replies, report)
            predictions += replies
            bar.update(len(batch))
            bar.set_postfix(acc=f"{report.accuracy():.3f}")
    return report, predictions


def routing_records(records: Sequence[Mapping[str, Any]],
                    predictions: Mapping[str, Sequence[str]]) -> list[dict[str, Any]]:
    """One routing-data row per record: each model's reply and its 0/1 score (see DESIGN.md)."""
    for model, preds in predictions.items():
        if len(preds) != len(records):
            raise TaskError(f"model {model!r}: {len(preds)} predictions for {len(records)} records")
    rows = []
    for i, rec in enumerate(records):
        responses = {m: preds[i] for m, preds in predictions.items()}
        check = rec.get("check", "text")
        scores = {m: float(score(p, str(rec["answer"]), check)) for m, p in responses.items()}
        rows.append({"id": rec.get("id", str(i)), "prompt": prompt_of(rec), "domain": rec.get("domain"),
                     "level": rec.get("level"), "responses": responses, "scores": scores})
    return rows


def write_routing_data(path: str | Path, records: Sequence[Mapping[str, Any]],
                       predictions: Mapping[str, Sequence[str]]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in routing_records(records, predictions):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
