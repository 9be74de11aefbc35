"""Tests of the visual-QA document set: determinism by seed, grounded answers, rendering, the scorer."""

from __future__ import annotations

import re

import numpy as np
import pytest

from fleetlm.vision.docset import (
    KINDS,
    SKILLS,
    Document,
    available_fonts,
    contains_match,
    exact_match,
    generate_set,
    make_document,
    normalize_answer,
)


@pytest.fixture(scope="module")
def docset() -> tuple[list[Document], list]:
    return generate_set(300, seed=0)


def test_the_set_has_the_questions_asked_for_in_every_kind_and_skill(docset):
    docs, questions = docset
    assert len(questions) == 300
    assert len({q.id for q in questions}) == 300
    assert {q.kind for q in questions} == set(KINDS)
    assert {q.skill for q in questions} == set(SKILLS)
    assert {d.kind for d in docs} == set(KINDS)


def test_same_seed_same_documents_and_pixels_other_seed_other_documents():
    a, b, c = make_document(3, seed=5), make_document(3, seed=5), make_document(3, seed=6)
    assert (a.rows, a.questions, a.style) == (b.rows, b.questions, b.style)
    assert np.array_equal(np.asarray(a.render()), np.asarray(b.render()))
    assert a.text != c.text


def test_every_answer_is_grounded_in_the_ground_truth(docset):
    docs, questions = docset
    text_of = {d.id: d.text.splitlines() for d in docs}
    for q in questions:
        lines = text_of[q.document]
        assert (q.evidence or q.skill == "count") and all(e in lines for e in q.evidence), q
        if q.skill == "count":  # the answer is how many rows answer it, each a different row
            assert int(q.answer) == len(q.evidence) == len(set(q.evidence)), q
        else:  # the answer is printed on a row that answers it
            assert any(q.answer in e for e in q.evidence), q


def test_receipt_counts_agree_with_a_recount_of_the_printed_prices(docset):
    docs, _ = docset
    checked = 0
    for doc in docs:
        for q in doc.questions:
            m = re.fullmatch(r"How many items cost more than \$(\d+)\?", q.question)
            if not m:
                continue
            rules = [i for i, r in enumerate(doc.rows) if r.layout == "rule"]
            items = doc.rows[rules[0] + 1:rules[1]]
            assert int(q.answer) == sum(float(r.cells[-1]) > int(m.group(1)) for r in items)
            checked += 1
    assert checked > 0


def test_table_compare_answers_are_the_extreme_row(docset):
    docs, _ = docset
    checked = 0
    for doc in (d for d in docs if d.kind == "table"):
        header = next(r for r in doc.rows if r.layout == "grid" and r.bold)
        body = [r for r in doc.rows if r.layout == "grid" and not r.bold]
        for q in (q for q in doc.questions if q.skill == "compare"):
            m = re.fullmatch(r"Which \w+ has the (largest|smallest) (.+)\?", q.question)
            col = header.cells.index(m.group(2))
            pick = max if m.group(1) == "largest" else min
            assert pick(body, key=lambda r: float(r.cells[col].replace(",", ""))).cells[0] == q.answer
            checked += 1
    assert checked > 0


def test_every_kind_renders_an_rgb_page_with_ink(docset):
    docs, _ = docset
    for doc in docs[:len(KINDS)]:
        img = doc.render()
        assert img.mode == "RGB" and img.width >= 360 and img.height > 100
        pixels = np.asarray(img.convert("L"))
        assert (pixels < 100).mean() > 0.005 or (pixels > 180).mean() > 0.005  # dark ink or light text
        assert pixels.std() > 20


def test_the_style_varies_across_the_set(docset):
    docs, _ = docset
    styles = [d.style for d in docs]
    assert len({s.font_size for s in styles}) > 5
    assert any(s.rotation_deg for s in styles) and any(not s.rotation_deg for s in styles)
    assert len({s.font for s in styles}) == min(len(available_fonts()), 8) or not available_fonts()
    assert any(s.dark for s in styles)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="unknown document kind"):
        make_document(0, kind="poster")
    with pytest.raises(ValueError, match="n_questions"):
        generate_set(0)


@pytest.mark.parametrize(("reply", "answer"), [
    ("$1,234.50", "1,234.50"), ("1234.5", "1,234.50"), ("42.10\nbecause the receipt says so", "42.10"),
    ("northside hardware.", "Northside Hardware"), ("  INV-30172 ", "INV-30172"), ("7", "7"),
    ("£ 3.37", "3.37"), ('"Mar 2, 2025"', "Mar 2, 2025"),
])
def test_exact_match_ignores_case_currency_separators_and_edges(reply, answer):
    assert exact_match(reply, answer)


@pytest.mark.parametrize(("reply", "answer"), [
    ("The total is 42.10.", "42.10"), ("12", "2"), ("42.11", "42.10"), ("", "7"), (None, "7"),
    ("1,2", "12"), ("Mar 2 2025", "Mar 2, 2025x"),
])
def test_exact_match_refuses_other_values_and_extra_words(reply, answer):
    assert not exact_match(reply, answer)


def test_contains_match_finds_the_answer_as_whole_words_only():
    assert contains_match("The total is $42.10.", "42.10")
    assert contains_match("It is billed to Laura Schmidt, see above", "Laura Schmidt")
    assert not contains_match("The count is 12", "2")
    assert not contains_match(None, "2")


def test_normalize_answer_canonical_numbers():
    assert normalize_answer("$8,976.820") == "8976.82"
    assert normalize_answer("10.0") == "10"
    assert normalize_answer("Version 2.10.75") == "version 2.10.75"
