"""The labelled retrieval set: passages cut from Debian's python3.11-doc HTML manual, and questions on them.

The corpus is the library reference pages of ~45 everyday modules plus the whole tutorial, from the Debian
package `python3.11-doc` (`make kb-corpus` installs it; it lands in /usr/share/doc/python3.11/html, or
FLEETLM_PYDOC_ROOT). A passage is one section of a page (a Sphinx `<section>`, its own text without its
subsections), cut into parts of at most MAX_WORDS words, preferring to break where a new documented object
(function, class, method) starts. Each passage has a stable id `<file>#<section id>` (`~N` for the N-th part
after the first) and starts with a line naming its page and section, so a chunk read alone keeps its context.

The questions (questions.jsonl beside this module) were written by hand against these passages: each is
answered by exactly one passage (`passage_id`), carries a short exact answer for the answer-accuracy figure,
says whether it names its key words (`lexical: true`) or paraphrases them (`lexical: false`), and quotes
`evidence`: words of the gold passage that hold the answer (the tests check they are there, so a change in
how passages are cut that moves an answer to another passage fails loudly instead of mislabelling).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

DEBIAN_PACKAGE = "python3.11-doc"
DEFAULT_ROOT = Path("/usr/share/doc/python3.11/html")
QUESTIONS_PATH = Path(__file__).with_name("questions.jsonl")

MAX_WORDS = 300  # "a few hundred words": fits one 800-token chunk of the store's `auto` strategy
MIN_WORDS_BEFORE_OBJECT_BREAK = 100  # a new function/class starts a new passage once this much is gathered
MIN_BODY_WORDS = 12  # sections that are only a heading (their text lives in subsections) are dropped

LIBRARY_MODULES = (
    "argparse", "base64", "bisect", "collections", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "difflib", "enum", "fnmatch", "functools", "glob", "gzip", "hashlib", "heapq", "itertools",
    "json", "logging", "math", "operator", "os.path", "pathlib", "pickle", "pprint", "queue", "random", "re",
    "secrets", "shlex", "shutil", "sqlite3", "statistics", "string", "struct", "subprocess", "tarfile",
    "tempfile", "textwrap", "threading", "time", "timeit", "urllib.parse", "uuid", "zipfile",
)
TUTORIAL_PAGES = (
    "appetite", "interpreter", "introduction", "controlflow", "datastructures", "modules", "inputoutput",
    "errors", "classes", "stdlib", "stdlib2", "venv", "whatnow", "interactive", "floatingpoint", "appendix",
)
PAGES = (tuple(f"library/{m}.html" for m in LIBRARY_MODULES)
         + tuple(f"tutorial/{p}.html" for p in TUTORIAL_PAGES))


class CorpusMissing(RuntimeError):
    """The python3.11-doc manual is not installed where we look."""


@dataclass(frozen=True)
class Passage:
    id: str
    file: str
    title: str
    text: str


@dataclass(frozen=True)
class Question:
    id: str
    question: str
    passage_id: str
    answer: str
    lexical: bool
    evidence: str


@dataclass
class _Block:
    text: str
    starts_object: bool  # the block is the signature of a documented function/class/method
    is_term: bool = False  # a <dt>: it belongs with the description that follows, never cut after it


@dataclass
class _Section:
    anchor: str
    heading: str = ""
    blocks: list[_Block] | None = None


_VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "col", "area", "base", "source"}
_BLOCK = {"p", "pre", "li", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "div", "dl", "ul", "ol",
          "table", "blockquote", "section", "caption"}
_HEADINGS = {"h1", "h2", "h3", "h4", "h5", "h6"}


class _ManualParser(HTMLParser):
    """Walks one Sphinx page's main body and gathers each section's own text as blocks."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sections: list[_Section] = []  # in document order
        self._open: list[_Section] = []  # nesting of <section>s; text goes to the innermost
        self._tags: list[tuple[str, bool]] = []  # (tag, is section) inside the body
        self._body_depth = 0  # how many tags deep into div.body we are; 0 = outside
        self._skip_depth = 0  # > 0 inside a headerlink (the pilcrow)
        self._pre_depth = 0
        self._buffer: list[str] = []
        self._in_heading = False
        self._object_pending = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = {k: v or "" for k, v in attrs}
        if not self._body_depth:
            if tag == "div" and "body" in attr.get("class", "").split():
                self._body_depth = 1
            return
        if tag in _VOID:
            return
        self._body_depth += 1
        if self._skip_depth:
            self._skip_depth += 1
            return
        if tag == "a" and "headerlink" in attr.get("class", "").split():
            self._skip_depth = 1
            return
        if tag in _BLOCK:
            self._flush()
        if tag == "section":
            section = _Section(anchor=attr.get("id", ""), blocks=[])
            self.sections.append(section)
            self._open.append(section)
        elif tag in _HEADINGS:
            self._in_heading = True
        elif tag == "pre":
            self._pre_depth += 1
        elif tag == "dt" and "sig-object" in attr.get("class", "").split():
            self._object_pending = True
        self._tags.append((tag, tag == "section"))

    def handle_endtag(self, tag: str) -> None:
        if not self._body_depth or tag in _VOID:
            return
        self._body_depth -= 1
        if self._skip_depth:
            self._skip_depth -= 1
            return
        if not self._tags:  # the closing tag of div.body itself
            self._flush()
            self._body_depth = 0
            return
        open_tag, is_section = self._tags.pop()
        if open_tag in _BLOCK:
            self._flush(heading=open_tag in _HEADINGS, term=open_tag == "dt")
        if open_tag in _HEADINGS:
            self._in_heading = False
        elif open_tag == "pre":
            self._pre_depth -= 1
        if is_section and self._open:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if self._body_depth and not self._skip_depth:
            self._buffer.append(data if self._pre_depth else re.sub(r"\s+", " ", data))

    def _flush(self, heading: bool = False, term: bool = False) -> None:
        text = "".join(self._buffer).strip()
        self._buffer = []
        if not text or not self._open:
            return
        section = self._open[-1]
        if heading and not section.heading:
            section.heading = text
            return
        assert section.blocks is not None
        section.blocks.append(_Block(text, self._object_pending, term))
        self._object_pending = False


