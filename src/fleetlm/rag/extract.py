"""Files to text, streamed: plain text, Markdown, source code, HTML (stdlib parser), PDF (pypdf, by page).

Every extractor yields the text in pieces, so a large file is never held whole in memory (a PDF is read one
page at a time; pypdf keeps the cross-reference table and the page objects it has parsed). A file that
cannot be read raises ExtractError with OpenAI's last_error codes: `unsupported_file` for a kind we do not
read, `invalid_file` for a file that claims a kind and is broken (bad UTF-8, a corrupt PDF).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import BinaryIO

from fleetlm.errors import FleetError

READ_BYTES = 64 * 1024
SNIFF_BYTES = 8 * 1024

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst", ".csv", ".tsv", ".log", ".tex", ".org"}
CODE_SUFFIXES = {
    ".py",
    ".pyi",
    ".js",
    ".mjs",
    ".ts",
    ".tsx",
    ".jsx",
    ".java",
    ".kt",
    ".scala",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".cs",
    ".go",
    ".rs",
    ".rb",
    ".php",
    ".pl",
    ".sh",
    ".bash",
    ".zsh",
    ".ps1",
    ".sql",
    ".r",
    ".swift",
    ".lua",
    ".json",
    ".jsonl",
    ".yaml",
    ".yml",
    ".toml",
    ".ini",
    ".cfg",
    ".xml",
    ".css",
    ".scss",
    ".proto",
    ".ipynb",
    ".dockerfile",
    ".makefile",
    ".cmake",
    ".gradle",
}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}
PDF_SUFFIXES = {".pdf"}
PDF_OBJECT_CACHE = 200  # parsed objects kept between pages (bench/kb_store.py memory --pdf-reader)
# Formats we know and do not read yet (an optional converter could): a clear error instead of garbage text.
KNOWN_BINARY = {
    ".docx",
    ".doc",
    ".pptx",
    ".ppt",
    ".xlsx",
    ".xls",
    ".odt",
    ".epub",
    ".zip",
    ".gz",
    ".png",
    ".jpg",
    ".jpeg",
    ".gif",
    ".webp",
    ".mp3",
    ".wav",
    ".mp4",
    ".exe",
    ".bin",
}


class ExtractError(FleetError):
    """A file that yields no text; `code` is OpenAI's last_error code."""

    def __init__(self, message: str, code: str = "invalid_file"):
        super().__init__(message)
        self.code = code


def kind_of(path: Path, filename: str) -> str:
    """'text', 'html' or 'pdf', from the file name and, for unknown names, its first bytes."""
    suffix = Path(filename).suffix.lower()
    if suffix in PDF_SUFFIXES:
        return "pdf"
    if suffix in HTML_SUFFIXES:
        return "html"
    if suffix in TEXT_SUFFIXES or suffix in CODE_SUFFIXES:
        return "text"
    if suffix in KNOWN_BINARY:
        raise ExtractError(
            f"{filename}: {suffix} files are not supported (text, Markdown, HTML, PDF and source code are)",
            code="unsupported_file",
        )
    with path.open("rb") as fh:
        head = fh.read(SNIFF_BYTES)
    if head.startswith(b"%PDF-"):
        return "pdf"
    lowered = head.lstrip()[:200].lower()
    if lowered.startswith((b"<!doctype html", b"<html")):
        return "html"
    if b"\x00" in head:
        raise ExtractError(
            f"{filename}: a binary file of unknown type is not supported", code="unsupported_file"
        )
    return "text"


def extract(path: Path, filename: str) -> Iterator[str]:
    """The file's text in pieces (in order); raises ExtractError for a file that cannot be read."""
    kind = kind_of(path, filename)
    if kind == "pdf":
        return _pdf(path, filename)
    if kind == "html":
        return _html(path, filename)
    return _text(path, filename)


def _decoded(path: Path, filename: str) -> Iterator[str]:
    """UTF-8 text in pieces (a BOM is dropped); invalid UTF-8 is an invalid_file."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")("strict")
    offset = 0
    with path.open("rb") as fh:
        while block := fh.read(READ_BYTES):
            if b"\x00" in block:
                raise ExtractError(
                    f"{filename}: contains NUL bytes: not a text file", code="unsupported_file"
                )
            try:
                piece = decoder.decode(block)
            except UnicodeDecodeError as exc:
                raise ExtractError(f"{filename}: not valid UTF-8 at byte {offset + exc.start}") from None
            offset += len(block)
            if piece:
                yield piece
        try:
            tail = decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ExtractError(f"{filename}: ends inside a UTF-8 character") from None
        if tail:
            yield tail


def _text(path: Path, filename: str) -> Iterator[str]:
    yield from _decoded(path, filename)


class _HtmlText(HTMLParser):
    """Collects the visible text of HTML fed to it piece by piece; scripts, styles and heads are skipped."""

    SKIP = {"script", "style", "head", "noscript", "template", "svg"}
    BLOCK = {
        "p",
        "div",
        "section",
        "article",
        "br",
        "li",
        "tr",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "h6",
        "pre",
        "table",
        "dt",
        "dd",
        "blockquote",
        "hr",
        "title",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.SKIP:
            self._skipping += 1
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skipping = max(0, self._skipping - 1)
        elif tag in self.BLOCK:
            self.out.append("\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.out.append(data)

    def take(self) -> str:
        text, self.out = "".join(self.out), []
        return text


def _html(path: Path, filename: str) -> Iterator[str]:
    parser = _HtmlText()
    for piece in _decoded(path, filename):
        parser.feed(piece)
        if text := parser.take():
            yield text
    parser.close()
    if text := parser.take():
        yield text


def _pdf(path: Path, filename: str) -> Iterator[str]:
    with path.open("rb") as fh:  # a file object is read as pypdf needs it; a path is read whole into memory
        yield from _pdf_pages(fh, filename)


def _pdf_pages(fh: BinaryIO, filename: str) -> Iterator[str]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(fh)
        pages = len(reader.pages)
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise ExtractError(f"{filename}: not a readable PDF ({type(exc).__name__}: {exc})") from None
    if reader.is_encrypted:
        raise ExtractError(f"{filename}: the PDF is encrypted")
    for number in range(pages):
        try:
            text = reader.pages[number].extract_text() or ""
        except (PyPdfError, ValueError, KeyError, TypeError) as exc:
            raise ExtractError(
                f"{filename}: page {number + 1} cannot be read ({type(exc).__name__})"
            ) from None
        if len(reader.resolved_objects) > PDF_OBJECT_CACHE:  # pypdf caches every page's objects: bound it
            reader.resolved_objects.clear()
        if text.strip():
            yield text + "\n\n"
