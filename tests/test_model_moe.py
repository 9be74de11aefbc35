"""Mixture of experts: tiny random Mixtral / Qwen2-MoE checkpoints built with transformers load into our
decoder with transformers' logits and greedy tokens, save back, export to GGUF that llama.cpp decodes alike.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fleetlm.errors import CheckpointError
from fleetlm.model.checkpoint import load_checkpoint, save_checkpoint
from fleetlm.model.config import ModelConfig
from fleetlm.model.moe import MoEFeedForward, load_balancing_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, rms_norm_eps=1e-5)
# name -> (transformers classes, config kwargs)
VARIANTS = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig",
                dict(intermediate_size=96, num_local_experts=4, num_experts_per_tok=2, rope_theta=1e6,
                     tie_word_embeddings=False, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                  dict(intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
                       num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, rope_theta=1e6,
                       tie_word_embeddings=True, use_sliding_window=False)),
    # Qwen2-MoE with renormalised top-k and a dense second layer (mlp_only_layers)
    "qwen2_moe_norm": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig",
                       dict(intermediate_size=128, moe_intermediate_size=48,
                            shared_expert_intermediate_size=80, num_experts=4, num_experts_per_tok=2,
                            norm_topk_prob=True, mlp_only_layers=[1],
                            rope_theta=1e6, tie_word_embeddings=False, use_sliding_window=False)),
}


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    # std 0.1 weights (norms near 1): logits of real spread and routers far from ties (conftest.perturb_)
    from conftest import perturb_

    perturb_(model, seed)


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory, tiny_tokenizer_dir):
    """variant -> Path of a tiny random HF MoE checkpoint with a real tokenizer (built once per module)."""
    import transformers

    cache: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in cache:
            cls, cfg_cls, extra = VARIANTS[variant]
            style = "llama3" if variant == "mixtral" else "chatml"
            tok_dir, ids = tiny_tokenizer_dir(style)
            cfg = getattr(transformers, cfg_cls)(**SHAPE, **extra, vocab_size=ids["vocab_size"],
                                                 bos_token_id=ids["bos_token_id"],
                                                 eos_token_id=ids["eos_token_ids"],
                                                 pad_token_id=ids["pad_token_id"])
            torch.manual_seed(0)
            model = getattr(transformers, cls)(cfg).eval()
            _perturb(model)
            out = tmp_path_factory.mktemp(f"moe-{variant}")
            model.save_pretrained(out)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copyfile(tok_dir / name, out / name)
            cache[variant] = out
        return cache[variant]

    return make


def _hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _ids(vocab: int, n: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(moe_checkpoint, variant):
    path = moe_checkpoint(variant)
    ours = load_checkpoint(path)
    assert ours.config.num_experts == 4
    moe = [isinstance(layer.mlp, MoEFeedForward) for layer in ours.layers]
    assert moe == ([True, False] if variant == "qwen2_moe_norm" else [True, True])
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        want = _hf(path)(ids).logits
        got = ours(ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_greedy_generation_matches_transformers(moe_checkpoint, variant):
    from fleetlm.engine import Engine, GenerationRequest

    path = moe_checkpoint(variant)
    engine = Engine.load(str(path), dtype="f32")  # fused experts, KV cache, grouped dispatch per step
    prompt = _ids(engine.model.config.vocab_size, 12, seed=3)[0].tolist()
    ours = [e.token_id for e in engine.generate([GenerationRequest(prompt_ids=prompt, max_tokens=16,
                                                                   temperature=0.0, ignore_eos=True)])
            if e.token_id is not None]
    with torch.no_grad():
        out = _hf(path).generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()


def test_save_checkpoint_round_trips_through_transformers(moe_checkpoint, tmp_path):
    path = moe_checkpoint("qwen2_moe")
    ours = load_checkpoint(path)
    save_checkpoint(ours, tmp_path / "saved", tokenizer_dir=path)
    names = json.loads((tmp_path / "saved" / "config.json").read_text())["architectures"]
    assert names == ["Qwen2MoeForCausalLM"]
    ids = _ids(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(_hf(tmp_path / "saved")(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    again = load_checkpoint(tmp_path / "saved")
    for (name, a), (_, b) in zip(sorted(ours.state_dict().items()), sorted(again.state_dict().items()),
                                 strict=True):
        assert torch.equal(a, b), name


def _dense_reference(m: MoEFeedForward, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the router's renormalised top-k: the slow definition."""
    probs = m.gate(x).float().softmax(-1)
    w, idx = probs.topk(m.top_k, dim=-1)
    if m.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(m.num_experts):
        y = torch.nn.functional.linear(
            torch.nn.functional.silu(x @ m.gate_exps[e].T) * (x @ m.up_exps[e].T), m.down_exps[e])
        out += y * (w * (idx == e)).sum(-1, keepdim=True)
    return out


