"""Engine quantization of MoE models: routers and shared-expert gates stay float, the rest as if dense."""

import pytest
import torch
from torch import nn

from fleetlm.engine.quant import quantize
from fleetlm.engine.quant_moe import expert_report, float_linears
from fleetlm.model.config import ModelConfig
from fleetlm.model.decoder import Transformer
from fleetlm.model.moe import MoEFeedForward


def _moe(arch: str) -> Transformer:
    extra = (dict(moe_intermediate_size=64, shared_expert_intermediate_size=96, norm_topk_prob=False)
             if arch == "qwen2_moe" else {})
    cfg = ModelConfig(arch=arch, vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, num_experts=4, num_experts_per_tok=2, **extra)
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("scheme, kernels", [("int8", False), ("int4", False), ("int4", True)])
def test_quantize_keeps_routers_float_and_stays_close(arch, scheme, kernels):
    from fleetlm.engine.engine import our_kernels

    if kernels and not our_kernels():
        pytest.skip("our kernels do not build here")
    model = _moe(arch)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids)
        routers = [m.gate.weight.clone() for m in model.modules() if isinstance(m, MoEFeedForward)]
        experts = [m.down_exps.clone() for m in model.modules() if isinstance(m, MoEFeedForward)]
    skipped = float_linears(model)
    assert "layers.0.mlp.gate" in skipped and len(skipped) == (4 if arch == "qwen2_moe" else 2)
    quantize(model, scheme, group_size=32, kernels=kernels)
    with torch.no_grad():
        got = model(ids)
    moes = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    for m, r, e in zip(moes, routers, experts, strict=True):
        assert type(m.gate) is nn.Linear and torch.equal(m.gate.weight, r)  # the router untouched
        assert torch.equal(m.down_exps, e)  # stacked experts kept as they were
        if arch == "qwen2_moe":
            assert type(m.shared_expert_gate) is nn.Linear
            assert type(m.shared_expert.up_proj) is not nn.Linear  # the shared expert is quantized
    assert type(model.layers[0].self_attn.q_proj) is not nn.Linear
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (0.02 if scheme == "int8" else 0.2), rel
    report = expert_report(model)
    assert report.layers == 2 and report.expert_weights == sum(
        m.gate_exps.numel() + m.up_exps.numel() + m.down_exps.numel() for m in moes)
    assert "kept in float32" in report.describe()


def test_a_dense_model_has_nothing_to_keep():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                      num_kv_heads=2)
    model = Transformer(cfg)
    assert float_linears(model) == [] and expert_report(model).describe() == "no MoE layers"
