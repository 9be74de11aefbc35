import random
import re
import statistics
from decimal import Decimal

import pytest

from fleetlm.tasks import conversion
from fleetlm.tasks.base import TaskError

KNOWN = {0: "zero", 7: "seven", 13: "thirteen", 20: "twenty", 42: "forty-two", 100: "one hundred",
         101: "one hundred one", 342: "three hundred forty-two", 1000: "one thousand",
         12005: "twelve thousand five", 999999: "nine hundred ninety-nine thousand nine hundred ninety-nine",
         1000000: "one million", 2000010: "two million ten", -15: "minus fifteen"}
# Independent unit table, as Decimals in the base unit.
SIZES = {"mm": "0.001", "cm": "0.01", "m": "1", "km": "1000", "mg": "0.001", "g": "1", "kg": "1000",
         "t": "1000000", "s": "1", "min": "60", "h": "3600", "day": "86400"}


def _draw(level: int, n: int = 300):
    rng = random.Random(30 + level)
    return [conversion.generate(rng, level) for _ in range(n)]


def test_number_words_known_values_and_round_trip():
    for n, words in KNOWN.items():
        assert conversion.number_to_words(n) == words
        assert conversion.words_to_number(words) == n
    rng = random.Random(0)
    for n in [rng.randrange(10**9) for _ in range(2000)]:
        assert conversion.words_to_number(conversion.number_to_words(n)) == n
    with pytest.raises(TaskError):
        conversion.words_to_number("three apples")


def test_gold_answers_match_an_independent_check():
    for level in conversion.LEVELS:
        for t in _draw(level):
            if m := re.fullmatch(r"Convert (\d+) (\w+) to (\w+)", t.question):
                expected = Decimal(m[1]) * Decimal(SIZES[m[2]]) / Decimal(SIZES[m[3]])
                assert Decimal(t.answer) == expected, t.question
                assert "e" not in t.answer.lower() and not t.answer.endswith(".0")
                assert m[2] != m[3]
            elif m := re.fullmatch(r"In words: (\d+)", t.question):
                assert len(m[1]) == level
                assert conversion.words_to_number(t.answer) == int(m[1])
                assert re.fullmatch(r"[a-z -]+", t.answer)
            else:
                m = re.fullmatch(r"As a number: ([a-z -]+)", t.question)
                assert m, t.question
                assert len(t.answer) == level and conversion.words_to_number(m[1]) == int(t.answer)


def test_easy_unit_levels_have_whole_answers_and_levels_grow_harder():
    for level in (1, 2, 3):
        assert all("." not in t.answer for t in _draw(level) if t.kind == "units")
    assert any("." in t.answer for t in _draw(5) if t.kind == "units")
    means = [statistics.mean(len(t.answer) for t in _draw(level) if t.kind != "units")
             for level in conversion.LEVELS]
    assert all(b > a for a, b in zip(means, means[1:], strict=False)), means


def test_format_exact():
    from fractions import Fraction

    assert conversion.format_exact(Fraction(3, 2)) == "1.5"
    assert conversion.format_exact(Fraction(3000)) == "3000"
    assert conversion.format_exact(Fraction(7, 1000000)) == "0.000007"
    assert conversion.format_exact(Fraction(0)) == "0"
