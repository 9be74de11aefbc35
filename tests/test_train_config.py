import pytest
import yaml

from fleetlm.errors import ConfigError
from fleetlm.train.config import TrainConfig, load_config, parse_config

BASE = {"model": {"shape": {"hidden_size": 64, "num_heads": 4}}, "tokenizer": {"train_vocab_size": 512},
        "data": {"train": "train.jsonl"}}


def test_defaults_and_shape():
    cfg = parse_config(BASE)
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.shape.hidden_size == 64 and cfg.model.backend == "fleetlm"
    assert cfg.steps > 0 and cfg.schedule == "cosine" and cfg.bf16 is False and cfg.data.format == "chat"


def test_yaml_paths_are_relative_to_the_file(tmp_path):
    path = tmp_path / "sub" / "train.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({**BASE, "out_dir": "out", "steps": 7, "lr": 1e-3}))
    cfg = load_config(path)
    assert cfg.data.train == path.parent / "train.jsonl"
    assert cfg.out_dir == path.parent / "out"
    assert cfg.steps == 7 and cfg.lr == 1e-3


@pytest.mark.parametrize("bad, words", [
    ({**BASE, "steps": 0}, "steps"),
    ({**BASE, "stepz": 3}, "stepz"),
    ({**BASE, "batch_size": 6, "grad_accum": 4}, "grad_accum"),
    ({**BASE, "model": {"shape": {"hidden_size": 30, "num_heads": 4}}}, "num_heads"),
    ({**BASE, "model": {"init": "ckpt", "shape": {}}}, "exactly one"),
    ({**BASE, "model": {}}, "exactly one"),
    ({**BASE, "tokenizer": {}}, "tokenizer"),
    ({**BASE, "lora": {"r": 4}}, "model.init"),
    ({**BASE, "schedule": "wiggly"}, "schedule"),
])
def test_bad_values_are_one_line_config_errors(bad, words):
    with pytest.raises(ConfigError) as err:
        parse_config(bad)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(tmp_path / "broken.yaml")
