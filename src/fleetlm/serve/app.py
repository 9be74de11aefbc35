"""The FastAPI gateway: OpenAI's API in front of the fleet, with keys, limits, fallbacks and a usage log.

Every request that gets past body parsing leaves one row in the usage store, committed before the
response (or the stream's final `data: [DONE]`) is sent.

A cascade with checks (routing.FleetRouter.ladder) is climbed here (`_climb`): each model of the ladder
answers in turn, the router's checks judge the answer, and every attempt (model, checks, what they found,
tokens, cost) goes to `x-fleet-route`, the usage log's `checks` and the body's `fleet.attempts`; the request
costs the sum over its attempts. A streamed cascade request buffers each checked answer whole and streams
the kept one; the last model of the ladder, unchecked, streams live. A recorded model's answer (replay) is
labelled: `model` is the recorded name (`...@recorded`), x-fleet-route says recorded, and so does the log.
A chat request with `{"type": "mcp"}` tools runs its rounds of MCP calls in serve/mcp_tools.py (a row each).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from fleetlm.config import FleetConfig
from fleetlm.mcp.client import AsyncMcpToolbox
from fleetlm.serve import assistants, chat_grounding, mcp_tools, vision, voice_chat
from fleetlm.serve.backends import Backend, Delta, Generation, RouteDecision
from fleetlm.serve.dashboard import install as install_dashboard
from fleetlm.serve.embeddings import BUILTIN_EMBEDDING_MODEL, MiniLMBackend, encode_base64
from fleetlm.serve.errors import (
    APIError,
    BackendError,
    BadRequest,
    ModelNotFound,
    PayloadTooLarge,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
    error_body,
)
from fleetlm.serve.failover import ClosingStreamingResponse, first_piece, resilient_stream
from fleetlm.serve.files_api import install_files, store_failure
from fleetlm.serve.limits import Limits
from fleetlm.serve.metrics import Metrics
from fleetlm.serve.metrics import install as install_metrics
from fleetlm.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    ChunkDelta,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Embedding,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    Usage,
    new_id,
    parse_request,
)
from fleetlm.serve.responses_api import install_responses
from fleetlm.serve.speech import install_speech
from fleetlm.serve.store import ApiKey, RequestRecord, UsageStore
from fleetlm.serve.tracing import Tracing
from fleetlm.serve.transcribe import install_transcribe
from fleetlm.serve.vector_stores_api import install_vector_stores

KEY_CACHE_S = 2.0
DISCONNECT_POLL_S = 0.25  # how often a whole answer in progress checks that its client is still there


class Router(Protocol):
    """A virtual model: picks a real model for a request (fleetlm.route provides the fitted ones)."""

    name: str

    def route(self, request: ChatCompletionRequest | CompletionRequest) -> RouteDecision: ...


@dataclass
class _Call:
    """What one request did, filled in as it goes and logged at the end."""

    endpoint: str
    start: float = field(default_factory=time.perf_counter)
    request_id: str = field(default_factory=lambda: new_id("req"))
    model_requested: str = "?"
    model_used: str | None = None
    route: str = "direct"
    predicted_quality: float | None = None
    fallbacks: list[str] = field(default_factory=list)
    cascade: bool = False  # the routed model answers first and the router reviews its answer
    extra_cost: float = 0.0  # what a cascade's reviewed-and-rejected answer cost
    plan: dict | None = None  # a cascade with checks: {"ladder", "checks", "samples"} from the router
    attempts: list[dict] = field(default_factory=list)  # each model a cascade with checks asked
    recorded: bool = False  # the answering backend serves recorded answers (replay)
    served_as: str | None = None  # the answering model's own name when it differs (a recorded model's)
    key: ApiKey | None = None
    user: str | None = None
    stream: bool = False
    ttft_ms: float | None = None
    routed_at: float | None = None  # when the router decided (the trace's router span ends there)
    failovers: list[dict] = field(default_factory=list)  # mid-stream switches (serve/failover.py)
    tally: Any = None  # a stream's token counts so far (failover.Tally)
    prompt: str | None = None  # with log_content: the request's messages as JSON
    response: str | None = None  # with log_content: the first choice's answer
    mcp: Any = None  # a request with mcp tools: its tool loop so far (serve/mcp_tools.McpRun)
    vision: str | None = None  # a request with images: what read them (serve/vision.py)
    voice: Any = None  # a request with audio parts or a spoken answer (serve/voice_chat.VoiceTurn)
    grounding: Any = None  # a request with fleet_file_search: its sources (serve/chat_grounding.py)
    speculative: dict | None = None  # speculative decoding's tally (serve/local.py Drafts), for the log

    def route_reason(self) -> str:
        """The usage log's route_reason: the route, and what read images or drafted tokens on the way."""
        reason = self.route if self.vision is None else f"{self.route}; vision: {self.vision}"
        if self.speculative:
            s = self.speculative
            rate = "" if s.get("acceptance") is None else f" ({s['acceptance']:.0%})"
            kept = f"{s.get('accepted')}/{s.get('drafted')}"
            reason += f"; speculative {s.get('drafter')}: {kept} drafts kept{rate}"
        return reason

    def headers(self, cost: float | None = None) -> dict[str, str]:
        h = {
            "x-fleet-model": self.model_used or "",
            "x-fleet-route": _header_safe(self.route_header()),
            "x-request-id": self.request_id,
        }
        if cost is not None:
            h["x-fleet-cost-usd"] = f"{cost:.8f}"
        if self.mcp is not None:
            h["x-fleet-mcp-calls"] = str(len(self.mcp.calls))
        if self.vision is not None:
            h["x-fleet-vision"] = _header_safe(self.vision)
        return h

    def route_header(self) -> str:
        route = f"{self.route}; fallback from {','.join(self.fallbacks)}" if self.fallbacks else self.route
        if self.recorded:
            route += f"; recorded: {self.served_as or self.model_used}"
        return route


