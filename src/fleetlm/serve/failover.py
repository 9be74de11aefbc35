"""Failover mid-stream: a stream whose backend fails after it has begun is continued by a fallback model.

`resilient_stream` wraps the deltas the gateway streams to the client. When the backend raises (connection
dropped, error event), or no piece arrives within the model's `stall_timeout`, the next model of the chain
is asked to continue the same answer: for chat, the text produced so far is appended as the start of the
assistant's reply (an assistant-prefill turn, which llama.cpp's server, vLLM and our engine continue); for
completions it is appended to the prompt. Its pieces follow on the same SSE stream, so the client sees one
uninterrupted answer; the switch is recorded in the usage log (fallbacks, route) and sent in a final chunk's
`fleet.failover`. `first_piece` applies the model's `ttft_timeout` before anything is sent, so a slow
backend is replaced before the stream commits to it.

Tokens: a backend's reported usage is used when it arrives; a segment that died (or a backend that reports
none) is counted one token per streamed piece (what OpenAI, vLLM, llama.cpp and our engine send), its
prompt as reported, else bounded by limits.prompt_token_bound. The request costs the sum of its segments,
each at its model's price.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Send

from fleetlm.serve.backends import Delta, close_stream
from fleetlm.serve.errors import BackendError
from fleetlm.serve.limits import prompt_token_bound
from fleetlm.serve.protocol import ChatMessage


async def first_piece(it: AsyncIterator[Delta], timeout_s: float | None, name: str) -> Delta:
    """The stream's first piece, or a retryable BackendError when it takes longer than `timeout_s`."""
    if timeout_s is None:
        return await it.__anext__()
    try:
        return await asyncio.wait_for(it.__anext__(), timeout_s)
    except asyncio.TimeoutError:
        await close_stream(it)
        raise BackendError(f"{name}: no first token within {timeout_s:g} s (ttft_timeout)") from None


@dataclass
class Segment:
    model: str
    pieces: int = 0  # streamed pieces with text (one token each)
    usage: tuple[int, int] | None = None  # what the backend reported


@dataclass
class Tally:
    """What a stream produced, segment by segment, so that it can be priced at any moment (abandoned too)."""

    request: Any
    segments: list[Segment] = field(default_factory=list)
    finished: tuple[int, int] | None = None

    def usage(self) -> tuple[int, int]:
        """(prompt, completion) as the client sees them: the first prompt, all completion tokens."""
        first = self.segments[0]
        prompt = first.usage[0] if first.usage else prompt_token_bound(self.request)
        return prompt, sum(s.usage[1] if s.usage else s.pieces for s in self.segments)

    def finish(self, gateway: Any, call: Any) -> tuple[int, int]:
        """The usage to log; after a failover the price difference between the segments' real cost and the
        last model's price for the whole is added to the call's extra cost (once)."""
        if self.finished is not None:
            return self.finished
        self.finished = usage = self.usage()
        if len(self.segments) > 1:
            paid = 0.0
            for s in self.segments:
                prompt, completion = s.usage or (prompt_token_bound(self.request), s.pieces)
                paid += gateway.cost(s.model, prompt, completion)
            call.extra_cost += paid - gateway.cost(self.segments[-1].model, *usage)
        return usage


def continuation(request: Any, partial: str, produced: int) -> Any | None:
    """The request that asks a fallback to continue `partial`, or None when it cannot be continued."""
    update: dict[str, Any] = {}
    limit = request.token_limit()
    if limit is not None:
        update["max_completion_tokens" if getattr(request, "max_completion_tokens", None) is not None
               else "max_tokens"] = max(1, limit - produced)
    if hasattr(request, "messages"):
        update["messages"] = [*request.messages, ChatMessage(role="assistant", content=partial)]
    elif isinstance(request.prompt, str):
        update["prompt"] = request.prompt + partial
    else:
        return None  # several prompts or token ids: no single text to continue
    return request.model_copy(update=update)


