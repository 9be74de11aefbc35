"""`fleet train --config train.yaml`, `fleet train --resume DIR` and `fleet lora merge`."""

from __future__ import annotations

from pathlib import Path

import typer

from fleetlm.errors import ConfigError


def register(app: typer.Typer) -> None:
    @app.command("train")
    def train_cmd(
        config: Path = typer.Option(None, "--config", "-c", help="train.yaml (model, data, steps, lr)"),
        resume: Path = typer.Option(None, "--resume", help="continue the run saved in this checkpoint dir"),
        steps: int = typer.Option(None, "--steps", help="override the config's total steps"),
        out: Path = typer.Option(None, "--out", help="override the config's out_dir"),
    ) -> None:
        """Train or resume a model (2 processes: torchrun --nproc-per-node 2 -m fleetlm.train ...)."""
        from fleetlm.train.config import load_config
        from fleetlm.train.loop import read_resume_config, train

        if (config is None) == (resume is None):
            raise ConfigError("give exactly one of --config FILE or --resume DIR")
        cfg = load_config(config) if config is not None else read_resume_config(resume)
        if steps is not None:
            cfg.steps = steps
        if out is not None or resume is not None:
            cfg.out_dir = out or resume  # a resumed run continues in its own dir unless told otherwise
        result = train(cfg, resume=resume)
        ev = ""
        if result.eval_loss is not None:
            ev = f"  eval loss {result.eval_loss:.4f}  ppl {result.perplexity:.2f}"
        typer.echo(f"step {result.step}  loss {result.train_loss:.4f}{ev}  "
                   f"tokens/s {result.tokens_per_s:,.0f}  -> {result.out_dir}")

    lora = typer.Typer(help="LoRA adapters (fleet train with a lora: section trains them).",
                       no_args_is_help=True)

    @lora.command("merge")
    def merge_cmd(
        base: Path = typer.Option(..., "--base", help="the base checkpoint dir"),
        adapter: Path = typer.Option(..., "--adapter", help="the PEFT adapter dir"),
        out: Path = typer.Option(..., "--out", help="where to write the merged checkpoint"),
    ) -> None:
        """Fold LoRA adapters into the base weights: a plain HF-layout checkpoint."""
        from fleetlm.train.lora import merge_lora

        typer.echo(f"merged -> {merge_lora(base, adapter, out)}")

    app.add_typer(lora, name="lora")
