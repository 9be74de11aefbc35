"""PCM to OpenAI's speech formats (mp3, opus, aac, flac, wav, pcm), encoded piece by piece as audio arrives.

Every format is 24 kHz mono, as OpenAI's are (its `pcm` is raw 24 kHz 16-bit little-endian mono); the
voice's own rate (22.05 kHz for Piper's joe and espeak-ng) is resampled with scipy's polyphase filter.
mp3 (LAME), opus (in Ogg), aac (ADTS) and flac are encoded by FFmpeg through PyAV, muxed into a sink that
cannot seek, so each piece can be sent as soon as it is encoded; wav is a header whose sizes say "unknown"
(0xFFFFFFFF, what streaming encoders write) followed by the PCM.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from math import gcd

import numpy as np

from fleetlm.errors import FleetError

OUTPUT_RATE = 24_000


@dataclass(frozen=True)
class AudioFormat:
    name: str
    media_type: str
    container: str | None = None  # FFmpeg's muxer; None: written here (wav, pcm)
    codec: str | None = None


FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in [
        AudioFormat("mp3", "audio/mpeg", "mp3", "libmp3lame"),
        AudioFormat("opus", "audio/ogg", "ogg", "libopus"),
        AudioFormat("aac", "audio/aac", "adts", "aac"),
        AudioFormat("flac", "audio/flac", "flac", "flac"),
        AudioFormat("wav", "audio/wav"),
        AudioFormat("pcm", "audio/pcm"),
    ]
}


class EncoderUnavailableError(FleetError):
    """The installed PyAV (FFmpeg) build has no encoder for the format asked for."""


def missing_encoder(fmt: str) -> str | None:
    """The FFmpeg encoder a format needs that this PyAV build lacks, else None."""
    codec = FORMATS[fmt].codec
    if codec is None:
        return None
    import av

    try:
        av.codec.Codec(codec, "w")
    except Exception:  # PyAV raises its own UnknownCodecError (a ValueError) or an FFmpeg error
        return codec
    return None


def resample(samples: np.ndarray, rate: int, to: int = OUTPUT_RATE) -> np.ndarray:
    """int16 mono at `rate` to int16 mono at `to`."""
    if rate == to or samples.size == 0:
        return samples.astype(np.int16, copy=False)
    from scipy.signal import resample_poly

    g = gcd(rate, to)
    out = resample_poly(samples.astype(np.float32), to // g, rate // g)
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


def wav_stream_header(rate: int = OUTPUT_RATE) -> bytes:
    """A RIFF/WAVE header for 16-bit mono PCM of unknown length."""
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return b"RIFF" + struct.pack("<I", unknown) + b"WAVEfmt " + struct.pack("<I", 16) + fmt + \
        b"data" + struct.pack("<I", unknown)


class _Sink:
    """A write-only file for PyAV's muxer: what it wrote since the last `take()`. No seek, so no muxer
    goes back to patch a header: the bytes already sent stay valid."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def write(self, data: bytes) -> int:
        self._buf += data
        return len(data)

    def take(self) -> bytes:
        out = bytes(self._buf)
        self._buf.clear()
        return out


class StreamEncoder:
    """Encode int16 mono chunks: `feed(samples, rate)` returns the bytes ready so far, `close()` the rest."""

    def __init__(self, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"unknown audio format {fmt!r}; the formats are {', '.join(FORMATS)}")
        missing = missing_encoder(fmt)
        if missing:
            raise EncoderUnavailableError(f"response_format {fmt!r} needs FFmpeg's {missing} encoder, which "
                                          "this PyAV build lacks; use wav, pcm or flac")
        self.format = FORMATS[fmt]
        self._started = False
        if self.format.container is not None:
            self._open_ffmpeg()

    def _open_ffmpeg(self) -> None:
        import av

        self._sink = _Sink()
        # Ogg pages are flushed every 100 ms rather than FFmpeg's default 1 s, so opus streams too.
        options = {"page_duration": "100000"} if self.format.container == "ogg" else {}
        self._container = av.open(self._sink, "w", format=self.format.container, options=options)
        self._stream = self._container.add_stream(self.format.codec, rate=OUTPUT_RATE, layout="mono")
        ctx = self._stream.codec_context
        # Encoders with fixed frames (mp3 576/1152, aac 1024, opus 20 ms) get exactly that many samples.
        self._resampler = av.AudioResampler(format=ctx.format.name, layout="mono", rate=OUTPUT_RATE,
                                            frame_size=ctx.frame_size or None)
        self._pts = 0

    def feed(self, samples: np.ndarray, rate: int) -> bytes:
        pcm = resample(samples, rate)
        head = b""
        if not self._started and self.format.name == "wav":
            head = wav_stream_header()
        self._started = True
        if self.format.container is None:
            return head + pcm.astype("<i2").tobytes()
        return self._encode(pcm)

    def close(self) -> bytes:
        if self.format.container is None:
            return b"" if self._started or self.format.name == "pcm" else wav_stream_header()
        out = self._encode(None)
        for packet in self._stream.encode(None):
            self._container.mux(packet)
        self._container.close()
        return out + self._sink.take()

    def _encode(self, pcm: np.ndarray | None) -> bytes:
        import av

        frame = None
        if pcm is not None:
            if pcm.size == 0:
                return b""
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = OUTPUT_RATE
            frame.pts, self._pts = self._pts, self._pts + pcm.size
        for resampled in self._resampler.resample(frame):
            for packet in self._stream.encode(resampled):
                self._container.mux(packet)
        return self._sink.take()


def encode_stream(chunks: Iterable[tuple[np.ndarray, int]], fmt: str) -> Iterator[bytes]:
    """Encoded bytes as each chunk of audio arrives (empty pieces are skipped)."""
    encoder = StreamEncoder(fmt)
    for samples, rate in chunks:
        if piece := encoder.feed(samples, rate):
            yield piece
    if tail := encoder.close():
        yield tail
