"""Weight-only int8/int4 linears: kernel numerics, a quantized tiny model, greedy top-1 agreement."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from fleetlm.bench.agreement import greedy_tokens, top1_agreement
from fleetlm.engine import Engine, GenerationRequest
from fleetlm.engine.quant import (
    DynamicInt8Linear,
    Int4Linear,
    Int8Linear,
    QuantizationError,
    cpu_has_vnni,
    dynamic_int8_available,
    quantize,
    quantize_int4_weight,
    quantized_bytes,
)
from fleetlm.model import ModelConfig, Transformer


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.detach().float() - ref.detach().float()).norm() / ref.detach().float().norm())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_close_to_float(dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 96, bias=bias).to(dtype)
    x = torch.randn(2, 3, 256, dtype=dtype)
    q = Int8Linear.from_linear(lin)
    y = q(x)
    assert y.shape == (2, 3, 96) and y.dtype == dtype
    assert q.weight.dtype == torch.int8
    assert _rel_err(y, lin(x)) < 0.02  # 8 bits per channel: well under 1% on random weights, bf16 adds noise


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_linear_close_to_float(group_size: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(256, 64, bias=True).to(dtype)
    x = torch.randn(5, 256, dtype=dtype)
    q = Int4Linear.from_linear(lin, group_size)
    y = q(x)
    assert y.shape == (5, 64) and y.dtype == dtype
    err = _rel_err(y, lin(x))
    assert 0.0 < err < 0.12  # 16 levels per group: a few percent, never exact


def test_int4_kernel_matches_reference_dequantization() -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 128)
    q, sz = quantize_int4_weight(w, 32)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    scale = sz[..., 0].t().repeat_interleave(32, dim=1)
    zero = sz[..., 1].t().repeat_interleave(32, dim=1)
    deq = (q.float() - 8) * scale + zero
    assert float((deq - w).abs().max()) <= float(scale.max()) / 2 + 1e-5  # round-to-nearest: half a step
    layer = nn.Linear(128, 64, bias=False)
    layer.weight.data.copy_(w)
    m = Int4Linear.from_linear(layer, 32)
    x = torch.randn(3, 128)
    torch.testing.assert_close(m(x), x @ deq.t(), atol=1e-4, rtol=1e-4)


def _tiny_model(dtype: torch.dtype = torch.float32) -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="llama", vocab_size=256, hidden_size=128, intermediate_size=256, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=512)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.05)
    return model.to(dtype).eval()


def test_quantize_swaps_linears_and_shrinks_weights() -> None:
    model = _tiny_model()
    before = quantized_bytes(model)
    quantize(model, "int8")
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.layers[0].mlp.down_proj, Int8Linear)
    assert isinstance(model.embed_tokens, nn.Embedding)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert quantized_bytes(model) < 0.5 * before

    model4 = quantize(_tiny_model(), "int4", group_size=64, skip=["lm_head"])
    assert isinstance(model4.lm_head, nn.Linear)
    assert isinstance(model4.layers[1].self_attn.q_proj, Int4Linear)


@pytest.mark.parametrize("scheme,tol", [("int8", 0.03), ("int4", 0.3)])
def test_quantized_tiny_model_logits_close(scheme: str, tol: float) -> None:
    ref_model = _tiny_model()
    idx = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = ref_model(idx)
        q = quantize(copy.deepcopy(ref_model), scheme, group_size=32)(idx)
    assert _rel_err(q, ref) < tol


@pytest.mark.parametrize("scheme,floor", [("int8", 0.9), ("int4", 0.6)])
def test_greedy_top1_agreement_with_bf16(scheme: str, floor: float) -> None:
    ref_model = _tiny_model(torch.bfloat16)
    prompt = list(range(10, 26))
    reference = greedy_tokens(ref_model, prompt, 48)
    assert len(reference) == 48
    assert top1_agreement(ref_model, prompt, reference) > 0.95  # the reference agrees with itself
    qmodel = quantize(copy.deepcopy(ref_model), scheme, group_size=32)
    agreement = top1_agreement(qmodel, prompt, reference)
    assert floor <= agreement <= 1.0


def test_bad_scheme_and_group_size_are_typed_errors() -> None:
    with pytest.raises(QuantizationError, match="unknown quantization scheme"):
        quantize(_tiny_model(), "int3")
    with pytest.raises(QuantizationError, match="group size"):
        quantize(_tiny_model(), "int4", group_size=48)
    with pytest.raises(QuantizationError, match="no nn.Linear"):
        quantize(nn.Embedding(4, 4), "int8")


@pytest.mark.skipif(not dynamic_int8_available(), reason="PyTorch built without fbgemm")
@pytest.mark.parametrize("reduce_range", [None, False, True])
def test_dynamic_int8_linear_close_to_float(reduce_range: bool | None) -> None:
    """8-bit activations (reduce_range=False) are only exact enough with VNNI: without it fbgemm's int16 pair
    sums saturate, which is why the default (None) picks 7-bit activations on such CPUs."""
    if reduce_range is False and not cpu_has_vnni():
        pytest.skip("8-bit activations saturate fbgemm's int16 sums on CPUs without VNNI")
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 96, bias=True)
    q = DynamicInt8Linear(linear, reduce_range=reduce_range)
    assert q.reduce_range == (not cpu_has_vnni() if reduce_range is None else reduce_range)
    x = torch.randn(2, 5, 128)
    with torch.no_grad():
        want, got = linear(x), q(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    rel = (got - want).norm() / want.norm()
    assert rel < (0.05 if q.reduce_range else 0.03), rel
    assert q.nbytes == 128 * 96 + 4 * 96


@pytest.mark.skipif(not dynamic_int8_available(), reason="PyTorch built without fbgemm")
def test_engine_int8_uses_the_dynamic_kernel_and_agrees_with_f32(tiny_llama, monkeypatch) -> None:
    monkeypatch.setenv("FLEET_KERNELS", "0")  # our kernels off: fbgemm's path (ours: tests/test_kernels.py)
    engine = Engine.load(tiny_llama, dtype="int8")
    assert any(isinstance(m, DynamicInt8Linear) for m in engine.model.modules())
    assert quantized_bytes(engine.model) < quantized_bytes(Engine.load(tiny_llama, dtype="f32").model) / 2
    reference = Engine.load(tiny_llama, dtype="f32")
    prompt = [GenerationRequest(prompt="hello world", max_tokens=16, temperature=0.0)]
    got = [e.token_id for e in engine.generate(prompt)]
    want = [e.token_id for e in reference.generate(prompt)]
    agree = sum(a == b for a, b in zip(got, want, strict=False)) / len(want)
    assert agree >= 0.5, (got, want)
