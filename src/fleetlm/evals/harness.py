"""The benchmark harness: items, a stable train/test split, the run loop, routing-data rows and a summary.

A benchmark is a list of `EvalItem`s and a `score(item, reply) -> (score, detail)`; a runner (runners.py)
answers batches of them. Every item becomes one routing-data row (shared/DESIGN.md "Data formats").
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fleetlm.errors import FleetError

# Share of items in the train split; the rest is test. Fixed: the router issue's splits must never mix.
TRAIN_FRACTION = 0.8
SPLITS = ("train", "test", "all")


class EvalError(FleetError):
    """A bad benchmark name, data folder, model reference or endpoint, reported in one line."""


@dataclass
class EvalItem:
    """One question: `messages` for a chat model, `completion` (raw text) for a base model."""

    id: str
    prompt: str                       # the question as routing data records it
    messages: list[dict[str, str]]
    domain: str
    completion: str | None = None     # the prompt to continue in completion mode (HumanEval)
    data: dict[str, Any] = field(default_factory=dict)  # what the scorer needs (tests, gold, ...)


@dataclass
class Benchmark:
    name: str
    items: list[EvalItem]
    score: Callable[[EvalItem, str, bool], tuple[float, str]]   # (item, reply, completion mode)
    max_tokens: int
    stop: list[str] = field(default_factory=list)   # stop strings in completion mode
    chat_stop: list[str] = field(default_factory=list)  # and in chat mode


@dataclass
class Reply:
    text: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    seconds: float = 0.0


@dataclass
class ItemResult:
    item: EvalItem
    reply: Reply
    score: float
    detail: str


def split_of(item_id: str) -> str:
    """"train" or "test", from a hash of the id alone: stable across runs, files and machines."""
    digest = hashlib.sha256(f"fleetlm-split:{item_id}".encode()).digest()
    return "train" if int.from_bytes(digest[:8], "big") / 2**64 < TRAIN_FRACTION else "test"


def select(items: Sequence[EvalItem], split: str = "all", limit: int | None = None,
           seed: int | None = None) -> list[EvalItem]:
    """The items of one split; then the first `limit` of them, or `limit` drawn with `seed`."""
    if split not in SPLITS:
        raise EvalError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if limit is not None and limit < 1:
        raise EvalError(f"--limit must be >= 1, got {limit}")
    picked = [it for it in items if split == "all" or split_of(it.id) == split]
    if seed is not None:
        picked = random.Random(seed).sample(picked, len(picked))
    return picked[:limit] if limit else picked


def routing_row(result: ItemResult, model: str, bench: str) -> dict[str, Any]:
    item, reply = result.item, result.reply
    return {"id": item.id, "prompt": item.prompt, "domain": item.domain, "bench": bench,
            "split": split_of(item.id), "responses": {model: reply.text}, "scores": {model: result.score},
            "tokens": {model: {"prompt": reply.prompt_tokens, "completion": reply.completion_tokens}},
            "latency_s": {model: round(reply.seconds, 4)}, "detail": {model: result.detail}}


def run_benchmark(bench: Benchmark, runner: Any, items: Sequence[EvalItem], *, model: str,
                  completion_mode: bool = False, out: IO[str] | None = None,
                  progress: bool = True) -> list[ItemResult]:
    """Ask `runner` every item in batches of runner.batch_size, score each reply, write its row to `out`."""
    from tqdm import tqdm

    results: list[ItemResult] = []
    correct = 0.0
    with tqdm(total=len(items), desc=f"{bench.name} {model}", unit="item", disable=not progress) as bar:
        for start in range(0, len(items), runner.batch_size):
            batch = items[start:start + runner.batch_size]
            if completion_mode:
                prompts = [it.completion or it.prompt for it in batch]
                replies = runner.complete(prompts, max_tokens=bench.max_tokens, stop=bench.stop)
            else:
                replies = runner.chat([it.messages for it in batch], max_tokens=bench.max_tokens,
                                      stop=bench.chat_stop)
            for it, reply in zip(batch, replies, strict=True):
                score, detail = bench.score(it, reply.text, completion_mode)
                result = ItemResult(it, reply, score, detail)
                results.append(result)
                correct += score
                if out is not None:
                    out.write(json.dumps(routing_row(result, model, bench.name), ensure_ascii=False) + "\n")
                    out.flush()
            bar.update(len(batch))
            bar.set_postfix(acc=f"{correct / len(results):.3f}")
    return results


def summarize(results: Sequence[ItemResult], *, bench: str, model: str, engine: str,
              seconds: float) -> dict[str, Any]:
    """Accuracy overall and per domain, tokens and time: the `--json` summary."""
    by_domain: dict[str, list[float]] = {}
    for r in results:
        by_domain.setdefault(r.item.domain, []).append(r.score)
    completion = sum(r.reply.completion_tokens or 0 for r in results)
    n = len(results)
    total = sum(r.score for r in results)
    return {"bench": bench, "model": model, "engine": engine, "n": n, "correct": total,
            "accuracy": total / n if n else None,
            "domains": {d: {"n": len(s), "correct": sum(s), "accuracy": sum(s) / len(s)}
                        for d, s in sorted(by_domain.items())},
            "completion_tokens": completion, "seconds": round(seconds, 2),
            "tokens_per_second": round(completion / seconds, 2) if seconds > 0 else None}


def format_summary(summary: dict[str, Any]) -> str:
    """One row per domain then "all": n, correct, accuracy in percent."""
    rows = [[d, str(v["n"]), f"{v['correct']:g}", f"{100 * v['accuracy']:.1f}"]
            for d, v in summary["domains"].items()]
    acc = summary["accuracy"]
    rows.append(["all", str(summary["n"]), f"{summary['correct']:g}",
                 "-" if acc is None else f"{100 * acc:.1f}"])
    head = ["domain", "n", "correct", "acc %"]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(r: list[str]) -> str:
        cells = zip(r, widths, strict=True)
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(cells))

    title = (f"{summary['bench']}  model {summary['model']}  engine {summary['engine']}  "
             f"{summary['seconds']:.0f} s, {summary['completion_tokens']} tokens")
    return "\n".join([title, line(head), "  ".join("-" * w for w in widths), *[line(r) for r in rows]])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def open_out(path: Path | None) -> IO[str] | None:
    if path is None:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", encoding="utf-8")
