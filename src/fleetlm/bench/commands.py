"""`fleet bench decode`: the decode benchmark from the command line."""

from __future__ import annotations

from pathlib import Path

import typer

from fleetlm.bench.decode import (
    DEFAULT_CACHE,
    ENGINE_MODES,
    TINY_SHAPE,
    WIDTHS,
    BenchOptions,
    BenchShape,
    format_table,
)
from fleetlm.bench.real import DEFAULT_CHAT


def decode_command(
    model_dir: Path = typer.Option(DEFAULT_CACHE, "--model-dir", help="Checkpoint; built if absent."),
    prompt_tokens: int = typer.Option(32, help="Prompt length in tokens."),
    new_tokens: int = typer.Option(128, help="Tokens to decode per timed run."),
    warmup_tokens: int = typer.Option(8, help="Tokens of the warm-up run before each timed run."),
    widths: str = typer.Option(",".join(WIDTHS), help="Comma-separated widths: bf16,int8,int4."),
    no_transformers: bool = typer.Option(False, "--no-transformers", help="Skip transformers' generate."),
    no_llama_cpp: bool = typer.Option(False, "--no-llama-cpp", help="Skip llama.cpp."),
    threads: int = typer.Option(0, help="Threads for every runner (0: all cores)."),
    bandwidth_mb: int = typer.Option(1024, help="Buffer size of the bandwidth measurement."),
    agreement_tokens: int = typer.Option(256, help="Tokens for int8/int4 top-1 agreement (0: skip)."),
    profile: bool = typer.Option(False, help="Print the top ops of one decode step per width."),
    engine_modes: str = typer.Option(",".join(ENGINE_MODES), help="Our engine's modes: eager,compiled "
                                     "(compiled: decode step through torch.compile, compiled in warm-up)."),
    tiny: bool = typer.Option(False, help="A tiny model shape (smoke test), not the 415M one."),
    model: str | None = typer.Option(None, "--model", help="A real GGUF model (catalog name or .gguf path) "
                                     "instead of the random checkpoint; llama.cpp then runs on its own file "
                                     "and on BF16/Q8_0/Q4_0 files made from it (cached in the fleet home)."),
    chat: str = typer.Option(DEFAULT_CHAT, help="The user message of a real model's chat prompt."),
    serve: bool = typer.Option(False, help="Also time one streamed request per width through `fleet serve` "
                               "(engine: fleetlm), client-side; needs --model."),
    serve_widths: str = typer.Option("", help="Widths the gateway serves with --serve (default: --widths)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of the table."),
) -> None:
    """Decode tokens/s of fleetlm vs transformers vs llama.cpp, and as a share of memory bandwidth."""
    from fleetlm.bench.decode import run_benchmark

    opts = BenchOptions(model_dir=model_dir, shape=TINY_SHAPE if tiny else BenchShape(),
                        prompt_tokens=prompt_tokens, new_tokens=new_tokens, warmup_tokens=warmup_tokens,
                        widths=tuple(w.strip() for w in widths.split(",") if w.strip()),
                        transformers=not no_transformers, llama_cpp=not no_llama_cpp, threads=threads,
                        bandwidth_mb=bandwidth_mb, agreement_tokens=agreement_tokens, profile=profile,
                        engine_modes=tuple(m.strip() for m in engine_modes.split(",") if m.strip()),
                        model=model, chat=chat, serve=serve,
                        serve_widths=tuple(w.strip() for w in serve_widths.split(",") if w.strip()))
    result = run_benchmark(opts, progress=not as_json)
    typer.echo(result.to_json() if as_json else format_table(result))


def register(app: typer.Typer) -> None:
    bench = typer.Typer(help="Benchmarks.", no_args_is_help=True)
    bench.command("decode")(decode_command)
    app.add_typer(bench, name="bench")
