"""Model references: one string names a catalog model, a GGUF file, a checkpoint directory or an API URL."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from fleetlm.catalog.entries import entries
from fleetlm.catalog.errors import CatalogError
from fleetlm.catalog.inspect import GGUF_MAGIC, read_header
from fleetlm.catalog.store import MANIFEST, installed_file

URL_DEFAULT_MODEL = "default"  # the upstream model name when a URL has no #model-name


@dataclass(frozen=True)
class ModelRef:
    """kind "gguf": location is a .gguf file; "hf": a checkpoint directory; "url": an OpenAI-compatible base
    URL, name the upstream model (`URL#model-name`, else "default"). name is otherwise a display name."""

    kind: Literal["gguf", "hf", "url"]
    location: str
    name: str


def _is_hf_checkpoint(path: Path) -> bool:
    weights = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    return (path / "config.json").is_file() and bool(weights)


def _gguf_ref(path: Path, name: str) -> ModelRef:
    magic, _ = read_header(path)
    if magic != GGUF_MAGIC:
        raise CatalogError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return ModelRef("gguf", str(path.resolve()), name)


def _path_ref(path: Path) -> ModelRef:
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise CatalogError(f"{path}: a model file must be a .gguf file (or give a checkpoint directory)")
        return _gguf_ref(path, path.stem)
    if _is_hf_checkpoint(path):
        return ModelRef("hf", str(path.resolve()), path.resolve().name)
    pulled = _pulled_model(path)
    if pulled is not None:  # a directory made by `fleet models pull`
        return _gguf_ref(*pulled)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        return _gguf_ref(ggufs[0], ggufs[0].stem)
    raise CatalogError(f"{path}: not a model directory (no config.json with *.safetensors weights"
                       f"{', and ' + str(len(ggufs)) + ' .gguf files' if ggufs else ', no .gguf file'})")


def _pulled_model(path: Path) -> tuple[Path, str] | None:
    """(GGUF file, catalog name) of a directory with a pull's manifest, else None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        file = path / manifest["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (file, str(manifest.get("name", path.name))) if file.is_file() else None


def resolve_model(ref: str) -> ModelRef:
    """What a model reference names. An existing path wins over a catalog name of the same spelling."""
    ref = ref.strip()
    if not ref:
        raise CatalogError("empty model reference")
    if ref.startswith(("http://", "https://")):
        base, _, model = ref.partition("#")
        if not urlsplit(base).netloc:
            raise CatalogError(f"{ref}: not a valid http(s) URL")
        return ModelRef("url", base.rstrip("/"), model or URL_DEFAULT_MODEL)
    path = Path(ref).expanduser()
    if path.exists():
        return _path_ref(path)
    catalog = entries()
    if ref in catalog:
        installed = installed_file(catalog[ref])
        if installed is None:
            raise CatalogError(f"catalog model {ref} is not installed; run: fleet models pull {ref}")
        return ModelRef("gguf", str(installed), ref)
    if "/" in ref or "\\" in ref or ref.endswith(".gguf") or ref.startswith((".", "~")):
        raise CatalogError(f"{ref}: no such file or directory")
    raise CatalogError(f"unknown model {ref!r}: not a catalog name ({', '.join(catalog)}), "
                       "a .gguf file, a checkpoint directory or an http(s):// URL")