def _words(text: str) -> int:
    return len(text.split())


def _split_long(block: _Block) -> list[_Block]:
    """A block longer than MAX_WORDS (a long code example) cut at line ends into pieces that fit."""
    if _words(block.text) <= MAX_WORDS:
        return [block]
    pieces: list[list[str]] = [[]]
    size = 0
    for line in block.text.split("\n"):
        if size and size + _words(line) > MAX_WORDS:
            pieces.append([])
            size = 0
        pieces[-1].append(line)
        size += _words(line)
    return [_Block("\n".join(lines), block.starts_object and i == 0) for i, lines in enumerate(pieces)]


def _pack(blocks: list[_Block]) -> list[list[_Block]]:
    """Group a section's blocks into parts of at most MAX_WORDS, breaking early where a new object starts."""
    parts: list[list[_Block]] = [[]]
    size = 0
    for block in (piece for b in blocks for piece in _split_long(b)):
        n = _words(block.text)
        full = size and size + n > MAX_WORDS
        object_break = block.starts_object and size >= MIN_WORDS_BEFORE_OBJECT_BREAK
        after_term = bool(parts[-1]) and parts[-1][-1].is_term
        if (full or object_break) and not after_term:
            parts.append([])
            size = 0
        parts[-1].append(block)
        size += n
    if len(parts) > 1 and sum(_words(b.text) for b in parts[-1]) < MIN_BODY_WORDS * 3:
        parts[-2].extend(parts.pop())  # a short tail reads better with what precedes it
    return parts


