"""rag/labelled.py: passages cut from Sphinx HTML, the hand-written questions and their gold passages.

The cutting is tested on a small page written inline; the checks against the real manual (gold ids exist,
evidence sits in the gold passage, paraphrased questions share few key words) skip when python3.11-doc is
not installed (`make kb-corpus`).
"""

import statistics
from collections import Counter

import pytest

from fleetlm.rag import labelled
from fleetlm.rag.labelled import (
    PAGES,
    CorpusMissing,
    cut_page,
    document_frequencies,
    keyword_overlap,
    load_corpus,
    load_questions,
    normalize,
)

# IDF-weighted share of a question's content words found in its gold passage (keyword_overlap). Measured on
# this set: lexical questions mean 0.80, paraphrased ones mean 0.28 and at most 0.50.
PARAPHRASE_MAX_OVERLAP = 0.5
PARAPHRASE_MAX_MEAN = 0.35
LEXICAL_MIN_MEAN = 0.7

PAGE = """<html><body><div class="sphinxsidebar">sidebar text, not content</div>
<div class="body" role="main">
<section id="module-spam"><h1>spam — Tins of meat<a class="headerlink" href="#module-spam">¶</a></h1>
<p>The spam module opens tins. It keeps a count of the tins it has opened so far today.</p>
<section id="functions"><h2>Functions<a class="headerlink" href="#functions">¶</a></h2>
<dl class="py function"><dt class="sig sig-object py" id="spam.open">spam.open(tin)</dt>
<dd><p>Open <em>tin</em> and return its contents as a list of slices, one per portion of meat.</p></dd></dl>
<dl class="py function"><dt class="sig sig-object py" id="spam.close">spam.close(tin)</dt>
<dd><p>Close the tin again with a lid that keeps the remaining slices fresh for another day.</p></dd></dl>
</section>
<section id="empty"><h2>Only a heading</h2></section>
</section></div><div class="footer">footer text</div></body></html>"""


def test_cut_page_gives_one_passage_per_section_with_its_own_text():
    passages = cut_page(PAGE, "library/spam.html")
    assert [p.id for p in passages] == ["library/spam.html#module-spam", "library/spam.html#functions"]
    top, functions = passages
    assert top.title == "spam — Tins of meat"
    assert top.text.startswith("spam — Tins of meat\nThe spam module opens tins.")
    assert "Open tin" not in top.text  # a subsection's text is its own passage
    assert functions.title == "spam — Tins of meat > Functions"
    assert "spam.open(tin)\nOpen tin and return its contents" in functions.text
    for passage in passages:
        assert "¶" not in passage.text and "sidebar" not in passage.text and "footer" not in passage.text


def test_long_sections_break_at_a_new_object_never_after_a_term(monkeypatch):
    monkeypatch.setattr(labelled, "MAX_WORDS", 25)
    monkeypatch.setattr(labelled, "MIN_WORDS_BEFORE_OBJECT_BREAK", 10)
    monkeypatch.setattr(labelled, "MIN_BODY_WORDS", 3)
    passages = cut_page(PAGE, "library/spam.html")
    parts = [p for p in passages if p.id.startswith("library/spam.html#functions")]
    assert [p.id for p in parts] == ["library/spam.html#functions", "library/spam.html#functions~1"]
    assert "spam.open(tin)\nOpen tin" in parts[0].text and "spam.close" not in parts[0].text
    assert parts[1].text.startswith("spam — Tins of meat > Functions\nspam.close(tin)\nClose the tin")
    assert cut_page(PAGE, "library/spam.html") == passages  # deterministic


def test_a_term_stays_with_its_description(monkeypatch):
    monkeypatch.setattr(labelled, "MAX_WORDS", 25)
    words = " ".join(["word"] * 20)
    blocks = [labelled._Block(words, False), labelled._Block("*?, +?", False, is_term=True),
              labelled._Block(words, False), labelled._Block(words + " " + words, False)]
    parts = labelled._pack(blocks)
    assert [len(part) for part in parts] == [3, 1]  # over the limit at the term's description, kept anyway


def test_missing_manual_says_how_to_install_it(tmp_path):
    with pytest.raises(CorpusMissing, match="make kb-corpus"):
        load_corpus(tmp_path)


def test_questions_are_well_formed():
    questions = load_questions()
    assert len(questions) >= 200
    assert len({q.id for q in questions}) == len(questions)
    assert len({normalize(q.question) for q in questions}) == len(questions)
    for q in questions:
        assert q.question.strip() and q.answer.strip() and q.evidence.strip(), q.id
        assert q.passage_id.split("#")[0] in PAGES, q.id
    share = sum(q.lexical for q in questions) / len(questions)
    assert 0.4 <= share <= 0.6, share


@pytest.fixture(scope="module")
def corpus():
    try:
        return load_corpus()
    except CorpusMissing as exc:
        pytest.skip(str(exc))


def test_passage_ids_are_unique_and_every_page_gives_passages(corpus):
    assert len({p.id for p in corpus}) == len(corpus)
    assert set(Counter(p.file for p in corpus)) == set(PAGES)
    assert max(len(p.text.split()) for p in corpus) <= labelled.MAX_WORDS + 80  # title line + a kept term


def test_gold_passages_exist_and_hold_the_evidence(corpus):
    by_id = {p.id: p for p in corpus}
    for q in load_questions():
        assert q.passage_id in by_id, q.id
        assert normalize(q.evidence) in normalize(by_id[q.passage_id].text), q.id


def test_paraphrased_questions_share_few_key_words_with_their_passage(corpus):
    by_id = {p.id: p for p in corpus}
    df, n_docs = document_frequencies(corpus)
    questions = load_questions()
    overlap = {q.id: keyword_overlap(q.question, by_id[q.passage_id].text, df, n_docs) for q in questions}
    paraphrased = [overlap[q.id] for q in questions if not q.lexical]
    lexical = [overlap[q.id] for q in questions if q.lexical]
    too_close = [q.id for q in questions if not q.lexical and overlap[q.id] > PARAPHRASE_MAX_OVERLAP]
    assert not too_close
    assert statistics.mean(paraphrased) <= PARAPHRASE_MAX_MEAN
    assert statistics.mean(lexical) >= LEXICAL_MIN_MEAN


def test_overlap_weighs_rare_words_more_than_common_ones():
    passages = [labelled.Passage(id=str(i), file="f", title="t", text=text) for i, text in enumerate(
        ["copy the file", "open the file", "read the file", "deepcopy memo dictionary"])]
    df, n_docs = document_frequencies(passages)
    rare = keyword_overlap("deepcopy file", passages[3].text, df, n_docs)
    common = keyword_overlap("deepcopy file", passages[0].text, df, n_docs)
    assert rare > 0.5 > common > 0.0
    assert keyword_overlap("the of and", passages[0].text, df, n_docs) == 0.0  # only stopwords
