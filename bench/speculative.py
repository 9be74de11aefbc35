"""Speculative decoding (issue 14, item 4): Qwen2.5-Coder-1.5B drafted by prompt lookup and by the 0.5B,
against plain decoding in the same run and against llama.cpp's llama-lookup and llama-speculative on the same
files.

    flock /tmp/bench.lock nice .venv/bin/python bench/speculative.py --items 3 --json /tmp/spec.json

Tasks (single stream, greedy, chat template): HumanEval prompts, GSM8K questions, and document editing (rename
a function in a Python standard-library source and reply with the whole code: prompt lookup's best case).
Ours: the engine's plain generate() and engine/speculative.py with each drafter, all on the same loaded
weights (--dtype, default int4: the GGUF dequantized and packed for our kernels); the speculative outputs are
compared token for token with plain decoding. The draft length adapts (DraftLength) on a cost model measured
at the start: the target's T-row verify time over its one-row time, and a draft step in target steps.
Speed is decode tokens/s: tokens after the first over the time after the first (the prefill is the same work
either way). llama.cpp: llama-completion (plain), llama-lookup and llama-speculative on the catalog's Q4_K_M
files, same prompt text, --temp 0, its own figures.
"""

from __future__ import annotations

import fleetlm  # noqa: F401  (first: it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split

import argparse
import inspect
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from fleetlm.bench.real import resolve_gguf  # noqa: E402
from fleetlm.engine import Engine, GenerationRequest  # noqa: E402
from fleetlm.engine.speculative import (  # noqa: E402
    DraftLength,
    DraftModel,
    PromptLookup,
    SpeculativeStats,
    measure_verify_cost,
    speculative_generate,
    step_seconds,
)
from serve_real import ensure_symlinks, llama_cpp_bin_dir  # noqa: E402

EDIT_SOURCES = ("textwrap:dedent", "difflib:SequenceMatcher.get_opcodes", "shlex:shlex.read_token")
EDIT_INSTRUCTION = ("Rename `{name}` to `{name}_v2` in the code below and change nothing else. Reply with "
                    "the complete updated code in one ```python block.\n\n```python\n{code}```")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    p.add_argument("--draft", default="qwen2.5-coder-0.5b-instruct")
    p.add_argument("--dtype", default="int4", help="our engine's width for both models")
    p.add_argument("--tasks", default="edit,humaneval,gsm8k")
    p.add_argument("--items", type=int, default=3, help="items per task")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--lookup-k", type=int, default=8, help="llama-lookup's --spec-draft-n-max")
    p.add_argument("--model-k", type=int, default=4, help="llama-speculative's --spec-draft-n-max")
    p.add_argument("--high", type=int, default=12, help="our longest draft (ours adapts below it)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peers-python", default="/work/peers-venv/bin/python",
                   help="a Python with llama-cpp-bin installed (its llama-lookup, llama-speculative)")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--json", type=Path, help="write the figures here too")
    return p


def task_messages(task: str, n: int) -> list[tuple[str, list[dict[str, str]]]]:
    """(item id, chat messages) of the first n items of a task."""
    if task == "humaneval":
        from fleetlm.evals import humaneval

        return [(it.id, it.messages) for it in humaneval.items()[:n]]
    if task == "gsm8k":
        from fleetlm.evals import gsm8k

        return [(it.id, it.messages) for it in gsm8k.load()[0][:n]]
    if task == "edit":
        out = []
        for ref in EDIT_SOURCES[:n]:
            module, qual = ref.split(":")
            obj = __import__(module)
            for part in qual.split("."):
                obj = getattr(obj, part)
            code = inspect.cleandoc(inspect.getsource(obj)) + "\n"
            text = EDIT_INSTRUCTION.format(name=qual.split(".")[-1], code=code)
            out.append((f"edit:{ref}", [{"role": "user", "content": text}]))
        return out
    raise SystemExit(f"unknown task {task!r}: want edit, humaneval or gsm8k")


def prompt_ids(engine: Engine, messages: list[dict[str, str]]) -> tuple[list[int], str]:
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return engine.tokenizer.encode(text, add_special_tokens=False), text