def test_dispatch_matches_the_dense_definition_and_touches_only_chosen_experts():
    torch.manual_seed(0)
    m = MoEFeedForward(32, 48, num_experts=6, top_k=2).eval()
    torch.nn.init.normal_(m.gate.weight, std=0.5)
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        want = _dense_reference(m, x.reshape(-1, 32)).view_as(x)
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)
        _, w, idx = m.route(x.reshape(-1, 32))
        torch.testing.assert_close(m._gathered(x.reshape(-1, 32), w, idx).view_as(x), want, atol=1e-5,
                                   rtol=1e-5)
        # one token: exactly its k experts run, each once
        ran: list[int] = []
        original = m._expert
        m._expert = lambda e, t, w: (ran.append(e), original(e, t, w))[1]
        m(x[:1, :1])
        _, _, chosen = m.route(x[0, :1])
        assert sorted(ran) == sorted(chosen[0].tolist())
        m._expert = original
        m.fuse()  # gate and up stacked side by side, as the engine runs it
        torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


def test_load_balancing_loss_matches_transformers(moe_checkpoint):
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    ours = load_checkpoint(moe_checkpoint("mixtral")).train()
    ids = _ids(ours.config.vocab_size, 24)
    ours(ids)
    router_logits = tuple(layer.mlp.gate(h) for layer, h in zip(ours.layers, _router_inputs(ours, ids),
                                                                   strict=True))
    want = load_balancing_loss_func(router_logits, 4, 2)
    torch.testing.assert_close(load_balancing_loss(ours), want.float(), atol=1e-5, rtol=1e-5)
    # perfectly balanced routing costs k; sending every token to one pair of experts costs more
    assert 1.5 < float(load_balancing_loss(ours)) < 2 * 4


def _router_inputs(model, ids):
    """The normalised hidden states each MoE layer's router saw (recomputed through hooks)."""
    seen = []
    def keep(_module, args):
        seen.append(args[0].reshape(-1, args[0].shape[-1]))

    hooks = [layer.mlp.register_forward_pre_hook(keep) for layer in model.layers]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_bad_moe_configs_are_clear_errors(moe_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="num_experts_per_tok=5 must lie in 1..num_experts=4"):
        ModelConfig(arch="mixtral", num_experts=4, num_experts_per_tok=5)
    with pytest.raises(CheckpointError, match="mixtral needs num_experts"):
        ModelConfig(arch="mixtral", num_experts=0)
    # a checkpoint that lost one expert's tensor names the layer and the expert
    from safetensors.torch import load_file, save_file

    src = moe_checkpoint("mixtral")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    dropped = [k for k in tensors if ".experts.3." in k and "layers.1." in k]
    if not dropped:  # transformers 5 saved the experts stacked: drop one stacked tensor instead
        dropped = [k for k in tensors if "layers.1." in k and "down_proj" in k and "experts" in k]
    for k in dropped:
        del tensors[k]
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"layer 1|lacks"):
        load_checkpoint(broken)


# ----------------------------------------------------------------------------------------------------
# GGUF export: llama.cpp (llama-cpp-python) runs the file and decodes greedily as our engine does

PROMPT = "The quick brown fox jumps over the lazy dog. 123 4567"


def _llama_cpp_greedy(path: Path, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    llama_cpp = pytest.importorskip("llama_cpp")
    # an f32 KV cache (ggml type 0) keeps llama.cpp's arithmetic close to ours
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False, logits_all=True,
                          type_k=0, type_v=0)
    llm.eval(ids)
    first = torch.tensor(llm.scores[: len(ids)])  # the prompt's logits, one row per position
    llm.reset()
    out: list[int] = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) == n:
            break
    return out, first


