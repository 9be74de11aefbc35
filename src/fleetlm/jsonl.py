"""JSON Lines reading shared by the data formats (task records, routing rows): one error type per caller."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from fleetlm.errors import FleetError


def iter_jsonl(path: str | Path, error: type[FleetError],
               what: str = "data file") -> Iterator[tuple[str, object]]:
    """(where, object) per non-blank line, where is "path:line"; a missing file or bad line raises `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} not found: {path}")
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{n}: not valid JSON ({exc.msg})") from None
