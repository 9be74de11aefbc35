"""Recorded frontier models behind the gateway: GPT-4 alone, Mixtral alone, and a math-checked cascade.

Every GSM8K question of a RouteLLM-style folder goes through `fleet serve`'s app (in process, with the
official OpenAI client) three ways: model gpt4 (recorded gpt-4-1106-preview), model mixtral (recorded
Mixtral-8x7B-Instruct), and model auto = a cascade with the math check (Mixtral answers; an answer without a
final number or with arithmetic that does not re-check escalates to GPT-4). Accuracy is the recordings' own
grade (`fleet.recorded.correct` in each response), cost the gateway's `x-fleet-cost-usd` at list prices
(cl100k token counts). It prints accuracy, cost and the cascade's share of GPT-4's, and the checks' time.

python bench/cascade_replay.py [--src ../shared/data/routellm] [--limit N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import openai
from fastapi.testclient import TestClient
from tqdm import tqdm

from fleetlm.config import parse_config
from fleetlm.route.data import import_routellm
from fleetlm.serve.app import create_app
from fleetlm.serve.backends import build_backends
from fleetlm.serve.store import UsageStore


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[1].parent / "shared/data/routellm"))
    ap.add_argument("--limit", type=int, default=None, help="first N questions only")
    args = ap.parse_args()
    src = Path(args.src)
    cfg = parse_config({
        "models": {
            "mixtral": {"replay": str(src), "replay_model": "Mixtral-8x7B-Instruct"},
            "gpt4": {"replay": str(src), "replay_model": "gpt-4-1106-preview"},
        },
        "router": {"name": "auto", "kind": "cascade", "checks": ["math"], "models": ["mixtral", "gpt4"]},
    })
    questions = [r.prompt for r in import_routellm(src, "gsm8k")][: args.limit]
    with tempfile.TemporaryDirectory() as tmp:
        store = UsageStore(f"sqlite:///{tmp}/bench.db")
        with TestClient(create_app(cfg, store, build_backends(cfg))) as http:
            client = openai.OpenAI(
                base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0
            )
            results: dict[str, list[tuple[bool, float]]] = {"gpt4": [], "mixtral": [], "auto": []}
            escalated, check_s, request_s = 0, [], []
            for q in tqdm(questions, desc="questions", unit="q"):
                for model in results:
                    start = time.perf_counter()
                    raw = client.chat.completions.with_raw_response.create(
                        model=model, messages=[{"role": "user", "content": q}]
                    )
                    body = raw.parse()
                    results[model].append((bool(body.fleet["recorded"]["correct"]),
                                           float(raw.headers["x-fleet-cost-usd"])))
                    if model == "auto":
                        request_s.append(time.perf_counter() - start)
                        attempts = body.fleet.get("attempts") or []
                        escalated += len(attempts) > 1
                        check_s += [c["seconds"] for a in attempts for c in a["checks"]]
    n = len(questions)
    acc = {m: sum(ok for ok, _ in r) / n for m, r in results.items()}
    cost = {m: sum(c for _, c in r) for m, r in results.items()}
    print(f"{n} GSM8K questions from {src}")
    print(f"{'model (answers recorded)':<24} {'accuracy':>9} {'cost_usd':>10} {'acc/gpt4':>9} "
          f"{'cost/gpt4':>10}")
    labels = {"gpt4": "gpt4@recorded", "mixtral": "mixtral@recorded", "auto": "auto (cascade of both)"}
    for m in results:
        share_acc, share_cost = acc[m] / acc["gpt4"], cost[m] / cost["gpt4"]
        print(f"{labels[m]:<24} {acc[m]:>9.3f} {cost[m]:>10.4f} {share_acc:>9.1%} {share_cost:>10.1%}")
    print(f"cascade escalated {escalated}/{n} ({escalated / n:.1%}) to gpt4")
    print(f"math check: median {statistics.median(check_s) * 1e3:.2f} ms, max {max(check_s) * 1e3:.2f} ms; "
          f"whole auto request through the app: median {statistics.median(request_s) * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
