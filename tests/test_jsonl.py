"""JSON Lines reading: plain and gzipped files, blank lines skipped, a bad line named by path and line."""

from __future__ import annotations

import gzip

import pytest

from fleetlm.errors import FleetError
from fleetlm.jsonl import iter_jsonl


class Bad(FleetError):
    pass


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.jsonl.gz"])
def test_rows_come_back_with_where_they_stand(tmp_path, name):
    path = tmp_path / name
    text = '{"a": 1}\n\n{"a": 2}\n'
    if name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    assert list(iter_jsonl(path, Bad)) == [(f"{path}:1", {"a": 1}), (f"{path}:3", {"a": 2})]


def test_a_bad_line_and_a_missing_file_are_the_callers_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(Bad, match=r"rows.jsonl:2: not valid JSON"):
        list(iter_jsonl(path, Bad))
    with pytest.raises(Bad, match="outcomes not found"):
        list(iter_jsonl(tmp_path / "none.jsonl", Bad, "outcomes"))
