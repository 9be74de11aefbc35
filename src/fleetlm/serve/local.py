"""Local models behind the gateway: our engine, fed by a worker thread that batches concurrent requests.

Requests that arrive while a batch is decoding wait for the next one ("wave" batching); joining a running
batch at any step (continuous batching) needs the engine's per-row cache reset and replaces `_run_wave`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fleetlm.config import ModelSpec
from fleetlm.engine import Engine, GenerationError, GenerationRequest, TokenEvent
from fleetlm.engine.generate import encode_request
from fleetlm.serve.backends import Choice, Delta, Embeddings, Generation
from fleetlm.serve.errors import BackendError
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

DEFAULT_MAX_TOKENS = 256
_DONE = object()


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    prompt_ids: list[int] = field(default_factory=list)
    cancelled: bool = False

    def post(self, item: Any) -> None:
        if not self.cancelled:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)


def _unsupported(message: str) -> BackendError:
    return BackendError(message, retryable=False, upstream_status=400)


class LocalBackend:
    """One loaded Engine and the thread that runs it; every public method is safe to call from the app."""

    def __init__(self, name: str, engine: Engine, max_batch: int = 32):
        self.name, self.engine, self.max_batch = name, engine, max_batch
        self.context = int(engine.model.config.max_position_embeddings)
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._worker, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @classmethod
    def from_spec(cls, name: str, spec: ModelSpec) -> LocalBackend:
        assert spec.path is not None
        return cls(name, Engine.load(spec.path, dtype=spec.dtype, name=name))

    # ------------------------------------------------------------ the worker thread

    def _worker(self) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            wave = [first]
            while len(wave) < self.max_batch:  # everyone already waiting rides along
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    self._jobs.put(None)
                    break
                wave.append(job)
            self._run_wave(wave)

    def _admit(self, job: _Job) -> bool:
        """Tokenize and size-check one job, so that one bad prompt cannot fail the whole batch."""
        try:
            job.prompt_ids = encode_request(self.engine.tokenizer, job.request)
        except GenerationError as exc:
            job.post(_unsupported(f"{self.name}: {exc}"))
            return False
        need = len(job.prompt_ids) + job.request.max_tokens
        if need > self.context:
            job.post(
                _unsupported(
                    f"{self.name}: prompt ({len(job.prompt_ids)} tokens) + max_tokens "
                    f"({job.request.max_tokens}) exceed the context of {self.context} tokens"
                )
            )
            return False
        return True

    def _run_wave(self, wave: list[_Job]) -> None:
        jobs = [j for j in wave if not j.cancelled and self._admit(j)]
        if not jobs:
            return
        reqs = []
        for j in jobs:
            r = j.request
            reqs.append(
                GenerationRequest(
                    prompt_ids=j.prompt_ids,
                    max_tokens=r.max_tokens,
                    temperature=r.temperature,
                    top_p=r.top_p,
                    seed=r.seed,
                    stop=r.stop,
                    logprobs=r.logprobs,
                )
            )
        try:
            for event in self.engine.generate(reqs):
                jobs[event.request_index].post(event)
        except GenerationError as exc:
            for j in jobs:
                j.post(_unsupported(f"{self.name}: {exc}"))
        except Exception as exc:  # noqa: BLE001 - the engine failed: tell every waiting request, keep serving
            for j in jobs:
                j.post(BackendError(f"{self.name}: engine failed: {type(exc).__name__}: {exc}"))
        for j in jobs:
            j.post(_DONE)

    # ------------------------------------------------------------ the async side

    async def _events(self, request: GenerationRequest) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(prompt token count, event) pairs for one request, as the worker produces them."""
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue())
        self._jobs.put(job)
        try:
            while True:
                item = await job.out.get()
                if item is _DONE:
                    return
                if isinstance(item, BackendError):
                    raise item
                yield len(job.prompt_ids), item
        finally:
            job.cancelled = True  # a client that went away stops receiving (its row still finishes)

    def _requests(self, req: ChatCompletionRequest | CompletionRequest) -> list[GenerationRequest]:
        limit = req.token_limit()
        common = dict(
            max_tokens=DEFAULT_MAX_TOKENS if limit is None else limit,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=req.stop_list(),
        )
        if isinstance(req, ChatCompletionRequest):
            if req.tools and req.tool_choice != "none":
                raise _unsupported(f"{self.name}: tools are not supported on local models yet")
            if req.response_format is not None and req.response_format.type != "text":
                raise _unsupported(
                    f"{self.name}: response_format {req.response_format.type} is not "
                    "supported on local models yet"
                )
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            prompts: list[dict] = [{"messages": messages}]
            logprobs = req.logprobs
        else:
            if req.echo or req.suffix:
                raise _unsupported(f"{self.name}: echo and suffix are not supported on local models")
            prompts = [{"prompt": p} for p in req.prompts()]
            logprobs = req.logprobs is not None
        if common["max_tokens"] == 0:
            raise _unsupported(f"{self.name}: max_tokens must be at least 1")
        out = []
        for p in prompts:
            for j in range(req.n):
                seed = None if req.seed is None else req.seed + j  # n samples of one prompt must differ
                out.append(GenerationRequest(**p, **common, seed=seed, logprobs=logprobs))
        return out

    async def _merged(self, reqs: list[GenerationRequest]) -> AsyncIterator[tuple[int, int, TokenEvent]]:
        """Events of several requests (n > 1 or several prompts) as (choice index, prompt tokens, event)."""
        if len(reqs) == 1:
            async for pt, ev in self._events(reqs[0]):
                yield 0, pt, ev
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, r: GenerationRequest) -> None:
            try:
                async for pt, ev in self._events(r):
                    await merged.put((i, pt, ev))
            except BackendError as exc:
                await merged.put(exc)
            finally:
                await merged.put(None)

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
        try:
            open_ = len(tasks)
            while open_:
                item = await merged.get()
                if item is None:
                    open_ -= 1
                elif isinstance(item, BackendError):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()

    async def _whole(self, req: ChatCompletionRequest | CompletionRequest) -> Generation:
        reqs = self._requests(req)
        texts, reasons = [""] * len(reqs), [None] * len(reqs)
        lps: list[list[dict]] = [[] for _ in reqs]
        prompt_tokens, completion_tokens = [0] * len(reqs), 0
        async for i, pt, ev in self._merged(reqs):
            texts[i] += ev.text
            prompt_tokens[i] = pt
            completion_tokens += 1
            if ev.finish_reason:
                reasons[i] = ev.finish_reason
            if ev.logprob is not None:
                lps[i].append({"token": ev.text, "logprob": ev.logprob, "top_logprobs": []})
        n = req.n
        # OpenAI counts a prompt once however many samples (n) are drawn from it.
        pt_total = sum(prompt_tokens[i] for i in range(0, len(reqs), n))
        choices = [
            Choice(i, texts[i], reasons[i] or "length", None, {"content": lps[i]} if lps[i] else None)
            for i in range(len(reqs))
        ]
        return Generation(choices, pt_total, completion_tokens)

    async def _stream(self, req: ChatCompletionRequest | CompletionRequest) -> AsyncIterator[Delta]:
        reqs = self._requests(req)
        prompt_tokens, completion_tokens = [0] * len(reqs), 0
        async for i, pt, ev in self._merged(reqs):
            prompt_tokens[i] = pt
            completion_tokens += 1
            lp = (
                {"content": [{"token": ev.text, "logprob": ev.logprob, "top_logprobs": []}]}
                if ev.logprob is not None
                else None
            )
            yield Delta(i, ev.text, ev.finish_reason, None, lp)
        yield Delta(usage=(sum(prompt_tokens[i] for i in range(0, len(reqs), req.n)), completion_tokens))

    async def chat(self, request: ChatCompletionRequest) -> Generation:
        return await self._whole(request)

    def stream_chat(self, request: ChatCompletionRequest) -> AsyncIterator[Delta]:
        return self._stream(request)

    async def complete(self, request: CompletionRequest) -> Generation:
        return await self._whole(request)

    def stream_complete(self, request: CompletionRequest) -> AsyncIterator[Delta]:
        return self._stream(request)

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        raise _unsupported(f"{self.name}: embeddings from local models are not served yet")

    async def aclose(self) -> None:
        self._jobs.put(None)
