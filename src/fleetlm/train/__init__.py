"""Training: the loop (ours or any HF causal LM), chat/text data, a BPE tokenizer, DDP on gloo, LoRA."""

from fleetlm.train.config import TrainConfig, load_config, parse_config
from fleetlm.train.loop import Batch, LossFn, TrainResult, lm_loss, train

__all__ = ["Batch", "LossFn", "TrainConfig", "TrainResult", "lm_loss", "load_config", "parse_config", "train"]
