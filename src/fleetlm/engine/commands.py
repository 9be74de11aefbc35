"""`fleet generate`: stream a continuation or a chat answer from a local model (catalog, .gguf, HF dir)."""

from __future__ import annotations

import sys

import typer

from fleetlm.errors import FleetError

DEFAULT_PROMPT = "Once upon a time"


def generate_command(
    model: str | None = typer.Option(None, "--model", help="A catalog name, .gguf file or checkpoint dir "
                                     "(default: the shipped tiny model)."),
    dtype: str = typer.Option("bf16", "--dtype", help="Weight width: bf16, f32, int8 or int4."),
    prompt: str | None = typer.Option(None, "--prompt", help="Text to continue."),
    chat: str | None = typer.Option(None, "--chat", help="A user message, answered via the chat template."),
    max_tokens: int = typer.Option(64, "--max-tokens", help="Most new tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    seed: int | None = typer.Option(None, "--seed", help="Seed for reproducible sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    compile: bool = typer.Option(False, "--compile", help="Compile the decode step at load (its time is "
                                 "printed apart; the artifacts are cached in the fleet home for next time)."),
) -> None:
    """Stream generated text to stdout; prompt and decode tokens/s go to stderr at the end."""
    from fleetlm.engine.engine import Engine
    from fleetlm.engine.generate import GenerationRequest

    if prompt is not None and chat is not None:
        raise FleetError("give either --prompt or --chat, not both")
    if model is None:
        from fleetlm.model import SHIPPED_TINY_MODEL

        location, name = str(SHIPPED_TINY_MODEL), None
    else:
        from fleetlm.catalog import resolve_model

        ref = resolve_model(model)
        if ref.kind == "url":
            raise FleetError(f"{model}: fleet generate runs local models; serve a URL as `remote:` in a "
                             "fleet config instead")
        location, name = ref.location, ref.name
    engine = Engine.load(location, dtype=dtype, name=name, compile=compile)
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    stop=list(stop))
    if chat is not None:
        request = GenerationRequest(messages=[{"role": "user", "content": chat}], **sampling)
    else:
        request = GenerationRequest(prompt=prompt if prompt is not None else DEFAULT_PROMPT, **sampling)
    finish = None
    for event in engine.generate(request):
        sys.stdout.write(event.text)
        sys.stdout.flush()
        finish = event.finish_reason
    sys.stdout.write("\n")
    s = engine.last_stats
    # compiling happened at load (Engine.warm_up): reported apart, never inside the decode tokens/s
    compiled = f" | compile: {engine.compile_seconds:.1f} s at load" if compile else ""
    typer.echo(f"[{engine.name} {dtype}] prompt: {s.prompt_tokens} tokens, {s.prefill_tokens_per_second:.1f} "
               f"tok/s | decode: {s.decode_tokens} tokens, {s.decode_tokens_per_second:.1f} tok/s | "
               f"finish: {finish}{compiled}", err=True)


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)