def cut_page(html: str, file: str) -> list[Passage]:
    """The passages of one manual page, in document order."""
    parser = _ManualParser()
    parser.feed(html)
    parser.close()
    if not parser.sections:
        return []
    page_title = parser.sections[0].heading
    passages: list[Passage] = []
    for section in parser.sections:
        blocks = section.blocks or []
        if sum(_words(b.text) for b in blocks) < MIN_BODY_WORDS:
            continue
        title = page_title if section is parser.sections[0] else f"{page_title} > {section.heading}"
        for n, part in enumerate(_pack(blocks)):
            pid = f"{file}#{section.anchor}" + (f"~{n}" if n else "")
            body = "\n".join(b.text for b in part)
            passages.append(Passage(id=pid, file=file, title=title, text=f"{title}\n{body}"))
    return passages


def corpus_root() -> Path:
    return Path(os.environ.get("FLEETLM_PYDOC_ROOT", DEFAULT_ROOT))


def load_corpus(root: Path | None = None) -> list[Passage]:
    """Every passage of the chosen pages; CorpusMissing (with the install line) when the manual is absent."""
    root = root or corpus_root()
    missing = [page for page in PAGES if not (root / page).is_file()]
    if missing:
        raise CorpusMissing(f"{len(missing)} manual pages missing under {root} (first: {missing[0]}); "
                            f"install them with `make kb-corpus` (apt-get install {DEBIAN_PACKAGE})")
    passages: list[Passage] = []
    for page in PAGES:
        passages.extend(cut_page((root / page).read_text(encoding="utf-8"), page))
    return passages


def load_questions(path: Path = QUESTIONS_PATH) -> list[Question]:
    questions = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                questions.append(Question(id=row["id"], question=row["question"],
                                          passage_id=row["passage_id"], answer=row["answer"],
                                          lexical=bool(row["lexical"]), evidence=row["evidence"]))
    return questions


# Overlap between a question and its passage, to check that `lexical: false` questions paraphrase.
_STOPWORDS = frozenset("""
a about after all also an and any are as at be been before being between both but by can could did do does
doing done each else for from get gets got had has have how i if in into is it its just let like make makes
may me might more most much must my need no not of on one only or other our out over own same should so some
such than that the their them then there these they this those through to too under up use used uses using
very want was way we were what when where whether which while who whom why will with without would you your
""".split())


def _stem(word: str) -> str:
    """A crude suffix strip: 'copies', 'copied' count as 'copy' (overlap must not hide in morphology)."""
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: len(word) - len(suffix)] + repl
    return word


def normalize(text: str) -> str:
    """Curly quotes made straight and whitespace collapsed: how evidence is matched against passage text."""
    text = text.translate({0x2018: "'", 0x2019: "'", 0x201C: '"', 0x201D: '"'})
    return re.sub(r"\s+", " ", text).strip().lower()


def content_words(text: str) -> set[str]:
    """Lower-cased, stemmed words of 3+ letters that are not stopwords (identifiers split at . and _)."""
    tokens = re.findall(r"[a-z0-9]+", text.lower())
    return {_stem(t) for t in tokens if len(t) >= 3 and t not in _STOPWORDS}


def document_frequencies(passages: list[Passage]) -> tuple[Counter[str], int]:
    counts: Counter[str] = Counter()
    for passage in passages:
        counts.update(content_words(passage.text))
    return counts, len(passages)


def keyword_overlap(question: str, passage_text: str, df: Counter[str], n_docs: int) -> float:
    """IDF-weighted share of the question's content words that occur in the passage (0: none, 1: all).

    Weighting by IDF makes the measure about key words: a shared 'file' or 'list' weighs little, a shared
    'deepcopy' or 'memo' weighs a lot.
    """
    words = content_words(question)
    if not words:
        return 0.0
    passage_words = content_words(passage_text)
    weight = {w: math.log((n_docs + 1) / (df.get(w, 0) + 1)) + 1.0 for w in words}
    return sum(weight[w] for w in words if w in passage_words) / sum(weight.values())
