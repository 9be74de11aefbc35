"""`fleet demo`: the gateway on the real fleet, driven by the official OpenAI client, end to end.

It writes the demo fleet (demo/fleet.py: the default fleet, plus recorded GPT-4 for GSM8K), starts `fleet
serve` on it as a real process on a loopback port, and sends held-out items of HumanEval, GSM8K and the task
suite (demo/items.py) through it: each model alone, then `auto`, a few requests in flight. Each reply is
scored with the benchmark's own scorer (evals/: HumanEval's tests in the sandbox, GSM8K's final number, the
suite's checker); cost is read from the gateway (`x-fleet-cost-usd`), the answering model and the route from
`x-fleet-model` / `x-fleet-route`, latency on the client.

Items go in rounds: each round sends the next few items of every benchmark to every model, so all models see
the same items; a benchmark joins a new round only while its last round's duration still fits in the time
budget (the cheap task suite goes on after HumanEval and GSM8K have stopped). The report
(demo/report.py) adds the held-out figures of the recorded outcomes (fleet/outcomes.py) beside the live ones.
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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fleetlm.config import FleetConfig, load_config
from fleetlm.demo.items import BENCHES, DemoBench, load_benches
from fleetlm.errors import FleetError

DEFAULT_BUDGET_S = 420.0  # for the requests; start-up and the report add about a minute here
DEFAULT_CHUNK = 1  # items of each benchmark per round (requests in flight to one model)
TASKS_PER_CHUNK = 4  # task-suite items are short answers: several times as many per round
START_TIMEOUT_S = 900.0  # a first start may measure each model's engines (minutes on a busy machine)
REQUEST_TIMEOUT_S = 600.0


class DemoError(FleetError):
    """The demo could not start the gateway or could not finish its run."""


@dataclass
class Answer:
    """One request of the demo: what it was, who answered, how it scored, what it cost and took."""

    bench: str
    model: str          # the model asked for (a fleet model, or `auto`)
    item: str
    domain: str
    round: int
    score: float = 0.0
    detail: str = ""
    answered_by: str = ""  # x-fleet-model
    route: str = ""        # x-fleet-route
    recorded: bool = False  # the answer is a recording (replay), not generated now
    cost_usd: float = 0.0
    latency_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GatewayProcess:
    """`fleet serve` in a child process, torn down on exit; its output goes to a log file."""

    def __init__(self, config_path: Path, db_url: str, log_path: Path,
                 start_timeout_s: float = START_TIMEOUT_S):
        import httpx

        self.port = free_port()
        self.log_path = log_path
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
            time.sleep(0.3)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _error_text(exc: Exception) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return f"{getattr(exc, 'status_code', '')} {body['message']}".strip()[:300]
    return f"{type(exc).__name__}: {exc}"[:300]


async def ask(client: Any, model: str, bench: DemoBench, item: Any, round_: int) -> Answer:
    """One item through the gateway as `model`, scored by the benchmark's scorer."""
    b = bench.benchmark
    answer = Answer(bench.name, model, item.id, item.domain, round_)
    started = time.perf_counter()
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=item.messages, max_tokens=b.max_tokens, temperature=0,
            stop=(b.chat_stop[:4] or None))
    except Exception as exc:  # noqa: BLE001 - a failed request is counted against the model; the demo goes on
        answer.latency_s = time.perf_counter() - started
        answer.error = _error_text(exc)
        return answer
    answer.latency_s = time.perf_counter() - started
    resp = raw.parse()
    text = resp.choices[0].message.content or ""
    answer.score, answer.detail = await asyncio.to_thread(b.score, item, text, False)
    answer.answered_by = raw.headers.get("x-fleet-model") or model
    answer.route = raw.headers.get("x-fleet-route") or ""
    answer.recorded = "; recorded: " in answer.route or str(resp.model).endswith("@recorded")
    answer.cost_usd = float(raw.headers.get("x-fleet-cost-usd") or 0.0)
    if resp.usage is not None:
        answer.prompt_tokens = resp.usage.prompt_tokens
        answer.completion_tokens = resp.usage.completion_tokens
    return answer


def chunk_of(bench: DemoBench, round_: int, chunk: int) -> list[Any]:
    size = chunk * TASKS_PER_CHUNK if bench.name == "tasks" else chunk
    return bench.items[round_ * size:(round_ + 1) * size]


async def send_rounds(client: Any, benches: list[DemoBench], models: Callable[[str], list[str]], *,
                      chunk: int, budget_s: float, max_rounds: int | None = None,
                      log: Callable[[str], None] = print,
                      clock: Callable[[], float] = time.perf_counter) -> tuple[list[Answer], int]:
    """Rounds of items through every model of each benchmark while the budget lasts: (answers, rounds).

    A benchmark takes part in the next round only while its last round's duration still fits in what is left
    of the budget, so a cheap benchmark goes on after an expensive one has stopped; every model of a
    benchmark always gets the same items."""
    answers: list[Answer] = []
    start = clock()
    last: dict[str, float] = {}  # each benchmark's duration in its last round
    active = [b.name for b in benches]
    round_ = 0
    while active and (max_rounds is None or round_ < max_rounds):
        ran = False
        for bench in benches:
            items = chunk_of(bench, round_, chunk)
            if bench.name not in active:
                continue
            elapsed = clock() - start
            if not items or elapsed > budget_s or elapsed + last.get(bench.name, 0.0) > budget_s:
                if items:
                    log(f"{bench.name}: round {round_ + 1} would end past the {budget_s:.0f} s budget "
                        f"({elapsed:.0f} s spent, its last round took {last.get(bench.name, 0.0):.0f} s)")
                active.remove(bench.name)
                continue
            began = clock()
            for model in models(bench.name):
                t0 = clock()
                got = await asyncio.gather(*(ask(client, model, bench, it, round_) for it in items))
                answers.extend(got)
                errors = sum(a.error is not None for a in got)
                log(f"round {round_ + 1} {bench.name:<9} {model:<32} {sum(a.score for a in got):g}/"
                    f"{len(got)} correct, {errors} errors, {clock() - t0:.0f} s")
            last[bench.name] = clock() - began
            ran = True
        if not ran:
            break
        round_ += 1
    return answers, round_


