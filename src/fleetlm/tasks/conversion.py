"""Unit conversion (length, mass, time) and numbers to words and back; level = digits of the number."""

from __future__ import annotations

import random
from decimal import Decimal, localcontext
from fractions import Fraction

from fleetlm.tasks.base import Task, TaskError

DOMAIN = "conversion"
LEVELS = (1, 2, 3, 4, 5, 6)
KINDS = ("units", "to_words", "from_words")

# Each unit's size in the category's base unit (m, g, s).
UNITS: dict[str, dict[str, int | Fraction]] = {
    "length": {"mm": Fraction(1, 1000), "cm": Fraction(1, 100), "m": 1, "km": 1000},
    "mass": {"mg": Fraction(1, 1000), "g": 1, "kg": 1000, "t": 1_000_000},
    "time": {"s": 1, "min": 60, "h": 3600, "day": 86400},
}

ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
        "sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
SCALES = ((1_000_000_000, "billion"), (1_000_000, "million"), (1000, "thousand"))


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(TENS[n // 10] + (f"-{ONES[n % 10]}" if n % 10 else ""))
    elif n or not words:
        words.append(ONES[n])
    return words


def number_to_words(n: int) -> str:
    """American English without "and": 342 -> "three hundred forty-two"."""
    if n < 0:
        return "minus " + number_to_words(-n)
    if n >= 1000 * SCALES[0][0]:
        raise TaskError(f"number too large to spell: {n}")
    words: list[str] = []
    for size, name in SCALES:
        if n >= size:
            words += _below_thousand(n // size) + [name]
            n %= size
    if n or not words:
        words += _below_thousand(n)
    return " ".join(words)


def words_to_number(text: str) -> int:
    """The inverse of number_to_words (accepts hyphens or spaces between tens and ones)."""
    values = {w: i for i, w in enumerate(ONES)} | {w: 10 * i for i, w in enumerate(TENS) if w != "_"}
    scales = {name: size for size, name in SCALES}
    tokens = text.lower().replace("-", " ").split()
    sign = -1 if tokens[:1] == ["minus"] else 1
    total = current = 0
    for tok in tokens[1:] if sign < 0 else tokens:
        if tok in values:
            current += values[tok]
        elif tok == "hundred":
            current *= 100
        elif tok in scales:
            total += current * scales[tok]
            current = 0
        else:
            raise TaskError(f"not a number word: {tok!r}")
    return sign * (total + current)


def format_exact(value: Fraction) -> str:
    """A terminating fraction as a plain decimal string without trailing zeros: 3/2 -> "1.5"."""
    with localcontext() as ctx:
        ctx.prec = 50
        d = Decimal(value.numerator) / Decimal(value.denominator)
    text = format(d.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _number(rng: random.Random, digits: int) -> int:
    return rng.randint(1 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def generate(rng: random.Random, level: int) -> Task:
    kind = rng.choice(KINDS)
    if kind == "to_words":
        n = _number(rng, level)
        return Task(DOMAIN, level, kind, f"In words: {n}", number_to_words(n), "words")
    if kind == "from_words":
        n = _number(rng, level)
        return Task(DOMAIN, level, kind, f"As a number: {number_to_words(n)}", str(n), "number")
    category = rng.choice(sorted(UNITS))
    names = sorted(UNITS[category], key=lambda u: UNITS[category][u])
    if level <= 3:
        # Easy levels only go to a smaller unit, so the answer is a whole number: 3 km -> 3000 m.
        i = rng.randrange(1, len(names))
        src, dst = names[i], names[rng.randrange(i)]
        value = _number(rng, level)
    else:
        # Harder levels go either way, so decimals appear: 4512 g -> 4.512 kg.
        src, dst = rng.sample(names, 2)
        value = _number(rng, level - 2)
    ratio = Fraction(UNITS[category][src]) / Fraction(UNITS[category][dst])
    if ratio.denominator > 1 and any(p not in (2, 5) for p in _prime_factors(ratio.denominator)):
        # Seconds to hours etc. would not terminate as decimals: ask about a whole multiple instead.
        value *= ratio.denominator
    return Task(DOMAIN, level, kind, f"Convert {value} {src} to {dst}", format_exact(value * ratio), "number")


def _prime_factors(n: int) -> set[int]:
    out, p = set(), 2
    while p * p <= n:
        while n % p == 0:
            out.add(p)
            n //= p
        p += 1
    return out | ({n} if n > 1 else set())
