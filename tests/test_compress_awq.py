"""AWQ-style scaling (fleetlm.compress.awq): folding keeps the float function, the search beats RTN."""

from __future__ import annotations

import copy

import torch

from fleetlm.compress.awq import apply_awq, fold_into_linear, fold_into_norm, search_scale
from fleetlm.compress.grid import rtn
from fleetlm.model.config import ModelConfig
from fleetlm.model.decoder import TransformerBlock, rope_cos_sin, rope_inv_freq


def _block(heads: int = 4, kv_heads: int = 2) -> tuple[TransformerBlock, ModelConfig]:
    cfg = ModelConfig(arch="llama", hidden_size=64, intermediate_size=128, num_heads=heads,
                      num_kv_heads=kv_heads, num_layers=1, vocab_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    block = TransformerBlock(cfg).eval()
    with torch.no_grad():
        for name, p in block.named_parameters():
            p.copy_(1 + 0.3 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return block, cfg


def _run(block, cfg, x):
    cos, sin = rope_cos_sin(rope_inv_freq(cfg), torch.arange(x.shape[1])[None], x.dtype)
    return block(x, cos, sin, None, None)


def _inputs(t: int = 16) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(2, t, 64, generator=gen) * (0.2 + 4 * torch.rand(64, generator=gen))


def test_folding_keeps_the_function():
    for heads, kv in ((4, 2), (4, 4)):
        block, cfg = _block(heads, kv)
        x = _inputs()
        before = _run(block, cfg, x)
        gen = torch.Generator().manual_seed(5)
        attn, mlp = block.self_attn, block.mlp
        fold_into_norm(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj],
                       0.5 + torch.rand(64, generator=gen))
        fold_into_norm(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj],
                       0.5 + torch.rand(64, generator=gen))
        fold_into_linear(mlp.up_proj, [mlp.down_proj], 0.5 + torch.rand(128, generator=gen))
        if heads == kv:
            fold_into_linear(attn.v_proj, [attn.o_proj], 0.5 + torch.rand(64, generator=gen))
        torch.testing.assert_close(_run(block, cfg, x), before, rtol=1e-4, atol=1e-5)


def test_apply_awq_keeps_function_and_beats_rtn():
    block, cfg = _block()
    x = _inputs()
    before = _run(block, cfg, x)
    captured = {}
    hooks = [m.register_forward_pre_hook(
        lambda _m, a, n=n: captured.__setitem__(n, a[0].reshape(-1, a[0].shape[-1])))
             for n, m in (("qkv", block.self_attn.q_proj), ("gate_up", block.mlp.gate_proj),
                          ("down", block.mlp.down_proj))]
    _run(block, cfg, x)
    for h in hooks:
        h.remove()
    scaled = copy.deepcopy(block)
    losses = apply_awq(scaled, captured, 3, 32)
    assert set(losses) == {"qkv", "gate_up", "down"}  # no v -> o pair with grouped-query attention
    assert all(loss <= base for loss, base in losses.values())
    assert any(loss < 0.95 * base for loss, base in losses.values())
    torch.testing.assert_close(_run(scaled, cfg, x), before, rtol=1e-4, atol=1e-5)  # float: unchanged


def test_search_scale_alpha_zero_is_rtn():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=gen) * (0.1 + 5 * torch.rand(64, generator=gen))
    w = 0.1 * torch.randn(32, 64, generator=gen)
    s, loss, base = search_scale(x, [w], 4, 32)
    ref = x @ w.T
    assert abs(base - float(((x @ rtn(w, 4, 32).dequantize().T - ref) ** 2).mean())) < 1e-6 * max(base, 1)
    assert loss < base and s.shape == (64,) and bool((s > 0).all())


def _correlated(t: int, k: int = 128, seed: int = 0) -> torch.Tensor:
    """Activations with shared directions and a few salient channels (20x the others), as real ones have."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(16, k, generator=torch.Generator().manual_seed(99))
    scale = 0.2 + 0.5 * torch.rand(k, generator=torch.Generator().manual_seed(98))
    scale[::16] *= 20
    return (torch.randn(t, 16, generator=gen) @ mix + 0.3 * torch.randn(t, k, generator=gen)) * scale


def _output_error(x, w, w_hat):
    return float(((x @ (w_hat - w).T) ** 2).mean())


def test_awq_output_error_below_rtn_on_held_out_correlated_inputs():
    """The scales fitted on calibration inputs lower the error on other inputs of the same kind too (what
    the held-out perplexity measures), at 4 and 3 bits."""
    w = 0.05 * torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    calib, held_out = _correlated(2048, seed=0), _correlated(2048, seed=1)
    for bits in (4, 3):
        s, _, _ = search_scale(calib, [w], bits, 32)
        awq_w = rtn(w * s, bits, 32).dequantize() / s
        rtn_w = rtn(w, bits, 32).dequantize()
        assert _output_error(held_out, w, awq_w) < 0.7 * _output_error(held_out, w, rtn_w)


def test_search_loss_from_the_gram_matrix_equals_the_direct_one():
    w = 0.05 * torch.randn(48, 64, generator=torch.Generator().manual_seed(2))
    x = _correlated(512, 64)
    s_gram, loss_gram, rtn_gram = search_scale(x, [w], 4, 32)  # K = 64 < T = 512: Gram path
    s_direct, loss_direct, rtn_direct = search_scale(x[:48], [w], 4, 32)  # K > T: direct path
    assert abs(rtn_gram - _output_error(x, w, rtn(w, 4, 32).dequantize())) < 1e-4 * rtn_gram
    gram_w, direct_w = (rtn(w * s, 4, 32).dequantize() / s for s in (s_gram, s_direct))
    assert abs(loss_gram - _output_error(x, w, gram_w)) < 1e-4 * rtn_gram
    assert abs(loss_direct - _output_error(x[:48], w, direct_w)) < 1e-5 * rtn_direct
