import os

import pytest
import torch

from fleetlm.errors import CheckpointError
from fleetlm.train.config import parse_config
from fleetlm.train.loop import train
from fleetlm.train.lora import merge_lora
from train_fixtures import tiny_config, write_chat

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_lora_adapters_train_save_in_peft_format_and_merge_to_equal_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fleetlm.model.checkpoint import load_checkpoint

    data = write_chat(tmp_path / "train.jsonl", 100)
    base = parse_config(tiny_config(tmp_path / "base", data, steps=3))
    train(base)
    cfg = tiny_config(tmp_path / "lora", data, steps=6, lr=2e-2, lora={"r": 4, "alpha": 8},
                      model={"init": str(base.out_dir), "shape": None}, tokenizer={"train_vocab_size": None})
    lora = parse_config(cfg)
    train(lora)
    adapter = lora.out_dir
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "model.safetensors").exists()  # adapters only, the base is untouched

    merged_dir = merge_lora(base.out_dir, adapter, tmp_path / "merged")
    ids = torch.tensor([[1, 5, 40, 99, 7, 250, 3]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base.out_dir, dtype=torch.float32).eval()
        base_logits = plain(ids).logits
        with_adapter = PeftModel.from_pretrained(plain, str(adapter)).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()(ids).logits
        ours = load_checkpoint(merged_dir).eval()(ids)
    torch.testing.assert_close(merged, with_adapter, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, with_adapter, rtol=1e-4, atol=1e-4)
    assert (with_adapter - base_logits).abs().max() > 1e-3  # the adapters learned something
    assert (merged_dir / "tokenizer.json").is_file()


def test_merge_rejects_a_dir_without_adapters(tmp_path):
    with pytest.raises(CheckpointError, match="adapter_config.json"):
        merge_lora(tmp_path, tmp_path, tmp_path / "out")
