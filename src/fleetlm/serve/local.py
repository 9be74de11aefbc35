"""Local models behind the gateway: our engine, driven by a worker thread that batches concurrent requests.

Continuous batching: the worker runs one engine loop (fleetlm.engine.batcher.Batcher) in which a request
joins the running batch at the next step and leaves it the step it finishes, instead of waiting for the
batch in flight to end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import queue
import sys
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fleetlm.config import ModelSpec
from fleetlm.engine import Engine, GenerationError, GenerationRequest, TokenEvent
from fleetlm.engine.batcher import Batcher, Speculation
from fleetlm.engine.compiled import compile_cache_dir
from fleetlm.engine.constrain import ConstraintError, GrammarConstraint
from fleetlm.errors import ConfigError, FleetError
from fleetlm.model.tokenizer import ChatTemplateError
from fleetlm.serve.backends import Choice, Delta, Embeddings, Generation
from fleetlm.serve.errors import BackendError
from fleetlm.serve.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from fleetlm.serve.tools import ChatPlan, ToolCallStream, ToolError, plan_chat

DEFAULT_MAX_TOKENS = 256
# The compiled step recompiles when the batcher reallocates its cache, so a compiled batcher starts with this
# many slots per row (a longer conversation grows it, and pays one recompile).
SERVE_CACHE_LENGTH = 1024
SPECULATIVE_HIGH = 8  # the longest draft: past ~4 rows a verify costs most of a step a row (2 AVX2 cores)
WARM_BATCHES = (1, 2)  # one graph for a single stream, one for 2+ rows where the batch dimension is dynamic
COMPILE_MIN_BYTES = 200_000_000  # SmolLM2-135M (Q4_1, 98 MB) stays eager, Qwen2.5-0.5B (491 MB) compiles
_DONE = object()


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    prompt_tokens: int = 0
    cancelled: bool = False


def _unsupported(message: str) -> BackendError:
    return BackendError(message, retryable=False, upstream_status=400)


def _deliver(items: list[tuple[_Job, Any]]) -> None:
    # Runs on the event loop: one wake-up per engine step and loop, not one per token.
    for job, item in items:
        if not job.cancelled:
            job.out.put_nowait(item)


async def drain(job: Any) -> AsyncIterator[tuple[int, TokenEvent]]:
    """(prompt token count, event) pairs a worker posts to `job.out`, until _DONE; a BackendError it posts is
    raised here. Leaving early (a client that went away) marks the job cancelled, so the worker drops it."""
    try:
        while True:
            item = await job.out.get()
            if item is _DONE:
                return
            if isinstance(item, BackendError):
                raise item
            yield job.prompt_tokens, item
    finally:
        job.cancelled = True


class TokenStreamBackend:
    """The OpenAI side of a backend that streams our TokenEvents: requests in, Generations and Deltas out.

    Subclasses run the requests (`_events`): LocalBackend on our engine, LlamaCppBackend on llama.cpp.
    """

    name: str
    tokenizer: Any  # renders chat templates and builds constraints (response_format, tools)

    def _events(self, request: GenerationRequest) -> AsyncIterator[tuple[int, TokenEvent]]:
        raise NotImplementedError

    def _plan(self, req: ChatCompletionRequest | CompletionRequest) -> ChatPlan | None:
        """Prompt and grammar of a chat (tools, response_format: serve/tools.py); None for completions."""
        if not isinstance(req, ChatCompletionRequest):
            return None
        try:
            return plan_chat(req, self.tokenizer)
        except (ToolError, ConstraintError, ChatTemplateError) as exc:
            raise _unsupported(f"{self.name}: {exc}") from None

    def _constraint(self, plan: ChatPlan | None, max_tokens: int) -> GrammarConstraint | None:
        if plan is None or plan.grammar is None:
            return None
        try:  # one per request: a constraint follows its own row's tokens
            return GrammarConstraint(plan.grammar, self.tokenizer, max_tokens=max_tokens)
        except ConstraintError as exc:
            raise _unsupported(f"{self.name}: {exc}") from None

    def _requests(
        self, req: ChatCompletionRequest | CompletionRequest, plan: ChatPlan | None = None
    ) -> list[GenerationRequest]:
        limit = req.token_limit()
        common = dict(
            max_tokens=DEFAULT_MAX_TOKENS if limit is None else limit,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=req.stop_list(),
        )
        if isinstance(req, ChatCompletionRequest):
            plan = plan or self._plan(req)
            assert plan is not None
            prompt: dict = (
                {"messages": plan.messages} if plan.prompt_ids is None else {"prompt_ids": plan.prompt_ids}
            )
            prompts: list[dict] = [prompt]
            logprobs = req.logprobs
        else:
            if req.echo or req.suffix:
                raise _unsupported(f"{self.name}: echo and suffix are not supported on local models")
            prompts = [{"prompt": p} if isinstance(p, str) else {"prompt_ids": list(p)}
                       for p in req.prompts()]
            logprobs = req.logprobs is not None
        if common["max_tokens"] == 0:
            raise _unsupported(f"{self.name}: max_tokens must be at least 1")
        out = []
        for p in prompts:
            for j in range(req.n):
                seed = None if req.seed is None else req.seed + j  # n samples of one prompt must differ
                constraint = self._constraint(plan, common["max_tokens"])
                out.append(
                    GenerationRequest(**p, **common, seed=seed, logprobs=logprobs, constraint=constraint)
                )
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
        plan = self._plan(req)
        reqs = self._requests(req, plan)
        texts, reasons = [""] * len(reqs), [None] * len(reqs)
        lps: list[list[dict]] = [[] for _ in reqs]
        prompt_tokens, completion_tokens = [0] * len(reqs), 0
        drafts = Drafts()
        async for i, pt, ev in self._merged(reqs):
            texts[i] += ev.text
            prompt_tokens[i] = pt
            completion_tokens += 1
            drafts.add(ev)
            if ev.finish_reason:
                reasons[i] = ev.finish_reason
            if ev.logprob is not None:
                lps[i].append({"token": ev.text, "logprob": ev.logprob, "top_logprobs": []})
        redo = [i for i in range(len(reqs)) if plan is not None and plan.undeclared_call(texts[i])]
        if redo:  # a call of a tool the request did not declare: that choice is asked again, for text
            assert plan is not None and plan.text_grammar is not None
            again = [self._text_request(reqs[i], plan) for i in redo]
            texts_again, reasons_again = [""] * len(redo), [None] * len(redo)
            async for j, _, ev in self._merged(again):
                texts_again[j] += ev.text
                completion_tokens += 1
                reasons_again[j] = ev.finish_reason or reasons_again[j]
            for j, i in enumerate(redo):
                texts[i], reasons[i], lps[i] = texts_again[j], reasons_again[j], []
        n = req.n
        # OpenAI counts a prompt once however many samples (n) are drawn from it.
        pt_total = sum(prompt_tokens[i] for i in range(0, len(reqs), n))
        choices = [
            Choice(i, texts[i], reasons[i] or "length", None, {"content": lps[i]} if lps[i] else None)
            for i in range(len(reqs))
        ]
        if plan is not None and plan.mode != "none":  # tool calls read back out of the text
            for c in choices:
                c.text, c.tool_calls, c.finish_reason = plan.shape(c.text or "", c.finish_reason or "length")
        return Generation(choices, pt_total, completion_tokens, drafts.fleet(self))

    def _text_request(self, r: GenerationRequest, plan: ChatPlan) -> GenerationRequest:
        """The same prompt again, held to text: for a choice that called a tool the request lacks."""
        assert plan.text_grammar is not None
        constraint = GrammarConstraint(plan.text_grammar, self.tokenizer, max_tokens=r.max_tokens)
        return dataclasses.replace(r, constraint=constraint, logprobs=False)

    async def _stream(self, req: ChatCompletionRequest | CompletionRequest) -> AsyncIterator[Delta]:
        plan = self._plan(req)
        reqs = self._requests(req, plan)
        calls = [ToolCallStream(plan) for _ in reqs] if plan is not None and plan.mode != "none" else None
        prompt_tokens, completion_tokens = [0] * len(reqs), 0
        drafts = Drafts()
        async for i, pt, ev in self._merged(reqs):
            prompt_tokens[i] = pt
            completion_tokens += 1
            drafts.add(ev)
            lp = (
                {"content": [{"token": ev.text, "logprob": ev.logprob, "top_logprobs": []}]}
                if ev.logprob is not None
                else None
            )
            if calls is None:
                yield Delta(i, ev.text, ev.finish_reason, None, lp)
                continue
            for piece in calls[i].push(ev.text, ev.finish_reason):  # text, or tool_calls fragments
                yield Delta(i, piece.text, piece.finish_reason, piece.tool_calls)
            if calls[i].undeclared and len(reqs) == 1:
                break  # it called a tool the request did not declare: stop it, and ask again for text below
        if calls is not None and calls[0].undeclared and len(reqs) == 1:
            assert plan is not None
            async for _, _, ev in self._merged([self._text_request(reqs[0], plan)]):
                completion_tokens += 1
                if ev.text or ev.finish_reason:
                    yield Delta(0, ev.text, ev.finish_reason)
        yield Delta(usage=(sum(prompt_tokens[i] for i in range(0, len(reqs), req.n)), completion_tokens),
                    fleet=drafts.fleet(self))

    async def chat(self, request: ChatCompletionRequest) -> Generation:
        return await self._whole(request)

    def stream_chat(self, request: ChatCompletionRequest) -> AsyncIterator[Delta]:
        return self._stream(request)

    async def complete(self, request: CompletionRequest) -> Generation:
        return await self._whole(request)

    def stream_complete(self, request: CompletionRequest) -> AsyncIterator[Delta]:
        return self._stream(request)


@dataclass
class Drafts:
    """Speculative decoding's tally over a request's choices, from their last events' (drafted, kept)."""

    drafted: int = 0
    kept: int = 0
    seen: bool = False

    def add(self, event: TokenEvent) -> None:
        if event.draft is not None:
            self.seen = True
            self.drafted, self.kept = self.drafted + event.draft[0], self.kept + event.draft[1]

    def fleet(self, backend: object) -> dict[str, Any] | None:
        """The response body's `fleet` extension ({"speculative": ...}), None when nothing speculated."""
        if not self.seen:
            return None
        speculation = getattr(getattr(backend, "batcher", None), "speculation", None)
        return {"speculative": {"drafter": getattr(speculation, "name", "draft"), "drafted": self.drafted,
                                "accepted": self.kept,
                                "acceptance": round(self.kept / self.drafted, 4) if self.drafted else None}}


