"""voice/asr.py: Whisper tiny.en on Piper's speech, window by window, timestamps placed in the file."""

import re
import tracemalloc
from types import SimpleNamespace

import jiwer
import numpy as np
import pytest

from fleetlm.voice import asr
from fleetlm.voice.audio_in import SAMPLE_RATE, Window
from voice_speech import speech_wav

FIRST = "The red fox jumps over the dog."
SECOND = "Call me back tomorrow."


def wer(reference: str, hypothesis: str) -> float:
    clean = lambda s: " ".join(re.sub(r"[^a-z' ]", " ", s.lower()).split())  # noqa: E731
    return jiwer.wer(clean(reference), clean(hypothesis))


@pytest.fixture(scope="module")
def two_sentences(tmp_path_factory):
    """FIRST, 1 s of silence, SECOND: about 4.5 s."""
    return speech_wav(tmp_path_factory.getbasetemp(), "two_sentences", [FIRST, SECOND], gap_s=1.0)


def test_transcribes_speech_with_word_timestamps(two_sentences):
    t = asr.transcribe(two_sentences, language="en", word_timestamps=True)
    assert wer(f"{FIRST} {SECOND}", t.text) <= 0.3, t.text
    assert t.language == "en" and 3.5 < t.duration < 7.0
    words = t.words
    assert len(words) >= 9
    assert all(a.start <= a.end <= b.start + 1e-6 for a, b in zip(words, words[1:], strict=False))
    assert words[-1].end <= t.duration
    fox = next(w for w in words if "fox" in w.word.lower())
    call = next(w for w in words if "call" in w.word.lower())
    assert fox.end < call.start  # the two sentences land in order, on either side of the silence


def test_windows_are_transcribed_in_turn_with_their_offsets(two_sentences):
    # 3 s windows: the cut falls in the silence, and the second sentence's times are offset past it
    t = asr.transcribe(two_sentences, window_s=3.0)
    assert wer(f"{FIRST} {SECOND}", t.text) <= 0.3, t.text
    assert [s.id for s in t.segments] == list(range(len(t.segments)))
    assert all(a.start <= a.end <= b.start for a, b in zip(t.segments, t.segments[1:], strict=False))
    later = [s for s in t.segments if "call" in s.text.lower()]
    assert later and later[0].start > 1.5 and later[0].seek > 150  # placed in the file, not at 0
    assert t.segments[-1].end <= t.duration


def test_silence_and_hiss_come_back_empty_and_fast(tmp_path):
    # without VAD, tiny.en hears "You" in 10 s of silence and climbs its temperature ladder on hiss
    from voice_speech import write_wav

    rng = np.random.default_rng(2)
    for name, samples in [("silence", np.zeros(10 * 22050)), ("hiss", rng.standard_normal(10 * 22050) * 300)]:
        path = tmp_path / f"{name}.wav"
        write_wav(path, samples.astype(np.int16), 22050)
        t = asr.transcribe(path)
        assert (t.text, t.segments, t.duration) == ("", [], 10.0), name


class FakeModel:
    """faster-whisper's transcribe, scripted: one segment per window, reaching a little past its end."""

    def __init__(self):
        self.prompts: list[str | None] = []

    def transcribe(self, samples, **kw):
        self.prompts.append(kw["initial_prompt"])
        length = len(samples) / SAMPLE_RATE
        raw = SimpleNamespace(start=0.2, end=length + 0.5, text=f" part {len(self.prompts)}", tokens=[1, 2],
                              temperature=kw["temperature"][0], avg_logprob=-0.1, compression_ratio=1.0,
                              no_speech_prob=0.0, seek=0, words=None)
        return iter([raw]), None


def test_times_are_clamped_to_their_window_and_the_prompt_carries_over(tmp_path):
    from voice_speech import write_wav

    path = tmp_path / "noise.wav"
    write_wav(path, (np.random.default_rng(1).standard_normal(12 * 22050) * 3000).astype(np.int16), 22050)
    model = FakeModel()
    t = asr.transcribe(path, prompt="Fleet, Whisper.", temperature=0.4, window_s=5.0, model=model)
    assert len(t.segments) == len(model.prompts) >= 3  # 12 s in windows of at most 5 s, one segment each
    assert all(s.end <= t.duration for s in t.segments)
    assert all(a.end <= b.start for a, b in zip(t.segments, t.segments[1:], strict=False))
    assert t.segments[1].start > 4.0
    assert {s.temperature for s in t.segments} == {0.4}  # one fixed temperature, no fallback ladder
    assert model.prompts[0] == "Fleet, Whisper." and model.prompts[1] == "Fleet, Whisper. part 1"
    assert t.text == " ".join(f"part {i}" for i in range(1, len(model.prompts) + 1))


def test_minutes_of_audio_are_transcribed_in_bounded_memory_with_monotonic_times(tmp_path):
    # the pipeline around the model over 5 minutes (the model scripted: the real one is the test above)
    from voice_speech import bursts_wav

    path = bursts_wav(tmp_path / "long.wav", 5)
    tracemalloc.start()
    try:
        t = asr.transcribe(path, model=FakeModel())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert t.duration == pytest.approx(300.0, abs=0.01) and len(t.segments) >= 10
    starts = [s.start for s in t.segments]
    assert starts == sorted(starts) and all(a.end <= b.start for a, b in zip(t.segments, t.segments[1:],
                                                                             strict=False))
    assert t.segments[-1].start > 270.0 and t.segments[-1].end <= 300.0
    assert peak < 4 * 30 * SAMPLE_RATE * 4  # a few 30 s windows, where the decoded file is 19 MB


def test_placed_segments_keep_their_words_inside_them():
    window = Window(10.0, np.zeros(3 * SAMPLE_RATE, np.float32))
    word = SimpleNamespace(start=-0.5, end=4.0, word=" hi", probability=0.5)
    raw = SimpleNamespace(start=0.5, end=9.0, text=" hi", tokens=[1], temperature=0.0, avg_logprob=-1.0,
                          compression_ratio=1.0, no_speech_prob=0.1, seek=50, words=[word])
    (s,) = asr._placed([raw], window, True, first_id=7, not_before=10.8)
    assert (s.id, s.start, s.end, s.seek) == (7, 10.8, 13.0, 1050)
    assert (s.words[0].start, s.words[0].end) == (10.8, 13.0)


def test_names_languages_and_temperatures():
    assert asr.local_model_for("whisper-1") == asr.local_model_for("gpt-4o-transcribe") == "whisper-tiny.en"
    assert asr.local_model_for("whisper-large-v3") is None
    asr.check_language("en")
    asr.check_language("English")
    with pytest.raises(asr.UnsupportedLanguage, match="English only"):
        asr.check_language("fr")
    with pytest.raises(asr.UnsupportedLanguage):
        asr.transcribe("/nonexistent.wav", language="de")
    with pytest.raises(ValueError):
        asr.transcribe("/nonexistent.wav", temperature=1.5)
    assert asr.load_model() is asr.load_model()  # loaded once per process
