"""`fleet demo`: the gateway on the embedded fleet, driven by the official OpenAI client, end to end.

It starts `fleet serve` as a real process on a loopback port, sends the task suite's test split through it
(each model alone, then the router's virtual model), scores the replies with the suite's evaluator, reads
cost from the gateway's `x-fleet-cost-usd` header and latency on the client, and reports per model:
accuracy, cost, mean latency; then what the router saved against the strongest model at the quality kept.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetlm.config import FleetConfig, load_config
from fleetlm.errors import FleetError


class DemoError(FleetError):
    """The demo could not start the gateway or could not finish its run."""


@dataclass
class ModelResult:
    model: str
    n: int = 0
    correct: int = 0
    errors: int = 0
    cost_usd: float = 0.0
    latency_s: list[float] = field(default_factory=list)
    routed_to: Counter = field(default_factory=Counter)
    by_domain: dict[str, list[int]] = field(default_factory=dict)  # domain -> [correct, n]

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def mean_latency_ms(self) -> float:
        return 1000 * sum(self.latency_s) / len(self.latency_s) if self.latency_s else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("latency_s")
        d.update(accuracy=self.accuracy, mean_latency_ms=self.mean_latency_ms, routed_to=dict(self.routed_to))
        return d


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    """`fleet serve` in a child process, torn down on exit; its stderr goes to a log file."""

    def __init__(self, config_path: Path, db_url: str, log_path: Path, start_timeout_s: float = 120):
        import httpx

        self.port = free_port()
        self.log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        env = {**os.environ, "FLEET_DB_URL": db_url}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fleetlm", "serve", "--config", str(config_path),
             "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise DemoError(f"the gateway did not start; see {log_path}: "
                                f"{log_path.read_text()[-400:].strip()}")
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def run_model(client: Any, model: str, records: list[dict], concurrency: int,
                    max_tokens: int, bar: Any) -> ModelResult:
    """Every record through the gateway as `model`, `concurrency` requests in flight."""
    from fleetlm.tasks.evaluate import score
    from fleetlm.tasks.suite import prompt_messages

    result = ModelResult(model)
    gate = asyncio.Semaphore(concurrency)

    async def one(rec: dict) -> None:
        async with gate:
            t0 = time.perf_counter()
            result.n += 1  # a failed request counts against accuracy, and the demo goes on
            try:
                raw = await client.chat.completions.with_raw_response.create(
                    model=model, messages=prompt_messages(rec), max_tokens=max_tokens, temperature=0)
            except Exception:  # noqa: BLE001
                result.errors += 1
                return
            finally:
                bar.update(1)
            result.latency_s.append(time.perf_counter() - t0)
            reply = raw.parse().choices[0].message.content or ""
            ok = score(reply, str(rec["answer"]), rec.get("check", "text"))
            result.correct += ok
            cell = result.by_domain.setdefault(rec["domain"], [0, 0])
            cell[0] += ok
            cell[1] += 1
            result.cost_usd += float(raw.headers.get("x-fleet-cost-usd") or 0.0)
            result.routed_to[raw.headers.get("x-fleet-model", model)] += 1

    await asyncio.gather(*(one(r) for r in records))
    return result


async def run_all(url: str, models: list[str], records: list[dict], concurrency: int,
                  max_tokens: int) -> list[ModelResult]:
    from openai import AsyncOpenAI
    from tqdm import tqdm

    results = []
    async with AsyncOpenAI(base_url=url, api_key="demo", max_retries=0, timeout=120) as client:
        for model in models:  # one untimed request each: lazy loads (router, embedder) are not latency
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=1)
        for model in models:
            with tqdm(total=len(records), desc=f"demo {model}", unit="req") as bar:
                results.append(await run_model(client, model, records, concurrency, max_tokens, bar))
    return results


def summary_lines(results: list[ModelResult], strongest: str, router: str | None) -> list[str]:
    lines = [f"{'model':<14}{'accuracy':>10}{'cost $':>12}{'mean ms':>10}{'errors':>8}  routed to"]
    for r in results:
        routed = ", ".join(f"{m} {c / max(1, sum(r.routed_to.values())):.0%}"
                           for m, c in r.routed_to.most_common()) if r.model == router else ""
        lines.append(f"{r.model:<14}{r.accuracy:>10.3f}{r.cost_usd:>12.6f}{r.mean_latency_ms:>10.1f}"
                     f"{r.errors:>8}  {routed}")
    by_name = {r.model: r for r in results}
    if router in by_name and strongest in by_name:
        s, a = by_name[strongest], by_name[router]
        kept = f"{a.accuracy / s.accuracy:.1%}" if s.accuracy else "n/a (it scored 0)"
        share = a.cost_usd / s.cost_usd if s.cost_usd else float("nan")
        lines.append(f"router '{router}' keeps {kept} of {strongest}'s accuracy at {share:.1%} of its "
                     f"cost (saves {1 - share:.1%})")
    return lines


def fleet_scope(fleet_dir: Path) -> tuple[list[str] | None, list[int] | None]:
    """(domains, levels) a built fleet was trained for, from its build.json; (None, None): all."""
    build = fleet_dir / "build.json"
    if not build.is_file():
        return None, None
    recipe = json.loads(build.read_text()).get("recipe", {})
    return list(recipe.get("domains") or []) or None, list(recipe.get("levels") or []) or None


def demo(out_dir: str | Path = "fleet-demo", config_path: str | Path | None = None, n_per_domain: int = 40,
         concurrency: int = 16, seed: int = 12345, max_tokens: int = 40) -> dict[str, Any]:
    """Run the demo; writes results.json, cost_accuracy.png and report.html into out_dir."""
    from fleetlm.demo.report import write_html, write_plot
    from fleetlm.fleet import FLEET_DIR
    from fleetlm.tasks.suite import generate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config_path = Path(config_path) if config_path else FLEET_DIR / "fleet.yaml"
    config: FleetConfig = load_config(config_path)
    router = config.router.name if config.router else None
    models = sorted(config.models, key=lambda m: config.models[m].price.output) + ([router] if router else [])
    # The test split, drawn with a seed of its own: questions no model trained on (splits are by hash),
    # from the domains and levels the fleet was built for (its build.json), else from the whole suite.
    domains, levels = fleet_scope(config_path.parent)
    records = generate(domains, n=n_per_domain, seed=seed, levels=levels, split="test")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        gateway = GatewayProcess(config_path, f"sqlite:///{Path(tmp) / 'demo.db'}", out / "gateway.log")
        try:
            results = asyncio.run(run_all(gateway.url, models, records, concurrency, max_tokens))
        finally:
            gateway.stop()
    strongest = config.strongest_model()
    lines = summary_lines(results, strongest, router)
    report = {"records": len(records), "seed": seed, "strongest": strongest, "router": router,
              "seconds": time.perf_counter() - t0, "summary": lines,
              "results": [r.to_dict() for r in results]}
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_plot(results, strongest, router, out / "cost_accuracy.png")
    write_html(report, out / "report.html", "cost_accuracy.png")
    return report