class LocalBackend(TokenStreamBackend):
    """One loaded Engine and the thread that runs it; every public method is safe to call from the app."""

    def __init__(self, name: str, engine: Engine, max_batch: int = 32,
                 warm_batches: tuple[int, ...] = WARM_BATCHES, speculation: Speculation | None = None):
        """An engine loaded with compile=True decodes every batch through its compiled step, compiled here for
        warm_batches (before the gateway listens: no request waits on the compiler). speculation: decode a
        request that runs alone speculatively (engine/batcher.py)."""
        self.name, self.engine, self.max_batch = name, engine, max_batch
        self.tokenizer = engine.tokenizer
        self.context = int(engine.model.config.max_position_embeddings)
        compiled = getattr(engine._decode, "warm_up", None) is not None
        self.batcher = Batcher(engine.model, engine.tokenizer, max_batch=max_batch, context=self.context,
                               decode_fn=engine._decode if compiled else None,
                               initial_length=min(self.context, SERVE_CACHE_LENGTH) if compiled else None,
                               speculation=speculation)
        self.compile_seconds = self._warm_up(warm_batches) if compiled else 0.0
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._closed = False
        self._threads_before: int | None = None  # torch's thread count while the engine is busy
        self._thread = threading.Thread(target=self._worker, name=f"engine-{name}", daemon=True)
        self._thread.start()

    @classmethod
    def from_spec(cls, name: str, spec: ModelSpec) -> LocalBackend:
        if spec.kind == "gguf":  # a GGUF file (or catalog model) served by our own engine (engine: fleetlm)
            location = spec.gguf_file()
        else:
            assert spec.path is not None
            location = spec.path
        compile = wants_compile(location)  # the batcher warms the compiled step on its own caches
        engine = Engine.load(location, dtype=spec.dtype, name=name, compile=compile, warm=False)
        speculation = speculation_for(spec.speculative, engine, spec.dtype) if spec.speculative else None
        return cls(name, engine, speculation=speculation)

    def _warm_up(self, batch_sizes: tuple[int, ...]) -> float:
        threads = self.engine.num_threads
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            seconds = self.batcher.warm_up(batch_sizes)
        finally:
            torch.set_num_threads(previous)
        print(f"fleetlm: {self.name}: decode step compiled for batches {list(batch_sizes)} in {seconds:.1f} "
              f"s (artifacts cached in {compile_cache_dir()})", file=sys.stderr, flush=True)
        return seconds

    # ------------------------------------------------------------ the worker thread

    def _worker(self) -> None:
        jobs: dict[int, _Job] = {}  # batcher handle -> job
        while True:
            # Block only when there is nothing to decode; otherwise pick up newcomers between steps.
            try:
                incoming = [self._jobs.get(block=not self.batcher.busy)]
            except queue.Empty:
                incoming = []
            while True:
                try:
                    incoming.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            if None in incoming:  # shut down: nobody waits forever on a request the engine will not run
                closing = [j for j in incoming if j is not None] + list(jobs.values())
                for job in closing:
                    try:
                        job.loop.call_soon_threadsafe(_deliver, [(job, self._shut_down())])
                    except RuntimeError:
                        pass
                return
            replies: dict[asyncio.AbstractEventLoop, list[tuple[_Job, Any]]] = defaultdict(list)
            for job in incoming:
                if job is not None and not job.cancelled:
                    self._admit(job, jobs, replies)
            for handle in [h for h, j in jobs.items() if j.cancelled]:
                self.batcher.cancel(handle)  # a client that went away frees its slot at once
                del jobs[handle]
            if self.batcher.busy:
                self._step(jobs, replies)
            for loop, items in replies.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # that caller's event loop is closed: nobody is listening any more
                    pass

    def _admit(self, job: _Job, jobs: dict[int, _Job], replies: dict) -> None:
        """Tokenize and size-check one job, so that one bad prompt cannot fail the others."""
        try:
            handle = self.batcher.add(job.request)
        except FleetError as exc:  # too long, empty, a chat template that rejects the conversation, ...
            replies[job.loop].append((job, _unsupported(f"{self.name}: {exc}")))
            return
        except Exception as exc:  # noqa: BLE001 - a bug must fail this request, not the engine thread
            replies[job.loop].append((job, BackendError(f"{self.name}: {type(exc).__name__}: {exc}")))
            return
        job.prompt_tokens = self.batcher.prompt_tokens(handle)
        jobs[handle] = job

    def _step(self, jobs: dict[int, _Job], replies: dict) -> None:
        # Thread count is process-wide and costly to switch (~1 ms): set it for a busy period, not per step.
        threads = self.engine.num_threads
        if threads and self._threads_before is None:
            self._threads_before = torch.get_num_threads()
            torch.set_num_threads(threads)
        try:
            events = self.batcher.step()
        except Exception as exc:  # noqa: BLE001 - the engine failed: tell every waiting request, keep serving
            self.batcher.clear()
            for job in jobs.values():
                replies[job.loop].append((job, BackendError(f"{self.name}: engine failed: "
                                                            f"{type(exc).__name__}: {exc}")))
            jobs.clear()
            events = []
        if not self.batcher.busy and self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        for event in events:
            job = jobs[event.request_index]
            replies[job.loop].append((job, event))
            if event.finish_reason is not None:
                replies[job.loop].append((job, _DONE))
                del jobs[event.request_index]

    # ------------------------------------------------------------ the async side

    def _events(self, request: GenerationRequest) -> AsyncIterator[tuple[int, TokenEvent]]:
        """(prompt token count, event) pairs for one request, as the worker produces them."""
        if self._closed:
            raise self._shut_down()
        job = _Job(request, asyncio.get_running_loop(), asyncio.Queue())
        self._jobs.put(job)
        return drain(job)

    async def embed(self, request: EmbeddingRequest) -> Embeddings:
        """Mean-pooled last hidden states of our decoder (off the event loop, beside the decode thread)."""
        hidden = int(self.engine.model.config.hidden_size)
        if request.dimensions is not None and request.dimensions != hidden:
            raise _unsupported(
                f"{self.name}: dimensions={request.dimensions} is not supported (it gives {hidden})"
            )
        try:
            vectors, counts = await asyncio.to_thread(self.engine.embed, request.items())
        except GenerationError as exc:
            raise _unsupported(f"{self.name}: {exc}") from None
        return Embeddings(vectors.numpy(), sum(counts))  # type: ignore[arg-type]  # the app serializes it

    async def aclose(self) -> None:
        self._closed = True
        self._jobs.put(None)

    def _shut_down(self) -> BackendError:
        return BackendError(f"{self.name}: the model has been shut down", retryable=False)


