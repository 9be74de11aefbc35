"""The pronunciation lexicon: entries checked against the voice's phonemes, stored atomically, applied."""

import json

import pytest

from fleetlm.voice.lexicon import (
    LexiconEntry,
    LexiconError,
    LexiconStore,
    apply_lexicon,
    parse_entries,
    parse_entry,
    piper_phonemes,
    validate_ipa,
)
from fleetlm.voice.ssml import Segment


def test_the_voice_knows_espeak_ipa_and_not_control_symbols():
    phonemes = piper_phonemes()
    assert {"ə", "ˈ", "ɹ", "θ", "æ"} <= phonemes
    assert not {"_", "^", "$"} & phonemes


def test_ipa_is_checked_phoneme_by_phoneme():
    assert validate_ipa(" nˈæsə ") == "nˈæsə"
    with pytest.raises(LexiconError, match="not in the voice's phoneme set") as info:
        validate_ipa("nˈæ☃sə")
    assert "U+2603" in str(info.value) and info.value.param == "ipa"
    with pytest.raises(LexiconError, match="empty"):
        validate_ipa("  ")


def test_entries_are_ipa_or_a_respelling():
    assert parse_entry({"ipa": "nˈæsə"}) == LexiconEntry(ipa="nˈæsə")
    assert parse_entry({"say": " nassa  please "}) == LexiconEntry(say="nassa please")
    assert parse_entry("nassa") == LexiconEntry(say="nassa")
    for bad in [{"ipa": "x", "say": "y"}, {}, {"ipa": 3}, ["x"], {"say": " "}]:
        with pytest.raises(LexiconError):
            parse_entry(bad)
    with pytest.raises(LexiconError, match="lexicon entry 'bad'"):
        parse_entries({"ok": "fine", "bad": {"ipa": "☃"}})


def test_matching_is_case_insensitive_whole_words_and_longest_first():
    entries = parse_entries({"nasa": {"ipa": "nˈæsə"}, "new york": "noo york", "new": "gnu"})
    segs = apply_lexicon("NASA flew to New   York, not to NASAL new places.", entries)
    assert segs == [
        Segment("phonemes", "nˈæsə"),
        Segment("text", " flew to "),
        Segment("words", "noo york"),
        Segment("text", ", not to NASAL "),
        Segment("words", "gnu"),
        Segment("text", " places."),
    ]


def test_abbreviations_with_dots_match_as_written():
    segs = apply_lexicon("Dr. Smith", parse_entries({"Dr.": "Doctor"}))
    assert segs == [Segment("words", "Doctor"), Segment("text", " Smith")]


def test_store_adds_lists_and_removes_durably(tmp_path):
    path = tmp_path / "voice" / "lexicon.json"
    store = LexiconStore(path)
    assert store.load() == {}
    assert store.add("  NASA ", LexiconEntry(ipa="nˈæsə")) == "nasa"
    store.add("Dr.", LexiconEntry(say="Doctor"))
    assert LexiconStore(path).load() == {"nasa": LexiconEntry(ipa="nˈæsə"), "dr.": LexiconEntry(say="Doctor")}
    assert json.loads(path.read_text())["version"] == 1
    assert store.remove("nasa") and not store.remove("nasa")
    assert list(store.load()) == ["dr."]
    assert [p.name for p in path.parent.iterdir()] == ["lexicon.json"]  # no temporary file left behind


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"version": 1, "entries": {"x": 5}}'])
def test_a_corrupt_file_is_a_clear_error(tmp_path, content):
    path = tmp_path / "lexicon.json"
    path.write_text(content)
    with pytest.raises(LexiconError, match="unreadable"):
        LexiconStore(path).load()
