"""`fleet train --config train.yaml`, `fleet train --resume DIR`, `fleet distill` and `fleet lora merge`."""

from __future__ import annotations

from pathlib import Path

import typer

from fleetlm.errors import ConfigError

FLYWHEEL_DEFAULTS = {"steps": 60, "batch_size": 8, "lr": 1e-4, "seq_len": 192, "warmup_steps": 6,
                     "eval_interval": 0}


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

    @app.command("distill")
    def distill_cmd(
        teacher: str = typer.Option(None, "--teacher", help="a checkpoint dir, or an OpenAI-compatible base "
                                    "URL (http://host/v1; sequence-level only)"),
        student: Path = typer.Option(None, "--student", help="the student checkpoint dir (else model.init or "
                                     "model.shape of --config)"),
        data: Path = typer.Option(None, "--data", help="prompts: chat JSONL as `fleet tasks generate` writes "
                                  "(messages, answer?) or {\"prompt\": ...} lines"),
        method: str = typer.Option("kl", "--method", help="seq | kl | rkl | gkd | onpolicy"),
        config: Path = typer.Option(None, "--config", "-c", help="train.yaml for the student's training "
                                    "(data.train may be left out)"),
        steps: int = typer.Option(None, "--steps"),
        batch_size: int = typer.Option(None, "--batch-size"),
        lr: float = typer.Option(None, "--lr"),
        seq_len: int = typer.Option(None, "--seq-len"),
        out: Path = typer.Option(None, "--out", help="the run dir (default runs/distill)"),
        alpha: float = typer.Option(0.5, "--alpha", help="token-level: weight of the divergence, 1 - alpha "
                                    "of the LM loss"),
        beta: float = typer.Option(0.5, "--beta", help="gkd: the JSD's beta, in (0, 1)"),
        temperature: float = typer.Option(1.0, "--temperature", help="softmax temperature in the divergence"),
        on_policy_fraction: float = typer.Option(None, "--on-policy-fraction", help="share of steps trained "
                                                 "on the student's own samples (onpolicy: 0.5)"),
        responses: str = typer.Option("auto", "--responses", help="token-level data: auto (gold answers, the "
                                      "teacher's where none) | gold | teacher"),
        teacher_model: str = typer.Option(None, "--teacher-model", help="remote teacher: the model name"),
        api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="remote teacher: env var of "
                                        "the API key"),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="teacher answers, on-policy samples"),
        teacher_temperature: float = typer.Option(0.0, "--teacher-temperature", help="0: greedy answers"),
        samples_per_prompt: int = typer.Option(1, "--samples-per-prompt"),
        sample_temperature: float = typer.Option(1.0, "--sample-temperature", help="of on-policy samples"),
        teacher_dtype: str = typer.Option("f32", "--teacher-dtype", help="f32 | bf16"),
        from_usage: str = typer.Option(None, "--from-usage", help="learn from the gateway's usage log "
                                       "(SQLite file, DB URL or JSONL export; fleet.yaml log_content: "
                                       "true): the teacher's logged answers of --domain"),
        domain: str = typer.Option(None, "--domain", help="with --from-usage: the domain (contacts)"),
        expert: str = typer.Option(None, "--expert-name", help="with --from-usage: the expert's fleet name "
                                   "(default STUDENT-DOMAIN)"),
        max_examples: int = typer.Option(None, "--max-examples", help="with --from-usage: train on at most "
                                         "this many logged answers"),
    ) -> None:
        """Distill a teacher into a small student: sequence-level (seq), token-level KD (kl, rkl, gkd),
        on-policy GKD (onpolicy, or --on-policy-fraction); or, with --from-usage, the teacher's logged
        answers of one domain (the flywheel: the expert, its fleet.yaml entry and routing data)."""
        from fleetlm.train.distill import distill, parse_distill_config, train_config

        if from_usage is not None:
            _from_usage(from_usage, domain, student, teacher_model, expert, config, out, max_examples,
                        steps=steps, batch_size=batch_size, lr=lr, seq_len=seq_len)
            return
        if not teacher:
            raise ConfigError("give the teacher: --teacher DIR (a checkpoint) or --teacher http://HOST/v1")
        if data is None:
            raise ConfigError("give the prompts: --data prompts.jsonl")
        dcfg = parse_distill_config(dict(
            teacher=teacher, prompts=data, method=method, alpha=alpha, beta=beta, temperature=temperature,
            on_policy_fraction=on_policy_fraction, responses=responses, teacher_model=teacher_model,
            api_key_env=api_key_env, max_new_tokens=max_new_tokens, teacher_temperature=teacher_temperature,
            samples_per_prompt=samples_per_prompt, sample_temperature=sample_temperature,
            teacher_dtype=teacher_dtype))
        cfg = train_config(config, student, data, steps=steps, batch_size=batch_size, lr=lr, seq_len=seq_len,
                           out_dir=out)
        result = distill(cfg, dcfg)
        ev = ""
        if result.eval_loss is not None:
            ev = f"  eval loss {result.eval_loss:.4f}"
        typer.echo(f"{dcfg.method}: step {result.step}  loss {result.train_loss:.4f}{ev}  "
                   f"tokens/s {result.tokens_per_s:,.0f}  -> {result.out_dir}")

    def _from_usage(source: str, domain: str | None, student: Path | None, model: str | None,
                    expert: str | None, config: Path | None, out: Path | None, max_examples: int | None,
                    **overrides) -> None:
        from fleetlm.train.distill import train_config
        from fleetlm.train.domain import domain_module
        from fleetlm.train.flywheel import distill_from_usage, student_checkpoint

        if domain is None or student is None:
            raise ConfigError("--from-usage needs --domain NAME and --student MODEL (a catalog name, a GGUF "
                              "file or a checkpoint dir)")
        dom = domain_module(domain)
        name = expert or f"{Path(str(student)).stem}-{dom.DOMAIN}"
        out = out or Path("runs") / name
        # the TrainConfig needs a student dir to validate; the GGUF is dequantized into one beside out/
        work = out.parent / f"{out.name}-work"
        init = student_checkpoint(student, work)
        # a full fine-tune's settings (the loop's defaults suit training from scratch); with a train.yaml its
        # own settings win over these, and the flags over both
        merged = {} if config is not None else dict(FLYWHEEL_DEFAULTS)
        merged.update({k: v for k, v in overrides.items() if v is not None})
        if config is None and "lr" in merged:
            merged["min_lr"] = merged["lr"] / 10
        cfg = train_config(config, init, None, out_dir=out, **merged)
        result = distill_from_usage(source, dom, cfg, student=student, expert=name, model=model,
                                    max_examples=max_examples)
        agree = ""
        if result.dev_agreement is not None:
            agree = f"  dev agreement with the teacher {result.dev_agreement:.1%} ({result.n_dev} prompts)"
        typer.echo(f"{name}: {result.n_train} logged answers of {result.teacher}, step {result.train.step}  "
                   f"loss {result.train.train_loss:.4f}{agree}  -> {result.expert_dir}")
        typer.echo(f"fleet.yaml entry: {result.expert_dir / 'fleet.yaml'}; refit the router: fleet route fit "
                   f"--data {result.expert_dir / 'routing.jsonl'} --router knn --out ROUTER_DIR")

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