def speculation_for(setting: str, engine: Engine, dtype: str) -> Speculation:
    """A model's `speculative:` setting made real: prompt lookup, or a draft model loaded at the target's
    width, with the draft-length policy's costs measured here on both models (a few seconds at start-up)."""
    from fleetlm.engine.speculative import (
        DraftLength,
        DraftModel,
        PromptLookup,
        measure_verify_cost,
        step_seconds,
    )

    verify_cost = measure_verify_cost(engine.model, rows=SPECULATIVE_HIGH + 1, context=128, reps=2)
    if setting == "lookup":
        return Speculation(PromptLookup(), DraftLength(verify_cost, high=SPECULATIVE_HIGH), name="lookup")
    location = _draft_location(setting)
    draft = Engine.load(location, dtype=dtype, name=f"{setting} (draft)")
    if draft.model.config.vocab_size != engine.model.config.vocab_size:
        theirs, ours = draft.model.config.vocab_size, engine.model.config.vocab_size
        raise ConfigError(f"speculative draft {setting!r} has a vocabulary of {theirs}, the model {ours}: "
                          f"a draft needs the same tokenizer")
    cost = step_seconds(draft.model, context=128, reps=3) / step_seconds(engine.model, context=128, reps=3)
    policy = DraftLength(verify_cost, draft_cost=cost, low=1, high=SPECULATIVE_HIGH)
    return Speculation(DraftModel(draft.model), policy, name=setting)


