"""Voice in chat: `input_audio` parts become their transcripts before routing, and `modalities: ["text",
"audio"]` adds the answer spoken, in OpenAI's shape.

`prepare` (called by Gateway.handle before the router runs, so that `auto` routes on the words) transcribes
each `{"type": "input_audio", "input_audio": {"data": <base64>, "format": "wav" | "mp3"}}` part with
Whisper tiny.en (voice/asr.py) and puts a text part with the transcript in its place. It also checks a
spoken-answer request up front (voice, format; no streaming yet), so a bad one fails before any model runs.
`speak` (called by Gateway._whole on the finished body) synthesises each choice's answer with Piper
(voice/tts.py) and, as OpenAI does, sets `message.audio = {"id", "data" (base64), "expires_at",
"transcript"}` with `message.content` null. What ran is under the body's `fleet.voice`.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.concurrency import run_in_threadpool

from fleetlm.errors import FleetError
from fleetlm.serve.errors import BadRequest
from fleetlm.serve.protocol import ChatCompletionRequest, ChatMessage, ContentPart, new_id
from fleetlm.voice import asr
from fleetlm.voice.audio_in import AudioDecodeError

INPUT_FORMATS = ("wav", "mp3")  # OpenAI's input_audio formats (the bytes are read by content either way)
# OpenAI's output formats and the speech encoder's names for them (pcm16: raw 24 kHz 16-bit mono)
OUTPUT_FORMATS = {"wav": "wav", "mp3": "mp3", "flac": "flac", "opus": "opus", "aac": "aac", "pcm16": "pcm"}
MODALITIES = {"text", "audio"}
AUDIO_TTL_S = 3600  # `expires_at`: the gateway keeps nothing, so this only tells the client how OpenAI would


@dataclass
class VoiceTurn:
    """What voice did in one chat request: the parts heard, and the spoken answer asked for (if any)."""

    heard: list[dict[str, Any]] = field(default_factory=list)
    voice: str | None = None
    format: str | None = None


def requested(request: Any) -> bool:
    """Whether a chat request has audio parts or asks for a spoken answer."""
    if not isinstance(request, ChatCompletionRequest):
        return False
    return bool(request.modalities or request.audio) or any(_has_audio(m) for m in request.messages)


def _has_audio(message: ChatMessage) -> bool:
    return isinstance(message.content, list) and any(p.type == "input_audio" for p in message.content)


async def prepare(gw: Any, request: ChatCompletionRequest, call: Any) -> ChatCompletionRequest:
    """The request with each audio part replaced by its transcript; call.voice records the turn."""
    turn = VoiceTurn()
    _check_output(gw, request, turn)
    messages = []
    for m, message in enumerate(request.messages):
        if not _has_audio(message):
            messages.append(message)
            continue
        parts = []
        for p, part in enumerate(message.content):
            if part.type != "input_audio":
                parts.append(part)
                continue
            transcript = await run_in_threadpool(_transcribe_part, gw, part, f"messages.{m}.content.{p}")
            turn.heard.append({"message": m, "part": p, "seconds": transcript.duration,
                               "text": transcript.text})
            parts.append(ContentPart(type="text", text=transcript.text if p == 0 else "\n" + transcript.text))
        messages.append(message.model_copy(update={"content": parts}))
    call.voice = turn
    prepared = request.model_copy(update={"messages": messages})
    if call.prompt is not None:  # log_content stores the words, not megabytes of base64
        call.prompt = json.dumps([msg.model_dump(exclude_none=True) for msg in prepared.messages])
    return prepared


async def speak(gw: Any, data: dict[str, Any], call: Any) -> None:
    """Add the spoken answer to each choice of a finished chat body (when asked), and `fleet.voice`.

    The answer is generated, logged and paid for by now: if it cannot be spoken, it is sent as text
    (`content` kept, no `audio`) and `fleet.voice.error` says why, rather than thrown away.
    """
    turn: VoiceTurn = call.voice
    info: dict[str, Any] = {"heard": turn.heard}
    if turn.voice is not None and turn.format is not None:
        started = time.perf_counter()
        for choice in data.get("choices", []):
            message = choice.get("message", {})
            text = message.get("content") or ""
            if not text.strip():  # a tool call, or nothing said: nothing to speak
                continue
            try:
                audio = await run_in_threadpool(_synthesize, gw, text, turn.voice, turn.format)
            except FleetError as exc:
                info["error"] = f"the answer of choice {choice.get('index', 0)} was not spoken: {exc}"
                continue
            message["audio"] = {"id": new_id("audio"), "data": base64.b64encode(audio).decode("ascii"),
                                "expires_at": int(time.time()) + AUDIO_TTL_S, "transcript": text}
            message["content"] = None  # OpenAI puts the words in audio.transcript
        info["spoken"] = {"voice": turn.voice, "format": turn.format,
                          "ms": round((time.perf_counter() - started) * 1000, 1)}
    data.setdefault("fleet", {})["voice"] = info


def _check_output(gw: Any, request: ChatCompletionRequest, turn: VoiceTurn) -> None:
    modalities = request.modalities or ["text"]
    unknown = [m for m in modalities if m not in MODALITIES]
    if unknown:
        raise BadRequest(f"unknown modality {unknown[0]!r}; modalities are text and audio",
                         param="modalities")
    if "audio" not in modalities:
        if request.audio is not None:
            raise BadRequest('audio output needs modalities ["text", "audio"]', param="modalities")
        return
    if request.audio is None:
        raise BadRequest('modalities with "audio" need the audio parameter: {"voice": ..., "format": ...}',
                         param="audio")
    voice, fmt = request.audio.get("voice"), request.audio.get("format")
    if not isinstance(voice, str) or not voice:
        raise BadRequest("audio.voice is required (e.g. alloy)", param="audio.voice")
    if fmt not in OUTPUT_FORMATS:
        raise BadRequest(f"audio.format must be one of {', '.join(OUTPUT_FORMATS)}", param="audio.format")
    if request.stream:
        raise BadRequest("streaming a spoken answer is not supported yet; send stream: false", param="stream")
    if request.n not in (None, 1):
        raise BadRequest("a spoken answer takes n = 1", param="n")
    from fleetlm.voice.voices import UnknownVoiceError, resolve_voice

    try:
        resolve_voice(voice)
    except UnknownVoiceError as exc:
        raise BadRequest(str(exc), param="audio.voice") from None
    turn.voice, turn.format = voice, OUTPUT_FORMATS[fmt]


def _transcribe_part(gw: Any, part: ContentPart, param: str) -> asr.Transcript:
    audio = part.input_audio
    if not isinstance(audio, dict) or not isinstance(audio.get("data"), str) or not audio["data"]:
        raise BadRequest('an input_audio part needs input_audio: {"data": <base64>, "format": "wav"}',
                         param=f"{param}.input_audio")
    if audio.get("format") not in INPUT_FORMATS:
        raise BadRequest(f"input_audio.format must be one of {', '.join(INPUT_FORMATS)}",
                         param=f"{param}.input_audio.format")
    try:
        raw = base64.b64decode(audio["data"], validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("input_audio.data is not valid base64", param=f"{param}.input_audio.data") from None
    settings = gw.config.transcription
    try:
        return asr.transcribe(io.BytesIO(raw), window_s=settings.window_s,
                              vad=settings.vad, model=asr.load_model(settings.cpu_threads))
    except AudioDecodeError as exc:
        raise BadRequest(f"could not read the audio: {exc}", param=f"{param}.input_audio.data",
                         code="invalid_audio") from None


def _synthesize(gw: Any, text: str, voice: str, fmt: str) -> bytes:
    """The text spoken and encoded; raises the voice package's FleetErrors (nothing speakable, no voice)."""
    from fleetlm.voice.encode import encode_stream
    from fleetlm.voice.lexicon import LexiconStore
    from fleetlm.voice.tts import plan_speech, render

    plan = plan_speech(text, voice=voice, engine=gw.config.voice.engine,
                       stored_lexicon=LexiconStore(gw.config.voice.lexicon).load())
    return b"".join(encode_stream(render(plan), fmt))
