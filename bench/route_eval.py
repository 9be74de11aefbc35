"""Held-out evaluation of every router on RouteLLM-layout data (prints figures; nothing is hard-coded).

MMLU: k-fold split BY SUBJECT (a router never sees the test subjects in training).
GSM8K: k-fold split by question. Then the quality floor checked over random calibration splits.

APGR(fold mean) averages the APGR of each test fold; APGR(pooled) ranks all out-of-fold prompts together
(as one router scoring the whole benchmark would). With --seeds a,b,c the folds are drawn once per seed and
the table shows the mean over seeds (each seed's figure in brackets): with 38 subjects, which subjects land
in which fold moves MMLU's APGR by a few hundredths, more than many differences between routers.

    python bench/route_eval.py --src /work/shared/data/routellm [--folds 5] [--seeds 0,1,2] [--routers ...]
    python bench/route_eval.py --write-split OUT   # fold 0 as OUT/{mmlu,gsm8k}_{train,test}.jsonl
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from fleetlm.route.calibrate import calibrate_floor, floor_holds
from fleetlm.route.data import import_routellm, model_names, save_rows, score_matrix
from fleetlm.route.metrics import evaluate
from fleetlm.route.routers import make_router


def _strong_weak(rows):
    models = model_names(rows)
    means = score_matrix(rows, models).mean(0)
    order = np.argsort(-means)
    return models[order[0]], models[order[-1]]


def out_of_fold(rows, groups, kind, folds, seed, settings):
    """Signal (strong - weak predicted quality) for each row, predicted by a router fit without its group."""
    strong, weak = _strong_weak(rows)
    signal = np.zeros(len(rows))
    fold_ids = _fold_ids(groups, folds, seed)
    for f in range(folds):
        train = [r for r, k in zip(rows, fold_ids, strict=True) if k != f]
        test_idx = np.flatnonzero(fold_ids == f)
        router = make_router(kind, **settings).fit(train)
        pred = router.score([rows[i] for i in test_idx])
        signal[test_idx] = pred[:, router.models.index(strong)] - pred[:, router.models.index(weak)]
    return signal, fold_ids, strong, weak


def _fold_ids(groups, folds, seed):
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    fold_of = {g: i % folds for i, g in enumerate(uniq)}
    return np.array([fold_of[g] for g in groups])


def report(name, rows, groups, kinds, folds, seeds, settings):
    strong, weak = _strong_weak(rows)
    y = score_matrix(rows, [strong, weak])
    print(
        f"\n== {name}: {len(rows)} rows, {len(set(groups))} groups, {folds}-fold held-out, seeds {seeds} =="
    )
    print(
        f"{'router':10s} {'APGR(fold mean)':>24s} {'APGR(pooled)':>24s} {'CPT50':>6s} {'CPT80':>6s} "
        f"{'save95/strong':>13s} {'save95/random':>13s} {'secs':>6s}"
    )
    signals = {}
    for kind in kinds:
        t = time.time()
        fold_means, pooled, reps = [], [], []
        for seed in seeds:
            signal, fold_ids, _, _ = out_of_fold(rows, groups, kind, folds, seed, settings.get(kind, {}))
            fold_means.append(
                np.mean(
                    [
                        evaluate(signal[fold_ids == f], y[fold_ids == f, 0], y[fold_ids == f, 1]).apgr
                        for f in range(folds)
                    ]
                )
            )
            reps.append(evaluate(signal, y[:, 0], y[:, 1]))
            pooled.append(reps[-1].apgr)
            if seed == seeds[0]:
                signals[kind] = signal  # the first seed's signal feeds the floor check

        def cell(v):
            return f"{np.mean(v):.4f}" + (f" ({' '.join(f'{x:.3f}' for x in v)})" if len(v) > 1 else "")

        print(
            f"{kind:10s} {cell(fold_means):>24s} {cell(pooled):>24s} "
            f"{np.mean([r.cpt50 for r in reps]):6.3f} {np.mean([r.cpt80 for r in reps]):6.3f} "
            f"{np.mean([r.saving_vs_strong for r in reps]):13.3f} "
            f"{np.mean([r.saving_vs_random for r in reps]):13.3f} {time.time() - t:6.1f}",
            flush=True,
        )
    rep = evaluate(np.zeros(len(rows)), y[:, 0], y[:, 1])
    print(f"{'(random)':10s} {rep.random_apgr:24.4f}   oracle APGR {rep.oracle_apgr:.4f}")
    return signals, y


def write_split(out: Path, rows, groups, folds: int, seed: int, name: str) -> None:
    """Fold 0 of the held-out split as train/test JSONL, for `fleet route fit` and `fleet route eval`."""
    fold_ids = _fold_ids(groups, folds, seed)
    train = [r for r, f in zip(rows, fold_ids, strict=True) if f != 0]
    test = [r for r, f in zip(rows, fold_ids, strict=True) if f == 0]
    save_rows(train, out / f"{name}_train.jsonl")
    save_rows(test, out / f"{name}_test.jsonl")
    held = sorted({g for g, f in zip(groups, fold_ids, strict=True) if f == 0})
    what = f"subjects {', '.join(held)}" if name == "mmlu" else f"{len(held)} questions"
    print(f"{name}: {len(train)} train rows, {len(test)} test rows; held out: {what}")


def floor_check(name, signal, y, floor, confidence, splits, seed):
    rng = np.random.default_rng(seed)
    n = len(signal)
    violations, shares = 0, []
    for _ in range(splits):
        perm = rng.permutation(n)
        cal, test = perm[: n // 2], perm[n // 2 :]
        c = calibrate_floor(signal[cal], y[cal, 0], y[cal, 1], floor, confidence)
        ok, routed, strong = floor_holds(signal[test], y[test, 0], y[test, 1], c.threshold, floor)
        violations += not ok
        shares.append(c.share_strong)
    print(
        f"floor {floor} @ {confidence:.0%} on {name}: violated {violations}/{splits} splits "
        f"(allowed about {(1 - confidence) * splits:.0f}); mean share of strong calls {np.mean(shares):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="/work/shared/data/routellm")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="fold seed (and calibration-split seed)")
    ap.add_argument("--seeds", default="", help="comma-separated fold seeds; default: --seed only")
    ap.add_argument("--routers", default="random,knn,logistic,mlp,mf,gbm,ensemble")
    ap.add_argument("--gsm-routers", default="random,knn,logistic,mlp,mf,gbm,ensemble,cascade")
    ap.add_argument("--floor", type=float, default=0.95)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--benchmarks", default="mmlu,gsm8k")
    ap.add_argument("--mmlu-subjects", type=int, default=0, help="use only the first N subjects (0: all)")
    ap.add_argument("--write-split", type=Path, help="write fold 0 as train/test JSONL here and stop")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]

    benchmarks = args.benchmarks.split(",")
    data = []
    if "mmlu" in benchmarks:
        mmlu = import_routellm(args.src, "mmlu")
        if args.mmlu_subjects:
            keep = sorted({r.domain for r in mmlu})[: args.mmlu_subjects]
            mmlu = [r for r in mmlu if r.domain in keep]
        data.append(("MMLU", "MMLU (held-out subjects)", mmlu, [r.domain for r in mmlu], args.routers))
    if "gsm8k" in benchmarks:
        gsm = import_routellm(args.src, "gsm8k")
        data.append(("GSM8K", "GSM8K (held-out questions)", gsm, [r.id for r in gsm], args.gsm_routers))
    if args.write_split:
        for bench, _, rows, groups, _ in data:
            write_split(args.write_split, rows, groups, args.folds, seeds[0], bench.lower())
        return
    results = []
    for bench, name, rows, groups, kinds in data:
        results.append((bench, *report(name, rows, groups, kinds.split(","), args.folds, seeds, {})))
    print()
    for bench, signals, y in results:
        for kind, s in signals.items():
            floor_check(f"{bench}/{kind}", s, y, args.floor, args.confidence, args.splits, args.seed)


if __name__ == "__main__":
    main()
