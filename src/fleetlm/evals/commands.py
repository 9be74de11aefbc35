"""`fleet eval`: one harness for HumanEval, GSM8K, the task suite and BFCL, on a local model or a URL."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from fleetlm.evals.harness import SPLITS, EvalError

BENCHES = ("humaneval", "gsm8k", "tasks", "bfcl")
MODES = ("chat", "complete")


def load_bench(bench: str, data: Path | None, max_tokens: int | None):
    """A benchmark by name (humaneval, gsm8k, tasks), its reply length capped at max_tokens if given."""
    if bench == "humaneval":
        from fleetlm.evals import humaneval
        from fleetlm.sandbox import check_sandbox

        check_sandbox()  # before the model loads: never generate code we could not run safely
        out = humaneval.benchmark()
    elif bench == "gsm8k":
        from fleetlm.evals import gsm8k

        kept, dropped = gsm8k.load(data)
        typer.echo(f"gsm8k: {len(kept)} questions kept (dropped: "
                   + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in dropped.items()) + ")", err=True)
        out = gsm8k.benchmark(kept)
    else:
        from fleetlm.evals import tasks
        from fleetlm.tasks.base import TaskError

        if data is None:
            raise TaskError("--bench tasks needs --data FILE.jsonl (from `fleet tasks generate`)")
        out = tasks.benchmark(tasks.items(data))
    if max_tokens is not None:
        if max_tokens < 1:
            raise EvalError(f"--max-tokens must be >= 1, got {max_tokens}")
        out.max_tokens = max_tokens
    return out


def _task_report(results, model: str, data: Path | None):
    from fleetlm.tasks.evaluate import EvalReport

    report = EvalReport(model=model, data=str(data) if data else None)
    for r in results:
        report.add(r.item.domain, r.item.data["level"], r.score == 1.0)
    return report


def eval_cmd(
    model: str = typer.Option(..., "--model", help="Catalog name, .gguf, checkpoint dir, URL[#model]."),
    bench: str = typer.Option("tasks", "--bench", help="humaneval, gsm8k, tasks or bfcl."),
    data: Path | None = typer.Option(None, "--data",
                                     help="tasks: records JSONL; gsm8k: a folder with gsm8k_responses.csv."),
    engine: str = typer.Option("fleetlm", "--engine", help="fleetlm (our engine) or llama_cpp (a GGUF)."),
    dtype: str | None = typer.Option(None, "--dtype", help="Our engine: f32, bf16, int8 or int4 "
                                                           "(default f32 for tasks, bf16 otherwise)."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N items (of the split; bfcl: "
                                                           "N per category)."),
    split: str = typer.Option("all", "--split", help="train, test or all (a stable hash of the item id)."),
    seed: int | None = typer.Option(None, "--seed", help="Draw the --limit items with this seed."),
    mode: str = typer.Option("chat", "--mode", help="chat, or complete (plain continuation: base models)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Our engine: prompts per batch."),
    concurrency: int = typer.Option(4, "--concurrency", help="A URL: requests at once."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads (llama.cpp default 1)."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="Longest reply (default per bench)."),
    name: str | None = typer.Option(None, "--name", help="The model's name in the output rows."),
    out: Path | None = typer.Option(None, "--out", help="Routing-data JSONL: one row per item."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the JSON summary here."),
    predictions_out: Path | None = typer.Option(None, "--predictions",
                                                help="tasks: replies and marks, for `fleet tasks routing`."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
    category: str | None = typer.Option(None, "--category",
                                        help="bfcl: categories, comma-separated, or all (default: simple, "
                                             "multiple, parallel, parallel_multiple, irrelevance, "
                                             "live_simple, live_multiple)."),
    constrained: bool | None = typer.Option(None, "--constrained/--unconstrained",
                                            help="bfcl: send constrained_decoding true/false (our gateway: "
                                                 "grammar-constrained tool calls, or the free baseline); "
                                                 "default: send nothing."),
) -> None:
    """Score a model on a benchmark; one routing-data row per item, a progress bar and a summary table."""
    from fleetlm.evals.harness import format_summary, open_out, run_benchmark, select, summarize, timed
    from fleetlm.evals.runners import make_runner

    if bench not in BENCHES:
        raise EvalError(f"unknown --bench {bench!r}; expected one of {', '.join(BENCHES)}")
    if mode not in MODES:
        raise EvalError(f"unknown --mode {mode!r}; expected chat or complete")
    if split not in SPLITS:
        raise EvalError(f"unknown --split {split!r}; expected one of {', '.join(SPLITS)}")
    if bench == "bfcl":
        if mode != "chat":
            raise EvalError("--bench bfcl asks chat models with tools: --mode complete does not apply")
        _eval_bfcl(model, category, engine=engine, dtype=dtype or "bf16", limit=limit, split=split,
                   seed=seed, concurrency=concurrency, max_tokens=max_tokens, name=name,
                   constrained=constrained, out=out, json_out=json_out, progress=progress)
        return
    if category is not None or constrained is not None:
        raise EvalError("--category and --constrained/--unconstrained are for --bench bfcl")
    benchmark = load_bench(bench, data, max_tokens)
    items = select(benchmark.items, split=split, limit=limit, seed=seed)
    if not items:
        raise EvalError(f"no {bench} items in split {split!r}")
    runner, model_name = make_runner(model, engine=engine,
                                     dtype=dtype or ("f32" if bench == "tasks" else "bf16"),
                                     batch_size=batch_size or (32 if bench == "tasks" else 8),
                                     concurrency=concurrency, threads=threads)
    model_name = name or model_name
    engine_name = "api" if type(runner).__name__ == "OpenAIRunner" else engine
    sink = open_out(out)
    try:
        results, seconds = timed(lambda: run_benchmark(benchmark, runner, items, model=model_name,
                                                       completion_mode=mode == "complete", out=sink,
                                                       progress=progress))
    finally:
        if sink is not None:
            sink.close()
    summary = summarize(results, bench=bench, model=model_name, engine=engine_name, seconds=seconds)
    summary.update(split=split, limit=limit, mode=mode)
    if bench == "tasks":
        from fleetlm.tasks.evaluate import format_table

        report = _task_report(results, model_name, data)
        typer.echo(format_table(report))
        summary.update({k: v for k, v in report.to_dict().items() if k in ("domains", "data")})
    else:
        typer.echo(format_summary(summary))
    _write_summary(summary, out, json_out)
    if predictions_out:
        from fleetlm.tasks.suite import write_jsonl

        write_jsonl([{"id": r.item.id, "prediction": r.reply.text, "answer": r.item.data.get("answer"),
                      "correct": r.score == 1.0} for r in results], predictions_out)


def _write_summary(summary: dict, out: Path | None, json_out: Path | None) -> None:
    """Says where the rows went, and writes the JSON summary to `json_out` (when given)."""
    if out:
        typer.echo(f"rows: {out}")
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(summary, indent=2) + "\n")
        typer.echo(f"summary: {json_out}")


def _eval_bfcl(model: str, category: str | None, *, out: Path | None, json_out: Path | None,
               max_tokens: int | None, **options) -> None:
    """BFCL asks with tools, so it has its own loop (evals/bfcl.py); rows, table and summary as the rest."""
    from fleetlm.evals import bfcl
    from fleetlm.evals.harness import open_out

    categories = bfcl.parse_categories(category)
    sink = open_out(out)
    try:
        summary, _ = bfcl.evaluate(model, categories=categories, out=sink,
                                   max_tokens=max_tokens or bfcl.MAX_TOKENS, **options)
    finally:
        if sink is not None:
            sink.close()
    typer.echo(bfcl.format_table(summary))
    _write_summary(summary, out, json_out)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
