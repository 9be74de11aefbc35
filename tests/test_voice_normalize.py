"""Tests of fleetlm.voice.normalize: one case per rule, SSML say-as, bad input, fuzz, idempotence, speed."""

from __future__ import annotations

import random
import time

import pytest

from fleetlm.voice.normalize import SAY_AS_KINDS, normalize_text, say_as

RULES = [
    # cardinals, decimals, negatives
    ("1,234", "one thousand two hundred thirty-four"),
    ("3.5", "three point five"),
    ("0.25", "zero point two five"),
    (".5", "point five"),
    ("-7 degrees", "minus seven degrees"),
    ("007", "zero zero seven"),
    ("10 - 3", "ten minus three"),
    ("v1.2.3", "v one point two point three"),
    ("1234567890123456", "one two three four five six seven eight nine zero one two three four five six"),
    # ordinals
    ("the 21st and 3rd", "the twenty-first and third"),
    ("1,000,000th", "one millionth"),
    # years, and four digits that are not one
    ("in 1999", "in nineteen ninety-nine"),
    ("It was 2024.", "It was twenty twenty-four."),
    ("2024", "twenty twenty-four"),
    ("since 2005", "since two thousand five"),
    ("2024 people", "two thousand twenty-four people"),
    ("from 1990 to 1995", "from nineteen ninety to nineteen ninety-five"),
    ("the 1990s", "the nineteen nineties"),
    ("the '90s", "the nineties"),
    ("In 1066, the Normans came.", "In ten sixty-six, the Normans came."),
    ("Q3 2024", "Q three twenty twenty-four"),
    ("in FY2023", "in F Y twenty twenty-three"),
    # money
    ("$4.50", "four dollars and fifty cents"),
    ("$1", "one dollar"),
    ("$0.99", "ninety-nine cents"),
    ("€10", "ten euros"),
    ("£3", "three pounds"),
    ("£3.01", "three pounds and one penny"),
    ("$1.2 million", "one point two million dollars"),
    ("$5M", "five million dollars"),
    ("USD 5", "five dollars"),
    ("5 EUR", "five euros"),
    ("-$5", "minus five dollars"),
    ("¥100", "one hundred yen"),
    # percentages
    ("50%", "fifty percent"),
    ("-2.5%", "minus two point five percent"),
    ("10-20%", "ten to twenty percent"),
    # dates
    ("2024-03-05", "March fifth, twenty twenty-four"),
    ("03/05/2024", "March fifth, twenty twenty-four"),
    ("March 5, 2024", "March fifth, twenty twenty-four"),
    ("5 March 2024", "the fifth of March, twenty twenty-four"),
    ("Jan. 5th", "January fifth"),
    ("Sept 2024", "September twenty twenty-four"),
    ("10.5.2024", "the tenth of May, twenty twenty-four"),
    ("due on 12/25.", "due on December twenty-fifth."),
    ("2024-13-45", "two thousand twenty-four to thirteen to forty-five"),  # no such date: a range
    # times
    ("3:30 pm", "three thirty p m"),
    ("3:30pm", "three thirty p m"),
    ("15:45", "fifteen forty-five"),
    ("9:05", "nine oh five"),
    ("7:00", "seven o'clock"),
    ("17:00", "seventeen hundred"),
    ("at 5 p.m. sharp", "at five p m sharp"),
    ("10:15 AM", "ten fifteen a m"),
    ("10am-2pm", "ten a m to two p m"),
    ("9:00–17:00", "nine o'clock to seventeen hundred"),
    ("12:00:30", "twelve o'clock and thirty seconds"),
    # phone numbers
    ("call 555-123-4567", "call five five five, one two three, four five six seven"),
    ("(555) 123-4567", "five five five, one two three, four five six seven"),
    ("Call me at 636-3376.", "Call me at six three six, three three seven six."),
    ("pages 100-2000", "pages one hundred to two thousand"),
    ("+44 20 7946 0958", "plus four four, two zero, seven nine four six, zero nine five eight"),
    # ranges
    ("pages 10-20", "pages ten to twenty"),
    ("1990–1995", "nineteen ninety to nineteen ninety-five"),
    ("$5-10", "five dollars to ten"),
    ("$3.99–$5.99", "three dollars and ninety-nine cents to five dollars and ninety-nine cents"),
    # units
    ("5 kg", "five kilograms"),
    ("1 kg", "one kilogram"),
    ("10 km", "ten kilometers"),
    ("3 ms", "three milliseconds"),
    ("2-3 kg", "two to three kilograms"),
    ("20°C", "twenty degrees Celsius"),
    ("8GB", "eight gigabytes"),
    # fractions
    ("1/2 cup", "one half cup"),
    ("add 3/4 cup", "add three quarters cup"),
    ("5/8 inch", "five eighths inch"),
    ("24/7", "twenty-four seven"),
    # abbreviations
    ("Dr. Smith", "Doctor Smith"),
    ("Mr. and Mrs. Jones", "Mister and Missus Jones"),
    ("St. Louis", "Saint Louis"),
    ("42 Main St.", "forty-two Main Street."),
    ("on Main St. in town", "on Main Street in town"),
    ("Elm Dr. and Dr. Who", "Elm Drive and Doctor Who"),
    ("apples, etc.", "apples, et cetera."),
    ("apples, etc. and pears", "apples, et cetera and pears"),
    ("e.g., this", "for example, this"),
    ("i.e. that", "that is that"),
    ("cats vs. dogs", "cats versus dogs"),
    ("Acme Inc. makes", "Acme Incorporated makes"),
    ("No. 5", "number five"),
    ("the U.S. Army", "the U S Army"),
    # acronyms
    ("FBI", "F B I"),
    ("HTML", "H T M L"),
    ("NASA", "NASA"),
    ("the FBI and CIA", "the F B I and C I A"),
    ("WATCH OUT NOW", "WATCH OUT NOW"),
    ("four GPUs", "four G P U's"),
    ("OK", "okay"),
    # symbols
    ("AT&T", "A T and T"),
    ("C++", "C plus plus"),
    ("me@example.com", "me at example dot com"),
    ("#1", "number one"),
    ("#tag", "hash tag"),
    ("50 % off", "fifty percent off"),
    # whitespace
    ("  lots   of\n\n space \t ", "lots of\nspace"),
    ("wait , what", "wait, what"),
]


