"""Sparse upcycling: exact copies compute the dense model, training moves experts and balances the router,
the result saves as a Mixtral checkpoint transformers and llama.cpp load, and `fleet upcycle` writes it."""

from __future__ import annotations

import json

import pytest
import torch

from fleetlm.errors import ConfigError
from fleetlm.model import SHIPPED_TINY_MODEL, load_checkpoint, save_checkpoint
from fleetlm.model.moe import MoEFeedForward
from fleetlm.model.upcycle import active_params, upcycle
from fleetlm.train.upcycle import (
    chunks_of,
    continue_training,
    frozen_prefix,
    lm_eval,
    set_trainable,
    top_logits,
)


@pytest.fixture(scope="module")
def dense():
    return load_checkpoint(SHIPPED_TINY_MODEL)


def _ids(model, n: int = 4, t: int = 24) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (n, t), generator=torch.Generator().manual_seed(0))


def test_exact_copies_compute_the_dense_model(dense):
    moe = upcycle(dense, num_experts=4, top_k=2)
    assert moe.config.arch == "mixtral" and moe.config.num_experts == 4
    assert all(isinstance(layer.mlp, MoEFeedForward) for layer in moe.layers)
    ids = _ids(dense)
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), dense(ids), atol=1e-5, rtol=1e-5)
    # k of E experts per token: the active count is the dense model's plus (k - 1) MLPs and the routers
    c = dense.config
    mlp = 3 * c.hidden_size * c.intermediate_size
    router = 4 * c.hidden_size
    assert active_params(moe) == active_params(dense) + c.num_layers * (mlp + router)
    noisy = upcycle(dense, num_experts=4, top_k=2, noise=0.05)
    with torch.no_grad():
        assert not torch.allclose(noisy(ids), dense(ids), atol=1e-5)


def test_partial_upcycle_keeps_lower_layers_dense_and_round_trips(dense, tmp_path):
    n = dense.config.num_layers
    moe = upcycle(dense, num_experts=3, top_k=1, layers=[n - 1])
    kinds = [type(layer.mlp).__name__ for layer in moe.layers]
    assert kinds == ["MLP"] * (n - 1) + ["MoEFeedForward"]
    save_checkpoint(moe, tmp_path / "moe", tokenizer_dir=SHIPPED_TINY_MODEL)
    cfg = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert cfg["mlp_only_layers"] == list(range(n - 1))
    again = load_checkpoint(tmp_path / "moe")
    ids = _ids(dense)
    with torch.no_grad():
        torch.testing.assert_close(again(ids), moe(ids))


def test_training_moves_experts_apart_and_keeps_the_router_balanced(dense):
    torch.manual_seed(0)
    moe = upcycle(dense, num_experts=4, top_k=2)
    n_train = set_trainable(moe)
    assert n_train == sum(p.numel() for layer in moe.layers for p in layer.mlp.parameters())
    assert not moe.embed_tokens.weight.requires_grad
    assert not moe.layers[0].self_attn.q_proj.weight.requires_grad
    ids = _ids(dense, 8, 32)
    hidden = frozen_prefix(moe, ids, 0)
    before = lm_eval(moe, hidden, ids, 0)
    stats = continue_training(moe, hidden, ids, 0, steps=8, batch=4, lr=3e-3, warmup=2)
    after = lm_eval(moe, hidden, ids, 0)
    assert after < before  # it fits the training rows
    w = moe.layers[0].mlp.gate_exps
    assert not torch.allclose(w[0], w[1])  # copies that got different tokens now differ
    # the load-balancing loss is about k (2) when balanced and k * E (8) when collapsed; it stays near 2
    assert all(1.9 < a < 3.0 for a in stats.aux_losses)
    assert moe.layers[0].mlp.router_probs is None  # router statistics are not kept across steps


