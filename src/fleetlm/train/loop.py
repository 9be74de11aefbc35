"""The training loop, nanoGPT-style: AdamW, warm-up + cosine, clipping, bf16 autocast, accumulation, DDP.

Works for our Transformer and any Hugging Face causal LM (and a peft LoRA wrapper of one). The loss is a hook
`loss_fn(student_logits, batch) -> summed loss over the batch's loss tokens`, so distillation plugs in by
passing a different function (the teacher's logits are computed inside it from batch.input_ids). A second,
optional hook `batch_fn(step, model, micro_batches) -> micro_batches` may replace a step's batches before the
forward pass (on-policy distillation swaps in the student's own samples); the loss is then normalized by the
loss tokens of the replaced batches.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fleetlm.errors import CheckpointError, ConfigError
from fleetlm.train.config import TrainConfig, parse_config
from fleetlm.train.data import IGNORE, Example, step_batches

STATE_FILE = "train_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], IGNORE where no loss; the loss at t predicts labels[t + 1]
    on_policy: bool = False  # the loss tokens are the model's own samples, not targets to imitate


LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]
BatchFn = Callable[[int, nn.Module, list[Batch]], list[Batch]]


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    train_loss: float
    eval_loss: float | None
    perplexity: float | None
    tokens_per_s: float
    history: list[dict] = field(default_factory=list)


def lm_loss(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy summed over the loss tokens (the loop divides by the global token count)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


def global_loss_tokens(micro: list[Batch], world: int) -> int:
    n = torch.tensor(sum(int((b.labels[:, 1:] != IGNORE).sum()) for b in micro))
    if world > 1:
        dist.all_reduce(n)
    return max(int(n), 1)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits  # HF models return an output record


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def init_distributed() -> tuple[int, int]:
    """(rank, world): joins the gloo process group when launched by torchrun (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("gloo")
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]  # matrices decay; norms and biases do not (nanoGPT)
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


