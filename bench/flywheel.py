"""The flywheel on real models: the teacher's logged traffic of one domain becomes a 135M expert in the fleet.

Phases (each one's outcome is saved in --out and reused on a re-run unless --fresh):
1. traffic: `fleet serve` (a real process, log_content: true) with Qwen2.5-Coder-1.5B (teacher) and
   SmolLM2-135M; the domain's train and dev prompts go to the teacher, so the usage log holds them and its
   answers;
2. before: the held-out (test split) items go to the teacher and to SmolLM2 as it is (no training);
3. distill: `fleet distill --from-usage usage.db --domain contacts --student smollm2-135m-instruct` (one
   command: full fine-tune of our decoder on CPU; the expert, its fleet.yaml entry and routing data);
4. refit: `fleet route fit --data expert/routing.jsonl` (the log's dev prompts, the expert scored against
   the teacher's logged answers);
5. after: a gateway with the expert in the fleet and `auto` on the refit router; the held-out items go to
   the expert and to `auto`.
Accuracy is exact match of the three fields with the gold; cost is what the gateway charged
(x-fleet-cost-usd), at prices from measured compute (fleet/measure.py: machine $/h / (tok/s x 3600) x 1e6).

    nice .venv/bin/python bench/flywheel.py --out runs/flywheel   # its gateways and distill inherit the nice
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

from fleetlm.train import domain

TEACHER, STUDENT, EXPERT = "qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct", "smollm2-contacts"
FLEET = Path(sys.executable).with_name("fleet")
MAX_TOKENS = 80


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Gateway:
    """`fleet serve --config CONFIG` in its own process, until the block ends."""

    def __init__(self, config: dict, path: Path, log: Path, env: dict | None = None) -> None:
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.path, self.log, self.port = path, log, free_port()
        self.env = {**os.environ, **(env or {})}

    def __enter__(self) -> Gateway:
        cmd = [str(FLEET), "serve", "--config", str(self.path), "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=self.env)
        self.base = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.time() + 900  # loading and (once per machine) measuring the models
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"fleet serve exited ({self.proc.returncode}); see {self.log}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(2)
        raise SystemExit(f"fleet serve did not come up; see {self.log}")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def ask(self, model: str, items: list[domain.Item], workers: int = 4) -> list[dict]:
        """Each item's prompt to `model`: answer, model used, cost and latency per item (in item order)."""
        def one(item: domain.Item) -> dict:
            body = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0,
                    "messages": [{"role": "user", "content": item.prompt}]}
            t0 = time.perf_counter()
            r = httpx.post(f"{self.base}/chat/completions", json=body, timeout=600)
            if r.status_code != 200:
                raise SystemExit(f"{model}: {r.status_code} {r.text[:300]}")
            answer = r.json()["choices"][0]["message"]["content"] or ""
            return {"id": item.id, "answer": answer, "correct": domain.score(answer, item.gold),
                    "model_used": r.headers["x-fleet-model"], "cost": float(r.headers["x-fleet-cost-usd"]),
                    "latency_s": time.perf_counter() - t0, "usage": r.json()["usage"]}

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, items))


def fleet_config(out: Path, expert: dict | None = None, router: Path | None = None) -> dict:
    models: dict = {m: {"catalog": m, "engine": "auto"} for m in (TEACHER, STUDENT)}
    cfg: dict = {"models": {**models, **(expert or {})}, "log_content": True,
                 "storage": f"sqlite:///{(out / 'usage.db').resolve()}", "strongest": TEACHER}
    if router is not None:
        cfg["router"] = {"name": "auto", "kind": "knn", "path": str(router.resolve()),
                         "models": [TEACHER, EXPERT],
                         "quality_floor": 0.95}
    return cfg


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({rc}); see {log}")
    return time.perf_counter() - t0