def _draft_location(setting: str) -> str:
    if setting.endswith(".gguf") or Path(setting).exists():
        if not Path(setting).exists():
            raise ConfigError(f"speculative draft {setting} does not exist")
        return setting
    from fleetlm.catalog import entries, installed_path

    if setting not in entries():
        raise ConfigError(f"speculative: want 'lookup', a catalog model or a .gguf file, got {setting!r}")
    path = installed_path(setting)
    if path is None:
        raise ConfigError(f"speculative draft {setting} is not installed; run: fleet models pull {setting}")
    return str(path)


def wants_compile(location: str | Path) -> bool:
    """Whether the gateway serves this model through the compiled decode step: FLEET_COMPILE=1 always, =0
    never; unset, when its weight files hold COMPILE_MIN_BYTES or more (compiling costs a minute or more at
    start-up the first time, less later: the artifacts are cached; tiny models gain little from it)."""
    flag = os.environ.get("FLEET_COMPILE", "").strip()
    if flag in ("0", "1"):
        return flag == "1"
    path = Path(location)
    files = [path] if path.is_file() else [*path.glob("*.safetensors"), *path.glob("*.bin")]
    return sum(f.stat().st_size for f in files) >= COMPILE_MIN_BYTES


def load_gguf_engine(path: str | Path, dtype: str = "f32", name: str | None = None) -> Engine:
    """Our engine on a GGUF file's weights (dequantized), for `gguf:` models with `engine: fleetlm`."""
    from fleetlm.engine.engine import prepare_weights, torch_dtype_of
    from fleetlm.model.gguf import load_gguf

    model, tokenizer = load_gguf(path, dtype=torch_dtype_of(dtype))
    return Engine(prepare_weights(model, dtype), tokenizer, name=name or Path(path).stem, dtype=dtype)