def _header_safe(s: str) -> str:
    return s.encode("ascii", "replace").decode("ascii").replace("\r", " ").replace("\n", " ")[:500]


class Gateway:
    def __init__(
        self,
        config: FleetConfig,
        store: UsageStore,
        backends: dict[str, Backend],
        router: Router | None = None,
    ):
        self.config, self.store, self.backends, self.router = config, store, backends, router
        # Key lookups are cached briefly so that a request costs no extra queries; a key made by
        # `fleet keys create` is seen within KEY_CACHE_S. Budgets and rate limits live in the counter
        # store (serve/limits.py): in this process, or in Redis shared by replicas.
        self._keys: dict[str, tuple[float, ApiKey | None]] = {}
        self._has_keys: tuple[float, bool] = (-1e9, False)
        self.limits = Limits(config, store)
        self.metrics = Metrics()
        self.tracing = Tracing.from_env()
        # The fleet's MCP servers, for requests with mcp tools; each is started (or reached) on first use.
        self.mcp = AsyncMcpToolbox(config.mcp_servers)

    async def _find_key(self, secret: str) -> ApiKey | None:
        now = time.monotonic()
        hit = self._keys.get(secret)
        if hit is None or now - hit[0] > KEY_CACHE_S:
            if len(self._keys) > 10_000:  # random wrong keys must not grow memory without bound
                self._keys.clear()
            hit = self._keys[secret] = (now, await run_in_threadpool(self.store.find_key, secret))
        return hit[1]

    async def _keys_required(self) -> bool:
        if self.config.require_api_key is not None:
            return self.config.require_api_key
        now = time.monotonic()
        if now - self._has_keys[0] > KEY_CACHE_S:
            self._has_keys = (now, await run_in_threadpool(self.store.has_keys))
        return self._has_keys[1]

    # ------------------------------------------------------------ request plumbing

    async def read_body(self, request: Request) -> bytes:
        limit = self.config.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise BadRequest("invalid content-length header")
            if int(declared) > limit:
                raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
        chunks: list[bytes] = []

        async def collect() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                chunks.append(chunk)

        try:  # a client that promises a body and never sends it must not hold a worker forever
            await asyncio.wait_for(collect(), timeout=self.config.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeout(
                f"the request body did not arrive within {self.config.body_timeout_s:g} s"
            ) from None
        return b"".join(chunks)

    async def authorize(self, request: Request, call: _Call) -> None:
        header = request.headers.get("authorization", "")
        secret = header[7:].strip() if header.lower().startswith("bearer ") else None
        key = await self._find_key(secret) if secret else None
        if key is None or key.revoked:
            if await self._keys_required():
                raise Unauthorized("missing or invalid API key" if secret else "an API key is required")
            return
        call.key = key
        self.limits.check_rate(key, call.request_id)

    def reserve(self, request: Any, chain: list[str], call: _Call) -> None:
        """Reserve the request's worst-case cost (every model it may reach) against its key's budget."""
        if call.key is None or call.key.budget_usd is None:
            return
        if call.plan is not None:
            steps = [self.chain(m) for m in call.plan["ladder"]]
        elif call.cascade:
            steps = [chain, self.chain(self.config.strongest_model())]
        else:
            steps = [chain]
        self.limits.reserve(call.key, call.request_id, self.limits.worst_case(request, steps))

    async def resolve(self, name: str, request: Any, call: _Call) -> list[str]:
        """The models to try, in order: the chosen one, then its fallbacks."""
        call.model_requested = name
        if self.config.router is not None and name == self.config.router.name:
            if self.router is None:
                raise ServiceUnavailable(f"router {name!r} is configured but no fitted router is loaded")
            decision = await run_in_threadpool(self.router.route, request)  # may embed the prompt
            model = self.config.resolve(decision.model)
            if model is None:
                raise ServiceUnavailable(
                    f"router {name!r} chose {decision.model!r}, which is not in the fleet"
                )
            call.route, call.predicted_quality = f"router:{decision.reason}", decision.predicted_quality
            call.routed_at = time.perf_counter()
            call.cascade = bool(decision.extra.get("cascade"))
            call.plan = decision.extra if "ladder" in decision.extra else None
        else:
            model = self.config.resolve(name)
            if model is None and name in self.backends:  # a model the gateway brings itself (MiniLM)
                model = name
            if model is None:
                raise ModelNotFound(f"the model {name!r} does not exist", param="model")
            call.route = "direct" if model == name else f"alias:{name}"
        return self.chain(model)

    def chain(self, model: str) -> list[str]:
        """A model and its fallbacks, in order."""
        chain = [model]
        spec = self.config.models.get(model)
        for fb in spec.fallbacks if spec else []:
            canonical = self.config.resolve(fb)
            if canonical and canonical not in chain:
                chain.append(canonical)
        return chain

    async def first_success(
        self, chain: list[str], call: _Call, attempt: Callable[[Backend], Awaitable[Any]]
    ) -> Any:
        errors = []
        for model in chain:
            try:
                backend = self.backends[model]
                result = await attempt(backend)
                call.model_used = model
                call.recorded = bool(getattr(backend, "recorded", False))
                call.served_as = getattr(backend, "served_name", None) if call.recorded else None
                return result
            except BackendError as exc:
                if not exc.retryable and exc.upstream_status is not None and exc.upstream_status < 500:
                    call.model_used = model
                    raise _client_error(exc) from None
                errors.append(exc.message)
                call.fallbacks.append(model)
        raise ServiceUnavailable("no model could serve the request: " + " | ".join(errors))

    def cost(self, model: str | None, prompt_tokens: int, completion_tokens: int) -> float:
        spec = self.config.models.get(model) if model is not None else None
        return spec.price.cost(prompt_tokens, completion_tokens) if spec is not None else 0.0

    def record(
        self,
        call: _Call,
        status: int,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        error: str | None = None,
    ) -> RequestRecord:
        # A failed request costs nothing; a stream the client cut short pays for what was generated.
        cost = self.cost(call.model_used, prompt_tokens, completion_tokens) if status < 500 else 0.0
        cost += call.extra_cost
        return RequestRecord(
            request_id=call.request_id,
            endpoint=call.endpoint,
            model_requested=call.model_requested,
            status=status,
            model_used=call.model_used,
            route_reason=call.route_reason(),
            predicted_quality=call.predicted_quality,
            fallbacks=call.fallbacks,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            latency_ms=(time.perf_counter() - call.start) * 1000,
            ttft_ms=call.ttft_ms,
            error=error,
            stream=call.stream,
            key_id=call.key.key_id if call.key else None,
            user=call.user,
            recorded=call.recorded,
            checks=call.attempts or None,
            prompt=call.prompt,
            response=call.response,
        )

    async def log(
        self,
        call: _Call,
        status: int,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        error: str | None = None,
    ) -> float:
        record = self.record(call, status, prompt_tokens, completion_tokens, error)
        await run_in_threadpool(self.store.log, record)
        self.settle(call, record)
        return record.cost_usd

    def settle(self, call: _Call, record: RequestRecord) -> None:
        """After the record is written: the reservation becomes the exact cost; metrics and the trace."""
        remaining = None
        if call.key is not None:
            tokens = record.prompt_tokens + record.completion_tokens
            remaining = self.limits.settle(call.key, call.request_id, record.cost_usd, tokens)
        self.metrics.observe(record, call, remaining)
        self.tracing.record(record, call)

    # ------------------------------------------------------------ endpoints

    async def handle(self, request: Request, endpoint: str, model_cls: type) -> Response:
        call = _Call(endpoint)
        try:
            body = await self.read_body(request)
            parsed = parse_request(model_cls, body)
            call.model_requested = parsed.model
            call.user = getattr(parsed, "user", None)
            if self.config.log_content and endpoint != "embeddings":
                call.prompt = _logged_prompt(parsed)
            await self.authorize(request, call)
            assistant = assistants.find_assistant(self.config, parsed.model) if endpoint == "chat" else None
            if assistant is not None:  # its instructions, stores, tools, then its model (serve/assistants.py)
                asked, parsed = parsed.model, assistants.apply(assistant, parsed)
            if vision.requested(parsed):  # images become stage one's text, which the router then reads
                parsed = await vision.prepare(self, parsed, call)
            if voice_chat.requested(parsed):  # audio parts become their transcripts, which the router reads
                parsed = await voice_chat.prepare(self, parsed, call)
            if chat_grounding.requested(parsed):  # vector store sources become a system message
                parsed = await chat_grounding.prepare(self, parsed, call)
            chain = await self.resolve(parsed.model, parsed, call)
            if assistant is not None:  # the log names the assistant asked for and the model that answered
                call.model_requested, call.route = asked, f"assistant>{call.route}"
            self.reserve(parsed, chain, call)
            if mcp_tools.requested(parsed):  # mcp entries become their servers' tools (or a 400 / 424)
                parsed = await mcp_tools.prepare(self, parsed, call)
            if endpoint == "embeddings":
                return await self._embeddings(parsed, chain, call)
            call.stream = parsed.stream
            if parsed.stream:
                return await self._stream(parsed, chain, call, chat=endpoint == "chat")
            return await self._unless_client_leaves(request, call,
                                                    self._whole(parsed, chain, call, chat=endpoint == "chat"))
        except APIError as exc:
            if call.model_requested != "?":  # a body we could not read names no model: nothing to log
                await self.log(call, exc.status, error=exc.message)
            return JSONResponse(exc.body(), status_code=exc.status, headers=call.headers())

    async def _unless_client_leaves(self, request: Request, call: _Call,
                                    work: Awaitable[Response]) -> Response:
        """A whole (unstreamed) answer, cancelled if the client disconnects first: a model does not go on
        generating for nobody (streams stop by themselves when their client goes)."""
        task = asyncio.ensure_future(work)
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):  # whatever it was doing, it is over
                    pass
                await self.log(call, 499, error="client went away")
                return Response(status_code=499)

    async def _review(self, req: Any, gen: Generation, call: _Call) -> list[str] | None:
        """Cascade: the router reads the cheap answer; the chain to escalate to, or None to keep it."""
        assert self.router is not None
        call.cascade = False
        if call.fallbacks:  # the cheap model failed and a fallback answered: its checks do not apply
            return None
        answers = [c.text or "" for c in gen.choices]
        decision = await run_in_threadpool(self.router.review, req, answers)  # type: ignore[attr-defined]
        call.route, call.predicted_quality = f"router:{decision.reason}", decision.predicted_quality
        model = self.config.resolve(decision.model)
        if model is None or model == call.model_used:
            return None
        # The rejected answer was paid for: its cost is logged with the request.
        call.extra_cost += self.cost(call.model_used, gen.prompt_tokens, gen.completion_tokens)
        return self.chain(model)

    async def _whole(self, req: Any, chain: list[str], call: _Call, *, chat: bool) -> Response:
        def attempt(b: Backend) -> Awaitable[Generation]:
            return b.chat(req) if chat else b.complete(req)

        if call.mcp is not None:  # rounds of MCP calls, then the answer (serve/mcp_tools.py)
            req, gen = await mcp_tools.whole_rounds(self, req, chain, call)
        elif call.plan is not None:
            gen = await self._climb(req, call, chat=chat)
        else:
            gen = await self.first_success(chain, call, attempt)
        if call.cascade:
            escalate = await self._review(req, gen, call)
            if escalate is not None:
                gen = await self.first_success(escalate, call, attempt)
        call.ttft_ms = (time.perf_counter() - call.start) * 1000
        usage = Usage.of(gen.prompt_tokens, gen.completion_tokens)
        model = call.served_as or req.model
        if chat:
            body: Any = ChatCompletion(
                model=model,
                usage=usage,
                choices=[
                    ChatChoice(
                        index=c.index,
                        message=AssistantMessage(content=c.text, tool_calls=c.tool_calls),
                        finish_reason=c.finish_reason,
                        logprobs=c.logprobs,
                    )
                    for c in gen.choices
                ],
            )
        else:
            body = Completion(
                model=model,
                usage=usage,
                choices=[
                    CompletionChoice(
                        index=c.index, text=c.text or "", finish_reason=c.finish_reason, logprobs=c.logprobs
                    )
                    for c in gen.choices
                ],
            )
        if self.config.log_content and gen.choices:
            call.response = gen.choices[0].text or ""
        call.speculative = (gen.fleet or {}).get("speculative")
        cost = await self.log(call, 200, gen.prompt_tokens, gen.completion_tokens)
        data = body.model_dump(exclude_none=True)
        if call.mcp is not None:  # the tool rounds' usage and cost, and the calls that ran
            cost = call.mcp.annotate(data, cost)
        extension = {**(gen.fleet or {}), **({"attempts": call.attempts} if call.attempts else {})}
        if extension:  # our additions sit under one key, so the OpenAI shape stays as it is
            data["fleet"] = extension
        if call.grounding is not None:  # citations of the sources (serve/chat_grounding.py)
            chat_grounding.annotate(data, call.grounding)
        if call.voice is not None:  # modalities ["text", "audio"]: the answer spoken (serve/voice_chat.py)
            await voice_chat.speak(self, data, call)
        return JSONResponse(data, headers=call.headers(cost))

    async def _climb(self, req: Any, call: _Call, *, chat: bool, stream: bool = False) -> Any:
        """Cascade with checks: the ladder's models answer in turn until an answer passes the checks; the last
        one's answer is kept unchecked (with `stream`, its stream is returned, as first_success gives it).
        A rejected answer's cost is added to the request's."""
        assert call.plan is not None and self.router is not None
        ladder, checks = call.plan["ladder"], call.plan["checks"]

        def whole(b: Backend, ask: Any = req) -> Awaitable[Generation]:
            return b.chat(ask) if chat else b.complete(ask)

        for step, model in enumerate(ladder):
            chain, started = self.chain(model), time.perf_counter()
            if step == len(ladder) - 1:
                if stream:
                    result = await self.first_success(chain, call, lambda b: self._open_stream(b, req, chat))
                else:
                    result = await self.first_success(chain, call, whole)
                call.attempts.append({"model": call.model_used, "kept": True, "recorded": call.recorded,
                                      "checks": [], "note": "last in the ladder: kept unchecked",
                                      "latency_ms": round((time.perf_counter() - started) * 1000, 2)})
                call.route = "router:" + _climb_summary(checks, call.attempts)
                return result
            samples = int(call.plan.get("samples", 1))
            if getattr(self.backends.get(model), "recorded", False):
                samples = 1  # a recording holds one answer
            ask = req.model_copy(update={"n": samples}) if samples > 1 else req
            try:
                gen: Generation = await self.first_success(chain, call, lambda b, ask=ask: whole(b, ask))
            except ServiceUnavailable as exc:  # this step cannot answer: the next one up the ladder may
                call.attempts.append({"model": model, "kept": False, "checks": [], "error": exc.message})
                continue
            latency_ms = (time.perf_counter() - started) * 1000
            results = await run_in_threadpool(
                self.router.check_answer, req, gen, checks, samples > 1  # type: ignore[attr-defined]
            )
            kept = all(r.passed for r in results)
            cost = self.cost(call.model_used, gen.prompt_tokens, gen.completion_tokens)
            call.attempts.append({
                "model": call.model_used, "kept": kept, "recorded": call.recorded,
                "checks": [r.to_dict() for r in results], "prompt_tokens": gen.prompt_tokens,
                "completion_tokens": gen.completion_tokens, "cost_usd": cost,
                "latency_ms": round(latency_ms, 2),
            })
            if kept:
                call.route = "router:" + _climb_summary(checks, call.attempts)
                if samples > 1:  # the extra samples were paid for, but the client asked for one answer
                    gen = Generation(gen.choices[:1], gen.prompt_tokens, gen.completion_tokens, gen.fleet)
                return gen
            call.extra_cost += cost
        raise AssertionError("unreachable: the last model of a ladder always answers")

    async def _open_stream(
        self, backend: Backend, req: Any, chat: bool
    ) -> tuple[AsyncIterator[Delta], Delta | None]:
        it = (backend.stream_chat(req) if chat else backend.stream_complete(req)).__aiter__()
        spec = self.config.models.get(backend.name)
        try:  # the first piece arrives before we commit to this backend, so a failure can fall back
            return it, await first_piece(it, spec.ttft_timeout if spec else None, backend.name)
        except StopAsyncIteration:
            return it, None

    async def _stream(self, req: Any, chain: list[str], call: _Call, *, chat: bool) -> Response:
        def open_stream(backend: Backend) -> Awaitable[tuple[AsyncIterator[Delta], Delta | None]]:
            return self._open_stream(backend, req, chat)

        if call.mcp is not None:  # rounds of MCP calls, then the answer's stream (serve/mcp_tools.py)
            req, deltas, first = await mcp_tools.stream_rounds(self, req, chain, call)
        elif call.plan is not None:
            # Each checked answer is generated whole and checked before anything is sent; the kept one is
            # replayed as one piece per choice, or the last model's stream is passed on as it comes.
            climbed = await self._climb(req, call, chat=chat, stream=True)
            if isinstance(climbed, Generation):
                deltas = _replay(climbed)
                first = await anext(deltas, None)
            else:
                deltas, first = climbed
        elif call.cascade:
            # A cascade must see the cheap answer whole before anything is sent: it is generated in full,
            # reviewed, then replayed as one piece per choice or replaced by the stronger model's stream.
            cheap: Generation = await self.first_success(
                chain, call, (lambda b: b.chat(req)) if chat else (lambda b: b.complete(req))
            )
            escalate = await self._review(req, cheap, call)
            if escalate is None:
                deltas = _replay(cheap)
                first = await anext(deltas, None)
            else:
                deltas, first = await self.first_success(escalate, call, open_stream)
        else:
            deltas, first = await self.first_success(chain, call, open_stream)
        # from here on a backend failure is continued on a fallback (failover.py); the tally prices the stream
        deltas = resilient_stream(self, req, call, deltas, first, chat=chat)
        first = await anext(deltas, None)
        call.ttft_ms = (time.perf_counter() - call.start) * 1000
        stream_id, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
        served = call.served_as or req.model

        def event(choices: list, usage: Usage | None = None, fleet: dict | None = None) -> str:
            if chat:
                obj: Any = ChatCompletionChunk(
                    id=stream_id, created=created, model=served, choices=choices, usage=usage
                )
                data = obj.model_dump(exclude_none=True)
                if usage is None and choices:
                    data["usage"] = None  # OpenAI sends usage: null on content chunks when usage is asked
            else:
                obj = Completion(id=stream_id, created=created, model=served, choices=choices, usage=usage)
                data = obj.model_dump(exclude_none=True)
            if fleet:
                data["fleet"] = fleet
            return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"

        def piece(d: Delta, first_of_choice: bool) -> str:
            if chat:
                # the MCP calls that ran before this answer ride on its first piece
                mcp = call.mcp is not None and first_of_choice and d.index == 0
                ran = {"fleet_mcp_calls": call.mcp.calls} if mcp else {}
                delta = ChunkDelta(
                    role="assistant" if first_of_choice else None, content=d.text, tool_calls=d.tool_calls,
                    **ran,
                )
                return event(
                    [
                        ChunkChoice(
                            index=d.index, delta=delta, finish_reason=d.finish_reason, logprobs=d.logprobs
                        )
                    ]
                )
            return event(
                [
                    CompletionChoice(
                        index=d.index, text=d.text or "", finish_reason=d.finish_reason, logprobs=d.logprobs
                    )
                ]
            )

        async def body() -> AsyncIterator[str]:
            usage: tuple[int, int] = (0, 0)
            seen: set[int] = set()
            status, error = 499, "client went away"
            try:
                pending = first
                while pending is not None:
                    if pending.usage is not None:
                        usage = pending.usage
                    if pending.fleet is not None:
                        call.speculative = pending.fleet.get("speculative", call.speculative)
                    if self.config.log_content and pending.index == 0 and pending.text:
                        call.response = (call.response or "") + pending.text
                    if call.grounding is not None and pending.index == 0:  # strip [n], keep the text
                        call.grounding.clean(pending)
                    if pending.text is not None or pending.finish_reason or pending.tool_calls:
                        yield piece(pending, pending.index not in seen)
                        seen.add(pending.index)
                    pending = await anext(deltas, None)
                # the status changes only once the record is written: a client gone by now cancels the
                # write before it starts (anyio checks first), and then the finally below must log it
                await self.log(call, 200, *usage)
                status, error = 200, None
                if call.grounding is not None:  # the citations, in a last chunk (serve/chat_grounding.py)
                    yield chat_grounding.sse(call.grounding, stream_id, created, served)
                if req.include_usage():
                    yield event([], Usage.of(*(call.mcp.total(usage) if call.mcp else usage)))
                if call.failovers:  # the switch to a fallback, in a final chunk's metadata
                    yield event([], fleet={"failover": call.failovers, "model": call.model_used})
                yield "data: [DONE]\n\n"
            except BackendError as exc:
                error = exc.message
                usage = call.tally.finish(self, call) if call.tally is not None else usage
                await self.log(call, 502, *usage, error=exc.message)
                status = 502
                yield f"data: {json.dumps(error_body(exc.message, exc.type, None, exc.code))}\n\n"
            finally:
                if status == 499:  # cancelled mid-stream: no await works here any more, so log in place
                    if call.tally is not None:  # pay for the tokens produced so far, not $0
                        usage = call.tally.finish(self, call)
                    rec = self.record(call, 499, *usage, error=error)
                    self.store.log(rec)
                    self.settle(call, rec)

        headers = call.headers()
        headers["cache-control"] = "no-cache"
        return ClosingStreamingResponse(body(), media_type="text/event-stream", headers=headers)

    async def _embeddings(self, req: EmbeddingRequest, chain: list[str], call: _Call) -> Response:
        emb = await self.first_success(chain, call, lambda b: b.embed(req))
        cost = await self.log(call, 200, emb.prompt_tokens, 0)
        if req.encoding_format == "base64":
            vectors: list = [encode_base64(v) for v in emb.vectors]
        else:  # a backend may hand over a numpy array; JSON wants plain floats
            vectors = [v.tolist() if hasattr(v, "tolist") else v for v in emb.vectors]
        body = EmbeddingResponse(
            model=req.model,
            usage=Usage.of(emb.prompt_tokens, 0),
            data=[Embedding(index=i, embedding=v) for i, v in enumerate(vectors)],
        )
        return JSONResponse(body.model_dump(), headers=call.headers(cost))

    def models(self) -> ModelList:
        recorded = {n for n, b in self.backends.items() if getattr(b, "recorded", False)}
        # a local model's engine (and, for engine auto, the measurements that chose it) rides along as "fleet"
        engines = {n: {"fleet": info} for n, b in self.backends.items()
                   if (info := getattr(b, "fleet_info", None))}
        cards = [ModelCard(id=n, owned_by="fleetlm-recorded" if n in recorded else "fleetlm",
                           **engines.get(n, {}))
                 for n in self.config.models]
        builtin = [n for n in self.backends if n not in self.config.models]
        cards += [ModelCard(id=n, owned_by="fleetlm-builtin") for n in builtin]
        if self.config.router is not None:
            cards.append(ModelCard(id=self.config.router.name, owned_by="fleetlm-router"))
        cards += [ModelCard(id=n, owned_by=assistants.OWNED_BY) for n in self.config.assistants]
        return ModelList(data=cards)


