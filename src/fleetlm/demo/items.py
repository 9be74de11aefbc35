"""The demo's held-out items: the test split of HumanEval, GSM8K and the task suite, in a seeded order.

Splits are the eval harness's (`fleetlm.evals.harness.split_of`, a hash of the item id), the same ones the
recorded outcomes are split by, so no item the router was fitted or calibrated on is ever sent here.
Task-suite items are those `fleet fleet record` draws (fleetlm.fleet.record.task_records: the suite's split
and the harness's agree), so every item sent here has a recorded outcome too.
"""

from __future__ import annotations

import itertools
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fleetlm.errors import FleetError
from fleetlm.evals.harness import Benchmark, EvalItem, select

BENCHES = ("humaneval", "gsm8k", "tasks")


@dataclass
class DemoBench:
    """One benchmark of the demo: its scorer and limits, and its held-out items in the order they are sent."""

    name: str
    benchmark: Benchmark
    items: list[EvalItem]


def _humaneval() -> Benchmark:
    from fleetlm.evals import humaneval
    from fleetlm.sandbox import check_sandbox

    check_sandbox()  # never ask for code we could not run safely
    return humaneval.benchmark()


def _gsm8k(data: str | Path | None) -> Benchmark:
    from fleetlm.evals import gsm8k

    kept, _ = gsm8k.load(data)
    return gsm8k.benchmark(kept)


def _tasks(seed: int) -> Benchmark:
    from fleetlm.evals import tasks
    from fleetlm.fleet.record import TASKS_PER_DOMAIN, task_records
    from fleetlm.tasks.suite import write_jsonl

    # the recording's own draw (its default seed) and the harness's items (prompts as `fleet eval` sends
    # them), so the items sent are among the recorded test items and asked the same way
    records = [r for r in task_records(TASKS_PER_DOMAIN, 0) if r["split"] == "test"]
    with tempfile.TemporaryDirectory() as tmp:
        items = tasks.items(write_jsonl(records, Path(tmp) / "tasks.jsonl"))
    random.Random(seed).shuffle(items)
    by_domain: dict[str, list[EvalItem]] = {}
    for it in items:
        by_domain.setdefault(it.domain, []).append(it)
    # one domain after another, so that the first few items sent already cover every domain
    mixed = [it for group in itertools.zip_longest(*by_domain.values()) for it in group if it is not None]
    return tasks.benchmark(mixed)


def load_bench(name: str, seed: int, gsm8k_data: str | Path | None = None) -> DemoBench:
    """A benchmark's held-out (test split) items, shuffled with `seed` (task suite: domains interleaved)."""
    if name == "humaneval":
        bench = _humaneval()
        items = select(bench.items, "test", seed=seed)
    elif name == "gsm8k":
        bench = _gsm8k(gsm8k_data)
        items = select(bench.items, "test", seed=seed)
    elif name == "tasks":
        bench = _tasks(seed)
        items = select(bench.items, "test")  # already in the interleaved order
    else:
        raise FleetError(f"unknown benchmark {name!r}; expected some of {', '.join(BENCHES)}")
    if not items:
        raise FleetError(f"{name}: no held-out items")
    return DemoBench(name, bench, items)


def load_benches(names: list[str], seed: int, gsm8k_data: str | Path | None = None
                 ) -> tuple[list[DemoBench], list[str]]:
    """The benchmarks that can run here, and one note for each that cannot (say, no GSM8K data)."""
    benches, notes = [], []
    for name in names:
        try:
            benches.append(load_bench(name, seed, gsm8k_data))
        except FleetError as exc:
            notes.append(f"{name} left out: {exc}")
    return benches, notes
