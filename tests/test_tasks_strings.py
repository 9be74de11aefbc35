import random
import re
import statistics

from fleetlm.tasks import strings


def _draw(level: int, n: int = 400):
    rng = random.Random(10 + level)
    return [strings.generate(rng, level) for _ in range(n)]


def _check(question: str) -> str:
    """Solve a strings question from its text alone."""
    if m := re.fullmatch(r"Reverse: ([a-z]+)", question):
        return "".join(reversed(list(m[1])))
    if m := re.fullmatch(r"Sort the letters: ([a-z]+)", question):
        return "".join(sorted(m[1]))
    if m := re.fullmatch(r"Count '([a-z])' in: ([a-z]+)", question):
        return str(sum(1 for c in m[2] if c == m[1]))
    if m := re.fullmatch(r"Uppercase: ([A-Za-z]+)", question):
        return "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in m[1])
    if m := re.fullmatch(r"Lowercase: ([A-Za-z]+)", question):
        return "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in m[1])
    if m := re.fullmatch(r"(First|Last) (\d+) letters of: ([a-z]+)", question):
        n, w = int(m[2]), m[3]
        assert 1 <= n <= len(w)
        return w[:n] if m[1] == "First" else w[len(w) - n:]
    raise AssertionError(f"unparsed question {question!r}")


def test_gold_answers_match_an_independent_solver():
    for level in strings.LEVELS:
        for t in _draw(level):
            assert t.answer == _check(t.question), t.question


def test_level_sets_the_word_length_and_every_kind_appears():
    for level in strings.LEVELS:
        tasks = _draw(level)
        assert {len(t.question.rsplit(" ", 1)[1]) for t in tasks} == {strings.LENGTHS[level]}
        assert {t.kind for t in tasks} == set(strings.KINDS)


def test_answers_grow_longer_with_level():
    means = [statistics.mean(len(t.answer) for t in _draw(level)) for level in strings.LEVELS]
    assert all(b > a for a, b in zip(means, means[1:], strict=False)), means


def test_count_questions_are_not_mostly_zero():
    counts = [t.answer for t in _draw(4, 1000) if t.kind == "count"]
    assert sum(a == "0" for a in counts) < 0.5 * len(counts)
