"""`fleet export ...`: write checkpoints in other runtimes' formats (GGUF for llama.cpp)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

export_app = typer.Typer(help="Export a checkpoint for other runtimes (GGUF for llama.cpp).",
                         no_args_is_help=True)


@export_app.command("gguf")
def gguf_command(
    model: Path = typer.Argument(..., help="Hugging Face checkpoint directory"),
    out: Path = typer.Argument(..., help="output .gguf file"),
    type_: str = typer.Option("f16", "--type", help="f16 | bf16 | q8_0 | f32"),
) -> None:
    """Write MODEL as a llama.cpp GGUF file (tensors, hyperparameters, tokenizer, chat template)."""
    from fleetlm.compress.gguf import export_gguf

    start = time.perf_counter()
    path = export_gguf(model, out, type_)
    _report(path, type_, start)


@export_app.command("quantize")
def quantize_command(
    src: Path = typer.Argument(..., help="input .gguf file (f16, bf16 or f32)"),
    out: Path = typer.Argument(..., help="output .gguf file"),
    type_: str = typer.Option("q4_0", "--type", help="q4_0 | q8_0"),
    threads: int = typer.Option(0, help="threads (0: all cores)"),
) -> None:
    """Quantize a GGUF file with llama.cpp's quantizer (through llama-cpp-python)."""
    from fleetlm.compress.gguf import quantize_gguf

    start = time.perf_counter()
    path = quantize_gguf(src, out, type_, threads)
    _report(path, type_, start)


def _report(path: Path, kind: str, start: float) -> None:
    size = path.stat().st_size / 2**20
    typer.echo(f"wrote {path} ({size:.1f} MiB, {kind}) in {time.perf_counter() - start:.1f}s")


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