@pytest.mark.parametrize(("text", "spoken"), RULES)
def test_normalize_text_reads_each_kind(text: str, spoken: str) -> None:
    assert normalize_text(text) == spoken


SAY_AS = [
    ("42", "cardinal", None, "forty-two"),
    ("-3.5", "number", None, "minus three point five"),
    ("3", "ordinal", None, "third"),
    ("21st", "ordinal", None, "twenty-first"),
    ("FBI", "characters", None, "F B I"),
    ("a1-b", "spell-out", None, "A one dash B"),
    ("12345", "digits", None, "one two three four five"),
    ("03/05/2024", "date", "mdy", "March fifth, twenty twenty-four"),
    ("05/03/2024", "date", "dmy", "the fifth of March, twenty twenty-four"),
    ("2024-03-05", "date", None, "March fifth, twenty twenty-four"),
    ("03/05", "date", "md", "March fifth"),
    ("1999", "date", "y", "nineteen ninety-nine"),
    ("March 2024", "date", "my", "March twenty twenty-four"),
    ("3:30pm", "time", None, "three thirty p m"),
    ("15:45", "time", None, "fifteen forty-five"),
    ("555-123-4567", "telephone", None, "five five five, one two three, four five six seven"),
    ("$4.50", "currency", None, "four dollars and fifty cents"),
    ("10", "currency", "EUR", "ten euros"),
    ("hello", "cardinal", None, "hello"),  # content that does not fit the kind is read as text
    ("13/45/2024", "date", "mdy", "thirteen/forty-five/twenty twenty-four"),
]