def plain(engine: Engine, ids: list[int], max_tokens: int) -> tuple[list[int], float]:
    tokens = [ev.token_id for ev in engine.generate(GenerationRequest(prompt_ids=ids, max_tokens=max_tokens))]
    return tokens, engine.last_stats.decode_tokens_per_second


def speculative(engine: Engine, ids: list[int], drafter: object, policy: DraftLength,
                max_tokens: int) -> tuple[list[int], float, SpeculativeStats]:
    stats, tokens = SpeculativeStats(), []
    t_first = 0.0
    stops = engine.tokenizer.eos_token_ids
    for token in speculative_generate(engine.model, ids, drafter, max_tokens=max_tokens, stop_ids=stops,
                                      draft_length=policy, stats=stats):
        tokens.append(token)
        if len(tokens) == 1:
            t_first = time.perf_counter()
    seconds = time.perf_counter() - t_first
    return tokens, (len(tokens) - 1) / seconds if seconds > 0 else 0.0, stats


_DECODED = re.compile(r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds, speed:\s+([\d.]+) t/s")
_ACCEPT = re.compile(r"accept\s+=\s+([\d.]+)%")
_EVAL = re.compile(r"\beval time =\s+([\d.]+) ms /\s+(\d+) runs")


def llama_run(binary: Path, args: list[str], timeout: float = 900) -> dict[str, float]:
    """Run a llama.cpp tool; its decode tokens/s (and acceptance where it drafts) from its own printout."""
    proc = subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        return {"error": f"{binary.name} exited {proc.returncode}: {out[-300:]}"}
    found: dict[str, float] = {}
    if m := _DECODED.search(out):
        found |= {"tokens": float(m.group(1)), "tok_s": float(m.group(3))}
    elif m := _EVAL.search(out):  # llama-completion: eval time covers the tokens after the first
        ms, runs = float(m.group(1)), int(m.group(2))
        found |= {"tokens": float(runs + 1), "tok_s": 1000.0 * runs / ms if ms else 0.0}
    if m := _ACCEPT.search(out):
        found["accept"] = float(m.group(1)) / 100
    return found or {"error": f"{binary.name}: no figures in its output: {out[-300:]}"}


def llama_item(bin_dir: Path, target: Path, draft: Path, text: str, args: argparse.Namespace) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    common = ["-m", str(target), "-f", f.name, "-n", str(args.max_tokens), "-t", str(args.threads),
              "--temp", "0", "-c", "4096"]
    try:
        return {
            "plain": llama_run(bin_dir / "llama-completion", [*common, "-no-cnv"]),
            "lookup": llama_run(bin_dir / "llama-lookup",
                                [*common, "--spec-draft-n-max", str(args.lookup_k)]),
            "draft": llama_run(bin_dir / "llama-speculative",
                               [*common, "-md", str(draft), "--spec-draft-n-max", str(args.model_k)]),
        }
    finally:
        Path(f.name).unlink(missing_ok=True)


def main() -> None:
    args = parser().parse_args()
    torch.set_num_threads(args.threads)
    target_path, draft_path = resolve_gguf(args.target), resolve_gguf(args.draft)
    print(f"loading {target_path.name} and {draft_path.name} at {args.dtype} ...", flush=True)
    target = Engine.load(target_path, dtype=args.dtype)
    draft = Engine.load(draft_path, dtype=args.dtype)
    # the cost model of the draft-length policy, measured here: T-row verify over one row (target), and one
    # draft step in target steps
    verify_cost = measure_verify_cost(target.model, rows=args.high + 1)
    draft_cost = step_seconds(draft.model) / step_seconds(target.model)
    print("verify cost (steps) T=1..: " + " ".join(f"{c:.2f}" for c in verify_cost)
          + f"; a 0.5B draft token costs {draft_cost:.2f} target steps", flush=True)
    bin_dir = None if args.skip_llama else llama_cpp_bin_dir(args.peers_python)
    if bin_dir is not None:
        ensure_symlinks(bin_dir)
    items = [(task, iid, msgs) for task in args.tasks.split(",")
             for iid, msgs in task_messages(task, args.items)]
    rows = []
    for task, iid, msgs in tqdm(items, desc="items"):
        ids, text = prompt_ids(target, msgs)
        want, plain_rate = plain(target, ids, args.max_tokens)
        row = {"task": task, "item": iid, "prompt_tokens": len(ids), "tokens": len(want),
               "plain_tok_s": plain_rate}
        policies = {"lookup": DraftLength(verify_cost, high=args.high),
                    "draft": DraftLength(verify_cost, draft_cost=draft_cost, low=1, high=args.high)}
        for name, drafter in (("lookup", PromptLookup(ngram_max=3)), ("draft", DraftModel(draft.model))):
            policy = policies[name]
            got, rate, st = speculative(target, ids, drafter, policy, args.max_tokens)
            row[name] = {"tok_s": rate, "speedup": rate / plain_rate if plain_rate else 0.0,
                         "accept": st.acceptance_rate, "tokens_per_round": st.tokens_per_round,
                         "identical": got == want, "first_difference": _first_difference(got, want),
                         "draft_s": st.draft_seconds, "verify_s": st.verify_seconds, "rounds": st.rounds,
                         "final_acceptance_estimate": policy.acceptance}
        if bin_dir is not None:
            row["llama"] = llama_item(bin_dir, target_path, draft_path, text, args)
        rows.append(row)
        tqdm.write(_line(row))
        if args.json:
            args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows,
                                             "verify_cost": verify_cost, "draft_cost": draft_cost}, indent=1))
    print(_summary(rows))


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _line(row: dict) -> str:
    parts = [f"{row['task']:<9} {row['item'][:34]:<34} {row['tokens']:>3} tok "
             f"plain {row['plain_tok_s']:5.1f}"]
    for name in ("lookup", "draft"):
        r = row[name]
        parts.append(f"{name} {r['tok_s']:5.1f} ({r['speedup']:.2f}x, acc {r['accept']:.0%}, "
                     f"{'same' if r['identical'] else 'DIFF@' + str(r['first_difference'])})")
    llama = row.get("llama", {})
    if llama:
        parts.append("llama.cpp " + " ".join(
            f"{k} {v.get('tok_s', float('nan')):.1f}" + (f" acc {v['accept']:.0%}" if "accept" in v else "")
            for k, v in llama.items()))
    return " | ".join(parts)


