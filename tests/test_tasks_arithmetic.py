import random
import re
import statistics

from fleetlm.tasks import arithmetic

PATTERN = re.compile(r"^(-?\d+) ([+*-]) (-?\d+) =$")


def _draw(level: int, n: int = 300):
    rng = random.Random(level)
    return [arithmetic.generate(rng, level) for _ in range(n)]


def test_gold_answers_match_an_independent_evaluation():
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for level in arithmetic.LEVELS:
        for t in _draw(level):
            m = PATTERN.match(t.question)
            assert m, t.question
            a, op, b = int(m[1]), m[2], int(m[3])
            assert int(t.answer) == ops[op](a, b)
            assert t.kind == arithmetic.KINDS[op] and t.check == "number"


def test_level_is_the_number_of_digits_of_each_operand():
    for level in arithmetic.LEVELS:
        for t in _draw(level, 100):
            m = PATTERN.match(t.question)
            assert len(m[1]) == len(m[3]) == level


def test_answers_grow_longer_with_level():
    means = [statistics.mean(len(t.answer.lstrip("-")) for t in _draw(level)) for level in arithmetic.LEVELS]
    assert all(b > a + 0.5 for a, b in zip(means, means[1:], strict=False)), means


def test_all_three_operations_appear():
    assert {t.kind for t in _draw(3)} == {"add", "sub", "mul"}
