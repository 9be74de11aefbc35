"""Distillation methods side by side: one student, one domain, one budget, five ways to train it.

The student has the fleet-small shape (fleetlm.fleet.recipe, RECIPES["full"]), starts from scratch with the
fleet's tokenizer (the teacher's, so token-level KD can compare distributions), and trains on the same
prompts (the domain's train split) for the same steps and global batch, with the recipe's lr schedule:

  gold  (a) the task suite's gold answers, the plain loop (`fleetlm.train.loop.train`)
  seq   (b) sequence-level distillation: the teacher's greedy answers replace the gold ones
  kl    (c) token-level KD, forward KL to the teacher's next-token distribution (+ LM loss, weight alpha)
  rkl   (d) token-level KD, reverse KL (MiniLLM)
  gkd   (e) on-policy GKD: generalized JSD (beta), half of the steps on the student's own samples

Each student is then scored on the domain's test split (a split training never sees, by hash) with
`fleetlm.tasks.evaluate.evaluate_model`; the teacher is scored on the same records for reference. The winner,
its margin over the runner-up and over gold (points), and an exact McNemar test on the paired per-question
marks are computed here, not written by hand.

    python bench/distill.py --teacher OUT/fleet-base [--domain conversion]   # OUT from fleet fleet build
        [--levels 1,2,3] [--steps 400] [--json OUT] [--png docs/img/distill_methods.png]
    python bench/distill.py --quick    # a tiny teacher trained on the fly (seconds; what the test runs)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from fleetlm.errors import FleetError
from fleetlm.fleet.recipe import RECIPES, Recipe, Size, make_tokenizer, params_of, train_config
from fleetlm.tasks.evaluate import evaluate_model, score_records
from fleetlm.tasks.suite import generate, parse_levels, write_jsonl
from fleetlm.train.config import TrainConfig
from fleetlm.train.data import IGNORE, load_chat, step_batches
from fleetlm.train.distill import DATA_FILE, REPORT_FILE, distill, parse_distill_config
from fleetlm.train.loop import train

METHODS: dict[str, str] = {
    "gold": "(a) gold answers, plain training",
    "seq": "(b) sequence-level KD (teacher's greedy answers)",
    "kl": "(c) token-level KD, forward KL",
    "rkl": "(d) token-level KD, reverse KL",
    "gkd": "(e) on-policy GKD (JSD, 50% on-policy steps)",
}


def distill_settings(method: str, teacher: Path, prompts: Path, args: argparse.Namespace) -> dict[str, Any]:
    base = {"teacher": str(teacher), "prompts": str(prompts), "alpha": args.alpha,
            "max_new_tokens": args.max_new_tokens, "teacher_temperature": 0.0}
    if method == "gkd":
        return {**base, "method": "gkd", "beta": args.beta, "on_policy_fraction": args.on_policy_fraction}
    return {**base, "method": method}


def train_tokens(data_file: Path, tok_dir: Path, cfg: TrainConfig, skip: set[int]) -> tuple[int, int]:
    """(non-pad tokens, answer tokens) of the batches the loop drew from `data_file`, steps in `skip` left
    out (on-policy steps train on the student's own samples, which are not in the file)."""
    from fleetlm.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tok_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else list(tok.eos_token_ids)[0]
    examples = load_chat(data_file, tok, cfg.data.seq_len)
    tokens = answers = 0
    for step in range(cfg.steps):
        if step in skip:
            continue
        pairs, _ = step_batches(examples, step, cfg.batch_size, cfg.grad_accum, cfg.seed, pad)
        for ids, labels in pairs:
            tokens += int((ids != pad).sum())
            answers += int((labels[:, 1:] != IGNORE).sum())
    return tokens, answers


def teacher_agreement(run_dir: Path, records: list[dict]) -> float | None:
    """Share of the seq run's training rows where the teacher's answer is the gold one."""
    path = run_dir / DATA_FILE
    if not path.is_file():
        return None
    gold = {r["id"]: r for r in records}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    preds = [r["messages"][-1]["content"] for r in rows]
    report, _ = score_records([gold[r["id"]] for r in rows], preds)
    return report.accuracy()


def run_method(method: str, cfg: TrainConfig, teacher: Path, train_path: Path, tok_dir: Path,
               records: list[dict], args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    on_policy: list[int] = []
    if method == "gold":
        result = train(cfg)
        data_file = train_path
    else:
        dcfg = parse_distill_config(distill_settings(method, teacher, train_path, args))
        result = distill(cfg, dcfg)
        data_file = cfg.out_dir / DATA_FILE
        on_policy = json.loads((cfg.out_dir / REPORT_FILE).read_text())["on_policy_steps"]
    seconds = time.perf_counter() - t0
    tokens, answers = train_tokens(data_file, tok_dir, cfg, set(on_policy))
    return {"method": method, "label": METHODS[method], "out_dir": str(cfg.out_dir), "steps": result.step,
            "train_loss": result.train_loss, "train_seconds": seconds, "tokens_from_data": tokens,
            "answer_tokens_from_data": answers, "on_policy_steps": len(on_policy),
            "teacher_train_agreement": teacher_agreement(cfg.out_dir, records) if method == "seq" else None}


def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Exact two-sided McNemar test on paired marks: only the questions where the two differ count."""
    from scipy.stats import binomtest

    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def verdict(rows: list[dict[str, Any]], marks: dict[str, list[bool]]) -> dict[str, Any]:
    ranked = sorted(rows, key=lambda r: -r["accuracy"])
    best, second = ranked[0], ranked[1] if len(ranked) > 1 else None
    out: dict[str, Any] = {"winner": best["method"], "accuracy": best["accuracy"],
                           "ranking": [r["method"] for r in ranked]}
    if second is not None:
        out.update(runner_up=second["method"],
                   margin_points=100 * (best["accuracy"] - second["accuracy"]),
                   p_value_vs_runner_up=mcnemar_p(marks[best["method"]], marks[second["method"]]))
    gold = next((r for r in rows if r["method"] == "gold"), None)
    if gold is not None and gold is not best:
        out.update(margin_vs_gold_points=100 * (best["accuracy"] - gold["accuracy"]),
                   p_value_vs_gold=mcnemar_p(marks[best["method"]], marks["gold"]))
    return out


def format_table(result: dict[str, Any]) -> str:
    s, levels = result["settings"], result["levels"]
    head = ["method", *[f"L{lv}" for lv in levels], "all", "train s", "tokens", "answer tok", "loss"]
    body = []
    for r in result["methods"]:
        per = [f"{100 * r['per_level'][str(lv)]:.1f}" for lv in levels]
        tok = f"{r['tokens_from_data']:,}" + ("*" if r["on_policy_steps"] else "")
        body.append([r["label"], *per, f"{100 * r['accuracy']:.1f}", f"{r['train_seconds']:.0f}", tok,
                     f"{r['answer_tokens_from_data']:,}", f"{r['train_loss']:.3f}"])
    t = result["teacher"]
    body.append([f"teacher {Path(t['path']).name} ({t['params'] / 1e6:.2f}M)",
                 *[f"{100 * t['per_level'][str(lv)]:.1f}" for lv in levels], f"{100 * t['accuracy']:.1f}",
                 "", "", "", ""])
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    v = result["verdict"]
    lines = [
        f"distillation methods: domain {s['domain']}, levels {','.join(map(str, levels))}; student "
        f"{s['student']} shape ({result['student_params'] / 1e6:.2f}M params) from scratch",
        f"{s['steps']} steps x batch {s['batch_size']} on {s['n_train']:,} train prompts; test split "
        f"{s['n_test']} questions (seed {s['test_seed']}); alpha {s['alpha']}, beta {s['beta']}, "
        f"on-policy fraction {s['on_policy_fraction']}; {s['threads']} thread(s)",
        "",
        fmt(head),
        "  ".join("-" * w for w in widths),
        *[fmt(r) for r in body],
    ]
    if any(r["on_policy_steps"] for r in result["methods"]):
        lines.append("* off-policy steps only: on-policy steps train on the student's own samples")
    seq = next((r for r in result["methods"] if r["method"] == "seq"), None)
    if seq is not None and seq["teacher_train_agreement"] is not None:
        lines.append(f"the teacher's greedy answers to the training prompts were right on "
                     f"{100 * seq['teacher_train_agreement']:.1f}% of them (what seq trained on)")
    lines.append("")
    line = f"winner: {v['winner']} at {100 * v['accuracy']:.1f}%"
    if "runner_up" in v:
        line += (f", {v['margin_points']:+.1f} points over the runner-up {v['runner_up']} "
                 f"(McNemar p = {v['p_value_vs_runner_up']:.3g})")
    if "margin_vs_gold_points" in v:
        line += f"; {v['margin_vs_gold_points']:+.1f} points over gold (p = {v['p_value_vs_gold']:.3g})"
    lines.append(line)
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, levels = result["methods"], result["levels"]
    groups = [*[str(lv) for lv in levels], "all"]
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for g, name in enumerate(groups):
        vals = [100 * (r["accuracy"] if name == "all" else r["per_level"][name]) for r in rows]
        xs = [i + (g - (len(groups) - 1) / 2) * width for i in range(len(rows))]
        bars = ax.bar(xs, vals, width, label="all levels" if name == "all" else f"level {name}",
                      color="black" if name == "all" else None, alpha=1.0 if name == "all" else 0.6)
        if name == "all":
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
    t = result["teacher"]
    ax.axhline(100 * t["accuracy"], color="grey", linestyle="--",
               label=f"teacher {Path(t['path']).name}, all levels")
    ax.set_xticks(range(len(rows)), [r["label"].replace(" (", "\n(").replace(", ", ",\n", 1) for r in rows],
                  fontsize=7)
    top = max([100 * t["accuracy"]] + [100 * r["accuracy"] for r in rows]
              + [100 * v for r in rows for v in r["per_level"].values()])
    ax.set_ylim(0, max(5.0, min(100.0, top * 1.15 + 2)))  # a row of zeros still gets a sane axis
    ax.set_ylabel("test accuracy (%)")
    s = result["settings"]
    ax.set_title(f"{s['domain']} L{levels[0]}-{levels[-1]}: student {s['student']} from scratch, "
                 f"{s['steps']} steps x {s['batch_size']}", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quick_setup(work: Path, args: argparse.Namespace) -> tuple[Path, Recipe, Size]:
    """A tiny teacher (CI shape, a few steps) and its tokenizer, trained here on the domain's records."""
    recipe = replace(RECIPES["ci"], batch_size=8, seq_len=64)
    rows = generate([args.domain], 48, args.seed, levels=parse_levels(args.levels), split="train",
                    answers=True)
    data = write_jsonl(rows, work / "teacher-data.jsonl")
    tok_dir = make_tokenizer(work, data, recipe)
    shape = recipe.generalists[0]
    train(train_config(replace(shape, steps=6), recipe, data, tok_dir, work / "teacher", progress=False))
    args.steps, args.batch_size, args.n_train, args.n_test, args.max_new_tokens = 4, 8, 24, 9, 6
    return work / "teacher", recipe, shape


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    levels = parse_levels(args.levels)
    if args.quick:
        teacher, recipe, shape = quick_setup(work, args)
    else:
        teacher, recipe = args.teacher, RECIPES["full"]
        shape = next(s for s in recipe.generalists if s.name == args.student)
        if teacher is None:
            raise FleetError("give --teacher DIR (a model of a fleet built by `fleet fleet build --out OUT`, "
                             "e.g. OUT/fleet-base), or use --quick")
        if not (teacher / "config.json").is_file() or not (teacher / "tokenizer.json").is_file():
            raise FleetError(f"teacher {teacher} is not a checkpoint with its tokenizer (config.json, "
                             f"tokenizer.json); build the fleet first or use --quick")
    args.batch_size = args.batch_size or recipe.batch_size
    recipe = replace(recipe, batch_size=args.batch_size)
    tok_dir = teacher  # checkpoints carry the tokenizer they were trained with: the fleet's
    train_rows = generate([args.domain], args.n_train, args.seed, levels=levels, split="train", answers=True)
    test_rows = generate([args.domain], args.n_test, args.seed + 1000, levels=levels, split="test")
    if not train_rows or not test_rows:
        raise FleetError(f"no {args.domain} records at levels {args.levels}")
    train_path = write_jsonl(train_rows, work / "train.jsonl")
    size = replace(shape, steps=args.steps)
    evals: dict[str, Any] = {}
    chosen = args.methods.split(",")
    rows = []
    t0 = time.perf_counter()
    with tqdm(total=len(chosen) + 1, desc="bench distill", unit="run", position=0) as bar:
        bar.set_postfix_str("teacher eval")
        evals["teacher"] = evaluate_model(teacher, test_rows, dtype="f32", max_tokens=args.max_new_tokens,
                                          progress=not args.quick)
        bar.update(1)
        for method in chosen:
            bar.set_postfix_str(method)
            cfg = train_config(size, recipe, train_path, tok_dir, work / method, progress=not args.quick)
            row = run_method(method, cfg, teacher, train_path, tok_dir, train_rows, args)
            evals[method] = evaluate_model(cfg.out_dir, test_rows, dtype="f32",
                                           max_tokens=args.max_new_tokens, progress=not args.quick)
            rows.append(row)
            bar.update(1)
    marks = {}
    for name, (_, preds) in evals.items():
        _, marks[name] = score_records(test_rows, preds)
    per_level = lambda rep: {str(lv): rep.accuracy(level=lv) for lv in rep.levels}  # noqa: E731
    for row in rows:
        report = evals[row["method"]][0]
        row.update(accuracy=report.accuracy(), correct=report.counts()[0], n=report.counts()[1],
                   per_level=per_level(report))
    t_report = evals["teacher"][0]
    return {
        "settings": {"domain": args.domain, "levels_arg": args.levels, "student": shape.name,
                     "student_shape": {"hidden": shape.hidden, "layers": shape.layers, "heads": shape.heads,
                                       "kv_heads": shape.kv_heads, "intermediate": shape.intermediate},
                     "steps": args.steps, "batch_size": args.batch_size, "seq_len": recipe.seq_len,
                     "lr": shape.lr, "n_train": len(train_rows), "n_test": len(test_rows), "seed": args.seed,
                     "test_seed": args.seed + 1000, "alpha": args.alpha, "beta": args.beta,
                     "on_policy_fraction": args.on_policy_fraction, "max_new_tokens": args.max_new_tokens,
                     "threads": torch.get_num_threads(), "quick": args.quick, "torch": torch.__version__,
                     "load_average": os.getloadavg(), "seconds": time.perf_counter() - t0},
        "levels": t_report.levels,
        "student_params": params_of(Path(rows[0]["out_dir"])),
        "teacher": {"path": str(teacher), "params": params_of(teacher), "accuracy": t_report.accuracy(),
                    "per_level": per_level(t_report)},
        "methods": rows,
        "verdict": verdict(rows, marks),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--teacher", type=Path, default=None,
                    help="a checkpoint dir with the fleet's tokenizer")
    ap.add_argument("--student", default="fleet-small", help="a generalist size of the full recipe")
    ap.add_argument("--domain", default="conversion", help="conversion: the domain every size learns")
    ap.add_argument("--levels", default="1,2,3", help='e.g. "1,2,3" or "1-3"')
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, help="global batch (default: the recipe's)")
    ap.add_argument("--n-train", type=int, default=3000, help="training prompts (spread over the levels)")
    ap.add_argument("--n-test", type=int, default=300, help="test questions (spread over the levels)")
    ap.add_argument("--alpha", type=float, default=0.5, help="weight of the divergence against the LM loss")
    ap.add_argument("--beta", type=float, default=0.5, help="GKD's JSD beta")
    ap.add_argument("--on-policy-fraction", type=float, default=0.5)
    ap.add_argument("--max-new-tokens", type=int, default=16, help="teacher answers, samples and eval")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for small models)")
    ap.add_argument("--work", type=Path, help="keep the runs here (default: a temp dir, removed)")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--png", type=Path, help="write the bar chart here (e.g. docs/img/distill_methods.png)")
    ap.add_argument("--quick", action="store_true", help="tiny teacher and student, a few steps")
    args = ap.parse_args(argv)
    unknown = sorted(set(args.methods.split(",")) - set(METHODS))
    if unknown:
        ap.error(f"unknown methods {unknown}; choose from {','.join(METHODS)}")
    if args.student not in {s.name for s in RECIPES["full"].generalists}:
        ap.error(f"unknown student {args.student!r}; the full recipe has "
                 f"{[s.name for s in RECIPES['full'].generalists]}")
    if min(args.steps, args.batch_size or 1, args.n_train, args.n_test, args.threads) < 1:
        ap.error("--steps, --batch-size, --n-train, --n-test and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        if args.work is not None:
            args.work.mkdir(parents=True, exist_ok=True)
            result = run(args, args.work)
        else:
            with tempfile.TemporaryDirectory(prefix="bench-distill-") as tmp:
                result = run(args, Path(tmp))
    except FleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if args.png:
        print(f"chart: {plot(result, args.png)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
