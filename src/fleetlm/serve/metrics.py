"""Prometheus metrics of the gateway (prometheus-client), served at /metrics in the text format.

Names follow what LLM gateways and servers already export (counters end in _total, times in seconds):
fleet_requests_total{model,route,key,status}, fleet_tokens_total{model,key,kind}, fleet_cost_usd_total,
fleet_errors_total, the histograms fleet_time_to_first_token_seconds, fleet_inter_token_latency_seconds and
fleet_request_duration_seconds, the gauge fleet_requests_in_flight, fleet_router_decisions_total,
fleet_cascade_escalations_total, fleet_fallbacks_total{from_model,to_model,stage} and
fleet_budget_remaining_usd{key}. `route` is the kind of route (direct, alias, router, cascade), never the
router's free-text reason, so that label sets stay few.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from fleetlm.serve.store import RequestRecord

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


def route_kind(route: str | None) -> str:
    route = route or "direct"
    if route.startswith("router:cascade"):
        return "cascade"
    return route.split(":", 1)[0].split(";", 1)[0]


class Metrics:
    """One registry per gateway (tests build many gateways in one process)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fleet_requests", "Requests by model, route kind, key and status",
                                ["model", "route", "key", "status"], registry=r)
        self.tokens = Counter("fleet_tokens", "Tokens by model, key and kind (prompt, completion)",
                              ["model", "key", "kind"], registry=r)
        self.cost = Counter("fleet_cost_usd", "Cost in US dollars by model and key", ["model", "key"],
                            registry=r)
        self.errors = Counter("fleet_errors", "Requests answered with status >= 400", ["model", "status"],
                              registry=r)
        self.ttft = Histogram("fleet_time_to_first_token_seconds",
                              "Time to the first token (or the whole answer)", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fleet_inter_token_latency_seconds", "Time between streamed pieces", ["model"],
                             buckets=ITL_BUCKETS, registry=r)
        self.duration = Histogram("fleet_request_duration_seconds", "End-to-end latency", ["model", "route"],
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("fleet_requests_in_flight", "Requests being served (streams until their end)",
                               registry=r)
        self.decisions = Counter("fleet_router_decisions", "Models the router chose", ["router", "model"],
                                 registry=r)
        self.escalations = Counter("fleet_cascade_escalations", "Cascade answers rejected and escalated",
                                   ["from_model"], registry=r)
        self.fallbacks = Counter("fleet_fallbacks", "Moves to a fallback model (stage: before the first "
                                 "token, or mid-stream)", ["from_model", "to_model", "stage"], registry=r)
        self.budget_remaining = Gauge("fleet_budget_remaining_usd", "Budget left per key", ["key"],
                                      registry=r)

    def observe(self, record: RequestRecord, call: Any, remaining_usd: float | None) -> None:
        model, key = record.model_used or "none", record.key_id or "none"
        kind = route_kind(record.route_reason)
        self.requests.labels(model, kind, key, str(record.status)).inc()
        if record.status >= 400:
            self.errors.labels(model, str(record.status)).inc()
        self.tokens.labels(model, key, "prompt").inc(record.prompt_tokens)
        self.tokens.labels(model, key, "completion").inc(record.completion_tokens)
        self.cost.labels(model, key).inc(record.cost_usd)
        if record.ttft_ms is not None:
            self.ttft.labels(model).observe(record.ttft_ms / 1000)
        if record.latency_ms is not None:
            self.duration.labels(model, kind).observe(record.latency_ms / 1000)
        if kind in ("router", "cascade") and record.model_used:
            self.decisions.labels(record.model_requested, record.model_used).inc()
        for attempt in record.checks or []:
            if not attempt.get("kept", True):
                self.escalations.labels(attempt.get("model") or "none").inc()
        failovers = getattr(call, "failovers", None) or []
        mid = {(f["from"], f["to"]) for f in failovers}
        chain = [*record.fallbacks, record.model_used or "none"]
        for src, dst in zip(chain, chain[1:], strict=False):
            self.fallbacks.labels(src, dst, "mid_stream" if (src, dst) in mid else "before_first_token").inc()
        if remaining_usd is not None:
            self.budget_remaining.labels(key).set(remaining_usd)

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


def install(app: FastAPI, metrics: Metrics) -> None:
    """GET /metrics, and the in-flight gauge around every API request (a stream counts until its end)."""

    @app.get("/metrics", include_in_schema=False)
    async def _metrics() -> Response:
        return metrics.render()

    inner = app.build_middleware_stack

    def build() -> Any:
        stack = inner()

        async def counted(scope: dict, receive: Any, send: Any) -> None:
            if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
                return await stack(scope, receive, send)
            metrics.in_flight.inc()
            try:
                await stack(scope, receive, send)
            finally:
                metrics.in_flight.dec()

        return counted

    app.build_middleware_stack = build  # type: ignore[method-assign]
