"""Shared session fixtures: tiny random HF checkpoints (built with transformers, offline) per architecture."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Which tokenizer/chat-template style each family gets in the fixtures.
ARCH_STYLE = {"llama": "llama3", "mistral": "llama3", "qwen2": "chatml"}
TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
)


def perturb_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Random weights with std 0.1 (not 0.02), norms near 1, nonzero biases: logits of real spread."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = std * torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + noise if "norm" in name else noise)


def build_tiny_checkpoint(out: Path, arch: str, tokenizer_dir: Path, ids: dict, **overrides) -> Path:
    import transformers

    cls_name, cfg_name = {
        "llama": ("LlamaForCausalLM", "LlamaConfig"),
        "qwen2": ("Qwen2ForCausalLM", "Qwen2Config"),
        "mistral": ("MistralForCausalLM", "MistralConfig"),
    }[arch]
    kwargs = dict(
        TINY_SHAPE,
        vocab_size=ids["vocab_size"],
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_ids"],
        pad_token_id=ids["pad_token_id"],
    )
    kwargs.update(
        {
            "llama": dict(tie_word_embeddings=False, rope_theta=500000.0),
            "qwen2": dict(tie_word_embeddings=True, rope_theta=1000000.0),
            "mistral": dict(tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=4096),
        }[arch]
    )
    kwargs.update(overrides)
    config = getattr(transformers, cfg_name)(**kwargs)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    perturb_(model)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    """style ("llama3" | "chatml") -> (dir with tokenizer.json + tokenizer_config.json, token ids)."""
    from fleetlm.model.make_tiny import write_tokenizer

    cache: dict[str, tuple[Path, dict]] = {}

    def make(style: str) -> tuple[Path, dict]:
        if style not in cache:
            out = tmp_path_factory.mktemp(f"tok-{style}")
            cache[style] = (out, write_tokenizer(out, style))
        return cache[style]

    return make


@pytest.fixture(scope="session")
def tiny_checkpoint_factory(tmp_path_factory, tiny_tokenizer_dir):
    """arch ("llama" | "qwen2" | "mistral"), **config overrides -> Path of a tiny random f32 HF checkpoint.

    Built once per (arch, overrides) in the session; treat the directory as read-only.
    """
    cache: dict[str, Path] = {}

    def make(arch: str = "llama", **overrides) -> Path:
        key = json.dumps([arch, overrides], sort_keys=True)
        if key not in cache:
            tok_dir, ids = tiny_tokenizer_dir(ARCH_STYLE[arch])
            out = tmp_path_factory.mktemp(f"tiny-{arch}")
            cache[key] = build_tiny_checkpoint(out, arch, tok_dir, ids, **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoint_factory) -> Path:
    return tiny_checkpoint_factory("llama")


@pytest.fixture(scope="session")
def ci_fleet(tmp_path_factory):
    """The reduced fleet recipe, built once per session: (fleet dir, build summary)."""
    from fleetlm.fleet.recipe import RECIPES, build_fleet

    out = tmp_path_factory.mktemp("ci-fleet")
    return out, build_fleet(out, RECIPES["ci"], log=lambda _: None)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (98 MB), pulled into the default fleet home: once per machine."""
    from fleetlm.catalog import pull

    return pull("smollm2-135m-instruct", progress=False)


@pytest.fixture(scope="module")
def scripted_server():
    """One scripted gateway (agent_fakes.py) per test module that asks for `gw`."""
    from agent_fakes import ScriptedGateway

    with ScriptedGateway() as gw:
        yield gw


@pytest.fixture
def gw(scripted_server):
    """The module's scripted gateway, reset (no scripts, prices, requests or answered_as from a test before);
    test modules with a gateway of their own define their own `gw`."""
    scripted_server.reset()
    return scripted_server