@pytest.mark.parametrize(("text", "kind", "format", "spoken"), SAY_AS)
def test_say_as_reads_each_kind(text: str, kind: str, format: str | None, spoken: str) -> None:
    assert say_as(text, kind, format) == spoken


def test_say_as_lists_its_kinds() -> None:
    assert {"cardinal", "ordinal", "characters", "spell-out", "date", "time", "telephone", "currency"} <= set(
        SAY_AS_KINDS
    )


@pytest.mark.parametrize(
    ("kind", "format", "named"), [("whisper", None, "'whisper'"), ("date", "qq", "'qq'")]
)
def test_say_as_rejects_an_unknown_kind_or_date_format(kind: str, format: str | None, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        say_as("1/2/2024", kind, format)


# tokens that trigger the rules, run together in random orders, plus random code points
_FUZZ_TOKENS = [
    "1", "12", "1999", "2024", "3.5", "1,234", "-", "–", "$", "€", "£", "%", ":", "/", ".", ",", " ", "\n",
    "St.", "Dr.", "Mr.", "etc.", "e.g.", "No.", "Jan.", "March", "May", "pm", "a.m.", "kg", "s", "ms", "FBI",
    "NASA", "STOP", "OK", "HTML", "A", "&", "+", "@", "#", "x", "Main", "th", "'", "(", ")", "USD", "k", "M",
    "million", "in", "to", "U.S.", "é", "٣", "²", "\u2028", "\x00", "°C", "Inc.", "vs", "0", "07",
]


def _fuzz_inputs(count: int) -> list[str]:
    rng = random.Random(15)
    inputs = []
    for _ in range(count):
        if rng.random() < 0.3:
            inputs.append("".join(chr(rng.randrange(0, 0x30000)) for _ in range(rng.randrange(0, 24))))
        else:
            inputs.append("".join(rng.choice(_FUZZ_TOKENS) for _ in range(rng.randrange(1, 12))))
    return inputs


def test_normalize_text_never_crashes_leaves_no_digit_and_is_idempotent() -> None:
    for text in _fuzz_inputs(2000) + [case for case, _ in RULES]:
        spoken = normalize_text(text)
        assert not any(c.isascii() and c.isdigit() for c in spoken), (text, spoken)
        assert normalize_text(spoken) == spoken, (text, spoken)


def test_say_as_never_crashes_on_random_text() -> None:
    for text in _fuzz_inputs(300):
        for kind in SAY_AS_KINDS:
            for format in (None, "dmy"):
                assert isinstance(say_as(text, kind, format), str)


def _long_text(length: int, seed: int) -> str:
    """Prose that runs most rules, its numbers drawn at random (so the number-word cache does not flatter)."""
    rng = random.Random(seed)
    sentences = []
    while sum(map(len, sentences)) < length:
        n = rng.randrange(10, 10**6)
        sentences.append(
            f"On March {n % 28 + 1}, {1900 + n % 120} Dr. Smith paid ${n:,}.{n % 100:02d} for {n % 97} kg at "
            f"{n % 12 + 1}:{n % 60:02d} pm, i.e. {n % 100}% off; call 555-{n % 900 + 100}-{n % 9000 + 1000}. "
            f"The FBI and NASA met at {n % 300} Main St. Then {n:,} people came, etc. "
        )
    return "".join(sentences)[:length]


def test_a_long_input_is_fast() -> None:
    normalize_text("On May 1, 1999 at 3:30 pm $4.50 5 kg 1st 50%")  # num2words loads its English on first use
    seconds = []
    for seed in range(3):  # the best of three fresh texts: the machine is shared, other work stalls a run
        text = _long_text(4096, seed)
        start = time.perf_counter()
        spoken = normalize_text(text)
        seconds.append(time.perf_counter() - start)
        assert "Doctor Smith" in spoken
    assert min(seconds) < 0.05, f"{min(seconds) * 1000:.1f} ms for 4,096 characters"
