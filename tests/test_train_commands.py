import os

import pytest
import yaml
from typer.testing import CliRunner

from fleetlm.cli import app
from fleetlm.errors import CheckpointError, ConfigError
from train_fixtures import tiny_config, write_chat

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def test_fleet_train_config_then_resume(tmp_path):
    data = write_chat(tmp_path / "train.jsonl", 60)
    cfg = tiny_config(tmp_path, data, steps=3)
    cfg["data"]["train"], cfg["out_dir"] = "train.jsonl", "run"  # relative to the yaml file
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    result = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "train.yaml")])
    assert result.exit_code == 0, result.output
    assert "step 3" in result.output and "tokens/s" in result.output
    assert (tmp_path / "run" / "model.safetensors").is_file()
    result = CliRunner().invoke(app, ["train", "--resume", str(tmp_path / "run"), "--steps", "5"])
    assert result.exit_code == 0, result.output
    assert "step 5" in result.output
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 5


@pytest.mark.parametrize("args, error", [
    (["train"], ConfigError),
    (["train", "--config", "nope.yaml"], ConfigError),
    (["train", "--resume", "."], CheckpointError),
    (["lora", "merge", "--base", ".", "--adapter", ".", "--out", "x"], CheckpointError),
])
def test_user_mistakes_are_typed_errors(args, error, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, error), result.output
