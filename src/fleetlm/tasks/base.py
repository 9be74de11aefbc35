"""The one record every domain produces: a question, its gold answer and how to check it."""

from __future__ import annotations

from dataclasses import dataclass

from fleetlm.errors import FleetError

# How a prediction is compared with the gold answer (see fleetlm.tasks.evaluate.normalize).
CHECKS = ("number", "text", "text_cs", "words")


class TaskError(FleetError):
    """A task request that cannot be met: an unknown domain, level or split, or a bad data file."""


@dataclass(frozen=True)
class Task:
    """One checkable question. `question` is the canonical user prompt; the split is a hash of it."""

    domain: str
    level: int
    kind: str  # the sub-task, e.g. "add", "reverse", "to_words"
    question: str
    answer: str
    check: str = "text"  # one of CHECKS

    def __post_init__(self) -> None:
        if self.check not in CHECKS:
            raise TaskError(f"unknown check {self.check!r}; expected one of {', '.join(CHECKS)}")