def phase(out: Path, name: str, fresh: bool, fn) -> dict:
    """A phase's saved outcome, or run it (timed) and save it."""
    path = out / f"{name}.json"
    if path.is_file() and not fresh:
        return json.loads(path.read_text())
    t0 = time.perf_counter()
    result = fn()
    result["wall_s"] = time.perf_counter() - t0
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def summary(rows: list[dict]) -> dict:
    n = len(rows)
    used: dict[str, int] = {}
    for r in rows:
        used[r["model_used"]] = used.get(r["model_used"], 0) + 1
    return {"n": n, "accuracy": sum(r["correct"] for r in rows) / n, "cost_usd": sum(r["cost"] for r in rows),
            "completion_tokens": sum(r["usage"]["completion_tokens"] for r in rows),
            "mean_latency_s": sum(r["latency_s"] for r in rows) / n, "models_used": used}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/flywheel"))
    ap.add_argument("--train", type=int, default=200, help="train-split prompts sent to the teacher")
    ap.add_argument("--dev", type=int, default=30, help="dev-split prompts sent to the teacher (router data)")
    ap.add_argument("--test", type=int, default=80, help="held-out items scored at the end")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--more-traffic", type=int, default=0,
                    help="a second turn: this many further train-split prompts (after the first --train) go "
                    "to the teacher, into the same log, before distilling")
    ap.add_argument("--fresh", action="store_true", help="redo every phase")
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    traffic = domain.generate("train", args.train, args.seed) + domain.generate("dev", args.dev, args.seed)
    test = domain.generate("test", args.test, args.seed)

    def before() -> dict:
        with Gateway(fleet_config(out), out / "fleet-before.yaml", out / "serve-before.log") as gw:
            t0 = time.perf_counter()
            logged = gw.ask(TEACHER, traffic)
            t_traffic = time.perf_counter() - t0
            teacher = gw.ask(TEACHER, test)
            student = gw.ask(STUDENT, test)
        return {"traffic": summary(logged), "traffic_s": t_traffic, "teacher": summary(teacher),
                "student_before": summary(student), "rows": {"teacher": teacher, "student_before": student}}

    def more() -> dict:
        extra = domain.generate("train", args.train + args.more_traffic, args.seed)[args.train:]
        with Gateway(fleet_config(out), out / "fleet-more.yaml", out / "serve-more.log") as gw:
            t0 = time.perf_counter()
            logged = gw.ask(TEACHER, extra)
        return {"traffic": summary(logged), "traffic_s": time.perf_counter() - t0}

    def distill() -> dict:
        cmd = [str(FLEET), "distill", "--from-usage", str(out / "usage.db"), "--domain", domain.DOMAIN,
               "--student", STUDENT, "--expert-name", EXPERT, "--out", str(out / "expert"),
               "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr)]
        seconds = run(cmd, out / "distill.log")
        report = json.loads((out / "expert" / "flywheel.json").read_text())
        refit = [str(FLEET), "route", "fit", "--data", str(out / "expert" / "routing.jsonl"), "--router",
                 "knn", "--set", "k=10", "--out", str(out / "router")]
        return {"distill_s": seconds, "refit_s": run(refit, out / "refit.log"), "report": report}

    def after() -> dict:
        entry = yaml.safe_load((out / "expert" / "fleet.yaml").read_text())["models"]
        cfg = fleet_config(out, entry, out / "router")
        # the expert runs eagerly on our engine, as SmolLM2 was measured there (a compile at start-up would
        # take minutes on this shared machine); its price is measured in that mode: the cost it serves at
        with Gateway(cfg, out / "fleet-after.yaml", out / "serve-after.log", {"FLEET_COMPILE": "0"}) as gw:
            expert = gw.ask(EXPERT, test)
            auto = gw.ask("auto", test)
        return {"expert": summary(expert), "auto": summary(auto), "rows": {"expert": expert, "auto": auto}}

    b = phase(out, "before", args.fresh, before)
    if args.more_traffic:
        phase(out, "more", args.fresh, more)
    d = phase(out, "distill", args.fresh, distill)
    a = phase(out, "after", args.fresh, after)
    report(out, b, d, a, args)


def report(out: Path, b: dict, d: dict, a: dict, args) -> None:
    from fleetlm.catalog import entries

    params = {TEACHER: entries()[TEACHER].parameters, STUDENT: entries()[STUDENT].parameters}
    lines = [f"held-out {domain.DOMAIN} items: {b['teacher']['n']} (test split; trained on "
             f"{d['report']['train_examples']} logged teacher answers, router refit on "
             f"{d['report']['dev_prompts']})",
             f"{'model':34} {'accuracy':>9} {'cost $':>11} {'$/item':>10}  sent to"]
    rows = [("teacher " + TEACHER, b["teacher"]), ("student before " + STUDENT, b["student_before"]),
            ("expert " + EXPERT, a["expert"]), ("auto after refit", a["auto"])]
    for label, s in rows:
        lines.append(f"{label:34} {s['accuracy']:9.1%} {s['cost_usd']:11.6f} {s['cost_usd'] / s['n']:10.2e}  "
                     f"{s['models_used']}")
    gap = (b["teacher"]["accuracy"] - a["expert"]["accuracy"]) * 100
    share = params[STUDENT] / params[TEACHER]
    before_cost, after_cost = b["teacher"]["cost_usd"], a["auto"]["cost_usd"]
    wall = (f"wall: teacher traffic {b['traffic_s']:.0f} s ({b['traffic']['n']} prompts), distill "
            f"{d['distill_s']:.0f} s (train {d['report']['seconds']['train']:.0f} s, {d['report']['step']} "
            f"steps), held-out eval before {b['wall_s'] - b['traffic_s']:.0f} s, after {a['wall_s']:.0f} s")
    lines += [f"expert vs teacher: {-gap:+.1f} points at {share:.1%} of its parameters",
              f"domain cost, everything to the teacher -> auto after refit: ${before_cost:.6f} -> "
              f"${after_cost:.6f} ({after_cost / before_cost:.1%}), accuracy "
              f"{b['teacher']['accuracy']:.1%} -> {a['auto']['accuracy']:.1%}", wall]
    text = "\n".join(lines)
    print(text)
    (out / "flywheel.txt").write_text(text + "\n")
    plot(out, rows)


def plot(out: Path, rows: list[tuple[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["teacher 1.5B", "student 135M", "expert 135M", "auto (refit)"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.bar(labels, [s["accuracy"] * 100 for _, s in rows], color=["#555", "#bbb", "#2a7", "#27a"])
    ax1.set_ylabel("held-out accuracy (%)")
    ax2.bar(labels, [s["cost_usd"] * 1000 / s["n"] for _, s in rows], color=["#555", "#bbb", "#2a7", "#27a"])
    ax2.set_ylabel("cost per 1k requests ($)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(f"flywheel on {domain.DOMAIN}: measured on held-out items")
    fig.tight_layout()
    fig.savefig(out / "flywheel.png", dpi=110)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
