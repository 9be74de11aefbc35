"""Our CPU kernels (engine/kernels): each op against its pure-PyTorch reference on both ISA paths, packing
round trips, a tiny model's greedy tokens through kernel and reference, torch.compile, and the fallback."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from fleetlm.engine import Engine, GenerationRequest, kernels
from fleetlm.engine.packed import KernelBf16Linear
from fleetlm.engine.quant import KernelInt4Linear, KernelInt8Linear, quantize
from fleetlm.model import ModelConfig, Transformer

HAVE = kernels.available()  # builds once per machine into the fleet home (cached across test runs)
needs_kernels = pytest.mark.skipif(not HAVE, reason="our kernels did not build on this machine")
ISAS = [name for name, level in (("avx512", 2), ("avx2", 1))
        if HAVE and int(torch.ops.fleetlm_kernels.best_isa_level()) >= level]
# M = 1, 3, 16 rows; K not a multiple of 32 or of the group; N not a multiple of the 16-row tile.
SHAPES = [(1, 40, 100), (3, 17, 64), (16, 96, 320), (5, 33, 70), (1, 200, 896)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(params=ISAS)
def isa(request):
    with kernels.use_isa(request.param) as got:
        assert got == request.param
        yield got


@needs_kernels
@pytest.mark.parametrize("m,k", [(1, 100), (3, 64), (16, 320), (2, 31)])
def test_activation_quantization_matches_the_reference_exactly(isa, m: int, k: int) -> None:
    torch.manual_seed(m * k)
    x = torch.randn(m, k) * 3
    kp = -(-k // 32) * 32
    got = torch.ops.fleetlm_kernels.quantize_rows(x, kp)
    want = kernels.reference_quantize_rows(x, kp)
    assert torch.equal(got[0], want[0])  # same scale, same rounding (half to even): identical int8 codes
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert torch.equal(got[2], want[2])
    torch.testing.assert_close(got[3], want[3], rtol=1e-5, atol=1e-5)  # float sums in another order


# Kernel and reference quantize identically and their integer dot products are exact, so they differ only in
# the order of f32 sums: ~1e-7 relative. The AVX2 bf16 path keeps activations in f32 where the reference
# (like vdpbf16ps) rounds them to bf16: up to 2^-9 per element, ~1e-3 on a dot product.
EXACT, BF16_ACTIVATIONS = 1e-5, 5e-3


@needs_kernels
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("group", [32, 64])
def test_int4_matches_the_reference(isa, m: int, n: int, k: int, group: int) -> None:
    torch.manual_seed(n + k)
    x, w, b = torch.randn(m, k), torch.randn(n, k) * 0.05, torch.randn(n)
    packed, scales = kernels.pack_int4(w, group)
    got = torch.ops.fleetlm_kernels.linear_int4(x, packed, scales, b, n, group)
    want = kernels.reference_linear_int4(x, packed, scales, b, n, group)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert rel(got, want) < EXACT
    # 16 levels per group and 8-bit activations: a few percent from the float product, never exact
    assert 0.0 < rel(got, x @ w.t() + b) < 0.1


@needs_kernels
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_matches_the_reference(isa, m: int, n: int, k: int) -> None:
    torch.manual_seed(n * k)
    x, w, b = torch.randn(m, k), torch.randn(n, k) * 0.05, torch.randn(n)
    packed, scales = kernels.pack_int8(w)
    got = torch.ops.fleetlm_kernels.linear_int8(x, packed, scales, b, n)
    assert rel(got, kernels.reference_linear_int8(x, packed, scales, b, n)) < EXACT
    assert rel(got, x @ w.t() + b) < 0.01  # 8-bit weights and activations per block of 32


@needs_kernels
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bf16_matches_the_reference(isa, m: int, n: int, k: int, dtype: torch.dtype) -> None:
    torch.manual_seed(m + n + k)
    x, w, b = torch.randn(m, k, dtype=dtype), torch.randn(n, k) * 0.05, torch.randn(n)
    packed = kernels.pack_bf16(w)
    got = torch.ops.fleetlm_kernels.linear_bf16(x, packed, b, n)
    assert got.dtype == dtype  # the output takes x's dtype
    tol = EXACT if isa == "avx512" and dtype == torch.float32 else BF16_ACTIVATIONS
    assert rel(got, kernels.reference_linear_bf16(x.float(), packed, b, n)) < tol


@needs_kernels
def test_rows_of_a_batch_do_not_depend_on_each_other(isa) -> None:
    """Each row has its own activation scales and the tile loop sums a row the same way at any M: a request
    in the gateway's batch gets bit-identical logits to the same request alone."""
    torch.manual_seed(3)
    x, w = torch.randn(7, 256), torch.randn(80, 256) * 0.05
    packs = {"int4": kernels.pack_int4(w, 64), "int8": kernels.pack_int8(w), "bf16": (kernels.pack_bf16(w),)}
    ops = torch.ops.fleetlm_kernels
    calls = {"int4": lambda xx: ops.linear_int4(xx, *packs["int4"], None, 80, 64),
             "int8": lambda xx: ops.linear_int8(xx, *packs["int8"], None, 80),
             "bf16": lambda xx: ops.linear_bf16(xx, *packs["bf16"], None, 80)}
    for name, call in calls.items():
        batched = call(x)
        for r in (0, 4, 6):
            assert torch.equal(batched[r], call(x[r : r + 1])[0]), name


