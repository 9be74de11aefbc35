"""The round trip's sentence set, hard words and WER scoring (fleetlm.voice.roundtrip): no model is loaded."""

import re

import pytest

from fleetlm.voice import roundtrip as rt


@pytest.fixture(scope="module")
def sentences() -> list[rt.Sentence]:
    return rt.sentence_set()


def test_the_set_has_at_least_200_sentences_in_every_category(sentences):
    assert len(sentences) >= 200
    counts = {c: sum(s.category == c for s in sentences) for c in rt.CATEGORIES}
    assert min(counts.values()) >= 10, counts
    assert len({s.id for s in sentences}) == len(sentences)
    assert len({s.text for s in sentences}) >= 0.95 * len(sentences)  # the seeded values vary


def test_every_reference_is_words_only(sentences):
    for s in sentences:
        assert s.reference, s.id
        assert re.fullmatch(r"[a-z' ]+", s.reference), (s.id, s.reference)


def test_the_set_is_seeded_and_its_prefix_covers_every_category():
    assert rt.sentence_set(seed=3) == rt.sentence_set(seed=3)
    assert rt.sentence_set(seed=3) != rt.sentence_set(seed=4)
    assert {s.category for s in rt.sentence_set(len(rt.CATEGORIES))} == set(rt.CATEGORIES)


def test_the_input_text_read_as_a_transcript_scores_zero(sentences):
    # the references and the scorer's written-form rules agree: a transcript that spells the input
    # exactly as it was written is heard as the reference
    assert [s.id for s in sentences if rt.word_errors(s.reference, s.text).wer] == []


@pytest.mark.parametrize(("written", "spoken"), [
    ("Dr. Smith paid $4.50 on 3/5/2024.", "doctor smith paid four dollars fifty cents on march fifth twenty "
                                          "twenty four"),
    ("at 3.30pm, the FB-I called NASA", "at three thirty pm the fbi called nasa"),
    ("land at 645 PM, start at 22.55, rods of 22.55 m", "land at six forty five pm start at twenty two fifty "
                                                        "five rods of twenty two point five five m"),
    ("57MPH, 58 kW, 2.5kg, the 17th", "fifty seven mph fifty eight kilowatts two point five kilograms the "
                                      "seventeenth"),
    ("Call 555-0134 at 9 a.m.", "call five five five zero one three four at nine am"),
    ("the f b i at nine a m", "the fbi at nine am"),
    ("one hundred and five", "one hundred five"),
    ("bread and butter", "bread and butter"),
    ("ten oh five", "ten zero five"),
    ("St. Louis is on Elm St. now", "saint louis is on elm street now"),
    ("The CEO earned $2.5 million in 2023.", "the ceo earned two point five million dollars in twenty twenty "
                                             "three"),
    ("£45.20 and €1", "forty five pounds twenty pence and one euro"),
    ("It fell to -5 degrees, 10-20 km", "it fell to minus five degrees ten twenty kilometers"),
    ("the 21st of December 2008; 5 March",
     "the twenty first of december two thousand eight the fifth of march"),
    ("1 lb, 3 lbs, 40 mph", "one pound three pounds forty miles per hour"),
    ("Beyoncé O'Brien o'clock", "beyonce obrien oclock"),
    ("Pi is 3.1415, Tom & Jerry 12%", "pi is three point one four one five tom and jerry twelve percent"),
])
def test_spoken_form_turns_written_forms_into_words(written, spoken):
    assert rt.spoken_form(written) == spoken


def test_word_errors_count_substitutions_deletions_insertions():
    assert rt.word_errors("the cat sat", "the cat sat") == rt.Errors(0, 0, 0, 3)
    assert rt.word_errors("the cat sat", "the bat sat") == rt.Errors(1, 0, 0, 3)
    assert rt.word_errors("the cat sat", "the sat") == rt.Errors(0, 1, 0, 3)
    assert rt.word_errors("the cat sat", "the cat sat down") == rt.Errors(0, 0, 1, 3)
    assert rt.word_errors("the cat sat", "") == rt.Errors(0, 3, 0, 3)
    assert rt.word_errors("the cat sat", "The cat, sat!").wer == 0.0
    with pytest.raises(ValueError, match="no words"):
        rt.word_errors("", "anything")


def test_wer_is_summed_over_items_not_averaged():
    # 1 error in 1 word and 0 in 3: the corpus WER is 1/4, not the mean of 1.0 and 0.0
    assert rt.wer(["hello", "the cat sat"], ["yellow", "the cat sat"]) == pytest.approx(0.25)
    assert rt.wer(["paid $4.50"], ["paid four dollars and fifty cents"]) == 0.0
    with pytest.raises(ValueError, match="2 references but 1"):
        rt.wer(["a", "b"], ["a"])


def test_reference_number_words():
    assert rt.money("4.50", "dollar") == "four dollars and fifty cents"
    assert rt.money("1.01", "dollar") == "one dollar and one cent"
    assert rt.money("3", "pound", rt.PENCE) == "three pounds"
    assert rt.clock(10, 5) == "ten oh five" and rt.clock(3, 0) == "three"
    assert rt.year(2024) == "twenty twenty four" and rt.year(2008) == "two thousand eight"
    assert rt.cardinal("1,234") == "one thousand two hundred thirty four"
    assert rt.decimal("3.05") == "three point zero five"


def test_hard_words_have_valid_lexicon_entries():
    from fleetlm.voice.lexicon import piper_phonemes

    assert len(rt.HARD_WORDS) >= 30
    assert len({h.word.lower() for h in rt.HARD_WORDS}) == len(rt.HARD_WORDS)
    known = piper_phonemes()
    for h in rt.HARD_WORDS:
        assert h.carrier.count("@") == 1, h.word
        assert h.ipa and set(h.ipa) <= known, (h.word, set(h.ipa) - known)
        assert h.word in h.text and h.lexicon() == {h.word: {"ipa": h.ipa}}


def test_contains_word_matches_whole_words_of_any_accepted_spelling():
    assert rt.contains_word("Install NumPy before you run it.", ["NumPy"])
    assert rt.contains_word("install numpy first", ["NumPy"])
    assert not rt.contains_word("install num pie first", ["NumPy"])
    assert not rt.contains_word("the gnocchis", ["gnocchi"])
    kyiv = next(h for h in rt.HARD_WORDS if h.word == "Kyiv")
    assert rt.contains_word("News from Kiev today.", kyiv.spellings)
    assert rt.contains_word("She sang Beyoncé songs", ["Beyonce"])
