"""The gateway's dashboard: GET /dashboard (one HTML page, no external assets) and GET /dashboard/data (JSON).

From the usage log of the last `hours` (default 24): spend and tokens over time by model and by key, the
router's share of traffic per model, the savings against sending every request to the strongest model,
latency percentiles per model, and the most recent requests with their route. The page draws its charts
as inline SVG with a few lines of JavaScript (the gateway may run offline: no CDN). The data covers every
key: serve the gateway on loopback or behind an authenticating proxy when that matters.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.concurrency import run_in_threadpool

PAGE = Path(__file__).with_name("dashboard.html")
MAX_BUCKETS = 48
RECENT = 25


def _percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def summarize(rows: list[dict], config: Any, since: float, now: float) -> dict:
    """The dashboard's numbers from usage rows (store.requests)."""
    span = max(now - since, 60.0)
    bucket_s = max(60.0, span / MAX_BUCKETS)
    n_buckets = int(span // bucket_s) + 1
    by_model: dict[str, list[list[float]]] = defaultdict(lambda: [[0.0, 0] for _ in range(n_buckets)])
    by_key: dict[str, list[list[float]]] = defaultdict(lambda: [[0.0, 0] for _ in range(n_buckets)])
    share: dict[str, int] = defaultdict(int)
    latency: dict[str, list[float]] = defaultdict(list)
    ttft: dict[str, list[float]] = defaultdict(list)
    strongest = config.strongest_model()
    price = config.models[strongest].price
    spent = baseline = 0.0
    for r in rows:
        i = min(n_buckets - 1, int((r["created"] - since) // bucket_s))
        model = r["model_used"] or "(unserved)"
        tokens = (r["prompt_tokens"] or 0) + (r["completion_tokens"] or 0)
        for series, name in ((by_model, model), (by_key, r["key_id"] or "(no key)")):
            series[name][i][0] += r["cost_usd"] or 0.0
            series[name][i][1] += tokens
        if (r["route_reason"] or "").startswith("router:") and r["model_used"]:
            share[model] += 1
        if r["status"] < 400:
            spent += r["cost_usd"] or 0.0
            baseline += price.cost(r["prompt_tokens"] or 0, r["completion_tokens"] or 0)
            if r["latency_ms"] is not None:
                latency[model].append(r["latency_ms"])
            if r["ttft_ms"] is not None:
                ttft[model].append(r["ttft_ms"])

    def series(d: dict) -> list[dict]:
        return [{"name": k, "cost": [b[0] for b in v], "tokens": [b[1] for b in v]}
                for k, v in sorted(d.items())]

    recent = [{"time": r["created"], "model_requested": r["model_requested"], "model_used": r["model_used"],
               "route": r["route_reason"], "status": r["status"], "tokens": (r["prompt_tokens"] or 0)
               + (r["completion_tokens"] or 0), "cost_usd": r["cost_usd"], "latency_ms": r["latency_ms"]}
              for r in rows[-RECENT:][::-1]]
    return {
        "since": since, "bucket_s": bucket_s, "buckets": [since + i * bucket_s for i in range(n_buckets)],
        "by_model": series(by_model), "by_key": series(by_key),
        "router_share": dict(sorted(share.items())),
        "savings": {"strongest": strongest, "spent_usd": spent, "all_on_strongest_usd": baseline,
                    "saved_usd": baseline - spent},
        "latency": {m: {"p50": _percentile(v, .5), "p90": _percentile(v, .9), "p99": _percentile(v, .99),
                        "ttft_p50": _percentile(ttft[m], .5), "requests": len(v)}
                    for m, v in sorted(latency.items())},
        "requests": len(rows), "recent": recent,
    }


def install(app: FastAPI, gateway: Any) -> None:
    @app.get("/dashboard", include_in_schema=False)
    async def _page() -> HTMLResponse:
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.get("/dashboard/data", include_in_schema=False)
    async def _data(request: Request) -> JSONResponse:
        try:
            hours = min(24 * 30, max(0.05, float(request.query_params.get("hours", "24"))))
        except ValueError:
            return JSONResponse({"error": {"message": "hours must be a number", "type":
                                           "invalid_request_error", "param": "hours", "code": None}}, 400)
        now = time.time()
        since = now - hours * 3600
        rows = await run_in_threadpool(gateway.store.requests, since)
        return JSONResponse(summarize(rows, gateway.config, since, now))
