"""Letter-string chores: reverse, sort, count a letter, change case, first/last n; level = length."""

from __future__ import annotations

import random
import string

from fleetlm.tasks.base import Task

DOMAIN = "strings"
LEVELS = (1, 2, 3, 4, 5, 6)
LENGTHS = {1: 3, 2: 5, 3: 7, 4: 10, 5: 14, 6: 20}
KINDS = ("reverse", "sort", "count", "upper", "lower", "first", "last")


def word(rng: random.Random, length: int, mixed_case: bool = False) -> str:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(length)]
    if mixed_case:
        letters = [c.upper() if rng.random() < 0.5 else c for c in letters]
    return "".join(letters)


def generate(rng: random.Random, level: int) -> Task:
    length = LENGTHS[level]
    kind = rng.choice(KINDS)
    if kind == "reverse":
        w = word(rng, length)
        return Task(DOMAIN, level, kind, f"Reverse: {w}", w[::-1], "text_cs")
    if kind == "sort":
        w = word(rng, length)
        return Task(DOMAIN, level, kind, f"Sort the letters: {w}", "".join(sorted(w)), "text_cs")
    if kind == "count":
        w = word(rng, length)
        # Ask about a letter present in the word two times out of three, so that 0 is not the usual answer.
        letter = rng.choice(w) if rng.random() < 2 / 3 else rng.choice(string.ascii_lowercase)
        return Task(DOMAIN, level, kind, f"Count '{letter}' in: {w}", str(w.count(letter)), "number")
    if kind in ("upper", "lower"):
        w = word(rng, length, mixed_case=True)
        answer = w.upper() if kind == "upper" else w.lower()
        return Task(DOMAIN, level, kind, f"{kind.capitalize()}case: {w}", answer, "text_cs")
    w = word(rng, length)
    n = rng.randint(1, max(1, length - 1))
    answer = w[:n] if kind == "first" else w[-n:]
    return Task(DOMAIN, level, kind, f"{kind.capitalize()} {n} letters of: {w}", answer, "text_cs")
