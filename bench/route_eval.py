"""Held-out evaluation of every router on RouteLLM-layout data (prints figures; nothing is hard-coded).

MMLU: k-fold split BY SUBJECT (a router never sees the test subjects in training).
GSM8K: k-fold split by question. Then the quality floor checked over random calibration splits.

    python bench/route_eval.py --src /work/shared/data/routellm [--folds 5] [--routers knn,logistic,...]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fleetlm.route.calibrate import calibrate_floor, floor_holds
from fleetlm.route.data import import_routellm, model_names, score_matrix
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
    uniq = sorted(set(groups))
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    fold_of = {g: i % folds for i, g in enumerate(uniq)}
    signal = np.zeros(len(rows))
    fold_ids = np.array([fold_of[g] for g in groups])
    for f in range(folds):
        train = [r for r, k in zip(rows, fold_ids, strict=True) if k != f]
        test_idx = np.flatnonzero(fold_ids == f)
        router = make_router(kind, **settings).fit(train)
        pred = router.score([rows[i] for i in test_idx])
        signal[test_idx] = pred[:, router.models.index(strong)] - pred[:, router.models.index(weak)]
    return signal, fold_ids, strong, weak


def report(name, rows, groups, kinds, folds, seed, settings):
    strong, weak = _strong_weak(rows)
    y = score_matrix(rows, [strong, weak])
    print(f"\n== {name}: {len(rows)} rows, {len(set(groups))} groups, {folds}-fold held-out ==")
    print(
        f"{'router':10s} {'APGR(fold mean)':>15s} {'APGR(pooled)':>12s} {'CPT50':>7s} {'CPT80':>7s} "
        f"{'save95/strong':>13s} {'save95/random':>13s} {'secs':>6s}"
    )
    signals = {}
    for kind in kinds:
        t = time.time()
        signal, fold_ids, _, _ = out_of_fold(rows, groups, kind, folds, seed, settings.get(kind, {}))
        per_fold = [
            evaluate(signal[fold_ids == f], y[fold_ids == f, 0], y[fold_ids == f, 1]).apgr
            for f in range(folds)
        ]
        rep = evaluate(signal, y[:, 0], y[:, 1])
        signals[kind] = signal
        print(
            f"{kind:10s} {np.mean(per_fold):15.4f} {rep.apgr:12.4f} {rep.cpt50:7.3f} {rep.cpt80:7.3f} "
            f"{rep.saving_vs_strong:13.3f} {rep.saving_vs_random:13.3f} {time.time() - t:6.1f}"
        )
    rep = evaluate(np.zeros(len(rows)), y[:, 0], y[:, 1])
    print(f"{'(random)':10s} {rep.random_apgr:15.4f}   oracle APGR {rep.oracle_apgr:.4f}")
    return signals, y


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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--routers", default="random,knn,logistic,mlp,mf")
    ap.add_argument("--gsm-routers", default="random,knn,logistic,mlp,mf,cascade")
    ap.add_argument("--floor", type=float, default=0.95)
    ap.add_argument("--confidence", type=float, default=0.9)
    ap.add_argument("--splits", type=int, default=20)
    ap.add_argument("--benchmarks", default="mmlu,gsm8k")
    ap.add_argument("--mmlu-subjects", type=int, default=0, help="use only the first N subjects (0: all)")
    args = ap.parse_args()

    benchmarks = args.benchmarks.split(",")
    results = []
    if "mmlu" in benchmarks:
        mmlu = import_routellm(args.src, "mmlu")
        if args.mmlu_subjects:
            keep = sorted({r.domain for r in mmlu})[: args.mmlu_subjects]
            mmlu = [r for r in mmlu if r.domain in keep]
        name = "MMLU (held-out subjects)"
        results.append(
            (
                "MMLU",
                *report(
                    name, mmlu, [r.domain for r in mmlu], args.routers.split(","), args.folds, args.seed, {}
                ),
            )
        )
    if "gsm8k" in benchmarks:
        gsm = import_routellm(args.src, "gsm8k")
        name = "GSM8K (held-out questions)"
        results.append(
            (
                "GSM8K",
                *report(
                    name, gsm, [r.id for r in gsm], args.gsm_routers.split(","), args.folds, args.seed, {}
                ),
            )
        )
    print()
    for bench, signals, y in results:
        for kind, s in signals.items():
            floor_check(f"{bench}/{kind}", s, y, args.floor, args.confidence, args.splits, args.seed)


if __name__ == "__main__":
    main()
