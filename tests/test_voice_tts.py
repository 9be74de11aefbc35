"""Speech out: Piper sentence by sentence, the lexicon and SSML spliced in, the espeak-ng fallback."""

import shutil

import numpy as np
import pytest

from fleetlm.voice import tts
from fleetlm.voice.lexicon import LexiconEntry, LexiconError
from fleetlm.voice.ssml import Segment, SsmlError
from fleetlm.voice.tts import (
    SpeechError,
    VoiceUnavailableError,
    plan_speech,
    synthesize,
    to_espeak_mnemonics,
)
from fleetlm.voice.voices import UnknownVoiceError

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
NO_LEXICON: dict = {}


@pytest.fixture(scope="module")
def voice():
    return tts.piper_voice()  # loaded once for the module (and the process)


def seconds(chunks):
    return sum(len(a) / r for a, r in chunks)


def test_one_chunk_per_sentence_of_plausible_length(voice):
    chunks = list(synthesize("The cat sat down. It was tired.", stored_lexicon=NO_LEXICON))
    assert len(chunks) == 2
    for samples, rate in chunks:
        assert samples.dtype == np.int16 and rate == voice.config.sample_rate
        assert 0.5 < len(samples) / rate < 4.0
        assert np.abs(samples).max() > 3000  # speech, not silence


def test_speed_shortens_the_audio(voice):
    text = "Speed changes how long this takes."
    normal = seconds(synthesize(text, stored_lexicon=NO_LEXICON))
    fast = seconds(synthesize(text, speed=2.0, stored_lexicon=NO_LEXICON))
    assert fast < 0.7 * normal


def test_lexicon_ipa_reaches_piper_as_phonemes(voice):
    plan = plan_speech("I like NASA.", lexicon={"nasa": {"ipa": "nˈæsə"}}, stored_lexicon=NO_LEXICON)
    assert Segment("phonemes", "nˈæsə") in plan.segments
    (phonemes,) = voice.phonemize(tts._piper_text(plan.segments))
    assert "nˈæsə" in "".join(phonemes)


def test_the_per_request_lexicon_wins_over_the_stored_one_and_comes_before_normalisation():
    stored = {"dr.": LexiconEntry(say="Drive"), "nasa": LexiconEntry(say="nassa")}
    plan = plan_speech("Dr. Who and NASA", lexicon={"NASA": "gnasa"}, stored_lexicon=stored)
    spoken = [s.value for s in plan.segments if s.kind == "words"]
    assert spoken[0] == "Drive" and "gnasa" in spoken and "nassa" not in spoken


def test_ssml_break_is_silence_of_that_length(voice):
    chunks = list(synthesize('<speak>One. <break time="700ms"/> Two.</speak>', stored_lexicon=NO_LEXICON))
    assert len(chunks) == 3
    pause, rate = chunks[1]
    assert len(pause) == round(0.7 * rate) and not pause.any()


def test_bad_inputs_are_typed_errors():
    with pytest.raises(SpeechError, match="speed"):
        plan_speech("hi", speed=5.0, stored_lexicon=NO_LEXICON)
    with pytest.raises(SpeechError, match="empty"):
        plan_speech("   ", stored_lexicon=NO_LEXICON)
    with pytest.raises(SpeechError, match="nothing to speak"):
        plan_speech('<speak><break time="1s"/></speak>', stored_lexicon=NO_LEXICON)
    with pytest.raises(UnknownVoiceError) as info:
        plan_speech("hi", voice="galadriel", stored_lexicon=NO_LEXICON)
    assert info.value.param == "voice"
    with pytest.raises(LexiconError, match="phoneme set"):
        plan_speech("hi", lexicon={"hi": {"ipa": "h☃"}}, stored_lexicon=NO_LEXICON)
    with pytest.raises(SsmlError, match="phoneme set"):
        plan_speech('<speak><phoneme ph="☃">x</phoneme></speak>', stored_lexicon=NO_LEXICON)


def test_ipa_to_espeak_mnemonics():
    assert to_espeak_mnemonics("nˈæsə") == "n'as@"
    assert to_espeak_mnemonics("θˈɔːt") == "T'O:t"
    assert to_espeak_mnemonics("ʘ") is None  # not English: the fallback speaks the word as written


@needs_espeak
def test_espeak_speaks_with_the_lexicon():
    plain = list(synthesize("I like NASA. Yes.", engine="espeak", stored_lexicon=NO_LEXICON))
    assert len(plain) == 2 and all(r == tts.ESPEAK_RATE for _, r in plain)
    assert seconds(plain) > 0.8
    spliced = tts._espeak_text(plan_speech("NASA", lexicon={"nasa": {"ipa": "nˈæsə"}},
                                           stored_lexicon=NO_LEXICON).segments)
    assert spliced == "[[n'as@]]"


@needs_espeak
def test_a_piper_voice_that_cannot_load_falls_back_to_espeak(monkeypatch):
    monkeypatch.setattr(tts, "_PIPER", None)
    monkeypatch.setattr(tts, "_PIPER_FAILURE", "OSError: broken model")
    assert plan_speech("hi", stored_lexicon=NO_LEXICON).engine == "espeak"
    with pytest.raises(VoiceUnavailableError, match="broken model"):
        plan_speech("hi", engine="piper", stored_lexicon=NO_LEXICON)
