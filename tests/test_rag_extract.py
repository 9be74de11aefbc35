import pytest

from fleetlm.rag.extract import ExtractError, extract, kind_of
from rag_fakes import minimal_pdf


def text_of(tmp_path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return "".join(extract(path, name))


def test_text_markdown_and_code_are_read_as_utf8(tmp_path):
    assert text_of(tmp_path, "a.md", "# Titre\nÉté à Paris\n".encode()) == "# Titre\nÉté à Paris\n"
    assert "def f():" in text_of(tmp_path, "m.py", b"def f():\n    return 1\n")
    big = ("line é\n" * 20000).encode()  # several read blocks, a character cut at a block edge
    assert text_of(tmp_path, "big.txt", big) == big.decode()


def test_html_keeps_visible_text_only(tmp_path):
    html = (
        b"<html><head><title>T</title><style>p{}</style></head><body><h1>Head</h1><p>One &amp; two</p>"
        b"<script>var x = 1;</script><p>three</p></body></html>"
    )
    text = text_of(tmp_path, "p.html", html)
    assert "Head" in text and "One & two" in text and "three" in text
    assert "var x" not in text and "p{}" not in text


def test_pdf_pages_in_order(tmp_path):
    text = text_of(tmp_path, "d.pdf", minimal_pdf(["First page words", "Second page words"]))
    assert text.index("First page") < text.index("Second page")


def test_unknown_names_are_sniffed(tmp_path):
    (tmp_path / "noext").write_bytes(minimal_pdf(["x"]))
    assert kind_of(tmp_path / "noext", "noext") == "pdf"
    (tmp_path / "page").write_bytes(b"<!DOCTYPE html><html><p>hi</p></html>")
    assert kind_of(tmp_path / "page", "page") == "html"


@pytest.mark.parametrize(
    "name, data, code",
    [
        ("broken.pdf", b"%PDF-1.4\n1 0 obj garbage", "invalid_file"),
        ("latin1.txt", "café".encode("latin-1"), "invalid_file"),
        ("doc.docx", b"PK\x03\x04 zip bytes", "unsupported_file"),
        ("blob.dat", b"\x00\x01\x02binary", "unsupported_file"),
        ("nul.txt", b"text\x00with nul", "unsupported_file"),
    ],
)
def test_unreadable_files_fail_with_openai_codes(tmp_path, name, data, code):
    with pytest.raises(ExtractError) as err:
        text_of(tmp_path, name, data)
    assert err.value.code == code and name in str(err.value)
