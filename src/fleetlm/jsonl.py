"""JSON Lines reading shared by the data formats (task records, routing rows): one error type per caller."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from fleetlm.errors import FleetError


def iter_jsonl(path: str | Path, error: type[FleetError],
               what: str = "data file") -> Iterator[tuple[str, object]]:
    """(where, object) per non-blank line, where is "path:line"; a missing file or bad line raises `error`.
    A name ending in .gz is read through gzip (the shipped outcomes are)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{n}: not valid JSON ({exc.msg})") from None
