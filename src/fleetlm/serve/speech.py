"""POST /v1/audio/speech (OpenAI's shape, streamed as it is synthesised) and the pronunciation lexicon's API.

- `POST /v1/audio/speech`: `model`, `input` (at most 4096 characters), `voice`, `response_format`
  (mp3|opus|aac|flac|wav|pcm), `speed` (0.25-4.0), `instructions` (accepted, ignored: the local voices take
  no style prompt); fleet extensions `normalize` (bool) and `lexicon` (word -> entry). Each sentence is sent,
  encoded, as soon as it is synthesised (chunked transfer).
- `GET /v1/fleet/voice/lexicon`, `GET|PUT|DELETE /v1/fleet/voice/lexicon/{word}`: the stored lexicon.

The usage log gets one record per speech request: the input's characters as its prompt tokens.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from fleetlm.errors import FleetError
from fleetlm.serve.errors import APIError, BadRequest, ServiceUnavailable
from fleetlm.serve.failover import ClosingStreamingResponse
from fleetlm.serve.protocol import parse_request

if TYPE_CHECKING:
    from fleetlm.serve.app import Gateway

MAX_INPUT_CHARS = 4096  # OpenAI's limit for /v1/audio/speech


class SpeechRequest(BaseModel):
    """OpenAI's speech request, plus fleetlm's `normalize` and `lexicon` (docs/VOICE.md)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    input: str = Field(min_length=1, max_length=MAX_INPUT_CHARS)
    voice: str
    instructions: str | None = Field(None, description="accepted and ignored: local voices take no prompt")
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio"] = Field("audio", description="only raw audio; OpenAI's sse is not served")
    normalize: bool = Field(True, exclude=True, description="fleet: apply the text normaliser")
    lexicon: dict[str, Any] | None = Field(
        None, exclude=True, description="fleet: word -> {ipa} | {say} | respelling, over the stored lexicon"
    )


def _as_api_error(exc: FleetError) -> APIError:
    """The voice package's typed errors as 400s (or a 503 when no engine can speak)."""
    from fleetlm.voice.tts import VoiceUnavailableError

    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, VoiceUnavailableError):
        return ServiceUnavailable(str(exc))
    return BadRequest(str(exc), param=getattr(exc, "param", None) or "input")


def _lexicon_store(gw: Gateway) -> Any:
    from fleetlm.voice.lexicon import LexiconStore

    return LexiconStore(gw.config.voice.lexicon)


