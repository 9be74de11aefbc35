"""A script of bench/ loaded as a module for its test, and unloaded after."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"


@contextmanager
def bench_script(name: str, *, on_path: bool = False) -> Iterator[ModuleType]:
    """bench/<name>.py as the module `<name>_bench`; on_path: bench/ on sys.path meanwhile (for a script that
    imports another script's helpers)."""
    if on_path:
        sys.path.insert(0, str(BENCH_DIR))
    spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCH_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)
        if on_path:
            sys.path.remove(str(BENCH_DIR))
