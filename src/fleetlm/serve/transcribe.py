"""POST /v1/audio/transcriptions and /v1/audio/translations: OpenAI's multipart shape over voice/asr.py.

The upload is counted as it arrives (413 past `transcription.max_upload_bytes`) and spooled by Starlette's
multipart parser to a temporary file (in memory up to 1 MB, on disk beyond); the file is then decoded and
transcribed window by window in a worker thread. Each request leaves one usage row: endpoint
`audio.transcriptions` or `audio.translations`, the model asked for and the local one used, the transcript's
tokens as completion tokens, no cost; the seconds of audio are in the response's `usage` and in the
`x-fleet-audio-seconds` header.

Translations: Whisper tiny.en cannot translate, and it hears everything as English. English audio
"translated" to English is its transcript, so that is the answer (task "translate" in verbose_json, header
`x-fleet-translation: identity`); audio in another language comes back as a poor English transcript, since
the model cannot tell that it is not English (docs/VOICE.md).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData, UploadFile

from fleetlm.serve.errors import APIError, BadRequest
from fleetlm.serve.uploads import read_multipart
from fleetlm.voice import asr
from fleetlm.voice.audio_in import AudioDecodeError
from fleetlm.voice.subtitles import FORMATS, srt, verbose_json, vtt

if TYPE_CHECKING:
    from fleetlm.serve.app import Gateway

TRANSCRIPTION_FIELDS = {"file", "model", "language", "prompt", "response_format", "temperature",
                        "timestamp_granularities[]", "timestamp_granularities", "stream"}
TRANSLATION_FIELDS = {"file", "model", "prompt", "response_format", "temperature"}
GRANULARITIES = {"segment", "word"}
MAX_PROMPT_CHARS = 4000


def install_transcribe(app: FastAPI, gw: Gateway) -> None:
    """Add the two audio-in endpoints to the gateway's app."""

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        return await _serve(gw, request, task="transcribe")

    @app.post("/v1/audio/translations")
    async def translations(request: Request) -> Response:
        return await _serve(gw, request, task="translate")


async def _serve(gw: Gateway, request: Request, *, task: str) -> Response:
    from fleetlm.serve.app import _Call  # app.py imports this module: a top-level import would be circular

    call = _Call("audio.transcriptions" if task == "transcribe" else "audio.translations")
    form: FormData | None = None
    try:
        await gw.authorize(request, call)
        form = await _read_form(gw, request)
        options = _options(form, task)
        call.model_requested = options["model"]
        local = asr.local_model_for(options["model"])
        if local is None:
            raise BadRequest(
                f"the model {options['model']!r} is not a transcription model; use one of "
                + ", ".join(sorted(asr.MODEL_NAMES)), param="model", code="model_not_found")
        call.model_used = local
        call.route = "direct" if options["model"] == local else f"alias:{options['model']}"
        transcript = await run_in_threadpool(_transcribe, gw, options)
        tokens = sum(len(s.tokens) for s in transcript.segments)
        await gw.log(call, 200, 0, tokens)
        return _render(transcript, options, task, call.headers())
    except APIError as exc:
        if call.model_requested != "?":
            await gw.log(call, exc.status, error=exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=call.headers())
    finally:
        if form is not None:
            await form.close()  # removes the spooled temporary file


async def _read_form(gw: Gateway, request: Request) -> FormData:
    return await read_multipart(gw, request, limit=gw.config.transcription.max_upload_bytes, max_fields=32,
                                how_to="send the audio as multipart/form-data with a `file` part and a "
                                       "`model` field")


def _options(form: FormData, task: str) -> dict[str, Any]:
    """The request's fields, checked: a clear 400 naming the field for anything wrong."""
    allowed = TRANSCRIPTION_FIELDS if task == "transcribe" else TRANSLATION_FIELDS
    for key in form.keys():
        if key not in allowed:
            hint = "; translations take no language" if key == "language" else ""
            raise BadRequest(f"unknown field {key!r}{hint}", param=key)
    upload = form.get("file")
    if upload is None:
        raise BadRequest("the `file` part is required (the audio to transcribe)", param="file")
    if not isinstance(upload, UploadFile):
        raise BadRequest("`file` must be a file part, not a text field", param="file")
    model = _text(form, "model")
    if not model:
        raise BadRequest("the `model` field is required (e.g. whisper-1)", param="model")
    response_format = _text(form, "response_format") or "json"
    if response_format not in FORMATS:
        raise BadRequest(f"response_format must be one of {', '.join(FORMATS)}", param="response_format")
    language = _text(form, "language")
    if language is not None:
        try:
            asr.check_language(language)
        except asr.UnsupportedLanguage as exc:
            raise BadRequest(str(exc), param="language", code="unsupported_language") from None
    prompt = _text(form, "prompt")
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"prompt is longer than {MAX_PROMPT_CHARS} characters", param="prompt")
    granularities = [g for key in ("timestamp_granularities[]", "timestamp_granularities")
                     for g in form.getlist(key)]
    for g in granularities:
        if g not in GRANULARITIES:
            raise BadRequest("timestamp_granularities takes segment and word",
                             param="timestamp_granularities")
    if granularities and response_format != "verbose_json":
        raise BadRequest("timestamp_granularities needs response_format verbose_json",
                         param="timestamp_granularities")
    if (_text(form, "stream") or "false").lower() not in ("false", "0"):
        raise BadRequest("streamed transcription is not supported; the whole transcript comes at once",
                         param="stream")
    return {"file": upload, "model": model, "response_format": response_format, "language": language,
            "prompt": prompt, "temperature": _temperature(form), "words": "word" in granularities}


def _text(form: FormData, key: str) -> str | None:
    value = form.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadRequest(f"`{key}` must be a text field", param=key)
    return value.strip() or None


def _temperature(form: FormData) -> float:
    raw = _text(form, "temperature")
    if raw is None:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise BadRequest("temperature must be a number between 0 and 1", param="temperature") from None
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise BadRequest("temperature must be a number between 0 and 1", param="temperature")
    return value


def _transcribe(gw: Gateway, options: dict[str, Any]) -> asr.Transcript:
    settings = gw.config.transcription
    upload: UploadFile = options["file"]
    upload.file.seek(0)
    try:
        return asr.transcribe(
            upload.file, language=options["language"], prompt=options["prompt"],
            temperature=options["temperature"], word_timestamps=options["words"], window_s=settings.window_s,
            vad=settings.vad, model=asr.load_model(settings.cpu_threads),
        )
    except AudioDecodeError as exc:
        raise BadRequest(f"could not read the audio file: {exc}", param="file",
                         code="invalid_audio") from None


def _render(transcript: asr.Transcript, options: dict[str, Any], task: str,
            headers: dict[str, str]) -> Response:
    headers = {**headers, "x-fleet-audio-seconds": f"{transcript.duration:.3f}"}
    if task == "translate":
        headers["x-fleet-translation"] = "identity"  # English in, its English transcript out
    usage = {"type": "duration", "seconds": math.ceil(transcript.duration)}
    fmt = options["response_format"]
    if fmt == "json":
        return JSONResponse({"text": transcript.text, "usage": usage}, headers=headers)
    if fmt == "verbose_json":
        body = verbose_json(transcript, task=task, words=options["words"])
        return JSONResponse({**body, "usage": usage}, headers=headers)
    if fmt == "text":
        return PlainTextResponse(transcript.text + "\n", headers=headers)
    rendered = srt(transcript.segments) if fmt == "srt" else vtt(transcript.segments)
    return PlainTextResponse(rendered, headers=headers)