def install_speech(app: FastAPI, gw: Gateway) -> None:
    from fleetlm.serve.app import _Call  # the gateway's per-request record (app imports this module)

    @app.post("/v1/audio/speech", openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": SpeechRequest.model_json_schema()}}}})
    async def speech(request: Request) -> Response:
        call = _Call("speech")
        try:
            req = parse_request(SpeechRequest, await gw.read_body(request))
            call.model_requested, call.stream = req.model, True
            await gw.authorize(request, call)
            pieces = await run_in_threadpool(_prepare, gw, req, call)
        except FleetError as exc:
            err = _as_api_error(exc)
            if call.model_requested != "?":
                await gw.log(call, err.status, error=err.message)
            return JSONResponse(err.body(), status_code=err.status, headers=call.headers())
        from fleetlm.voice.encode import FORMATS

        headers = {**call.headers(), "cache-control": "no-cache"}
        return ClosingStreamingResponse(_sent(gw, call, pieces, len(req.input)),
                                        media_type=FORMATS[req.response_format].media_type, headers=headers)

    @app.get("/v1/fleet/voice/lexicon")
    async def list_lexicon(request: Request) -> Response:
        async def answer() -> Response:
            entries = await run_in_threadpool(_lexicon_store(gw).load)
            data = [{"word": w, **e.as_json()} for w, e in sorted(entries.items())]
            return JSONResponse({"object": "list", "data": data})

        return await _lexicon_call(gw, request, answer)

    @app.get("/v1/fleet/voice/lexicon/{word}")
    async def get_entry(request: Request, word: str) -> Response:
        async def answer() -> Response:
            from fleetlm.voice.lexicon import lexicon_key

            entries = await run_in_threadpool(_lexicon_store(gw).load)
            entry = entries.get(lexicon_key(word))
            if entry is None:
                return _not_found(word)
            return JSONResponse({"word": lexicon_key(word), **entry.as_json()})

        return await _lexicon_call(gw, request, answer)

    @app.put("/v1/fleet/voice/lexicon/{word}")
    async def put_entry(request: Request, word: str) -> Response:
        async def answer() -> Response:
            from fleetlm.voice.lexicon import parse_entry

            body = await gw.read_body(request)
            try:
                raw = json.loads(body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                raise BadRequest(f"request body is not valid JSON: {exc}") from None
            entry = parse_entry(raw)
            key = await run_in_threadpool(_lexicon_store(gw).add, word, entry)
            return JSONResponse({"word": key, **entry.as_json()})

        return await _lexicon_call(gw, request, answer)

    @app.delete("/v1/fleet/voice/lexicon/{word}")
    async def delete_entry(request: Request, word: str) -> Response:
        async def answer() -> Response:
            removed = await run_in_threadpool(_lexicon_store(gw).remove, word)
            if not removed:
                return _not_found(word)
            return JSONResponse({"word": " ".join(word.split()).lower(), "deleted": True})

        return await _lexicon_call(gw, request, answer)


def _not_found(word: str) -> JSONResponse:
    err = BadRequest(f"the lexicon has no entry for {word!r}", param="word")
    err.status, err.code = 404, "not_found"
    return JSONResponse(err.body(), status_code=404)


async def _lexicon_call(gw: Gateway, request: Request, answer: Any) -> Response:
    """A lexicon API call: authorised like the rest of the gateway, its errors as OpenAI's error JSON."""
    from fleetlm.serve.app import _Call

    try:
        await gw.authorize(request, _Call("voice.lexicon"))
        return await answer()
    except FleetError as exc:
        err = _as_api_error(exc)
        return JSONResponse(err.body(), status_code=err.status)


def _prepare(gw: Gateway, req: SpeechRequest, call: Any) -> Iterator[bytes]:
    """Check everything (model, voice, lexicon, SSML, encoder) and return the lazy stream of encoded audio."""
    from fleetlm.voice.encode import StreamEncoder
    from fleetlm.voice.tts import plan_speech, render
    from fleetlm.voice.voices import resolve_model

    engine = resolve_model(req.model, gw.config.voice.engine)
    plan = plan_speech(req.input, voice=req.voice, speed=req.speed, normalize=req.normalize,
                       lexicon=req.lexicon, engine=engine, stored_lexicon=_lexicon_store(gw).load())
    call.model_used = f"{plan.engine}:{plan.voice.name}"
    call.route = f"alias:{req.model}"
    encoder = StreamEncoder(req.response_format)

    def encoded() -> Iterator[bytes]:
        finished = False
        try:
            for samples, rate in render(plan):
                if piece := encoder.feed(samples, rate):
                    yield piece
            finished = True
            if tail := encoder.close():
                yield tail
        finally:
            if not finished:  # abandoned (the client left): release FFmpeg's context, the bytes go nowhere
                encoder.close()

    return encoded()


async def _sent(gw: Gateway, call: Any, pieces: Iterator[bytes], chars: int) -> AsyncIterator[bytes]:
    """The encoded pieces, each synthesised in a worker thread; the usage record is written at the end.

    A client that leaves cancels the stream after the sentence being synthesised (a worker thread is not
    interrupted); then no await works any more, so the 499 is logged in place, as the chat stream does."""
    status, error = 499, "client went away"
    try:
        while (piece := await run_in_threadpool(next, pieces, None)) is not None:
            if call.ttft_ms is None:
                call.ttft_ms = (time.perf_counter() - call.start) * 1000
            yield piece
        await gw.log(call, 200, prompt_tokens=chars)
        status, error = 200, None
    except Exception as exc:  # mid-stream the status is sent already: the audio ends early, the log says why
        status, error = 500, f"synthesis failed mid-stream: {type(exc).__name__}: {exc}"
        await gw.log(call, status, prompt_tokens=chars, error=error)
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()  # the encoder's FFmpeg context is released now, not by the garbage collector
        if status == 499:
            record = gw.record(call, 499, prompt_tokens=chars, error=error)
            gw.store.log(record)
            gw.settle(call, record)
