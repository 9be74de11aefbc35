"""OpenAI's speech model and voice names mapped to local voices (a documented table), and the `voice:` config.

Only one Piper voice installs offline (en_US joe, medium). OpenAI's eleven voices therefore differ in what can
honestly be varied on one Piper voice: its speaking rate (length scale) and its generator and duration noise
(how lively it sounds). With the espeak-ng fallback each one is a different espeak-ng variant (pitch and
timbre), so there they really sound like different speakers. docs/VOICE.md prints the table.

This module imports nothing heavy, so `fleetlm.config` can use `VoiceConfig` without loading Piper.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fleetlm.errors import FleetError

Engine = Literal["auto", "piper", "espeak"]


class UnknownVoiceError(FleetError):
    """A speech model or voice name that is not in the table; `param` names the request field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class LocalVoice:
    """How one voice name is spoken: Piper's scales (None: the voice file's own) and an espeak-ng variant."""

    name: str
    length_scale: float = 1.0  # multiplies the voice file's length scale; > 1 speaks slower
    noise_scale: float | None = None
    noise_w_scale: float | None = None
    espeak_voice: str = "en-us"


# OpenAI's voices (platform.openai.com/docs/guides/text-to-speech lists these eleven), plus `joe`, the Piper
# voice by its own name. The Piper defaults of the joe voice are noise 0.667 and duration noise 0.8.
VOICES: dict[str, LocalVoice] = {
    v.name: v
    for v in [
        LocalVoice("alloy", espeak_voice="en-us"),
        LocalVoice("ash", 1.05, 0.5, 0.6, "en-us+m3"),
        LocalVoice("ballad", 1.15, 0.8, 1.0, "en-us+m7"),
        LocalVoice("coral", 0.95, 0.7, 0.9, "en-us+f3"),
        LocalVoice("echo", 1.1, 0.45, 0.5, "en-us+m1"),
        LocalVoice("fable", 1.0, 0.8, 1.1, "en-us+m4"),
        LocalVoice("onyx", 1.2, 0.4, 0.5, "en-us+m2"),
        LocalVoice("nova", 0.9, 0.667, 0.8, "en-us+f2"),
        LocalVoice("sage", 1.1, 0.55, 0.7, "en-us+f4"),
        LocalVoice("shimmer", 0.95, 0.6, 0.7, "en-us+f1"),
        LocalVoice("verse", 1.0, 0.75, 1.0, "en-us+m6"),
        LocalVoice("joe", espeak_voice="en-us"),
    ]
}

# OpenAI's speech models; each is served by the configured engine. `piper` and `espeak-ng` name an engine.
MODELS: dict[str, Engine] = {
    "tts-1": "auto",
    "tts-1-hd": "auto",
    "gpt-4o-mini-tts": "auto",
    "piper": "piper",
    "espeak-ng": "espeak",
}


def resolve_voice(name: str) -> LocalVoice:
    voice = VOICES.get(name.lower())
    if voice is None:
        raise UnknownVoiceError(f"unknown voice {name!r}; the voices are {', '.join(VOICES)}", "voice")
    return voice


def resolve_model(name: str, configured: Engine = "auto") -> Engine:
    """The engine a speech model runs on: the model's own (piper, espeak-ng), else the configured one."""
    engine = MODELS.get(name)
    if engine is None:
        raise UnknownVoiceError(f"unknown speech model {name!r}; the models are {', '.join(MODELS)}", "model")
    return configured if engine == "auto" else engine


class VoiceConfig(BaseModel):
    """The `voice:` section of fleet.yaml (speech out)."""

    model_config = ConfigDict(extra="forbid")

    engine: Engine = Field(
        "auto", description="auto: Piper, else espeak-ng if the Piper voice cannot load; piper; espeak"
    )
    lexicon: Path | None = Field(
        None, description="the pronunciation lexicon's file; None: <fleet home>/voice/lexicon.json"
    )