def _logged_prompt(req: Any) -> str:
    """What log_content stores of a request: its messages (chat) or its prompt (completions), as JSON."""
    if isinstance(req, ChatCompletionRequest):
        return json.dumps([m.model_dump(exclude_none=True) for m in req.messages])
    return json.dumps(getattr(req, "prompt", None))


def _client_error(exc: BackendError) -> APIError:
    """An upstream 4xx is the client's mistake (e.g. context too long): pass it on with its status."""
    err = BadRequest(exc.message)
    err.status = exc.upstream_status or 400
    if err.status == 429:
        err.type, err.code = "rate_limit_error", "rate_limit_exceeded"
    return err


def _climb_summary(checks: list[str], attempts: list[dict]) -> str:
    """One line for x-fleet-route: each attempt's model, kept or rejected, and what its checks found."""
    parts = []
    for a in attempts:
        if a.get("error"):
            parts.append(f"{a['model']} failed ({a['error']})")
        elif a["checks"]:
            found = "; ".join(f"{c['name']} {'passed' if c['passed'] else 'failed'}: {c['detail']}"
                              for c in a["checks"])
            parts.append(f"{a['model']} {'kept' if a['kept'] else 'rejected'} ({found})")
        else:
            parts.append(f"{a['model']} kept (last, unchecked)")
    return f"cascade[{','.join(checks)}]: " + " > ".join(parts)