def test_packing_round_trips() -> None:
    torch.manual_seed(0)
    q = torch.randint(0, 16, (37, 96), dtype=torch.uint8)
    d, m = torch.rand(37, 3) * 0.1, -torch.rand(37, 3)
    packed, scales = kernels.pack_int4_codes(q, d, m, 32)
    assert packed.shape == (3, 96 * 8) and scales.shape == (3, 3, 2, 16)
    q2, d2, m2 = kernels.unpack_int4(packed, scales, 37, 96)
    assert torch.equal(q2, q)
    torch.testing.assert_close(d2, d.half().float())
    torch.testing.assert_close(m2, m.half().float())
    q8 = torch.randint(-127, 128, (20, 64), dtype=torch.int8)
    d8 = torch.rand(20, 2)
    w8, s8 = kernels.pack_int8_codes(q8, d8)
    q8b, d8b = kernels.unpack_int8(w8, s8, 20)
    assert torch.equal(q8b.to(torch.int8), q8) and torch.equal(d8b, d8.half().float())
    w = torch.randn(19, 50)
    assert torch.equal(kernels.unpack_bf16(kernels.pack_bf16(w), 19)[:, :50], w.bfloat16())


def test_weight_quantizers_stay_close_to_the_float_weights() -> None:
    torch.manual_seed(1)
    w = torch.randn(48, 200)
    q, d, m = kernels.unpack_int4(*kernels.pack_int4(w, 32), 48, 200)
    deq = (q.float().view(48, -1, 32) * d[..., None] + m[..., None]).view(48, -1)[:, :200]
    assert int(q.max()) <= 15
    # round to nearest on 16 levels between the group's min and max: half a step, plus float16 scales
    step = d.repeat_interleave(32, dim=1)[:, :200]
    assert bool(((deq - w).abs() <= step * 0.5 + 2e-3).all())
    q8, d8 = kernels.unpack_int8(*kernels.pack_int8(w), 48)
    deq8 = (q8.float().view(48, -1, 32) * d8[..., None]).view(48, -1)[:, :200]
    # rounding error is uniform in half a step, step = amax/127 of a block (~2.2/127 for 32 gaussians):
    # its RMS is step/sqrt(12) ~ 0.005 of the weights' RMS
    assert 0.002 < rel(deq8, w) < 0.01


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(arch="qwen2", vocab_size=300, hidden_size=96, intermediate_size=200, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=256, attention_bias=True)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, 0.08)
    model.fuse_projections()
    return model.eval()


def _greedy(model: nn.Module, steps: int = 24) -> list[int]:
    from fleetlm.bench.agreement import greedy_tokens

    return greedy_tokens(model, list(range(5, 17)), steps)


