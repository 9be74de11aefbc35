import json
import shutil
import subprocess
import sys

import pytest
import torch

from fleetlm.errors import CheckpointError
from fleetlm.model import SHIPPED_TINY_MODEL, Tokenizer, load_checkpoint, save_checkpoint
from fleetlm.model.checkpoint import INDEX, WEIGHTS


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def hf_load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_load_reads_config_of_each_family(tiny_checkpoint_factory, arch):
    model = load_checkpoint(tiny_checkpoint_factory(arch))
    c = model.config
    assert (c.arch, c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (
        arch,
        64,
        2,
        4,
        2,
        16,
    )
    assert c.attention_bias == (arch == "qwen2")
    assert c.tie_word_embeddings == (arch == "qwen2")
    assert c.sliding_window == (4096 if arch == "mistral" else None)
    assert len(c.eos_token_ids) == 2 and not model.training


@pytest.mark.parametrize("arch,shard_bytes", [("llama", None), ("llama", 60_000), ("qwen2", 60_000)])
def test_save_round_trip_and_transformers_loads_it(tiny_checkpoint_factory, tmp_path, arch, shard_bytes):
    src = tiny_checkpoint_factory(arch)
    model = load_checkpoint(src)
    out = save_checkpoint(model, tmp_path / "saved", tokenizer_dir=src, max_shard_bytes=shard_bytes)
    if shard_bytes is None:
        assert (out / WEIGHTS).is_file() and not (out / INDEX).exists()
    else:
        index = json.loads((out / INDEX).read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and all((out / s).is_file() for s in shards) and not (out / WEIGHTS).exists()
        assert "lm_head.weight" not in index["weight_map"] or not model.config.tie_word_embeddings
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    again = load_checkpoint(out)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(0))
    want = logits(model, ids)
    assert (logits(hf_load(out), ids) - want).abs().max().item() <= 1e-4
    assert Tokenizer.from_dir(out).encode("hello fleet") == Tokenizer.from_dir(src).encode("hello fleet")


def test_rope_scaled_model_saved_by_us_loads_in_transformers(tiny_checkpoint_factory, tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
    }
    model = load_checkpoint(
        tiny_checkpoint_factory("llama", rope_scaling=scaling, max_position_embeddings=32)
    )
    out = save_checkpoint(model, tmp_path / "scaled")
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(1))
    assert (logits(hf_load(out), ids) - logits(model, ids)).abs().max().item() <= 1e-4


def test_save_bf16_keeps_dtype(tiny_llama, tmp_path):
    tok = Tokenizer.from_dir(tiny_llama)
    out = save_checkpoint(load_checkpoint(tiny_llama, dtype="bf16"), tmp_path / "bf16", tokenizer_dir=tok)
    assert Tokenizer.from_dir(out).apply_chat_template([{"role": "user", "content": "x"}]).endswith("\n\n")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS), "pt") as f:
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_resave_replaces_old_shards(tiny_llama, tmp_path):
    model = load_checkpoint(tiny_llama)
    save_checkpoint(model, tmp_path / "m", max_shard_bytes=60_000)
    save_checkpoint(model, tmp_path / "m")
    assert not (tmp_path / "m" / INDEX).exists() and not list((tmp_path / "m").glob("model-*"))
    load_checkpoint(tmp_path / "m")


def check_error(path, *words):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_errors_are_one_clear_line(tiny_llama, tmp_path):
    check_error(tmp_path / "nope", "not found")
    (tmp_path / "file.txt").write_text("x")
    check_error(tmp_path / "file.txt", "not a checkpoint directory")
    (tmp_path / "empty").mkdir()
    check_error(tmp_path / "empty", "no config.json")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    )
    check_error(gpt2, "unsupported architecture", "GPT2LMHeadModel")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    check_error(tmp_path / "bad", "config.json")
    noweights = tmp_path / "noweights"
    noweights.mkdir()
    shutil.copyfile(tiny_llama / "config.json", noweights / "config.json")
    check_error(noweights, WEIGHTS)
    shutil.copyfile(tiny_llama / WEIGHTS, noweights / WEIGHTS)
    cfg = json.loads((tiny_llama / "config.json").read_text())
    (noweights / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    check_error(noweights, "lacks", "model.layers.2")
    (noweights / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    check_error(noweights, "does not match")
    (noweights / "config.json").write_text(json.dumps({**cfg, "vocab_size": None}))
    check_error(noweights, "config.json")


def test_saving_a_modified_module_tree_is_refused(tiny_llama, tmp_path):
    model = load_checkpoint(tiny_llama)
    model.layers[0].mlp.extra = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="cannot save"):
        save_checkpoint(model, tmp_path / "x")


def test_shipped_tiny_model_loads_and_matches_transformers():
    model = load_checkpoint(SHIPPED_TINY_MODEL)
    size = sum(f.stat().st_size for f in SHIPPED_TINY_MODEL.iterdir())
    assert model.config.arch == "llama" and size < 2_000_000
    tok = Tokenizer.from_dir(SHIPPED_TINY_MODEL)
    assert tok.vocab_size == model.config.vocab_size and tok.chat_template
    ids = torch.tensor([tok.encode("The fleet is ready.")])
    assert (logits(model, ids) - logits(hf_load(SHIPPED_TINY_MODEL), ids)).abs().max().item() <= 1e-4


def test_loading_and_chat_do_not_import_transformers():
    code = (
        "import sys, torch\n"
        "from fleetlm.model import SHIPPED_TINY_MODEL, Tokenizer, load_checkpoint\n"
        "m = load_checkpoint(SHIPPED_TINY_MODEL)\n"
        "t = Tokenizer.from_dir(SHIPPED_TINY_MODEL)\n"
        "prompt = t.apply_chat_template([{'role': 'user', 'content': 'hi'}])\n"
        "ids = t.encode(prompt, add_special_tokens=False)\n"
        "m(torch.tensor([ids]))\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
