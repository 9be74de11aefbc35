"""The built-in checkable task suite: generators per domain, hash splits, evaluators, routing data."""

from fleetlm.tasks.base import Task, TaskError
from fleetlm.tasks.evaluate import (
    EvalReport,
    format_table,
    normalize,
    routing_records,
    score,
    score_records,
    write_routing_data,
)
from fleetlm.tasks.facts import documents
from fleetlm.tasks.suite import (
    DOMAINS,
    SPLITS,
    generate,
    read_jsonl,
    split_of,
    write_documents,
    write_jsonl,
)

__all__ = [
    "DOMAINS", "SPLITS", "EvalReport", "Task", "TaskError", "documents", "format_table", "generate",
    "normalize", "read_jsonl", "routing_records", "score", "score_records", "split_of", "write_documents",
    "write_jsonl", "write_routing_data",
]
