"""voice/audio_in.py: containers found by content, bounded windows cut at quiet points, clear errors."""

import io
import tracemalloc
import wave

import numpy as np
import pytest

from fleetlm.voice.audio_in import SAMPLE_RATE, AudioDecodeError, decode, windows
from voice_speech import bursts_wav, encode, write_wav

RATE = 22_050


def tone(seconds: float, freq: float = 440.0, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """2 s of tone, 0.5 s of silence, 1 s of tone: 3.5 s."""
    path = tmp_path_factory.mktemp("audio_in") / "clip.wav"
    write_wav(path, np.concatenate([tone(2.0), np.zeros(RATE // 2, np.int16), tone(1.0, 660.0)]), RATE)
    return path


@pytest.mark.parametrize("fmt", ["wav", "mp3", "flac", "ogg", "webm", "m4a"])
def test_every_container_decodes_to_16k_mono_float_by_content_not_name(clip, tmp_path, fmt):
    path = clip if fmt == "wav" else encode(clip, tmp_path / f"clip.{fmt}", fmt)
    misnamed = tmp_path / "upload.txt"  # the name says nothing: FFmpeg's probe reads the bytes
    misnamed.write_bytes(path.read_bytes())
    samples = decode(misnamed)
    assert samples.dtype == np.float32 and samples.ndim == 1
    assert abs(len(samples) / SAMPLE_RATE - 3.5) < 0.08
    assert 0.1 < np.abs(samples[: SAMPLE_RATE]).max() <= 1.0  # the tone is there, scaled to [-1, 1]
    assert np.abs(samples[int(2.1 * SAMPLE_RATE): int(2.4 * SAMPLE_RATE)]).max() < 0.02  # and the silence


def test_a_file_object_decodes_like_a_path(clip):
    with open(clip, "rb") as fh:
        assert np.array_equal(decode(fh), decode(clip))


def test_full_windows_are_cut_in_their_quietest_stretch(tmp_path):
    # 10 s windows, searched over their last 2 s: the silence at 8.9-9.1 s is where the first one must end
    path = tmp_path / "gap.wav"
    write_wav(path, np.concatenate([tone(8.9), np.zeros(int(0.2 * RATE), np.int16), tone(6.0)]), RATE)
    found = list(windows(path, window_s=10.0, search_s=2.0))
    assert len(found) == 2
    assert 8.9 <= found[0].duration <= 9.1
    assert found[1].start == pytest.approx(found[0].duration)
    assert found[0].duration + found[1].duration == pytest.approx(15.1, abs=0.01)


def test_minutes_of_audio_stream_through_in_bounded_memory(tmp_path):
    # 5 minutes of speech-like bursts: 13 MB of WAV, 19 MB once decoded whole
    minutes = 5
    path = bursts_wav(tmp_path / "long.wav", minutes)
    tracemalloc.start()
    try:
        starts, total, longest = [], 0.0, 0.0
        for w in windows(path, window_s=30.0):
            starts.append(w.start)
            assert w.start == pytest.approx(total)  # each window begins where the last one ended
            total += w.duration
            longest = max(longest, w.duration)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == pytest.approx(60 * minutes, abs=0.01)
    assert len(starts) >= 8 and longest <= 30.0
    assert starts == sorted(starts)
    window_bytes, whole_bytes = 30 * SAMPLE_RATE * 4, 60 * minutes * SAMPLE_RATE * 4
    # a window, the next one filling, and the cut's copy: a few windows whatever the length, never the file
    assert peak < 4 * window_bytes < whole_bytes / 2, f"peak {peak / 1e6:.1f} MB while decoding"


def wav_bytes(samples: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(RATE)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"", "empty"),
        (np.random.default_rng(0).bytes(5000), "not a readable audio file"),
        (b"hello, this is a text file and not audio at all\n" * 20, "not a readable audio file"),
        (wav_bytes(tone(2.0))[:30_000], "truncated"),
        (wav_bytes(tone(2.0))[:30], "truncated"),
    ],
    ids=["empty", "random", "text", "cut-wav", "header-only-wav"],
)
def test_what_is_not_audio_is_a_clear_decode_error(tmp_path, content, fragment):
    path = tmp_path / "upload.mp3"
    path.write_bytes(content)
    with pytest.raises(AudioDecodeError, match=fragment):
        list(windows(path))


def test_a_container_outside_the_list_is_refused_by_name(tmp_path):
    import av

    path = tmp_path / "clip.aiff"
    with av.open(str(path), "w", format="aiff") as out:
        stream = out.add_stream("pcm_s16be", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone(0.5).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with pytest.raises(AudioDecodeError, match="unsupported file format 'aiff'"):
        list(windows(path))


def test_an_image_is_not_audio(tmp_path):
    from PIL import Image

    path = tmp_path / "photo.wav"
    Image.new("RGB", (8, 8), "red").save(path, format="PNG")
    with pytest.raises(AudioDecodeError, match="unsupported file format"):
        list(windows(path))


def test_a_missing_file_and_bad_window_sizes(tmp_path):
    with pytest.raises(AudioDecodeError, match="cannot open"):
        list(windows(tmp_path / "nope.wav"))
    with pytest.raises(ValueError):
        list(windows(tmp_path / "nope.wav", window_s=2.0, search_s=2.0))
