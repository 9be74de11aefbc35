"""`fleet upcycle MODEL --experts E --top-k K --out DIR`: a dense model's MLPs as a mixture of experts."""

from __future__ import annotations

import time
from pathlib import Path

import typer


def upcycle_command(
    model: Path = typer.Argument(..., help="dense Llama-family checkpoint directory or .gguf file"),
    experts: int = typer.Option(4, "--experts", help="experts per MoE layer (copies of the dense MLP)"),
    top_k: int = typer.Option(2, "--top-k", help="experts each token goes through"),
    out: Path = typer.Option(..., "--out", help="output checkpoint directory (Mixtral layout)"),
    top_layers: int = typer.Option(0, "--top-layers",
                                   help="upcycle only the top N layers (0: all; a partial model loads in "
                                        "fleetlm only, not in transformers or llama.cpp)"),
    noise: float = typer.Option(0.0, help="relative noise added to each expert copy (0: exact copies)"),
    seed: int = typer.Option(0, help="seed of the router init and the noise"),
) -> None:
    """Copy each dense MLP into E experts under a new router (sparse upcycling); train it with
    fleetlm.train.upcycle (bench/upcycle.py shows the whole recipe)."""
    import torch

    from fleetlm.model.checkpoint import load_checkpoint, save_checkpoint
    from fleetlm.model.upcycle import active_params, upcycle

    start = time.perf_counter()
    if model.suffix == ".gguf":
        from fleetlm.model.gguf import load_gguf

        dense, tokenizer = load_gguf(model, dtype=torch.float32)
        tok_source: object = tokenizer
    else:
        dense, tok_source = load_checkpoint(model), model
    n = dense.config.num_layers
    layers = list(range(n - top_layers, n)) if 0 < top_layers < n else None
    moe = upcycle(dense, experts, top_k, layers=layers, noise=noise, seed=seed)
    save_checkpoint(moe, out, tokenizer_dir=tok_source)  # type: ignore[arg-type]
    total = sum(p.numel() for p in {id(p): p for p in moe.parameters()}.values())
    typer.echo(f"wrote {out}: {experts} experts, top-{top_k}, {total / 1e6:.1f}M parameters "
               f"({active_params(moe) / 1e6:.1f}M active) in {time.perf_counter() - start:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("upcycle")(upcycle_command)
