"""What our widths cost in answers: HumanEval pass@1 and GSM8K accuracy of one model at bf16 and int8.

The gateway serves our engine at one width per model. int8 batches faster than bf16 (bench/serve_real.py), so
the question is whether it answers as well. Each width runs the same items in the same process, batched as
the gateway would batch them, with greedy decoding; the table gives each width's score, the items where the
two disagree (a McNemar-style count: right at bf16 only, right at int8 only), the share of identical replies
and the decode speed.
    nice .venv/bin/python bench/width_quality.py --model qwen2.5-coder-0.5b-instruct \
        [--benches humaneval,gsm8k] [--dtypes bf16,int8] [--limit 80] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from fleetlm.evals.commands import load_bench
from fleetlm.evals.harness import Benchmark, EvalItem, ItemResult, run_benchmark, select, timed
from fleetlm.evals.runners import make_runner


def sign_test_p(only_a: int, only_b: int) -> float:
    """Two-sided exact binomial p of `only_a` against `only_b` discordant items (McNemar's exact test)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def run_width(benchmark: Benchmark, items: list[EvalItem], dtype: str,
              args: argparse.Namespace) -> tuple[list[ItemResult], float]:
    runner, name = make_runner(args.model, engine="fleetlm", dtype=dtype, batch_size=args.batch,
                               threads=args.threads)
    return timed(lambda: run_benchmark(benchmark, runner, items, model=f"{name}@{dtype}", progress=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--benches", default="humaneval,gsm8k")
    ap.add_argument("--dtypes", default="bf16,int8", help="the first is the reference")
    ap.add_argument("--split", default="all")
    ap.add_argument("--limit", type=int, default=None, help="items per bench (drawn with --seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=16, help="prompts per batch (the gateway's 16 streams)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None, help="longest reply (default per bench)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    rows, report = [], {"model": args.model, "split": args.split, "limit": args.limit, "benches": {}}
    for bench_name in [b.strip() for b in args.benches.split(",") if b.strip()]:
        benchmark = load_bench(bench_name, None, args.max_tokens)
        items = select(benchmark.items, split=args.split, limit=args.limit, seed=args.seed)
        runs = {d: run_width(benchmark, items, d, args) for d in dtypes}
        ref_results, _ = runs[dtypes[0]]
        ref = {r.item.id: r for r in ref_results}
        report["benches"][bench_name] = {}
        for dtype, (results, seconds) in runs.items():
            score = sum(r.score for r in results) / len(results)
            tokens = sum(r.reply.completion_tokens or 0 for r in results)
            only_ref = sum(1 for r in results if ref[r.item.id].score > r.score)
            only_this = sum(1 for r in results if r.score > ref[r.item.id].score)
            same = sum(1 for r in results if r.reply.text == ref[r.item.id].reply.text) / len(results)
            figures = {"items": len(results), "score": score, "right_at_ref_only": only_ref,
                       "right_here_only": only_this, "identical_replies": same, "seconds": seconds,
                       "completion_tokens": tokens, "tokens_per_s": tokens / seconds,
                       "p_sign_test": sign_test_p(only_ref, only_this)}
            report["benches"][bench_name][dtype] = figures
            rows.append((bench_name, dtype, figures))
    print(f"\n{args.model}, split {args.split}, {args.limit or 'all'} items a bench, batch {args.batch}, "
          f"greedy; reference width {dtypes[0]}")
    print(f"{'bench':<10} {'width':<6} {'items':>5} {'score':>6} {f'right@{dtypes[0]} only':>16} "
          f"{'right here only':>15} {'p':>5} {'same reply':>10} {'tok/s':>6}")
    for bench_name, dtype, f in rows:
        print(f"{bench_name:<10} {dtype:<6} {f['items']:>5} {f['score']:>6.3f} {f['right_at_ref_only']:>16} "
              f"{f['right_here_only']:>15} {f['p_sign_test']:>5.2f} {f['identical_replies']:>10.0%} "
              f"{f['tokens_per_s']:>6.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
