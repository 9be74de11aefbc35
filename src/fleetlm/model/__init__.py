"""The compact Llama-family decoder, HF checkpoint load/save, and the tokenizer with its chat template."""

from pathlib import Path

from fleetlm.model.checkpoint import load_checkpoint, read_config, save_checkpoint
from fleetlm.model.config import ModelConfig
from fleetlm.model.decoder import KVCache, Transformer
from fleetlm.model.tokenizer import ChatTemplateError, Tokenizer

# Random-weight tiny Llama, real tokenizer and chat template; made by `python -m fleetlm.model.make_tiny`.
SHIPPED_TINY_MODEL = Path(__file__).resolve().parent.parent / "assets" / "tiny-llama"

__all__ = [
    "SHIPPED_TINY_MODEL",
    "ChatTemplateError",
    "KVCache",
    "ModelConfig",
    "Tokenizer",
    "Transformer",
    "load_checkpoint",
    "read_config",
    "save_checkpoint",
]
