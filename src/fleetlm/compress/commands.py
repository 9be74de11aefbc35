"""`fleet compress`: quantize a model with RTN, GPTQ, AWQ or HQQ into our kernels' formats (and GGUF);
`fleet export ...`: write checkpoints in other runtimes' formats (GGUF for llama.cpp)."""

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
    from fleetlm.compress.gguf import export_gguf, load_config

    start = time.perf_counter()
    if load_config(model).num_experts > 0:  # Mixtral / Qwen2-MoE: stacked expert tensors, own metadata
        from fleetlm.compress.gguf_moe import export_moe_gguf

        path = export_moe_gguf(model, out, type_)
    else:
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


def compress_command(
    model: str = typer.Argument(..., help="catalog name, .gguf file or HF checkpoint directory"),
    out: Path = typer.Option(..., "--out", help="output directory (a checkpoint with the codes beside it)"),
    method: str = typer.Option(None, "--method", help="rtn | gptq | awq | hqq (default rtn; with --prune: "
                               "none, pruning alone, or rtn | gptq after it)"),
    prune: str = typer.Option(None, "--prune", help="magnitude | wanda | sparsegpt (docs/COMPRESS.md)"),
    sparsity: str = typer.Option("0.5", "--sparsity", help="with --prune: a fraction (0.5) or N:M (2:4)"),
    bits: int = typer.Option(4, "--bits", help="8 | 4 | 3 (3-bit codes in 4-bit containers)"),
    group_size: int = typer.Option(64, "--group-size", help="32 | 64 | 128 input columns per scale (64 "
                                   "divides every catalog model's widths; 128 not SmolLM2's 576)"),
    calib: list[Path] = typer.Option(None, "--calib", help="calibration text files or directories "
                                     "(default: the Python 3.11 library reference, gptq/awq only)"),
    samples: int = typer.Option(128, "--samples", help="calibration sequences"),
    seq_len: int = typer.Option(256, "--seq-len", help="tokens per calibration sequence"),
    sym: bool = typer.Option(False, "--sym", help="symmetric 4/3-bit grids (GGUF Q4_0) instead of min/max"),
    act_order: bool = typer.Option(True, "--act-order/--no-act-order", help="GPTQ: columns by diag(H)"),
    gguf_out: Path = typer.Option(None, "--gguf", help="also write this .gguf file (Q8_0 / Q4_0 / Q4_1)"),
    target_bpw: float = typer.Option(None, "--target-bpw", help="automatic widths per tensor (8/4 bits or "
                                     "float16, embeddings included) for this average bits a weight"),
    max_kl: float = typer.Option(None, "--max-kl", help="automatic widths: the smallest mix whose predicted "
                                 "KL (nats a token, summed over tensors) is at most this"),
) -> None:
    """Quantize MODEL's block linears with METHOD and write them where our int8/int4 kernels load them."""
    from fleetlm.compress.pipeline import compress_to_dir

    start = time.perf_counter()
    if prune is not None:
        _prune_command(model, out, method, prune, sparsity, bits, group_size, calib, samples, seq_len, sym,
                       gguf_out, start)
        return
    method = method or "rtn"
    if target_bpw is not None or max_kl is not None:
        _mixed_command(model, out, method, target_bpw, max_kl, group_size, calib, samples, seq_len, sym,
                       act_order, gguf_out, start)
        return
    info = compress_to_dir(model, out, method=method, bits=bits, group=group_size, calib=calib or None,
                           samples=samples, seq_len=seq_len, sym=sym, act_order=act_order, progress=True)
    typer.echo(f"wrote {out} ({info['codes_mib']:.1f} MiB of codes, {method} {bits}-bit, group "
               f"{group_size}) in {time.perf_counter() - start:.1f}s")
    if gguf_out is not None:
        from fleetlm.compress.gguf import export_compressed_gguf

        _report(export_compressed_gguf(out, gguf_out), f"{method} {bits}-bit codes", start)


def _mixed_command(model: str, out: Path, method: str, target_bpw: float | None, max_kl: float | None,
                   group: int, calib: list[Path] | None, samples: int, seq_len: int, sym: bool,
                   act_order: bool, gguf_out: Path | None, start: float) -> None:
    from fleetlm.compress.mixed import compress_mixed_to_dir

    info = compress_mixed_to_dir(model, out, target_bpw=target_bpw, max_kl=max_kl, method=method, group=group,
                                 calib=calib or None, samples=samples, seq_len=seq_len, sym=sym,
                                 act_order=act_order, progress=True)
    c = info["choice"]
    typer.echo(f"wrote {out} ({info['codes_mib']:.1f} MiB of codes, {method} mix at {c.bpw:.3f} bits a "
               f"weight; KL predicted {c.predicted_kl:.4g}, measured {info['measured_kl']:.4g}) in "
               f"{time.perf_counter() - start:.1f}s")
    if gguf_out is not None:
        from fleetlm.compress.gguf import export_compressed_gguf

        _report(export_compressed_gguf(out, gguf_out), f"{method} mix", start)


def _prune_command(model: str, out: Path, method: str | None, prune: str, sparsity: str, bits: int,
                   group: int, calib: list[Path] | None, samples: int, seq_len: int, sym: bool,
                   gguf_out: Path | None, start: float) -> None:
    from fleetlm.compress.prune import QuantAfter, prune_to_dir

    quant = QuantAfter(method, bits, group, sym) if method else None
    info = prune_to_dir(model, out, prune=prune, sparsity=sparsity, quant=quant, calib=calib or None,
                        samples=samples, seq_len=seq_len, progress=True)
    what = f"{prune} {sparsity}" + (f" + {method} {bits}-bit" if method else "")
    typer.echo(f"wrote {out} ({what}, {100 * info['sparsity']:.1f}% zeros in the block linears) in "
               f"{time.perf_counter() - start:.1f}s")
    if gguf_out is not None:
        from fleetlm.compress.gguf import export_compressed_gguf, export_gguf

        path = export_compressed_gguf(out, gguf_out) if quant else export_gguf(out, gguf_out, "f16")
        _report(path, what, start)


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
    app.command("compress")(compress_command)
