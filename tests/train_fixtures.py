"""Small helpers shared by the fleetlm.train tests: synthetic chat data, a BPE tokenizer, a tiny config."""

from __future__ import annotations

import json
import random
from pathlib import Path


def chat_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        rows.append({"messages": [{"role": "user", "content": f"{a}+{b}="},
                                  {"role": "assistant", "content": str(a + b)}]})
    return rows


def write_chat(path: Path, n: int, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n, seed)))
    return path


def tiny_config(tmp: Path, data_file: Path | str, **over) -> dict:
    """A ~30k parameter llama trained from scratch on `data` with its own 300-id BPE tokenizer."""
    cfg = {
        "model": {"shape": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4,
                            "num_kv_heads": 2, "max_position_embeddings": 64}},
        "tokenizer": {"train_vocab_size": 300},
        "data": {"train": str(data_file), "format": "chat", "seq_len": 32, "eval_fraction": 0.1},
        "out_dir": str(tmp / "run"),
        "steps": 10, "batch_size": 8, "grad_accum": 1, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2,
        "eval_interval": 0, "eval_batches": 2, "progress": False, "seed": 0,
    }
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg
