"""`fleet compress` end to end: load a model in float32, read calibration text, quantize, write the output."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fleetlm.compress.calib import CALIB_DEFAULT, METHODS, compress_model, read_texts, token_windows
from fleetlm.compress.grid import CompressError, check_bits


def load_float_model(ref: str | Path) -> tuple[nn.Module, Any]:
    """(float32 Transformer, Tokenizer) of a checkpoint directory, a .gguf file (dequantized) or a catalog
    name."""
    from fleetlm.model.checkpoint import load_checkpoint
    from fleetlm.model.gguf import load_gguf
    from fleetlm.model.tokenizer import Tokenizer

    path = Path(ref).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return load_checkpoint(path, "float32"), Tokenizer.from_dir(path)
    if not path.exists():
        from fleetlm.catalog import resolve_model

        found = resolve_model(str(ref))
        if found.kind == "url":
            raise CompressError(f"{ref} is a remote model: compress needs its weights")
        path = Path(found.location)
        if found.kind == "hf":
            return load_checkpoint(path, "float32"), Tokenizer.from_dir(path)
    if path.suffix != ".gguf":
        raise CompressError(f"{ref}: not a checkpoint directory, a .gguf file or a catalog name")
    model, tokenizer = load_gguf(path, dtype=torch.float32)
    return model.float(), tokenizer


def calibration_windows(tokenizer: Any, calib: list[Path] | None, samples: int, seq_len: int):
    """[samples, seq_len] token ids spread over the calibration text."""
    paths = calib or [CALIB_DEFAULT]
    if not calib and not CALIB_DEFAULT.is_dir():
        raise CompressError(f"no calibration text: give --calib, or install {CALIB_DEFAULT} (make kb-corpus)")
    return token_windows(tokenizer.encode(read_texts(paths), add_special_tokens=False), samples, seq_len)


def compress_to_dir(ref: str | Path, out: str | Path, *, method: str = "rtn", bits: int = 4,
                    group: int = 128, calib: list[Path] | None = None, samples: int = 128, seq_len: int = 256,
                    sym: bool = False, act_order: bool = True, progress: bool = False) -> dict[str, Any]:
    """Quantize `ref` and write it to `out` (compress/store.py's layout); returns what was written."""
    from fleetlm.compress.store import save_compressed

    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    check_bits(bits)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressError(f"--out {out} exists and is not a directory")
    model, tokenizer = load_float_model(ref)
    windows = calibration_windows(tokenizer, calib, samples, seq_len) if method in ("gptq", "awq") else None
    start = time.perf_counter()
    codes = compress_model(model, method, bits, group, windows, sym=sym, act_order=act_order,
                           progress=progress)
    seconds = time.perf_counter() - start
    meta = {"method": method, "source": str(ref), "seconds": round(seconds, 1),
            "calibration": None if windows is None else {
                "paths": [str(p) for p in (calib or [CALIB_DEFAULT])],
                "samples": samples, "seq_len": seq_len},
            "act_order": act_order if method == "gptq" else None}
    save_compressed(model, codes, tokenizer, out, meta)
    return {"out": out, "seconds": seconds, "codes_mib": sum(q.nbytes() for q in codes.values()) / 2**20}