def _greedy_logits(model: nn.Module, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the logits row each was chosen from, decoded one token at a time."""
    model.setup_caches(1, len(prompt) + steps)
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt)).view(1, -1))[0, -1]
        tokens, rows = [], []
        for step in range(steps):
            tokens.append(int(logits.argmax()))
            rows.append(logits)
            pos = torch.tensor([[len(prompt) + step]])
            logits = model(torch.tensor([[tokens[-1]]]), pos)[0, -1]
    return tokens, rows


def _assert_diverge_only_at_a_tie(fast: nn.Module, reference: nn.Module, prompt: list[int],
                                  steps: int) -> None:
    """The two greedy streams agree up to their first difference, and there the reference's top-2 margin is
    within what the two paths' logits differ by on that very row (2 x their largest difference), and small:
    a numerical tie, not a kernel error (int4 on AVX2: a 0.017 margin, logits of 2 off by 0.05, step 6)."""
    got, got_rows = _greedy_logits(fast, prompt, steps)
    want, want_rows = _greedy_logits(reference, prompt, steps)
    for step, (a, b) in enumerate(zip(got, want, strict=True)):
        if a == b:
            continue
        top = torch.topk(want_rows[step], 2).values
        margin, noise = float(top[0] - top[1]), float((got_rows[step] - want_rows[step]).abs().max())
        assert margin <= 2 * noise and margin < 0.025 * float(top[0].abs()), (step, margin, noise)
        assert step >= 3, step  # the first tokens have clear margins on this model
        return


@needs_kernels
@pytest.mark.parametrize("scheme", ["int4", "int8", "bf16"])
def test_tiny_model_greedy_tokens_near_between_kernel_and_reference(scheme: str) -> None:
    """Same packed weights, same activation codes: one op differs only in f32 summation order (~1e-7). In a
    model that can still flip an int8 activation code (or a bf16 rounding) sitting at a rounding boundary, one
    step of the code (1/127 of its block's max), and on a random tiny model with near-tied logits that can
    change a greedy token after a dozen steps (on SmolLM2's real weights: a different but equally good
    answer after 20 tokens, both paths). So: the streams agree until a numerical tie, logits close, top-1
    agreement high."""
    model = _tiny_model()
    if scheme == "bf16":
        from fleetlm.engine.packed import pack_linears

        model = model.to(torch.bfloat16)
        pack_linears(model, kernels=True)
    else:
        quantize(model, scheme, group_size=32, kernels=True)
    ours = (KernelInt4Linear, KernelInt8Linear, KernelBf16Linear)
    mods = [mm for mm in model.modules() if isinstance(mm, ours)]
    assert mods and all(mm.use_kernel for mm in mods)
    if scheme == "int4":
        assert isinstance(model.lm_head, KernelInt8Linear)  # the vocabulary projection stays 8-bit
        assert isinstance(model.layers[0].mlp.down_proj, KernelInt4Linear)
    from fleetlm.bench.agreement import top1_agreement

    prompt = list(range(5, 17))
    fast = _greedy(model, 32)
    reference = copy.deepcopy(model)
    for mm in reference.modules():
        if hasattr(mm, "use_kernel"):
            mm.use_kernel = False
    _assert_diverge_only_at_a_tie(model, reference, prompt, 8)
    idx = torch.tensor([prompt + fast])
    with torch.no_grad():
        assert rel(model(idx), reference(idx)) < 0.05
    assert top1_agreement(reference, prompt, fast) >= 0.85


@needs_kernels
def test_ops_pass_torch_library_opcheck() -> None:
    """Schema, Meta (fake tensor) implementation and autograd registration are consistent: what
    torch.compile needs to call the ops as extern kernels."""
    torch.manual_seed(0)
    x, w = torch.randn(3, 64), torch.randn(24, 64)
    ops = torch.ops.fleetlm_kernels
    p4, s4 = kernels.pack_int4(w, 32)
    p8, s8 = kernels.pack_int8(w)
    torch.library.opcheck(ops.linear_int4.default, (x, p4, s4, None, 24, 32))
    torch.library.opcheck(ops.linear_int8.default, (x, p8, s8, torch.randn(24), 24))
    torch.library.opcheck(ops.linear_bf16.default, (x, kernels.pack_bf16(w), None, 24))


@needs_kernels
def test_compiled_module_calls_the_kernel() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 40, bias=True)
    mod = KernelInt4Linear(lin, 32)
    x = torch.randn(2, 64)
    compiled = torch.compile(lambda t: torch.relu(mod(t)) + 1, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), torch.relu(mod(x)) + 1)


@needs_kernels
def test_engine_load_uses_our_kernels_for_every_width(tiny_llama) -> None:
    want = {"int4": KernelInt4Linear, "int8": KernelInt8Linear, "bf16": KernelBf16Linear}
    for dtype, cls in want.items():
        engine = Engine.load(tiny_llama, dtype=dtype)
        assert any(isinstance(m, cls) for m in engine.model.modules()), dtype
        assert not any(type(m) is nn.Linear for m in engine.model.modules()), dtype
        # rows are independent in our kernels: a batch of one prompt three times is three copies of it alone
        # (prompts of different lengths differ in attention's float order, and a rounding flip of an int8
        # activation code can then change a token of a random model: see the batcher test)
        batched = engine.complete(["a b c"] * 3, max_tokens=6, temperature=0.0)
        assert batched == engine.complete(["a b c"], max_tokens=6, temperature=0.0) * 3, dtype


@needs_kernels
def test_bad_inputs_are_clear_errors() -> None:
    w = torch.randn(16, 64)
    p4, s4 = kernels.pack_int4(w, 32)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.fleetlm_kernels.linear_int4(torch.randn(1, 96), p4, s4, None, 16, 32)
    with pytest.raises(RuntimeError, match="tiles do not hold"):
        torch.ops.fleetlm_kernels.linear_int4(torch.randn(1, 64), p4, s4, None, 40, 32)
    with pytest.raises(ValueError, match="unknown ISA"):
        with kernels.use_isa("sse2"):
            pass
    with pytest.raises(ValueError, match="multiple of 32"):
        kernels.pack_int4(w, 48)


@needs_kernels
def test_env_var_forces_the_avx2_path() -> None:
    code = "from fleetlm.engine import kernels; print(kernels.isa())"
    env = {**os.environ, "FLEET_KERNELS_ISA": "avx2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "avx2"


def test_kernels_off_falls_back_to_pytorch(tiny_llama, monkeypatch) -> None:
    monkeypatch.setenv("FLEET_KERNELS", "0")
    assert not kernels.available()
    engine = Engine.load(tiny_llama, dtype="int4")
    assert not any(isinstance(m, (KernelInt4Linear, KernelInt8Linear)) for m in engine.model.modules())
    assert engine.complete(["hello"], max_tokens=3, temperature=0.0)[0] is not None
    bf16 = Engine.load(tiny_llama, dtype="bf16")
    assert not any(isinstance(m, KernelBf16Linear) for m in bf16.model.modules())


def test_a_failed_build_warns_once_and_falls_back(tmp_path, monkeypatch) -> None:
    """Simulate a machine without a compiler: no library in the build folder and the build raising."""
    monkeypatch.setattr(kernels, "build_dir", lambda: tmp_path)

    def broken_build(verbose: bool = False):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "build", broken_build)
    kernels._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert not kernels.available()
        assert not kernels.available()  # decided once: no second warning, no second build
        assert kernels.isa() == "none"
        mod = KernelInt8Linear(nn.Linear(40, 24))  # still constructible: runs the PyTorch reference
        assert not mod.use_kernel
        x = torch.randn(2, 40)
        want = kernels.reference_linear_int8(x, mod.weight, mod.scales, mod.bias, 24)
        torch.testing.assert_close(mod(x), want)
    finally:
        kernels._load.cache_clear()


@needs_kernels
@pytest.mark.parametrize("dtype", ["int4", "int8", "bf16"])
def test_the_gateways_continuous_batcher_runs_on_our_kernels(tiny_llama, dtype: str) -> None:
    """The batcher's decode steps call our linears with M = active rows. Identical requests in one batch get
    identical tokens, equal to the request alone. Requests of different lengths are only checked to finish:
    their attention sums in another order than alone (~1e-7), which can flip an int8 activation code sitting
    at a rounding boundary (1/127 of its block) and, on a random tiny model's near-tied logits, a token."""
    from fleetlm.engine.batcher import Batcher

    engine = Engine.load(tiny_llama, dtype=dtype)
    ours = (KernelInt4Linear, KernelInt8Linear, KernelBf16Linear)
    rows_seen: list[int] = []

    def count_rows(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        rows_seen.append(inp[0].numel() // inp[0].shape[-1])

    for mod in engine.model.modules():
        if isinstance(mod, ours):
            mod.register_forward_hook(count_rows)

    def run(batch: list[str]) -> dict[int, list[int]]:
        batcher = Batcher(engine.model, engine.tokenizer, max_batch=4)
        handles = [batcher.add(GenerationRequest(prompt=p, max_tokens=8, temperature=0.0, ignore_eos=True))
                   for p in batch]
        out: dict[int, list[int]] = {h: [] for h in handles}
        while batcher.busy:
            for event in batcher.step():
                out[event.request_index].append(event.token_id)
        return out

    alone = run(["a b c d"])[0]
    same = run(["a b c d"] * 3)
    assert all(tokens == alone for tokens in same.values())
    rows_seen.clear()
    mixed = run(["hello", "a b c d", "the"])
    assert all(len(tokens) == 8 for tokens in mixed.values())
    assert 3 in rows_seen  # decode steps ran the three active rows through our kernels at once


def _half_cache(b: int, h_kv: int, slots: int, d: int, used: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v as the KV cache hands them out: float16 views of the first `used` of `slots` slots."""
    k = torch.randn(b, h_kv, slots, d).to(torch.float16)
    v = torch.randn(b, h_kv, slots, d).to(torch.float16)
    return k[:, :, :used], v[:, :, :used]


@needs_kernels
@pytest.mark.parametrize("b,h,h_kv,d,length", [
    (1, 12, 2, 128, 8192),  # Qwen2.5-1.5B's heads at 8k: 32 chunks of 256 slots
    (1, 14, 2, 64, 257),    # 7 query heads a group (a block of 4, then 3); one slot past a chunk
    (2, 9, 3, 64, 1),       # SmolLM2's 3-head groups; a single slot
    (3, 4, 4, 16, 255),     # no grouping; head size 16
    (1, 8, 1, 32, 513),     # one KV head for 8 query heads
])
def test_half_cache_attention_matches_the_reference(b: int, h: int, h_kv: int, d: int, length: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(b, h, 1, d) * 2
    k, v = _half_cache(b, h_kv, length + 7, d, length)
    got = kernels.attend_f16(q, k, v, None)
    want = kernels.reference_attend_f16(q.view(b, h, d), k, v, None).view(b, h, 1, d)
    assert got.dtype == torch.float32 and got.shape == (b, h, 1, d)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@needs_kernels
def test_half_cache_attention_masks_slots_and_rows_are_independent() -> None:
    torch.manual_seed(1)
    b, h, h_kv, d, length = 3, 6, 2, 64, 600
    q = torch.randn(b, h, 1, d)
    k, v = _half_cache(b, h_kv, length, d, length)
    seen = torch.tensor([600, 300, 5])
    mask = (torch.arange(length)[None] < seen[:, None])[:, None, None, :]
    got = kernels.attend_f16(q, k, v, mask)
    want = kernels.reference_attend_f16(q.view(b, h, d), k, v, mask.view(b, length)).view(b, h, 1, d)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for row in range(b):  # a row alone over just the slots it sees: the same numbers
        n = int(seen[row])
        alone = kernels.attend_f16(q[row:row + 1], k[row:row + 1, :, :n], v[row:row + 1, :, :n], None)
        torch.testing.assert_close(got[row:row + 1], alone, rtol=1e-5, atol=1e-6)
    nothing = torch.zeros(b, 1, 1, length, dtype=torch.bool)
    assert not kernels.attend_f16(q, k, v, nothing).any()  # every slot masked: zeros, never NaN


@needs_kernels
def test_half_cache_attention_compiles_into_one_graph() -> None:
    # the compiled decode step calls attend_f16 in every layer: asking whether the kernels are there must not
    # break the graph (it did, and each layer then compiled as its own frame up to dynamo's recompile limit)
    torch.manual_seed(2)
    q = torch.randn(2, 6, 1, 64)
    k, v = _half_cache(2, 2, 40, 64, 40)
    mask = (torch.arange(40)[None] < torch.tensor([40, 17])[:, None])[:, None, None, :]
    torch._dynamo.reset()
    compiled = torch.compile(kernels.attend_f16, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v, mask), kernels.attend_f16(q, k, v, mask))


@needs_kernels
def test_half_cache_attention_bad_inputs_are_clear_errors() -> None:
    q = torch.randn(1, 4, 16)
    k, v = _half_cache(1, 2, 8, 16, 8)
    with pytest.raises(RuntimeError, match="must be float16"):
        torch.ops.fleetlm_kernels.attend_f16(q, k.float(), v.float(), None, 0.25)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        torch.ops.fleetlm_kernels.attend_f16(torch.randn(1, 4, 12), k[..., :12], v[..., :12], None, 0.25)
    torch.library.opcheck(torch.ops.fleetlm_kernels.attend_f16.default, (q, k.contiguous(), v.contiguous(),
                                                                         None, 0.25))


def _teacher_forced_logits(model: nn.Module, ids: list[int], steps: int) -> torch.Tensor:
    """Logits of a prefill of ids[:-steps], then one decode step for each of the last `steps` ids."""
    from fleetlm.engine.generate import decode_one_token, ensure_caches

    ensure_caches(model, 1, len(ids) + 1)
    n = len(ids) - steps
    with torch.inference_mode():
        out = [model(torch.tensor([ids[:n]]), torch.arange(n)[None], kv_len=n)[:, -1].float()]
        for pos in range(n, len(ids)):
            out.append(decode_one_token(model, torch.tensor([[ids[pos]]]), torch.tensor([[pos]])))
    return torch.cat(out)


@needs_kernels
@pytest.mark.parametrize("dtype", ["int4", "bf16", "f32"])
def test_engine_decodes_over_a_float16_cache_close_to_the_f32_one(tiny_llama, dtype: str,
                                                                   monkeypatch) -> None:
    """The engine's cache is float16 where our kernels run; FLEET_KV_CACHE=f32 keeps the f32 cache.
    - bf16: every bf16 k and v is a float16 value, so the cache loses nothing: logits within 1e-3 (only the
      softmax's float order differs; on this machine they were the same to the bit);
    - f32: float16 rounds k and v at 5e-4: logits within 2e-3;
    - int4: our int8 activation codes turn that into flipped codes downstream (a 1e-7 change in attention's
      sum order moved this random model's int4 logits by 2%, see Attention.forward's rowwise): within 6%."""
    ids = [(7 * i) % 200 + 3 for i in range(48)]
    half = Engine.load(tiny_llama, dtype=dtype)
    got = _teacher_forced_logits(half.model, ids, 16)
    assert half.model.layers[0].self_attn.kv_cache.k_cache.dtype == torch.float16
    monkeypatch.setenv("FLEET_KV_CACHE", "f32")
    plain = Engine.load(tiny_llama, dtype=dtype)
    want = _teacher_forced_logits(plain.model, ids, 16)
    assert plain.model.layers[0].self_attn.kv_cache.k_cache.dtype == torch.float32
    assert rel(got, want) < {"bf16": 1e-3, "f32": 2e-3, "int4": 6e-2}[dtype]
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= (0.8 if dtype == "int4" else 1.0)
