"""Where a model runs, behind one small async interface the app talks to.

`Backend` is the gateway-side face of DESIGN.md's Backend: it takes a validated OpenAI request and returns
a `Generation` (or streams `Delta`s). The remote OpenAI-compatible backend lives here; the local engine
(continuous batching over `Engine.generate`) and llama.cpp backends plug in through `register_kind`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import httpx

from fleetlm.config import FleetConfig, ModelSpec
from fleetlm.serve.errors import BackendError
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest


@dataclass
class Choice:
    index: int
    text: str | None
    finish_reason: str | None
    tool_calls: list[dict] | None = None
    logprobs: dict | None = None


@dataclass
class Generation:
    """A whole answer: one choice per (prompt, n) pair, and the token counts the price is computed on."""

    choices: list[Choice]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    fleet: dict[str, Any] | None = None  # our extension to the response body (e.g. a recording's grade)


@dataclass
class Delta:
    """One streamed piece of choice `index`; `usage` is set on the last piece when the backend knows it."""

    index: int = 0
    text: str | None = None
    finish_reason: str | None = None
    tool_calls: list[dict] | None = None
    logprobs: dict | None = None
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens)
    fleet: dict[str, Any] | None = None  # with usage: our extension (e.g. speculative decoding's tally)


async def close_stream(it: AsyncIterator[Delta]) -> None:
    """Closes a stream of deltas that is dropped before its end (its `aclose`, when it has one)."""
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except Exception:  # noqa: BLE001 - a broken stream may fail to close too; it is dropped either way
            pass


@dataclass
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int = 0


@runtime_checkable
class Backend(Protocol):
    name: str

    async def chat(self, request: ChatCompletionRequest) -> Generation: ...

    def stream_chat(self, request: ChatCompletionRequest) -> AsyncIterator[Delta]: ...

    async def complete(self, request: CompletionRequest) -> Generation: ...

    def stream_complete(self, request: CompletionRequest) -> AsyncIterator[Delta]: ...

    async def embed(self, request: EmbeddingRequest) -> Embeddings: ...

    async def aclose(self) -> None: ...


class UnavailableBackend:
    """A configured model that cannot run here (its runtime is missing); fails so that fallbacks answer."""

    def __init__(self, name: str, reason: str):
        self.name, self.reason = name, reason

    def _fail(self) -> BackendError:
        return BackendError(f"model {self.name!r} is unavailable: {self.reason}")

    async def chat(self, request: ChatCompletionRequest) -> Generation:
        raise self._fail()

    async def stream_chat(self, request: ChatCompletionRequest) -> AsyncIterator[Delta]:
        raise self._fail()
        yield Delta()  # pragma: no cover - makes this an async generator

    async def complete(self, request: CompletionRequest) -> Generation:
        raise self._fail()

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[Delta]:
        raise self._fail()
        yield Delta()  # pragma: no cover

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        raise self._fail()

    async def aclose(self) -> None:
        return None


RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}


class RemoteBackend:
    """An OpenAI-compatible endpoint over httpx: per-attempt timeout, retries with backoff, SSE streaming."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        upstream_model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 1,
        backoff: float = 0.05,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.name = name
        self.upstream_model = upstream_model or name
        self.retries = retries
        self.backoff = backoff
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(
            base_url=base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(timeout),
            transport=transport,
        )

    @classmethod
    def from_spec(cls, name: str, spec: ModelSpec) -> RemoteBackend:
        assert spec.remote is not None
        return cls(
            name,
            spec.remote,
            upstream_model=spec.remote_model,
            api_key=spec.api_key(),
            timeout=spec.timeout,
            retries=spec.retries,
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    def _payload(self, request: Any, stream: bool) -> dict:
        body = request.model_dump(exclude_none=True, exclude_unset=True)
        body["model"] = self.upstream_model
        body["stream"] = stream
        if stream:
            # Ask for usage so that a streamed answer can be priced like a whole one.
            body["stream_options"] = {"include_usage": True}
        else:
            body.pop("stream_options", None)
        return body

    async def _wait(self, attempt: int) -> None:
        await asyncio.sleep(self.backoff * (2**attempt))

    def _check(self, response: httpx.Response, text: str) -> None:
        if response.status_code < 400:
            return
        message = _upstream_message(text) or response.reason_phrase
        raise BackendError(
            f"{self.name}: upstream answered {response.status_code}: {message}",
            retryable=response.status_code in RETRY_STATUSES,
            upstream_status=response.status_code,
        )

    async def _post(self, path: str, body: dict) -> dict:
        last: BackendError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await self._wait(attempt - 1)
            try:
                response = await self.client.post(path, json=body)
                self._check(response, response.text)
                data = response.json()
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
                return data
            except BackendError as exc:
                if not exc.retryable:
                    raise
                last = exc
            except httpx.HTTPError as exc:
                last = BackendError(f"{self.name}: {type(exc).__name__}: {exc or 'no detail'}")
            except ValueError as exc:
                last = BackendError(f"{self.name}: upstream sent a malformed response ({exc})")
        assert last is not None
        raise last

    async def _stream(self, path: str, body: dict) -> AsyncIterator[dict]:
        last: BackendError | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                await self._wait(attempt - 1)
            started = False
            try:
                async with self.client.stream("POST", path, json=body) as response:
                    if response.status_code >= 400:
                        self._check(response, (await response.aread()).decode("utf-8", "replace"))
                    async for line in response.aiter_lines():
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            return
                        event = json.loads(data)
                        if isinstance(event, dict) and "error" in event:
                            raise BackendError(
                                f"{self.name}: upstream stream error: {_upstream_message(data)}",
                                retryable=not started,
                            )
                        started = True
                        yield event
                return
            except BackendError as exc:
                if started or not exc.retryable:
                    raise
                last = exc
            except httpx.HTTPError as exc:
                last = BackendError(f"{self.name}: {type(exc).__name__}: {exc or 'no detail'}")
                if started:  # half an answer was sent already; another try would repeat it
                    raise BackendError(f"{last.message} (mid-stream)", retryable=False) from None
            except ValueError as exc:
                raise BackendError(
                    f"{self.name}: upstream sent a malformed event ({exc})", retryable=False
                ) from None
        assert last is not None
        raise last

    async def chat(self, request: ChatCompletionRequest) -> Generation:
        data = await self._post("chat/completions", self._payload(request, stream=False))
        return _generation(data, chat=True, name=self.name)

    async def stream_chat(self, request: ChatCompletionRequest) -> AsyncIterator[Delta]:
        async for event in self._stream("chat/completions", self._payload(request, stream=True)):
            for delta in _deltas(event, chat=True):
                yield delta

    async def complete(self, request: CompletionRequest) -> Generation:
        data = await self._post("completions", self._payload(request, stream=False))
        return _generation(data, chat=False, name=self.name)

    async def stream_complete(self, request: CompletionRequest) -> AsyncIterator[Delta]:
        async for event in self._stream("completions", self._payload(request, stream=True)):
            for delta in _deltas(event, chat=False):
                yield delta

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        body = request.model_dump(exclude_none=True, exclude_unset=True)
        body["model"] = self.upstream_model
        body["encoding_format"] = "float"
        data = await self._post("embeddings", body)
        try:
            items = sorted(data["data"], key=lambda d: d["index"])
            vectors = [[float(x) for x in d["embedding"]] for d in items]
            tokens = int((data.get("usage") or {}).get("prompt_tokens", 0))
        except (KeyError, TypeError, ValueError) as exc:
            raise BackendError(f"{self.name}: malformed embeddings response ({exc!r})") from None
        return Embeddings(vectors, tokens)


def _upstream_message(text: str) -> str:
    try:
        data = json.loads(text)
        err = data.get("error") if isinstance(data, dict) else None
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
        if isinstance(data, dict) and data.get("detail"):
            return str(data["detail"])[:500]
    except ValueError:
        pass
    return text.strip()[:500]


def _usage(data: dict) -> tuple[int, int] | None:
    usage = data.get("usage")
    if not isinstance(usage, dict):
        return None
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


def _generation(data: dict, *, chat: bool, name: str) -> Generation:
    try:
        choices = []
        for c in data["choices"]:
            if chat:
                msg = c.get("message") or {}
                choices.append(
                    Choice(
                        int(c.get("index", 0)),
                        msg.get("content"),
                        c.get("finish_reason"),
                        msg.get("tool_calls"),
                        c.get("logprobs"),
                    )
                )
            else:
                choices.append(
                    Choice(
                        int(c.get("index", 0)),
                        c.get("text", ""),
                        c.get("finish_reason"),
                        None,
                        c.get("logprobs"),
                    )
                )
        prompt_tokens, completion_tokens = _usage(data) or (0, 0)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise BackendError(f"{name}: malformed response from upstream ({exc!r})") from None
    return Generation(choices, prompt_tokens, completion_tokens)


def _deltas(event: dict, *, chat: bool) -> list[Delta]:
    out = []
    for c in event.get("choices") or []:
        if chat:
            d = c.get("delta") or {}
            out.append(
                Delta(
                    int(c.get("index", 0)),
                    d.get("content"),
                    c.get("finish_reason"),
                    d.get("tool_calls"),
                    c.get("logprobs"),
                )
            )
        else:
            out.append(
                Delta(int(c.get("index", 0)), c.get("text"), c.get("finish_reason"), None, c.get("logprobs"))
            )
    usage = _usage(event)
    if usage is not None:
        out.append(Delta(usage=usage))
    return out


# A runtime registers a factory here: kind ("local" | "gguf" | "replay") -> (name, spec) -> Backend.
BackendFactory = Callable[[str, ModelSpec], Backend]
_FACTORIES: dict[str, BackendFactory] = {"remote": RemoteBackend.from_spec}


def register_kind(kind: str, factory: BackendFactory) -> None:
    _FACTORIES[kind] = factory


def build_backends(config: FleetConfig) -> dict[str, Backend]:
    """One backend per configured model (local and GGUF ones load now; a GGUF model without llama-cpp-python
    is unavailable, so its fallbacks answer)."""
    backends: dict[str, Backend] = {}
    for name, spec in config.models.items():
        factory = _FACTORIES.get(spec.kind)
        if factory is None and spec.kind == "local":
            from fleetlm.serve.local import LocalBackend  # imports torch: only when a local model is served

            factory = _FACTORIES["local"] = LocalBackend.from_spec
        if factory is None and spec.kind == "replay":
            from fleetlm.serve.replay import ReplayBackend  # recorded answers; registers itself

            factory = ReplayBackend.from_spec
        if factory is None and spec.kind == "gguf":
            from fleetlm.serve.gguf_backend import gguf_backend  # registers itself; llama.cpp or our engine

            factory = gguf_backend
        if factory is None:
            backends[name] = UnavailableBackend(name, f"no runtime for {spec.kind} models is installed yet")
        else:
            backends[name] = factory(name, spec)
    return backends


@dataclass
class RouteDecision:
    """Which model a virtual model (the router) picked, and why: logged and sent as x-fleet-route."""

    model: str
    reason: str
    predicted_quality: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
