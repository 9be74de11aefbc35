"""Router speed: one ~100-token prompt with a warm model (median ms), and 1,000 cached prompts (s).

The single-prompt figure is wall time; the CPU time of the same calls is printed beside it, with the load
average, because on a machine whose cores other processes share, wall time measures the neighbours too.
--compare also times the other embedding paths (fp32 forward, sentence-transformers' encode) on the same
prompts, interleaved so that each path sees the same load.

python bench/route_speed.py [--router mlp] [--repeats 50] [--compare]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fleetlm.route.data import RouteRow
from fleetlm.route.features import Embedder, MiniLMEncoder, minilm_model_path
from fleetlm.route.routers import make_router

WORDS = (
    "the model answers questions about physics chemistry history law and arithmetic with care while "
    "the router decides which model in the fleet should take each request at the least cost"
).split()


def prompt(i: int, words: int = 88) -> str:
    rng = np.random.default_rng(i)
    return f"Question {i}: " + " ".join(rng.choice(WORDS, words)) + "?"


def _time(fn: Callable[[], object]) -> tuple[float, float]:
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def _line(name: str, walls: list[float], cpus: list[float]) -> str:
    return (
        f"{name}: median {statistics.median(walls) * 1000:.1f} ms wall "
        f"(p10 {np.percentile(walls, 10) * 1000:.1f}), {statistics.median(cpus) * 1000:.1f} ms CPU"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--router", default="mlp")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument(
        "--compare", action="store_true", help="also time the fp32 and sentence-transformers paths"
    )
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
        encoder = emb._load()
        tokens = len(encoder.token_ids([prompt(0)])[0])
        paths: dict[str, Callable[[str], object]] = {
            f"router {args.router} score ({encoder.precision} MiniLM)": lambda p: router.score(
                [RouteRow(id=p, prompt=p)]
            )
        }
        if args.compare:
            fp32 = MiniLMEncoder(precision="fp32")
            paths["MiniLM forward fp32, direct"] = lambda p: fp32.encode([p])
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(minilm_model_path()), device="cpu")
            paths["sentence-transformers encode fp32"] = lambda p: st.encode(
                [p], normalize_embeddings=True, show_progress_bar=False
            )
        walls: dict[str, list[float]] = {k: [] for k in paths}
        cpus: dict[str, list[float]] = {k: [] for k in paths}
        for i in range(args.repeats + 3):
            p = prompt(i)  # a new prompt each time: never cached
            for name, fn in paths.items():
                w, c = _time(lambda fn=fn, p=p: fn(p))
                if i >= 3:  # the first calls warm the model
                    walls[name].append(w)
                    cpus[name].append(c)
        batch = [RouteRow(id=f"b{i}", prompt=prompt(50_000 + i)) for i in range(1000)]
        emb([r.prompt for r in batch])  # fill the cache
        cached, _ = _time(lambda: router.score(batch))
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"one prompt of {tokens} tokens, {args.repeats} prompts, "
        f"load average {load} on {os.cpu_count()} cores"
    )
    for name in paths:
        print(
            _line(name, walls[name], cpus[name])
            + ("  (target <= 25 ms)" if name.startswith("router") else "")
        )
    print(f"router {args.router}: 1,000 cached prompts in {cached:.3f} s (target <= 1 s)")


if __name__ == "__main__":
    main()
