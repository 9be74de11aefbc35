import pytest
import torch

from fleetlm.engine import Engine, GenerationRequest
from fleetlm.engine.engine import weight_count
from fleetlm.engine.packed import PackedLinear, bf16_packing_available, pack_linears, packed_bytes
from fleetlm.model import load_checkpoint

needs_bf16 = pytest.mark.skipif(not bf16_packing_available(), reason="this CPU has no native bf16 for oneDNN")


@needs_bf16
@pytest.mark.parametrize("shape", [(1, 96), (5, 96), (2, 3, 96)])
def test_packed_linear_equals_the_bf16_linear_it_replaces(shape):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40, bias=True).to(torch.bfloat16)
    packed = PackedLinear(linear)
    x = torch.randn(*shape).to(torch.bfloat16)
    with torch.no_grad():
        want, got = linear(x), packed(x)
    assert got.shape == want.shape and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=1e-2, atol=1e-2)


@needs_bf16
def test_packing_a_model_keeps_its_greedy_tokens_and_its_weight_count(tiny_llama):
    plain = load_checkpoint(tiny_llama, dtype=torch.bfloat16)
    packed = load_checkpoint(tiny_llama, dtype=torch.bfloat16)
    before = weight_count(packed)
    n = pack_linears(packed)
    assert n == sum(isinstance(m, PackedLinear) for m in packed.modules()) and n > 0
    assert weight_count(packed) >= before  # a tied lm_head now holds its own packed copy
    assert packed_bytes(packed) == 2 * sum(m.numel for m in packed.modules() if isinstance(m, PackedLinear))
    request = GenerationRequest(prompt="hello world", max_tokens=12, temperature=0.0)
    tokenizer = Engine.load(tiny_llama, dtype="f32").tokenizer
    tokens = [[e.token_id for e in Engine(m, tokenizer).generate(request)] for m in (plain, packed)]
    assert tokens[0] == tokens[1]


def test_engine_load_bf16_packs_only_where_the_cpu_has_native_bf16(tiny_llama, monkeypatch):
    monkeypatch.setenv("FLEET_KERNELS", "0")  # our kernels off (with them: KernelBf16Linear, test_kernels.py)
    engine = Engine.load(tiny_llama, dtype="bf16")
    packed = any(isinstance(m, PackedLinear) for m in engine.model.modules())
    assert packed == bf16_packing_available()
    out = engine.complete(["hello"], max_tokens=4, temperature=0.0)
    assert len(out) == 1 and isinstance(out[0], str)
