"""PCM to OpenAI's speech formats, 24 kHz mono, encoded piece by piece."""

import io

import av
import numpy as np
import pytest

from fleetlm.voice import encode
from fleetlm.voice.encode import (
    FORMATS,
    OUTPUT_RATE,
    EncoderUnavailableError,
    StreamEncoder,
    encode_stream,
    resample,
)

RATE = 22_050


def tone(seconds: float, rate: int = RATE) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)


def decoded_seconds(data: bytes) -> float:
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        return sum(f.samples for f in c.decode(stream)) / stream.rate


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
def test_every_container_format_decodes_to_the_audio_fed(fmt):
    pieces = list(encode_stream([(tone(0.5), RATE)] * 3, fmt))
    assert len(pieces) >= 2  # bytes leave before the last chunk is fed
    assert decoded_seconds(b"".join(pieces)) == pytest.approx(1.5, abs=0.1)


def test_each_fed_chunk_gives_bytes_at_once():
    for fmt in ["mp3", "aac", "flac", "wav", "pcm"]:
        assert StreamEncoder(fmt).feed(tone(0.5), RATE), fmt


def test_pcm_is_raw_24khz_16bit_little_endian():
    data = b"".join(encode_stream([(tone(1.0), RATE)], "pcm"))
    assert len(data) == OUTPUT_RATE * 2
    samples = np.frombuffer(data, "<i2")
    assert 7000 < np.abs(samples).max() <= 8100  # the tone's amplitude survives resampling


def test_wav_has_a_streaming_header_at_24khz():
    data = b"".join(encode_stream([(tone(0.2), RATE)], "wav"))
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt "
    assert int.from_bytes(data[24:28], "little") == OUTPUT_RATE
    assert data[36:40] == b"data" and len(data) == 44 + round(0.2 * OUTPUT_RATE) * 2


def test_no_audio_is_still_a_valid_wav():
    assert b"".join(encode_stream([], "wav"))[:4] == b"RIFF"


def test_resample_keeps_duration():
    assert len(resample(tone(1.0), RATE)) == OUTPUT_RATE
    x = tone(0.1, OUTPUT_RATE)
    assert np.array_equal(resample(x, OUTPUT_RATE), x)


def test_unknown_format_and_missing_encoder(monkeypatch):
    with pytest.raises(ValueError, match="unknown audio format"):
        StreamEncoder("ogg-vorbis")
    monkeypatch.setitem(FORMATS, "mp3", encode.AudioFormat("mp3", "audio/mpeg", "mp3", "no-such-encoder"))
    with pytest.raises(EncoderUnavailableError, match="no-such-encoder"):
        StreamEncoder("mp3")
