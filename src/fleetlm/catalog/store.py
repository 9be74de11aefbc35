"""Where pulled models live: `fleet_home()/models/<name>/` holds the verified GGUF file and its model.json."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fleetlm.catalog.entries import CatalogEntry, entries, get_entry

HOME_ENV = "FLEET_HOME"
MANIFEST = "model.json"
PARTIAL = ".partial-"  # staging directories: models/.partial-<name>-XXXX, renamed into place when verified


def fleet_home() -> Path:
    """$FLEET_HOME, else ~/.cache/fleetlm (under $XDG_CACHE_HOME when that is set)."""
    if os.environ.get(HOME_ENV):
        return Path(os.environ[HOME_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(cache).expanduser() / "fleetlm"


def models_dir() -> Path:
    return fleet_home() / "models"


def model_dir(name: str) -> Path:
    return models_dir() / name


def installed_file(entry: CatalogEntry) -> Path | None:
    path = model_dir(entry.name) / entry.file_name
    try:
        ok = path.stat().st_size == entry.size and (path.parent / MANIFEST).is_file()
    except OSError:
        return None
    return path if ok else None


def installed_path(name: str) -> Path | None:
    """A catalog model's installed GGUF file (present, of the pinned size, with its manifest), or None."""
    return installed_file(get_entry(name))


def read_manifest(name: str) -> dict[str, Any] | None:
    try:
        return json.loads((model_dir(name) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remove(name: str) -> bool:
    """Delete an installed model (and any pull of it left half done); True when something was removed."""
    get_entry(name)  # an unknown name is an error, not a silent no-op
    removed = False
    targets = [model_dir(name), *models_dir().glob(f"{PARTIAL}{name}-*")] if models_dir().is_dir() else []
    for path in targets:
        if path.exists():
            shutil.rmtree(path)
            removed = True
    return removed


@dataclass(frozen=True)
class Listing:
    entry: CatalogEntry
    path: Path | None  # None: not installed


def list_models() -> list[Listing]:
    """Every catalog entry and where it is installed, in catalog order."""
    return [Listing(e, installed_file(e)) for e in entries().values()]
