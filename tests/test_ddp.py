import os

import torch
from safetensors.torch import load_file

from fleetlm.train.bpe import train_bpe
from fleetlm.train.config import parse_config
from fleetlm.train.data import read_texts
from fleetlm.train.ddp import launch
from fleetlm.train.loop import train
from train_fixtures import tiny_config, write_chat

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_two_processes_reach_the_weights_of_one_with_the_same_global_batch(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 120)
    tok = train_bpe(read_texts(data), 300, tmp_path / "tok")
    # masked chat examples differ in length, so each process holds a different share of the loss tokens:
    # the loop divides by the global count, which makes the summed gradients equal the single-process ones
    common = {"steps": 4, "batch_size": 8, "grad_accum": 2, "lr": 5e-3,
              "data": {"eval_fraction": 0.0}, "tokenizer": {"path": str(tok), "train_vocab_size": None}}
    one = parse_config(tiny_config(tmp_path / "one", data, **common))
    first = train(parse_config(tiny_config(tmp_path / "init", data, **{**common, "steps": 1, "lr": 1e-9})))
    train(one)
    two = parse_config(tiny_config(tmp_path / "two", data, **common))
    launch(two, nprocs=2)
    a = load_file(str(one.out_dir / "model.safetensors"))
    b = load_file(str(two.out_dir / "model.safetensors"))
    start = load_file(str(first.out_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    # and training did move the weights well beyond that tolerance
    assert max((a[n] - start[n]).abs().max().item() for n in a) > 1e-2
    lines = (two.out_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4  # only rank 0 logs
