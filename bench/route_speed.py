"""Router speed: one ~100-token prompt with a warm model (median ms), and 1,000 cached prompts (s).

python bench/route_speed.py [--router mlp]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fleetlm.route.data import RouteRow
from fleetlm.route.features import Embedder
from fleetlm.route.routers import make_router

WORDS = (
    "the model answers questions about physics chemistry history law and arithmetic with care while "
    "the router decides which model in the fleet should take each request at the least cost"
).split()


def prompt(i: int, words: int = 75) -> str:
    rng = np.random.default_rng(i)
    return f"Question {i}: " + " ".join(rng.choice(WORDS, words)) + "?"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", default="mlp")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as cache:
        emb = Embedder(cache_dir=Path(cache))
        train = [
            RouteRow(
                id=f"t{i}",
                prompt=prompt(10_000 + i),
                scores={"strong": float(i % 3 > 0), "weak": float(i % 2)},
            )
            for i in range(300)
        ]
        router = make_router(args.router)
        router.embedder = emb
        router.fit(train)
        tokens = len(emb._load().tokenizer(prompt(0))["input_ids"])
        times = []
        for i in range(args.repeats + 3):
            row = [RouteRow(id=f"q{i}", prompt=prompt(i))]  # a new prompt each time: not cached
            t = time.perf_counter()
            router.score(row)
            times.append(time.perf_counter() - t)
        single = statistics.median(times[3:]) * 1000  # the first calls warm the model
        batch = [RouteRow(id=f"b{i}", prompt=prompt(50_000 + i)) for i in range(1000)]
        emb([r.prompt for r in batch])  # fill the cache
        t = time.perf_counter()
        router.score(batch)
        cached = time.perf_counter() - t
    print(
        f"router {args.router}: one prompt of {tokens} tokens, median {single:.1f} ms over {args.repeats} "
        f"(target <= 25 ms)"
    )
    print(f"router {args.router}: 1,000 cached prompts in {cached:.3f} s (target <= 1 s)")


if __name__ == "__main__":
    main()
