"""A Transcript rendered as OpenAI's transcription response formats: json, text, srt, vtt and verbose_json."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fleetlm.voice.asr import Segment, Transcript

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
LANGUAGE_NAMES = {"en": "english"}  # verbose_json names the language in full, as OpenAI's whisper-1 does


def srt(segments: list[Segment]) -> str:
    """SubRip: numbered cues from 1, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    cues = [f"{i}\n{_clock(s.start, ',')} --> {_clock(s.end, ',')}\n{s.text.strip()}\n"
            for i, s in enumerate(segments, start=1)]
    return "\n".join(cues)


def vtt(segments: list[Segment]) -> str:
    """WebVTT: the WEBVTT header, then cues `HH:MM:SS.mmm --> HH:MM:SS.mmm`."""
    cues = [f"{_clock(s.start, '.')} --> {_clock(s.end, '.')}\n{s.text.strip()}\n" for s in segments]
    return "WEBVTT\n\n" + "\n".join(cues)


def verbose_json(transcript: Transcript, *, task: str = "transcribe", words: bool = False) -> dict[str, Any]:
    """OpenAI's verbose_json: task, language, duration, text, segments, and words when asked for."""
    segments = []
    for s in transcript.segments:
        item = asdict(s)
        item.pop("words")
        segments.append(item)
    body: dict[str, Any] = {
        "task": task,
        "language": LANGUAGE_NAMES.get(transcript.language, transcript.language),
        "duration": transcript.duration,
        "text": transcript.text,
        "segments": segments,
    }
    if words:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for w in transcript.words]
    return body


def _clock(seconds: float, decimal_mark: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{millis:03d}"