@torch.no_grad()
def evaluate(model: nn.Module, examples: list[Example], cfg: TrainConfig, pad_id: int, rank: int, world: int,
             loss_fn: LossFn) -> tuple[float, float]:
    """Mean loss per loss token and perplexity over the first eval_batches batches, split over processes."""
    from fleetlm.train.data import collate

    model.eval()
    micro = max(1, cfg.batch_size // (cfg.grad_accum * world))
    chunk = examples[: cfg.eval_batches * micro * world]
    total = torch.zeros(2, dtype=torch.float64)
    for start in range(rank * micro, len(chunk), micro * world):
        ids, labels = collate(chunk[start : start + micro], pad_id)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss = loss_fn(logits_of(model, ids), Batch(ids, labels))
        total += torch.tensor([loss.item(), (labels[:, 1:] != IGNORE).sum().item()], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    model.train()
    mean = (total[0] / total[1].clamp(min=1)).item()
    return mean, math.exp(min(mean, 50.0))


def save_checkpoint_dir(model: nn.Module, out_dir: Path, tok_dir: Path, opt: torch.optim.Optimizer, step: int,
                        cfg: TrainConfig) -> None:
    """HF layout (or PEFT adapter layout for LoRA) plus train_state.pt with the optimizer for resuming."""
    raw = unwrap(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    if hasattr(raw, "save_pretrained"):  # transformers models and peft adapters write their own layouts
        raw.save_pretrained(out_dir, safe_serialization=True)
    else:
        from fleetlm.model.checkpoint import save_checkpoint

        save_checkpoint(raw, out_dir)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file() and tok_dir.resolve() != out_dir.resolve():
            shutil.copyfile(tok_dir / name, out_dir / name)
    state = {"step": step, "optimizer": opt.state_dict(), "config": cfg.model_dump(mode="json"),
             "rng": torch.get_rng_state()}
    torch.save(state, out_dir / STATE_FILE)


def read_resume_config(resume: str | Path) -> TrainConfig:
    path = Path(resume) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} not found (not a checkpoint written by fleet train)")
    return parse_config(torch.load(path, map_location="cpu", weights_only=False)["config"])


def train(cfg: TrainConfig | None = None, resume: str | Path | None = None, loss_fn: LossFn = lm_loss,
          stop_after: int | None = None, batch_fn: BatchFn | None = None) -> TrainResult:
    """Train per cfg (or continue the run saved in `resume`); `stop_after` ends early like an interruption."""
    from fleetlm.train.setup import build

    if cfg is None:
        if resume is None:
            raise ConfigError("train needs a config or a checkpoint dir to resume")
        cfg = read_resume_config(resume)
        cfg.out_dir = Path(resume)  # continue in place, wherever the run dir now lives
    rank, world = init_distributed()
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ConfigError(f"batch_size {cfg.batch_size} does not split into grad_accum {cfg.grad_accum} "
                          f"x {world} processes")
    torch.manual_seed(cfg.seed)
    model, tok, tok_dir, train_ex, eval_ex, pad_id = build(cfg, resume, rank, world)
    opt = make_optimizer(model, cfg)
    step = 0
    if resume is not None:
        state = torch.load(Path(resume) / STATE_FILE, map_location="cpu", weights_only=False)
        opt.load_state_dict(state["optimizer"])
        step, _ = state["step"], torch.set_rng_state(state["rng"])
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    model.train()
    end = min(cfg.steps, stop_after) if stop_after is not None else cfg.steps
    history: list[dict] = []
    metrics = cfg.out_dir / "metrics.jsonl"
    if rank == 0:
        cfg.out_dir.mkdir(parents=True, exist_ok=True)
        if resume is None:
            metrics.unlink(missing_ok=True)  # a fresh run starts a fresh log; a resumed one appends
    bar = tqdm(total=cfg.steps, initial=step, disable=rank != 0 or not cfg.progress, unit="step")
    t0, seen, loss_val, ev = time.perf_counter(), 0, float("nan"), (None, None)
    while step < end:
        pairs, n_loss = step_batches(train_ex, step, cfg.batch_size, cfg.grad_accum, cfg.seed, pad_id,
                                     rank, world)
        micro = [Batch(ids, labels) for ids, labels in pairs]
        if batch_fn is not None:
            micro = batch_fn(step, unwrap(model), micro)
            n_loss = global_loss_tokens(micro, world)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        total = torch.zeros(())
        for m, batch in enumerate(micro):
            last = m == len(micro) - 1
            # DDP all-reduces gradients only on the last micro-batch of a step
            sync = model.no_sync() if world > 1 and not last else nullcontext()
            with sync, torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
                loss = loss_fn(logits_of(model, batch.input_ids), batch) / n_loss * world
                loss.backward()
            total += loss.detach() / world
            seen += int((batch.input_ids != pad_id).sum()) * world
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if world > 1:
            dist.all_reduce(total)
        loss_val = total.item()
        record = {"step": step, "loss": loss_val, "lr": lr_at(step - 1, cfg)}
        if eval_ex and (step == cfg.steps or (cfg.eval_interval and step % cfg.eval_interval == 0)):
            ev = evaluate(model, eval_ex, cfg, pad_id, rank, world, loss_fn)
            record.update(eval_loss=ev[0], perplexity=ev[1])
        history.append(record)
        tps = seen / max(time.perf_counter() - t0, 1e-9)
        bar.set_postfix(loss=f"{loss_val:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
        bar.update(1)
        if rank == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps(record) + "\n")
            if step == end or (cfg.save_interval and step % cfg.save_interval == 0):
                save_checkpoint_dir(model, cfg.out_dir, tok_dir, opt, step, cfg)
    bar.close()
    if world > 1:
        dist.barrier()  # the checkpoint is complete before any process returns
    elapsed = time.perf_counter() - t0
    return TrainResult(cfg.out_dir, step, loss_val, ev[0], ev[1], seen / max(elapsed, 1e-9), history)