HELLO = [{"role": "user", "content": "hi"}]


async def warm_up(client: Any, warm: list[tuple[str, list[dict]]]) -> None:
    """One untimed request per model: lazy loads (the router's embedder, a compiled step, a recorded model's
    tokenizer) are not latency. A recorded model is asked one of its recorded questions."""
    for model, messages in warm:
        await client.chat.completions.create(model=model, messages=messages, max_tokens=1)


async def drive(url: str, benches: list[DemoBench], models: Callable[[str], list[str]],
                warm: list[tuple[str, list[dict]]], *,
                chunk: int, budget_s: float, max_rounds: int | None,
                log: Callable[[str], None]) -> tuple[list[Answer], int]:
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=url, api_key="demo", max_retries=0, timeout=REQUEST_TIMEOUT_S) as client:
        await warm_up(client, warm)
        return await send_rounds(client, benches, models, chunk=chunk, budget_s=budget_s,
                                 max_rounds=max_rounds, log=log)


def live_prices(config_path: Path) -> dict[str, tuple[float, float]]:
    """Each model's price ($ per 1M tokens in, out) as the gateway computes it at start-up: from the cached
    measurements (the gateway made any that were missing), never new ones."""
    from fleetlm.fleet.measure import price_local_models

    config = load_config(config_path)
    price_local_models(config, measure_missing=False, progress=False)
    return {n: (s.price.input, s.price.output) for n, s in config.models.items()}


def fleet_roles(config: FleetConfig, prices: dict[str, tuple[float, float]]
                ) -> tuple[list[str], list[str], str | None]:
    """(the chat models, cheapest first; those of them that are recordings; the router's name)."""
    models = sorted(config.models, key=lambda m: prices[m][::-1])
    recorded = [m for m in models if config.models[m].kind == "replay"]
    return models, recorded, config.router.name if config.router else None


def prepare(out_dir: str | Path = "fleet-demo", config_path: str | Path | None = None, *,
            gsm8k_data: str | Path | None = None, log: Callable[[str], None] = print) -> list[str]:
    """What `fleet serve` does once per machine before it can start quickly: measure each local model's
    engines (engine auto, prices; measuring our compiled engine also fills the compile cache). Returns the
    start-up summary's lines (engine and price per model)."""
    from fleetlm.demo.fleet import replay_folder, write_demo_config
    from fleetlm.fleet.measure import price_local_models
    from fleetlm.serve.commands import startup_summary

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = Path(config_path) if config_path else write_demo_config(out, replay_folder(gsm8k_data))
    config = load_config(path)
    return startup_summary(config, price_local_models(config, log=log))


def demo(out_dir: str | Path = "fleet-demo", config_path: str | Path | None = None, *,
         benches: list[str] | None = None, chunk: int = DEFAULT_CHUNK, budget_s: float = DEFAULT_BUDGET_S,
         max_rounds: int | None = None, seed: int = 0, gsm8k_data: str | Path | None = None,
         outcomes: str | Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; writes fleet.yaml, results.json, cost_accuracy.png and report.html into out_dir."""
    from fleetlm.demo.fleet import models_for, replay_folder, write_demo_config
    from fleetlm.demo.report import build_report, write_html, write_plot

    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if config_path is None:
        config_path = write_demo_config(out, replay_folder(gsm8k_data))
    config_path = Path(config_path)
    config = load_config(config_path)
    loaded, notes = load_benches(list(benches or BENCHES), seed, gsm8k_data)
    for note in notes:
        log(note)
    if not loaded:
        raise DemoError("no benchmark can run here: " + "; ".join(notes))
    log(f"starting the gateway on {config_path} (log: {out / 'gateway.log'})")
    with tempfile.TemporaryDirectory() as tmp:
        gateway = GatewayProcess(config_path, f"sqlite:///{Path(tmp) / 'demo.db'}", out / "gateway.log")
        try:
            started = time.perf_counter() - t0
            prices = live_prices(config_path)
            models, recorded, router = fleet_roles(config, prices)

            def asked(bench: str) -> list[str]:
                return models_for(bench, models, recorded) + ([router] if router else [])

            warm = [(m, HELLO) for m in models if m not in recorded] + ([(router, HELLO)] if router else [])
            warm += [(m, b.items[0].messages) for m in recorded for b in loaded if m in asked(b.name)][:1]
            log(f"gateway up in {started:.0f} s at {gateway.url}; sending held-out items "
                f"({', '.join(b.name for b in loaded)}), budget {budget_s:.0f} s")
            answers, rounds = asyncio.run(drive(gateway.url, loaded, asked, warm, chunk=chunk,
                                                budget_s=budget_s, max_rounds=max_rounds, log=log))
        finally:
            gateway.stop()
    report = build_report(answers, models, router=router, recorded=recorded, rounds=rounds, seed=seed,
                          notes=notes, prices=prices, outcomes=outcomes)
    report.update(seconds=time.perf_counter() - t0, gateway_start_s=started, config=str(config_path),
                  answers=[asdict(a) for a in answers])
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    write_plot(report, out / "cost_accuracy.png")
    write_html(report, out / "report.html", "cost_accuracy.png")
    return report
