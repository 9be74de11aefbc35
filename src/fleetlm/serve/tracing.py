"""OpenTelemetry spans of the gateway, after the GenAI semantic conventions, exported when configured.

One span per request, `{operation} {model}` (e.g. `chat auto`) with gen_ai.operation.name,
gen_ai.request.model, gen_ai.response.model, gen_ai.usage.input_tokens / output_tokens,
gen_ai.response.id and our fleet.* attributes (route, cost, fallbacks); a routed
request gets a child span `fleet.router` holding the decision. Spans are written when the request's usage
record is (start and end times given explicitly), so no context has to travel through the request's code.

Export is on when $OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) is set and the OTLP exporter package
is installed; tests hand in an in-memory exporter. The tracer provider is our own, never the global one.
"""

from __future__ import annotations

import os
import time
from typing import Any

from fleetlm.errors import ConfigError
from fleetlm.serve.store import RequestRecord

OPERATIONS = {"chat": "chat", "completions": "text_completion", "embeddings": "embeddings"}


class Tracing:
    def __init__(self, exporter: Any | None = None):
        self.tracer = None
        if exporter is None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": "fleetlm-gateway"}))
        in_memory = type(exporter).__name__ == "InMemorySpanExporter"
        self.provider.add_span_processor((SimpleSpanProcessor if in_memory else BatchSpanProcessor)(exporter))
        self.tracer = self.provider.get_tracer("fleetlm.serve")

    @classmethod
    def from_env(cls) -> Tracing:
        if not (os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")):
            return cls(None)
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise ConfigError("OTEL_EXPORTER_OTLP_ENDPOINT is set but opentelemetry-exporter-otlp-proto-http "
                              "is not installed") from None
        return cls(OTLPSpanExporter())

    def record(self, record: RequestRecord, call: Any) -> None:
        if self.tracer is None:
            return
        from opentelemetry import trace
        from opentelemetry.trace import Status, StatusCode

        end_ns = time.time_ns()
        start_ns = end_ns - int((record.latency_ms or 0.0) * 1e6)
        op = OPERATIONS.get(record.endpoint, record.endpoint)
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": op,
            "gen_ai.provider.name": "fleetlm",
            "gen_ai.request.model": record.model_requested,
            "gen_ai.usage.input_tokens": record.prompt_tokens,
            "gen_ai.usage.output_tokens": record.completion_tokens,
            "gen_ai.response.id": record.request_id,
            "fleet.route": record.route_reason or "",
            "fleet.cost_usd": record.cost_usd,
            "fleet.stream": record.stream,
            "http.response.status_code": record.status,
        }
        if record.model_used:
            attrs["gen_ai.response.model"] = record.model_used
        if record.fallbacks:
            attrs["fleet.fallbacks"] = list(record.fallbacks)
        if record.key_id:
            attrs["fleet.key_id"] = record.key_id
        span = self.tracer.start_span(f"{op} {record.model_requested}", kind=trace.SpanKind.SERVER,
                                      start_time=start_ns, attributes=attrs)
        if record.status >= 400:
            span.set_status(Status(StatusCode.ERROR, record.error or str(record.status)))
            span.set_attribute("error.type", str(record.status))
        routed_at = getattr(call, "routed_at", None)
        if record.route_reason and record.route_reason.startswith("router:") and routed_at is not None:
            route_end = start_ns + int((routed_at - call.start) * 1e9)
            child = self.tracer.start_span(
                "fleet.router", context=trace.set_span_in_context(span), start_time=start_ns,
                attributes={"gen_ai.request.model": record.model_requested,
                            "fleet.router.decision": record.model_used or "",
                            "fleet.router.reason": record.route_reason,
                            **({"fleet.router.predicted_quality": record.predicted_quality}
                               if record.predicted_quality is not None else {})})
            child.end(end_time=max(route_end, start_ns))
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        if self.tracer is not None:
            self.provider.shutdown()
