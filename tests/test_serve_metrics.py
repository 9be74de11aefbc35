"""/metrics in Prometheus' text format, and GenAI spans (in-memory exporter) with the router as a child."""

import json

from fastapi.testclient import TestClient
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

from fleetlm.config import parse_config
from fleetlm.serve.app import create_app
from fleetlm.serve.metrics import route_kind
from fleetlm.serve.store import UsageStore
from fleetlm.serve.tracing import Tracing
from test_app import CONFIG, FixedRouter, Scripted


def samples(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_and_spans(tmp_path):
    store = UsageStore(f"sqlite:///{tmp_path / 'm.db'}")
    _, secret = store.create_key("m", budget_usd=1.0)
    backends = {n: Scripted(n, fail="down" if n in ("down", "dead") else None) for n in CONFIG["models"]}
    app = create_app(parse_config(CONFIG), store, backends, router=FixedRouter())
    exporter = InMemorySpanExporter()
    app.state.gateway.tracing = Tracing(exporter)
    auth = {"authorization": f"Bearer {secret}"}
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    with TestClient(app) as client:
        for model in ("auto", "down", "dead"):
            client.post("/v1/chat/completions", content=json.dumps({"model": model, **chat}), headers=auth)
        with client.stream("POST", "/v1/chat/completions", headers=auth,
                           content=json.dumps({"model": "cheap", "stream": True, **chat})) as r:
            list(r.iter_lines())
        resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    s = samples(resp.text)
    key = store.keys()[0].key_id
    assert s[("fleet_requests_total", (("key", key), ("model", "cheap"), ("route", "router"),
                                       ("status", "200")))] == 1
    assert s[("fleet_requests_total", (("key", key), ("model", "none"), ("route", "direct"),
                                       ("status", "503")))] == 1
    assert s[("fleet_tokens_total", (("key", key), ("kind", "prompt"), ("model", "cheap")))] == 2000
    assert s[("fleet_cost_usd_total", (("key", key), ("model", "cheap")))] > 0
    assert s[("fleet_router_decisions_total", (("model", "cheap"), ("router", "auto")))] == 1
    assert s[("fleet_fallbacks_total", (("from_model", "down"), ("stage", "before_first_token"),
                                        ("to_model", "big")))] == 1
    assert s[("fleet_time_to_first_token_seconds_count", (("model", "cheap"),))] == 2
    assert s[("fleet_inter_token_latency_seconds_count", (("model", "cheap"),))] == 1  # 2 pieces, 1 gap
    assert s[("fleet_requests_in_flight", ())] == 0  # every request, the stream too, has ended
    remaining = s[("fleet_budget_remaining_usd", (("key", key),))]
    assert 0 < remaining < 1.0
    assert s[("fleet_errors_total", (("model", "none"), ("status", "503")))] == 1

    spans = exporter.get_finished_spans()
    routed = [sp for sp in spans if sp.name == "chat auto"]
    assert len(routed) == 1
    attrs = routed[0].attributes
    assert attrs["gen_ai.request.model"] == "auto" and attrs["gen_ai.response.model"] == "cheap"
    assert attrs["gen_ai.usage.input_tokens"] == 1000 and attrs["gen_ai.usage.output_tokens"] == 500
    assert attrs["gen_ai.operation.name"] == "chat"
    (router_span,) = [sp for sp in spans if sp.name == "fleet.router"]
    assert router_span.parent.span_id == routed[0].context.span_id
    assert router_span.attributes["fleet.router.decision"] == "cheap"
    failed = [sp for sp in spans if sp.name == "chat dead"]
    assert failed and failed[0].status.status_code.name == "ERROR"


def test_route_kinds_and_tracing_off_by_default(monkeypatch):
    assert [route_kind(r) for r in ("direct", "alias:c", "router:short prompt", "router:cascade[math]: a",
                                    None)] == ["direct", "alias", "router", "cascade", "direct"]
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert Tracing.from_env().tracer is None
