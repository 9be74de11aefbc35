"""The train.yaml schema: a pydantic model per section, so a typo or a bad value is one clear ConfigError."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleetlm.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelShape(_Strict):
    """The shape of a model trained from scratch (the vocabulary size comes from the tokenizer)."""

    arch: Literal["llama", "qwen2", "mistral"] = "llama"
    hidden_size: int = Field(128, gt=0)
    intermediate_size: int = Field(344, gt=0)
    num_layers: int = Field(4, gt=0)
    num_heads: int = Field(4, gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    max_position_embeddings: int = Field(512, gt=0)
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelShape:
        kv = self.num_kv_heads or self.num_heads
        if self.hidden_size % self.num_heads or self.num_heads % kv:
            raise ValueError("hidden_size must divide by num_heads and num_heads by num_kv_heads")
        return self


class ModelSection(_Strict):
    """Either `init` (an HF-layout checkpoint to fine-tune) or `shape` (a new model), not both."""

    init: Path | None = None
    shape: ModelShape | None = None
    backend: Literal["fleetlm", "hf"] = "fleetlm"  # our Transformer or transformers' AutoModelForCausalLM

    @model_validator(mode="after")
    def _one_source(self) -> ModelSection:
        if (self.init is None) == (self.shape is None):
            raise ValueError("give exactly one of model.init (a checkpoint dir) or model.shape (a new model)")
        return self


class TokenizerSection(_Strict):
    """A tokenizer dir, or a byte-level BPE trained on the training data (for models trained from scratch)."""

    path: Path | None = None
    train_vocab_size: int | None = Field(None, ge=300)


class DataSection(_Strict):
    train: Path
    eval: Path | None = None
    format: Literal["chat", "text"] = "chat"
    seq_len: int = Field(256, gt=1)
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # held out from train when no eval file is given


class LoraSection(_Strict):
    r: int = Field(8, gt=0)
    alpha: float = 16.0
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]


class TrainConfig(_Strict):
    model: ModelSection
    data: DataSection
    tokenizer: TokenizerSection = TokenizerSection()
    lora: LoraSection | None = None
    out_dir: Path = Path("runs/train")
    steps: int = Field(100, gt=0)
    batch_size: int = Field(8, gt=0)  # sequences per optimizer step, over all processes and micro-batches
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    bf16: bool = False  # autocast to bfloat16 on CPU; the master weights stay float32
    eval_interval: int = Field(50, ge=0)  # 0: only at the end
    eval_batches: int = Field(8, gt=0)
    save_interval: int = Field(0, ge=0)  # 0: only at the end
    seed: int = 0
    progress: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} does not divide by grad_accum {self.grad_accum}")
        if self.lora is not None and self.model.init is None:
            raise ValueError("lora needs model.init (the base checkpoint the adapters train on)")
        tok = self.tokenizer
        if self.model.shape is not None and tok.path is None and not tok.train_vocab_size:
            raise ValueError("a model from scratch needs tokenizer.path or tokenizer.train_vocab_size")
        return self


def parse_config(data: dict, base_dir: Path | None = None) -> TrainConfig:
    """Validate a dict; relative paths are taken relative to `base_dir` (the yaml file's folder)."""
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "config"
        raise ConfigError(f"train config: {where}: {first['msg']} ({exc.error_count()} error(s))") from None
    if base_dir is not None:
        fix = lambda p: p if p is None or p.is_absolute() else base_dir / p  # noqa: E731
        cfg.model.init, cfg.tokenizer.path = fix(cfg.model.init), fix(cfg.tokenizer.path)
        cfg.data.train, cfg.data.eval, cfg.out_dir = fix(cfg.data.train), fix(cfg.data.eval), fix(cfg.out_dir)
    return cfg


def load_config(path: str | Path) -> TrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"train config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train config {path} must be a mapping of sections")
    return parse_config(data, base_dir=path.parent.resolve())
