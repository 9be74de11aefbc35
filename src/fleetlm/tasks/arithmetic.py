"""Integer +, - and * where the level is the number of digits of each operand (1 to 6)."""

from __future__ import annotations

import random

from fleetlm.tasks.base import Task

DOMAIN = "arithmetic"
LEVELS = (1, 2, 3, 4, 5, 6)
OPS = ("+", "-", "*")
KINDS = {"+": "add", "-": "sub", "*": "mul"}


def operand(rng: random.Random, digits: int) -> int:
    # 1-digit operands include 0; longer ones have exactly `digits` digits (no leading zero).
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def generate(rng: random.Random, level: int) -> Task:
    a, b = operand(rng, level), operand(rng, level)
    op = rng.choice(OPS)
    result = a + b if op == "+" else a - b if op == "-" else a * b
    return Task(DOMAIN, level, KINDS[op], f"{a} {op} {b} =", str(result), "number")