def _summary(rows: list[dict]) -> str:
    lines = ["", "per task (median over items): decode tok/s and speedup over plain in the same run"]
    head = (f"{'task':<9} {'ours plain':>10} {'lookup':>14} {'acc':>5} {'0.5B draft':>14} {'acc':>5} "
            f"{'same':>5} | {'llama plain':>11} {'lookup':>14} {'acc':>5} {'0.5B draft':>14} {'acc':>5}")
    lines.append(head)
    for task in dict.fromkeys(r["task"] for r in rows):
        rs = [r for r in rows if r["task"] == task]
        med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
        pl = med([r["plain_tok_s"] for r in rs])
        cells = [f"{task:<9} {pl:>10.1f}"]
        for name in ("lookup", "draft"):
            rate = med([r[name]["tok_s"] for r in rs])
            cells.append(f"{rate:>6.1f} ({med([r[name]['speedup'] for r in rs]):.2f}x) "
                         f"{med([r[name]['accept'] for r in rs]):>5.0%}")
        same = sum(r[n]["identical"] for r in rs for n in ("lookup", "draft"))
        cells.append(f"{same:>2}/{2 * len(rs):<2}")
        ll = [r["llama"] for r in rs if "llama" in r]
        if ll:
            lp = med([x["plain"]["tok_s"] for x in ll if "tok_s" in x["plain"]])
            cells.append(f"| {lp:>11.1f}")
            for name in ("lookup", "draft"):
                rate = med([x[name]["tok_s"] for x in ll if "tok_s" in x[name]])
                acc = med([x[name]["accept"] for x in ll if "accept" in x[name]])
                cells.append(f"{rate:>6.1f} ({rate / lp if lp else 0:.2f}x) {acc:>5.0%}")
        lines.append(" ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
