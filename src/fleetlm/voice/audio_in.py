"""Audio uploads decoded with PyAV into 16 kHz mono float32 windows, streamed: never the whole file in memory.

The container is found by its content (FFmpeg's probe), not by the file's name: a text file called `.mp3`
is refused. Frames are decoded and resampled one at a time into a window of at most `window_s` seconds;
a full window is cut at its quietest 20 ms within the last `search_s` seconds, so that a word is rarely
split between two windows, and the rest carries over into the next one. Memory stays at about one window
(30 s of 16 kHz float32 is 1.9 MB) whatever the length of the file.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from fleetlm.errors import FleetError

SAMPLE_RATE = 16_000
QUIET_FRAME = SAMPLE_RATE // 50  # 20 ms, the unit in which a window's quietest point is looked for
# FFmpeg's demuxer names of the containers accepted (OpenAI's list: flac, mp3, mp4, mpeg, mpga, m4a, ogg, wav,
# webm), each with the name an error message uses
ACCEPTED_CONTAINERS = {
    "wav": "wav",
    "mp3": "mp3",
    "flac": "flac",
    "ogg": "ogg",
    "matroska,webm": "webm",
    "mov,mp4,m4a,3gp,3g2,mj2": "mp4",
}
TRUNCATION_SLACK_S = 0.25  # how far decoded audio may fall short of the declared length, not "truncated"


class AudioDecodeError(FleetError):
    """The upload is not audio we can read: empty, corrupt, truncated, unknown container, no audio stream."""


@dataclass
class Window:
    """A stretch of the audio: its samples (16 kHz mono float32) and where it starts in the file (seconds)."""

    start: float
    samples: np.ndarray

    @property
    def duration(self) -> float:
        return len(self.samples) / SAMPLE_RATE


Source = str | os.PathLike | BinaryIO


def windows(source: Source, window_s: float = 30.0, search_s: float = 2.0) -> Iterator[Window]:
    """The audio of `source` as consecutive windows of at most `window_s` seconds (the last may be shorter).

    Raises AudioDecodeError, before the first window when the file cannot be opened, or later when it
    turns out corrupt or truncated part way.
    """
    import av  # imported here: fleetlm.config imports this package, and the CLI should not pay for FFmpeg

    if window_s <= search_s or search_s <= 0:
        raise ValueError("window_s must exceed search_s, which must be positive")
    size = int(window_s * SAMPLE_RATE)
    handle, owned = _open_binary(source)
    try:
        _refuse_empty(handle)
        _refuse_truncated_wav(handle)
        try:
            container = av.open(handle, mode="r")
        except (av.error.FFmpegError, ValueError, EOFError) as exc:
            raise AudioDecodeError(f"not a readable audio file ({_reason(exc)})") from None
        with container:
            kind = ACCEPTED_CONTAINERS.get(container.format.name)
            if kind is None:
                raise AudioDecodeError(
                    f"unsupported file format {container.format.name!r}; send "
                    + ", ".join(sorted(set(ACCEPTED_CONTAINERS.values())))
                )
            streams = container.streams.audio
            if not streams:
                raise AudioDecodeError(f"the {kind} file holds no audio stream")
            stream = streams[0]
            declared = _declared_seconds(stream)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            pending: list[np.ndarray] = []
            held = 0
            emitted = 0  # samples already handed out, which places the next window in the file
            for chunk in _resampled(container, stream, resampler):
                pending.append(chunk)
                held += len(chunk)
                while held >= size:
                    buffer = np.concatenate(pending)
                    cut = _quiet_cut(buffer[:size], int(search_s * SAMPLE_RATE))
                    yield Window(emitted / SAMPLE_RATE, buffer[:cut])
                    emitted += cut
                    rest = buffer[cut:]
                    pending, held = ([rest] if len(rest) else []), len(rest)
            if held:
                yield Window(emitted / SAMPLE_RATE, np.concatenate(pending))
                emitted += held
            if emitted == 0:
                raise AudioDecodeError(f"the {kind} file holds no audio samples")
            if declared is not None and emitted / SAMPLE_RATE < declared - TRUNCATION_SLACK_S:
                raise AudioDecodeError(
                    f"the {kind} file is truncated: it declares {declared:.2f} s of audio but holds "
                    f"{emitted / SAMPLE_RATE:.2f} s"
                )
    finally:
        if owned:
            handle.close()


def decode(source: Source) -> np.ndarray:
    """The whole audio as one array (16 kHz mono float32): for short clips (voice chat, tests) only."""
    parts = [w.samples for w in windows(source)]
    return np.concatenate(parts)


def _resampled(container, stream, resampler) -> Iterator[np.ndarray]:  # noqa: ANN001 (PyAV's own types)
    import av

    try:
        for frame in container.decode(stream):
            frame.pts = None  # the resampler keeps its own clock; a stream's odd timestamps must not stall it
            for out in resampler.resample(frame):
                yield out.to_ndarray().reshape(-1)
        for out in resampler.resample(None):  # what the resampler still holds at the end
            yield out.to_ndarray().reshape(-1)
    except (av.error.FFmpegError, ValueError) as exc:
        raise AudioDecodeError(f"the audio is corrupt part way ({_reason(exc)})") from None


def _quiet_cut(window: np.ndarray, search: int) -> int:
    """Where to end a full window: the middle of its quietest 20 ms among the last `search` samples."""
    tail = window[len(window) - search:]
    frames = len(tail) // QUIET_FRAME
    energy = np.square(tail[: frames * QUIET_FRAME].reshape(frames, QUIET_FRAME)).mean(axis=1)
    quietest = int(np.argmin(energy))
    return len(window) - search + quietest * QUIET_FRAME + QUIET_FRAME // 2


def _declared_seconds(stream) -> float | None:  # noqa: ANN001
    """The length the container's header declares for the stream, when it declares one."""
    if stream.duration is None or stream.time_base is None:
        return None
    return float(stream.duration * stream.time_base)


def _open_binary(source: Source) -> tuple[BinaryIO, bool]:
    if isinstance(source, (str, os.PathLike)):
        try:
            return open(source, "rb"), True
        except OSError as exc:
            raise AudioDecodeError(f"cannot open {os.fspath(source)!r}: {exc.strerror}") from None
    return source, False


def _refuse_empty(handle: BinaryIO) -> None:
    start = handle.tell()
    if not handle.read(1):
        raise AudioDecodeError("the file is empty")
    handle.seek(start)


def _refuse_truncated_wav(handle: BinaryIO) -> None:
    """A WAV whose data chunk declares more bytes than the file holds was cut short (FFmpeg would quietly
    read what is there). A streamed WAV that declares 0 or 0xFFFFFFFF (length unknown) passes."""
    start = handle.tell()
    head = handle.read(12)
    try:
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return
        while True:
            chunk = handle.read(8)
            if len(chunk) < 8:
                raise AudioDecodeError("the wav file is truncated: it ends before its data chunk")
            name, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            if name == b"data":
                offset = handle.tell()
                end = handle.seek(0, os.SEEK_END)
                if size not in (0, 0xFFFFFFFF) and end - offset < size:
                    raise AudioDecodeError(
                        f"the wav file is truncated: its data chunk declares {size} bytes but {end - offset} "
                        "follow"
                    )
                return
            handle.seek(size + (size & 1), os.SEEK_CUR)  # chunks are padded to an even length
    finally:
        handle.seek(start)


def _reason(exc: Exception) -> str:
    """FFmpeg's message without the file name it appends (a temp file's path means nothing to a client)."""
    text = getattr(exc, "strerror", None) or str(exc)
    return str(text).split(":")[0].strip() or type(exc).__name__
