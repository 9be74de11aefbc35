"""Build what a run needs from its config: tokenizer, model (ours, HF, or LoRA-wrapped HF) and data."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import nn

from fleetlm.errors import CheckpointError
from fleetlm.train.config import ModelShape, TrainConfig
from fleetlm.train.data import Example, load_chat, pack_texts, read_texts


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2 style init; PyTorch's default N(0, 1) embedding makes tied output logits far too large."""
    for mod in model.modules():
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, mean=0.0, std=std)
        if isinstance(mod, nn.Linear) and mod.bias is not None:
            nn.init.zeros_(mod.bias)


def model_config(shape: ModelShape, vocab_size: int, eos_ids: list[int], bos_id: int | None):
    from fleetlm.model.config import ModelConfig

    return ModelConfig(
        arch=shape.arch, vocab_size=vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_layers=shape.num_layers, num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads or shape.num_heads, head_dim=shape.hidden_size // shape.num_heads,
        rms_norm_eps=1e-6, rope_theta=shape.rope_theta, rope_scaling=None,
        max_position_embeddings=shape.max_position_embeddings, tie_word_embeddings=shape.tie_word_embeddings,
        attention_bias=shape.arch == "qwen2", bos_token_id=bos_id, eos_token_ids=eos_ids, sliding_window=None,
    )


def new_model(cfg: TrainConfig, vocab_size: int, eos_ids: list[int], bos_id: int | None) -> nn.Module:
    mc = model_config(cfg.model.shape, vocab_size, eos_ids, bos_id)
    if cfg.model.backend == "hf":
        from transformers import AutoConfig, AutoModelForCausalLM

        hf = mc.to_hf()
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf))
    else:
        from fleetlm.model.decoder import Transformer

        model = Transformer(mc)
    init_weights(model)
    return model.float()


def load_model(path: Path, backend: str) -> nn.Module:
    if not (Path(path) / "config.json").is_file():
        raise CheckpointError(f"not a checkpoint dir (no config.json): {path}")
    if backend == "hf":
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    from fleetlm.model.checkpoint import load_checkpoint

    return load_checkpoint(path, dtype=torch.float32)


def tokenizer_dir(cfg: TrainConfig, resume: str | Path | None, rank: int, world: int) -> Path:
    if resume is not None:
        return Path(resume)
    if cfg.tokenizer.path is not None:
        return cfg.tokenizer.path
    if cfg.model.init is not None:
        return cfg.model.init
    out = cfg.out_dir / "tokenizer"
    if rank == 0:
        from fleetlm.train.bpe import train_bpe

        train_bpe(read_texts(cfg.data.train), cfg.tokenizer.train_vocab_size, out,
                  model_max_length=cfg.model.shape.max_position_embeddings)
    if world > 1:
        torch.distributed.barrier()  # the other processes read the tokenizer rank 0 just wrote
    return out


def load_examples(path: Path, cfg: TrainConfig, tok, eos_id: int) -> list[Example]:
    if cfg.data.format == "chat":
        return load_chat(path, tok, cfg.data.seq_len)
    return pack_texts(read_texts(path), tok, cfg.data.seq_len, eos_id)


def build(cfg: TrainConfig, resume: str | Path | None, rank: int, world: int):
    """(model, tokenizer, tokenizer dir, train examples, eval examples, pad id) for a run."""
    from tokenizers import Tokenizer as RawTokenizer

    from fleetlm.model.tokenizer import Tokenizer

    tok_dir = tokenizer_dir(cfg, resume, rank, world)
    if not (tok_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"no tokenizer.json in {tok_dir}")
    tok = Tokenizer.from_dir(tok_dir)
    eos_ids = list(tok.eos_token_ids)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_ids[0]
    if cfg.lora is not None:
        from fleetlm.train.lora import lora_model

        model = lora_model(cfg.model.init, cfg.lora, adapter_dir=resume)
    elif resume is not None or cfg.model.init is not None:
        model = load_model(Path(resume or cfg.model.init), cfg.model.backend)
    else:
        vocab = RawTokenizer.from_file(str(tok_dir / "tokenizer.json")).get_vocab_size()
        model = new_model(cfg, vocab, eos_ids, tok.bos_token_id)
    train_ex = load_examples(cfg.data.train, cfg, tok, eos_ids[0])
    if cfg.data.eval is not None:
        eval_ex = load_examples(cfg.data.eval, cfg, tok, eos_ids[0])
    elif cfg.data.eval_fraction > 0 and len(train_ex) > 1:
        random.Random(cfg.seed).shuffle(train_ex)  # a seeded split, the same in every process
        n_eval = max(1, int(len(train_ex) * cfg.data.eval_fraction))
        train_ex, eval_ex = train_ex[n_eval:], train_ex[:n_eval]
    else:
        eval_ex = []
    return model, tok, tok_dir, train_ex, eval_ex, pad_id