def _replay(gen: Generation) -> AsyncIterator[Delta]:
    """A whole answer as a stream: one piece per choice, then the usage."""

    async def pieces() -> AsyncIterator[Delta]:
        for c in gen.choices:
            yield Delta(c.index, c.text, c.finish_reason, c.tool_calls, c.logprobs)
        yield Delta(usage=(gen.prompt_tokens, gen.completion_tokens))

    return pieces()


def create_app(
    config: FleetConfig, store: UsageStore, backends: dict[str, Backend], router: Router | None = None
) -> FastAPI:
    """The gateway app. Without a `router`, the one fleet.yaml describes is built (routing.build_router); the
    built-in embedding model (all-MiniLM-L6-v2) is added unless the fleet names a model so."""
    if router is None and config.router is not None:
        from fleetlm.serve.routing import build_router

        router = build_router(config, missing_ok=True)
    if config.resolve(BUILTIN_EMBEDDING_MODEL) is None and BUILTIN_EMBEDDING_MODEL not in backends:
        backends = {**backends, BUILTIN_EMBEDDING_MODEL: MiniLMBackend()}
    gw = Gateway(config, store, backends, router)

    async def close_backends() -> None:
        for b in backends.values():
            await b.aclose()
        await gw.mcp.aclose()  # stops the MCP servers it started

    app = FastAPI(title="fleetlm gateway", version="0.1.0", on_shutdown=[close_backends])
    app.state.gateway = gw
    install_metrics(app, gw.metrics)  # GET /metrics, in-flight requests
    install_dashboard(app, gw)  # GET /dashboard: spend, traffic share, latency, recent requests
    install_transcribe(app, gw)  # POST /v1/audio/transcriptions and /v1/audio/translations
    install_files(app, gw)  # /v1/files: uploads into the knowledge base (serve/files_api.py)
    install_vector_stores(app, gw)  # /v1/vector_stores: stores, files, batches, search
    install_speech(app, gw)  # POST /v1/audio/speech; the pronunciation lexicon under /v1/fleet/voice
    install_responses(app, gw)  # /v1/responses: file_search with citations, stored chains

    # Nested request models (ChatMessage, Tool, ...), hoisted into the OpenAPI components their $refs name.
    defs: dict[str, Any] = {}

    def _body_schema(model_cls: type) -> dict:
        # The body is parsed by hand (size limit, exact 400s), so its schema is declared for the docs.
        schema = model_cls.model_json_schema(ref_template="#/components/schemas/{model}")
        defs.update(schema.pop("$defs", {}))
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            base_openapi().setdefault("components", {}).setdefault("schemas", {}).update(defs)
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_req: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _bug(_req: Request, exc: Exception) -> JSONResponse:
        if (unavailable := store_failure(exc)) is not None:  # a server behind the store, not our bug
            return JSONResponse(unavailable.body(), status_code=unavailable.status)
        return JSONResponse(
            error_body(f"internal error: {type(exc).__name__}", "server_error"), status_code=500
        )

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "models": list(config.models),
            "router": config.router.name if config.router else None,
        }

    @app.get("/v1/models")
    async def list_models() -> dict:
        return gw.models().model_dump()

    @app.get("/v1/models/{model_id}")
    async def get_model(model_id: str) -> Response:
        for card in gw.models().data:
            if card.id == model_id or config.resolve(model_id) == card.id:
                return JSONResponse(card.model_dump())
        err = ModelNotFound(f"the model {model_id!r} does not exist", param="model")
        return JSONResponse(err.body(), status_code=404)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await gw.handle(request, "chat", ChatCompletionRequest)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await gw.handle(request, "completions", CompletionRequest)

    @app.post("/v1/embeddings", openapi_extra=_body_schema(EmbeddingRequest))
    async def embeddings(request: Request) -> Response:
        return await gw.handle(request, "embeddings", EmbeddingRequest)

    return app
