import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

from fleetlm.errors import CheckpointError
from fleetlm.train.config import parse_config
from fleetlm.train.loop import Batch, lm_loss, lr_at, read_resume_config, train
from train_fixtures import tiny_config, write_chat

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_chat(tmp_path_factory.mktemp("data") / "train.jsonl", 300)


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def test_loss_goes_down_and_eval_reports_perplexity(data, tmp_path):
    cfg = parse_config(tiny_config(tmp_path, data, steps=40, batch_size=16, eval_interval=20))
    result = train(cfg)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 40 and result.step == 40
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert result.eval_loss is not None and result.perplexity == pytest.approx(math.exp(result.eval_loss))
    assert [h["step"] for h in result.history if "eval_loss" in h] == [20, 40]
    assert result.tokens_per_s > 0
    lines = (cfg.out_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, 41))


def test_resume_matches_an_uninterrupted_run(data, tmp_path):
    full = parse_config(tiny_config(tmp_path / "a", data, steps=8, grad_accum=2))
    train(full)
    cut = parse_config(tiny_config(tmp_path / "b", data, steps=8, grad_accum=2))
    assert train(cut, stop_after=3).step == 3
    assert read_resume_config(cut.out_dir).steps == 8
    resumed = train(resume=cut.out_dir)
    assert resumed.step == 8
    a, b = weights(full.out_dir), weights(cut.out_dir)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_checkpoint_loads_in_transformers_and_fleetlm_with_equal_logits(data, tmp_path):
    from transformers import AutoModelForCausalLM

    from fleetlm.model.checkpoint import load_checkpoint
    from fleetlm.model.tokenizer import Tokenizer

    cfg = parse_config(tiny_config(tmp_path, data, steps=3))
    train(cfg)
    ours = load_checkpoint(cfg.out_dir).eval()
    hf = AutoModelForCausalLM.from_pretrained(cfg.out_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_dir(cfg.out_dir)
    ids = torch.tensor([tok.encode("<|im_start|>user\n3+4=<|im_end|>\n", add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_hf_backend_and_loss_hook_and_bf16(data, tmp_path):
    seen = []

    def hook(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        seen.append((logits.shape, batch.input_ids.shape, batch.labels.shape))
        return lm_loss(logits, batch)

    cfg = parse_config(tiny_config(tmp_path, data, steps=12, bf16=True, model={"backend": "hf"}))
    result = train(cfg, loss_fn=hook)
    assert len(seen) == 12 + 2  # one call per training micro-batch, then eval_batches=2 at the end
    assert seen[0][0][:2] == seen[0][1] == seen[0][2]
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert (cfg.out_dir / "config.json").is_file() and (cfg.out_dir / "tokenizer.json").is_file()


def test_lr_schedule():
    cfg = parse_config(tiny_config(__import__("pathlib").Path("."), "x.jsonl", steps=100, warmup_steps=10))
    assert lr_at(0, cfg) == pytest.approx(cfg.lr / 10)
    assert lr_at(9, cfg) == pytest.approx(cfg.lr)
    assert lr_at(10, cfg) == pytest.approx(cfg.lr)
    assert lr_at(55, cfg) == pytest.approx((cfg.lr + cfg.min_lr) / 2)
    assert lr_at(100, cfg) == pytest.approx(cfg.min_lr)


def test_resume_from_a_dir_that_is_not_a_run(tmp_path):
    with pytest.raises(CheckpointError, match="train_state.pt"):
        train(resume=tmp_path)