@pytest.mark.parametrize("variant", ["mixtral", "qwen2_moe"])
def test_gguf_export_decodes_in_llama_cpp_as_in_our_engine(moe_checkpoint, tmp_path, variant):
    from fleetlm.compress.gguf_moe import export_moe_gguf
    from fleetlm.engine import Engine, GenerationRequest
    from fleetlm.model.gguf import GGUFFile, load_gguf

    path = moe_checkpoint(variant)
    out = export_moe_gguf(path, tmp_path / f"{variant}.gguf", "f32")
    reader = GGUFFile(out)
    arch = reader.meta("general.architecture")
    assert arch == {"mixtral": "llama", "qwen2_moe": "qwen2moe"}[variant]
    assert reader.meta(f"{arch}.expert_count") == 4 and reader.meta(f"{arch}.expert_used_count") == 2
    shapes = {t.name: t.shape for t in reader.tensors}
    width = 96 if variant == "mixtral" else 48
    assert shapes["blk.0.ffn_gate_exps.weight"] == (64, width, 4)  # ggml order of numpy [E, I, hidden]
    assert shapes["blk.1.ffn_down_exps.weight"] == (width, 64, 4)

    engine = Engine.load(str(path), dtype="f32")
    ids = engine.tokenizer.encode(PROMPT)
    ours = [e.token_id for e in engine.generate([GenerationRequest(prompt_ids=ids, max_tokens=16,
                                                                   temperature=0.0, ignore_eos=True)])
            if e.token_id is not None]
    theirs, logits = _llama_cpp_greedy(out, ids, 16)
    assert theirs == ours
    with torch.no_grad():
        want = load_checkpoint(path)(torch.tensor([ids]))[0]
    torch.testing.assert_close(logits, want, atol=2e-3, rtol=1e-3)
    # and our GGUF reader takes the file back: same config, same logits
    back, _ = load_gguf(out)
    assert back.config.arch == variant and back.config.num_experts == 4
    with torch.no_grad():
        torch.testing.assert_close(back(torch.tensor([ids]))[0], want, atol=1e-5, rtol=1e-5)


def test_gguf_export_refuses_what_llama_cpp_cannot_express(moe_checkpoint, tmp_path, tiny_llama):
    from fleetlm.compress.gguf import GGUFExportError
    from fleetlm.compress.gguf_moe import export_moe_gguf

    # llama.cpp's qwen2moe never renormalises top-k weights, and wants experts in every layer
    with pytest.raises(GGUFExportError, match=r"layers \[1\] have no experts"):
        export_moe_gguf(moe_checkpoint("qwen2_moe_norm"), tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="not a mixture-of-experts"):
        export_moe_gguf(tiny_llama, tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="unknown GGUF type"):
        export_moe_gguf(moe_checkpoint("mixtral"), tmp_path / "x.gguf", "q2")
    assert not (tmp_path / "x.gguf").exists()


def test_q8_0_export_keeps_routers_f32_and_loads_in_llama_cpp(moe_checkpoint, tmp_path):
    import gguf

    from fleetlm.compress.gguf_moe import export_moe_gguf
    from fleetlm.model.gguf import GGUFFile

    path = moe_checkpoint("qwen2_moe")
    out = export_moe_gguf(path, tmp_path / "q8.gguf", "q8_0")
    types = {t.name: gguf.GGMLQuantizationType(t.tensor_type).name for t in GGUFFile(out).tensors}
    assert types["blk.0.ffn_gate_inp.weight"] == "F32" and types["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
    assert types["blk.0.ffn_gate_exps.weight"] == "Q8_0" and types["blk.1.ffn_up_shexp.weight"] == "Q8_0"
    assert types["blk.1.ffn_down_shexp.weight"] == "F16"  # rows of 80 do not split into 32-value blocks
    assert "output.weight" in types  # qwen2moe requires it: the tied embedding is written again
    tokens, _ = _llama_cpp_greedy(out, [1, 5, 9, 20], 4)
    assert len(tokens) == 4


def test_fleet_export_gguf_writes_an_moe_checkpoint_with_its_experts(moe_checkpoint, tmp_path, monkeypatch,
                                                                       capsys):
    """`fleet export gguf` on a checkpoint with num_experts > 0 takes the MoE exporter (it failed before)."""
    from cli_runner import run_main
    from fleetlm.model.gguf import GGUFFile, load_gguf

    out = tmp_path / "moe.gguf"
    src = str(moe_checkpoint("mixtral"))
    code, stdout, err = run_main(monkeypatch, capsys, "export", "gguf", src, str(out), "--type", "f32")
    assert code == 0, err
    assert "wrote" in stdout and out.is_file()
    names = {t.name for t in GGUFFile(out).tensors}
    assert {"blk.0.ffn_gate_inp.weight", "blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"} <= names
    back, _ = load_gguf(out)
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids), load_checkpoint(moe_checkpoint("mixtral"))(ids), atol=1e-5,
                                   rtol=1e-5)