def test_frozen_prefix_then_top_layers_equal_the_whole_model(dense):
    ids = _ids(dense)
    start = dense.config.num_layers - 1
    with torch.no_grad():
        torch.testing.assert_close(top_logits(dense, frozen_prefix(dense, ids, start), start), dense(ids),
                                   atol=1e-5, rtol=1e-5)


def test_upcycled_checkpoint_loads_in_transformers_and_exports_to_gguf(dense, tmp_path):
    from transformers import AutoModelForCausalLM

    from fleetlm.compress.gguf_moe import export_moe_gguf

    moe = upcycle(dense, num_experts=4, top_k=2, noise=0.1)
    save_checkpoint(moe, tmp_path / "moe", tokenizer_dir=SHIPPED_TINY_MODEL)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "moe", dtype=torch.float32).eval()
    ids = _ids(dense)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, moe(ids), atol=1e-4, rtol=1e-4)
    out = export_moe_gguf(tmp_path / "moe", tmp_path / "moe.gguf", "f16")
    assert out.stat().st_size > 0


def test_bad_upcycle_requests_are_clear_errors(dense):
    with pytest.raises(ConfigError, match="--top-k must lie in 1..4"):
        upcycle(dense, num_experts=4, top_k=5)
    with pytest.raises(ConfigError, match="at least 2"):
        upcycle(dense, num_experts=1, top_k=1)
    with pytest.raises(ConfigError, match="already a mixture"):
        upcycle(upcycle(dense, 2, 1), 2, 1)
    with pytest.raises(ConfigError, match="not in 0.."):
        upcycle(dense, 2, 1, layers=[99])
    with pytest.raises(ConfigError, match="do not fill one sequence"):
        chunks_of([1, 2, 3], 8)
    with pytest.raises(ConfigError, match="nothing to train"):
        m = upcycle(dense, 2, 1)
        for p in m.parameters():
            p.requires_grad_(False)
        hidden = torch.zeros(1, 4, m.config.hidden_size)
        continue_training(m, hidden, torch.zeros(1, 4, dtype=torch.long), 0, 1)


def test_fleet_upcycle_command_writes_a_checkpoint(tmp_path, monkeypatch, capsys):
    from cli_runner import run_main

    code, out, err = run_main(monkeypatch, capsys, "upcycle", str(SHIPPED_TINY_MODEL), "--experts", "3",
                              "--top-k", "1", "--out", str(tmp_path / "out"))
    assert code == 0, err
    assert "3 experts, top-1" in out
    assert load_checkpoint(tmp_path / "out").config.num_experts == 3
    code, out, err = run_main(monkeypatch, capsys, "upcycle", str(SHIPPED_TINY_MODEL), "--experts", "3",
                              "--top-k", "7", "--out", str(tmp_path / "bad"))
    assert code == 2 and "--top-k must lie in 1..3" in err
    assert "Traceback" not in err + out


def test_bench_quick_runs():
    import subprocess
    import sys
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "bench" / "upcycle.py"
    out = subprocess.run([sys.executable, str(bench), "--quick"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "MoE / dense: held-out perplexity" in out.stdout


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_engine_runs_an_upcycled_model_at_other_widths(dense, tmp_path, dtype):
    from fleetlm.engine import Engine, GenerationRequest

    save_checkpoint(upcycle(dense, 4, 2, noise=0.1), tmp_path / "moe", tokenizer_dir=SHIPPED_TINY_MODEL)
    engine = Engine.load(str(tmp_path / "moe"), dtype=dtype)
    req = GenerationRequest(prompt="Hello there", max_tokens=8, ignore_eos=True)
    tokens = [e.token_id for e in engine.generate([req]) if e.token_id is not None]
    assert len(tokens) == 8
    # the experts stay float (stacked parameters, not nn.Linear); the router is an nn.Linear and is packed
    mlp = engine.model.layers[0].mlp
    assert isinstance(mlp, MoEFeedForward) and mlp.gate_up_exps is not None