def resilient_stream(
    gateway: Any, request: Any, call: Any, deltas: AsyncIterator[Delta], first: Delta | None, *, chat: bool
) -> AsyncIterator[Delta]:
    """The stream the client gets: `first` then `deltas`, continued on a fallback when the backend fails,
    ending with one usage piece."""
    tally = call.tally = Tally(request, [Segment(call.model_used or "?")])
    tried = {call.model_used}
    chain = gateway.chain(call.model_used) if call.model_used in gateway.config.models else []
    metrics = getattr(gateway, "metrics", None)

    def spec_of(model: str) -> Any:
        return gateway.config.models.get(model)

    async def switch(it: AsyncIterator[Delta], exc: Exception, produced: list[str],
                     single: bool) -> tuple[AsyncIterator[Delta], Delta | None]:
        await close_stream(it)
        seg = tally.segments[-1]
        if isinstance(exc, BackendError) and all(m in tried for m in chain):
            raise exc  # no fallback to continue on: the backend's own error goes to the client
        reason = exc.message if isinstance(exc, BackendError) else (
            f"{seg.model}: no token within {spec_of(seg.model).stall_timeout:g} s (stall_timeout)")
        sent = sum(s.pieces for s in tally.segments)
        cont = continuation(request, "".join(produced), sent) if single else None
        if cont is None:
            raise BackendError(f"{reason} (mid-stream; this request cannot be continued elsewhere)",
                               retryable=False)
        errors = [reason]
        for model in chain:
            if model in tried:
                continue
            tried.add(model)
            try:
                new_it, new_first = await gateway._open_stream(gateway.backends[model], cont, chat)
            except BackendError as err:
                errors.append(err.message)
                continue
            call.failovers.append({"from": seg.model, "to": model, "after_tokens": seg.pieces,
                                   "error": reason})
            call.fallbacks.append(seg.model)
            call.route = f"{call.route}; failover {seg.model}->{model} after {seg.pieces} tokens"
            call.model_used = model
            tally.segments.append(Segment(model))
            return new_it, new_first
        raise BackendError(" | ".join(errors) + " (mid-stream; no fallback could continue)", retryable=False)

    async def run() -> AsyncIterator[Delta]:
        it, piece = deltas, first
        produced: list[str] = []
        single = getattr(request, "n", 1) == 1
        last = time.perf_counter()
        done = False  # a finish_reason came: a failure after it loses nothing
        fleet = None  # the answering backend's extension (speculative decoding's tally), passed on
        while piece is not None:
            seg = tally.segments[-1]
            done = done or bool(piece.finish_reason)
            if piece.usage is not None:
                seg.usage = piece.usage
            fleet = piece.fleet if piece.fleet is not None else fleet
            if piece.text is not None or piece.finish_reason or piece.tool_calls:
                if piece.index != 0 or piece.tool_calls:
                    single = False  # several choices or tool calls: a partial answer is not one text
                if piece.text:
                    seg.pieces += 1
                    produced.append(piece.text)
                    now = time.perf_counter()
                    if metrics is not None and seg.pieces > 1:
                        metrics.itl.labels(seg.model).observe(now - last)
                    last = now
                yield Delta(piece.index, piece.text, piece.finish_reason, piece.tool_calls, piece.logprobs)
            stall = getattr(spec_of(seg.model), "stall_timeout", None)
            try:
                if stall is None:
                    piece = await anext(it, None)
                else:
                    piece = await asyncio.wait_for(anext(it, None), stall)
            except (BackendError, asyncio.TimeoutError) as exc:
                if done:
                    await close_stream(it)
                    break
                it, piece = await switch(it, exc, produced, single)
        yield Delta(usage=tally.finish(gateway, call), fleet=fleet)

    return run()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes its body when the client goes away. Starlette's stops iterating and
    leaves the generator to the garbage collector, so its `finally` (which writes the usage record of an
    abandoned stream) ran late or never; here it runs at once, shielded from the cancellation."""

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                with anyio.CancelScope(shield=True):
                    await aclose()
