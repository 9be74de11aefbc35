import functools

import pytest
import torch

from fleetlm.model import Transformer, load_checkpoint
from fleetlm.model.config import ModelConfig

TOL = 1e-4
ARCHS = ["llama", "qwen2", "mistral"]


@functools.cache
def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def random_ids(vocab: int, b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_full_forward_matches_transformers(tiny_checkpoint_factory, arch):
    path = tiny_checkpoint_factory(arch)
    ours, ref = load_checkpoint(path), hf_model(path)
    ids = random_ids(ours.config.vocab_size, 2, 24)
    with torch.no_grad():
        got = ours(ids)
    want = hf_logits(ref, ids)
    assert got.shape == (2, 24, ours.config.vocab_size) and got.dtype == torch.float32
    assert (
        want.abs().max() > 1.0
    )  # the fixture's logits are not all near zero, so the comparison means something
    assert (got - want).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_kv_cache_prefill_and_decode_match_full_forward(tiny_checkpoint_factory, arch):
    path = tiny_checkpoint_factory(arch)
    model, ref = load_checkpoint(path), hf_model(path)
    ids = random_ids(model.config.vocab_size, 1, 12, seed=1)
    full = hf_logits(ref, ids)
    model.setup_caches(max_batch_size=1, max_seq_length=32)
    with torch.no_grad():
        pre = model(ids[:, :7], torch.arange(7)[None])
        steps = [model(ids[:, t : t + 1], torch.tensor([[t]])) for t in range(7, 12)]
    got = torch.cat([pre, *steps], dim=1)
    assert (got - full).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_projections_give_the_same_logits(tiny_checkpoint_factory, arch):
    path = tiny_checkpoint_factory(arch)
    plain, fused = load_checkpoint(path), load_checkpoint(path)
    fused.fuse_projections()
    attn, mlp = fused.layers[0].self_attn, fused.layers[0].mlp
    assert attn.qkv_proj is not None and not hasattr(attn, "q_proj")
    assert mlp.gate_up_proj is not None and not hasattr(mlp, "up_proj")
    ids = random_ids(plain.config.vocab_size, 2, 11, seed=6)
    with torch.no_grad():
        assert (plain(ids) - fused(ids)).abs().max().item() <= TOL


def test_decode_over_exactly_the_filled_slots_needs_no_mask_and_matches_the_masked_step(tiny_llama):
    model = load_checkpoint(tiny_llama)
    ids = random_ids(model.config.vocab_size, 1, 9, seed=3)
    model.setup_caches(max_batch_size=1, max_seq_length=32)
    pos = torch.tensor([[8]])
    assert model.sees_all(pos, kv_len=9) and not model.sees_all(pos, kv_len=32)
    with torch.no_grad():
        model(ids[:, :8], torch.arange(8)[None])
        masked = model(ids[:, 8:], pos)  # all 32 slots, the unfilled ones masked
        unmasked = model(ids[:, 8:], pos, kv_len=9)  # the 9 filled slots, no mask
    assert (masked - unmasked).abs().max().item() <= TOL


def test_logits_of_the_last_prompt_tokens_only_equal_the_full_ones(tiny_llama):
    model = load_checkpoint(tiny_llama)
    ids = random_ids(model.config.vocab_size, 3, 7, seed=4)
    last = torch.tensor([6, 2, 4])  # right-padded prompts of lengths 7, 3, 5
    with torch.no_grad():
        full = model(ids)
        picked = model(ids, last=last)
    assert picked.shape == (3, 1, model.config.vocab_size)
    assert (picked[:, 0] - full[torch.arange(3), last]).abs().max().item() <= TOL  # GEMM blocking differs


def test_a_bf16_model_keeps_an_f32_cache_on_cpu_and_decodes_close_to_f32(tiny_llama):
    f32, bf16 = load_checkpoint(tiny_llama), load_checkpoint(tiny_llama, dtype=torch.bfloat16)
    bf16.setup_caches(max_batch_size=1, max_seq_length=16)
    f32.setup_caches(max_batch_size=1, max_seq_length=16)
    assert bf16.layers[0].self_attn.kv_cache.k_cache.dtype == torch.float32
    ids = random_ids(f32.config.vocab_size, 1, 10, seed=4)
    with torch.no_grad():
        outs = [(m(ids[:, :9], torch.arange(9)[None]), m(ids[:, 9:], torch.tensor([[9]]), kv_len=10))
                for m in (f32, bf16)]
    (a_pre, a_step), (b_pre, b_step) = outs
    assert b_step.dtype == torch.float32
    assert (a_step - b_step).abs().max().item() < 0.25 * a_step.abs().max().item()


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_right_padded_prompts(tiny_checkpoint_factory, arch):
    path = tiny_checkpoint_factory(arch)
    model, ref = load_checkpoint(path), hf_model(path)
    vocab = model.config.vocab_size
    lengths, new = [5, 11, 3], 4
    seqs = [random_ids(vocab, 1, n + new, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    prompt = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        prompt[b, :n] = seqs[b][:n]
        prompt[b, n:] = 7  # any id: padding slots are never attended by real tokens
    pos = torch.arange(width)[None].repeat(len(lengths), 1)  # padding positions run on past each length
    model.setup_caches(max_batch_size=4, max_seq_length=32)
    with torch.no_grad():
        pre = model(prompt, pos)
        steps = []
        for s in range(new):
            tok = torch.stack([seqs[b][n + s] for b, n in enumerate(lengths)])[:, None]
            steps.append(model(tok, torch.tensor(lengths)[:, None] + s))
    for b, n in enumerate(lengths):
        want = hf_logits(ref, seqs[b][None])[0]
        assert (pre[b, :n] - want[:n]).abs().max().item() <= TOL
        got_steps = torch.cat([st[b] for st in steps])
        assert (got_steps - want[n : n + new]).abs().max().item() <= TOL


@pytest.mark.parametrize(
    "scaling",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {"rope_type": "linear", "factor": 4.0},
        {"rope_type": "dynamic", "factor": 2.0},
    ],
)
def test_rope_scaling_matches_transformers(tiny_checkpoint_factory, scaling):
    # Short trained context (16 / max_position 32) and 40 tokens, so every scaled band is in play.
    path = tiny_checkpoint_factory("llama", rope_scaling=scaling, max_position_embeddings=32)
    ours, ref = load_checkpoint(path), hf_model(path)
    assert ours.config.rope_type == scaling["rope_type"]
    ids = random_ids(ours.config.vocab_size, 1, 40, seed=3)
    with torch.no_grad():
        got = ours(ids)
    assert (got - hf_logits(ref, ids)).abs().max().item() <= TOL
    if (
        scaling["rope_type"] != "dynamic"
    ):  # dynamic NTK depends on the length seen, so only a full pass compares
        ours.setup_caches(1, 64)
        with torch.no_grad():
            pre = ours(ids[:, :30], torch.arange(30)[None])
            step = ours(ids[:, 30:31], torch.tensor([[30]]))
        assert (torch.cat([pre, step], 1) - got[:, :31]).abs().max().item() <= TOL


def test_mistral_sliding_window_matches_transformers(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("mistral", sliding_window=6)
    ours, ref = load_checkpoint(path), hf_model(path)
    assert ours.config.sliding_window == 6
    ids = random_ids(ours.config.vocab_size, 1, 20, seed=4)
    want = hf_logits(ref, ids)
    with torch.no_grad():
        full = ours(ids)
        ours.setup_caches(1, 32)
        pre = ours(ids[:, :10], torch.arange(10)[None])
        steps = [ours(ids[:, t : t + 1], torch.tensor([[t]])) for t in range(10, 20)]
    assert (full - want).abs().max().item() <= TOL
    assert (torch.cat([pre, *steps], 1) - want).abs().max().item() <= TOL


def test_explicit_head_dim_and_untied_qwen2(tiny_checkpoint_factory):
    # head_dim != hidden / heads (as in Mistral-Nemo), and a Qwen2 with its own lm_head
    for arch, extra in (("mistral", {"head_dim": 32}), ("qwen2", {"tie_word_embeddings": False})):
        path = tiny_checkpoint_factory(arch, **extra)
        ours, ref = load_checkpoint(path), hf_model(path)
        ids = random_ids(ours.config.vocab_size, 2, 9, seed=6)
        with torch.no_grad():
            assert (ours(ids) - hf_logits(ref, ids)).abs().max().item() <= TOL
    assert ours.lm_head.weight is not ours.embed_tokens.weight


def test_reset_caches_zeroes_selected_rows(tiny_llama):
    model = load_checkpoint(tiny_llama)
    model.setup_caches(max_batch_size=2, max_seq_length=16)
    with torch.no_grad():
        model(random_ids(model.config.vocab_size, 2, 5), torch.arange(5)[None].repeat(2, 1))
    cache = model.layers[0].self_attn.kv_cache
    assert cache.k_cache.shape == (2, 2, 17, 16)  # 16 slots and the spare one (KVCache)
    assert cache.k_cache[0].abs().sum() > 0 and cache.k_cache[1].abs().sum() > 0
    model.reset_caches([1])
    assert cache.k_cache[0].abs().sum() > 0 and cache.k_cache[1].abs().sum() == 0
    model.reset_caches()
    assert cache.v_cache.abs().sum() == 0


def test_tied_embeddings_share_one_tensor():
    config = ModelConfig(
        arch="qwen2",
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        tie_word_embeddings=True,
        attention_bias=True,
    )
    model = Transformer(config)
    assert model.lm_head.weight is model.embed_tokens.weight
    assert model.layers[0].self_attn.q_proj.bias is not None and model.layers[0].self_attn.o_proj.bias is None


def test_bf16_model_runs_close_to_float32(tiny_llama):
    f32, bf16 = load_checkpoint(tiny_llama), load_checkpoint(tiny_llama, dtype=torch.bfloat16)
    assert bf16.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    ids = random_ids(f32.config.vocab_size, 1, 16, seed=5)
    with torch.no_grad():
        a, b = f32(ids), bf16(ids)
    assert b.dtype == torch.float32
    assert (a - b).abs().max().item() < 0.25 * a.abs().max().item()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75


def test_training_forward_backpropagates(tiny_llama):
    model = load_checkpoint(tiny_llama).train()
    ids = random_ids(model.config.vocab_size, 2, 10, seed=7)
    logits = model(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch, extra", [("llama", {}), ("qwen2", {}), ("mistral", {"sliding_window": 6})])
def test_attention_over_the_filled_slots_equals_the_whole_masked_cache(tiny_checkpoint_factory, arch, extra):
    """Rows at different fills (a continuous batch), one row, and a sliding window: attending over slots
    [0, kv_len) (the default now) gives the logits of attending over every slot of the cache with the
    unfilled ones masked, at every step, also once the rows pass the window."""
    model = load_checkpoint(tiny_checkpoint_factory(arch, **extra))
    vocab, slots = model.config.vocab_size, 48
    lengths = [13, 4, 8]
    ids = random_ids(vocab, 3, max(lengths) + 12, seed=21)
    model.setup_caches(max_batch_size=4, max_seq_length=slots)
    with torch.no_grad():
        for b, n in enumerate(lengths):  # each row prefilled alone into its own cache row
            model(ids[b : b + 1, :n], torch.arange(n)[None], cache_rows=slice(b, b + 1))
        for s in range(12):
            pos = torch.tensor(lengths)[:, None] + s
            tok = ids[torch.arange(3), pos[:, 0]][:, None]
            sliced = model(tok, pos, cache_rows=slice(0, 3))  # kv_len: the furthest row + 1
            # the same step written again (same keys and values), attending over all 48 slots
            whole = model(tok, pos, cache_rows=slice(0, 3), kv_len=slots)
            one = model(tok[1:2], pos[1:2], cache_rows=slice(1, 2))  # one row: no mask at all
            assert (sliced - whole).abs().max().item() <= TOL
            assert (one[0] - whole[1]).abs().max().item() <= TOL
    assert model.sees_all(pos[1:2], int(pos[1]) + 1) == ("sliding_window" not in extra or int(pos[1]) < 6)


def test_a_prefill_from_an_empty_row_is_plain_causal_and_matches_the_masked_one(tiny_llama):
    model = load_checkpoint(tiny_llama)
    ids = random_ids(model.config.vocab_size, 2, 10, seed=5)
    pos = torch.arange(10)[None].repeat(2, 1)
    assert model.plain_causal(pos, 10) and not model.plain_causal(pos, 12)
    assert not model.plain_causal(pos + 1, 11)  # a chunk after earlier slots needs the mask
    model.setup_caches(max_batch_size=2, max_seq_length=16)
    with torch.no_grad():
        causal = model(ids, pos, kv_len=10)
        masked = model(ids, pos, kv_len=10, unmasked=False)
    assert (causal - masked).abs().max().item() <= TOL


@pytest.mark.parametrize("width", ["bf16", "int4"])
def test_rowwise_forward_equals_one_token_steps_bit_for_bit(width: str) -> None:
    """rowwise (a speculative verify): T new tokens in one forward give exactly the logits of T decode steps,
    which a masked forward does only up to summation order, whenever the linears compute each row on its own
    (bf16 GEMM here, our int4/int8 kernels; not torch's f32 GEMM); and it still agrees with the masked one."""
    from fleetlm.engine import kernels
    from fleetlm.engine.quant import quantize

    torch.manual_seed(0)
    cfg = ModelConfig(arch="qwen2", vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2, max_position_embeddings=128, attention_bias=True)
    model = Transformer(cfg).eval()
    if width == "bf16":
        model = model.to(torch.bfloat16)
    elif not kernels.available():
        pytest.skip("our kernels are not built here")
    else:
        quantize(model, "int4", group_size=32, kernels=True)
    ids = torch.randint(0, 97, (1, 20))
    with torch.no_grad():
        model.setup_caches(1, 32)
        model(ids[:, :14], torch.arange(14)[None], kv_len=14)
        steps = torch.cat([model(ids[:, i:i + 1], torch.tensor([[i]]), kv_len=i + 1)
                           for i in range(14, 20)], dim=1)
        rowwise = model(ids[:, 14:], torch.arange(14, 20)[None], kv_len=20, rowwise=True)
        masked = model(ids[:, 14:], torch.arange(14, 20)[None], kv_len=20)
    assert torch.equal(rowwise, steps)
    torch.testing.assert_close(masked, steps, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("masked", [False, True])
def test_one_query_attention_groups_query_heads_like_sdpa_gqa(masked: bool) -> None:
    from fleetlm.model.decoder import one_query_attention

    torch.manual_seed(0)
    b, h, h_kv, s, d = 3, 12, 2, 37, 16
    q, k, v = torch.randn(b, h, 1, d), torch.randn(b, h_kv, s, d), torch.randn(b, h_kv, s, d)
    mask = (torch.arange(s)[None, None, None, :] < torch.tensor([37, 20, 5])[:, None, None, None]
            if masked else None)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    got = one_query_attention(q, k, v, mask)
    assert got.shape == (b, h, 1, d)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if masked:  # a row that sees 5 slots is unaffected by what lies past them
        v2 = v.clone()
        v2[2, :, 5:] = 1e3
        torch.testing.assert_close(one_query_attention(q, k, v2, mask)[2], got[2])
