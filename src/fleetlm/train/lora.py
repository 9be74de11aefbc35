"""LoRA with peft on a Hugging Face causal LM.

Our checkpoints are in the HF layout, so the base is loaded with transformers rather than wrapping our
Transformer: peft's adapters, `adapter_config.json` and merge path are then the standard ones (the adapter
works on the same base in any HF tool), and the merged model is saved with save_pretrained into the HF layout
that our engine loads. Our decoder stays the inference path; training adapters is an offline job.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from fleetlm.errors import CheckpointError
from fleetlm.train.config import LoraSection

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _base(base_dir: str | Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not (Path(base_dir) / "config.json").is_file():
        raise CheckpointError(f"LoRA base is not a checkpoint dir (no config.json): {base_dir}")
    return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)


def lora_model(base_dir: str | Path, lora: LoraSection, adapter_dir: str | Path | None = None) -> nn.Module:
    """The base wrapped with trainable adapters: fresh ones, or those saved in adapter_dir (to resume)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base = _base(base_dir)
    if adapter_dir is not None:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def merge_lora(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold the adapters into the base weights and save a plain HF checkpoint (with the base's tokenizer)."""
    from peft import PeftModel

    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise CheckpointError(f"not a PEFT adapter dir (no adapter_config.json): {adapter_dir}")
    merged = PeftModel.from_pretrained(_base(base_dir), str(adapter_dir)).merge_and_unload()
    out = Path(out_dir)
    merged.save_pretrained(out, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (Path(base_dir) / name).is_file():
            shutil.copyfile(Path(base_dir) / name, out / name)
    return out
