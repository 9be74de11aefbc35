"""GGUF export of mixture-of-experts checkpoints (Mixtral as llama.cpp's "llama", Qwen2-MoE as "qwen2moe").

Built on compress/gguf.py (its vocabulary, metadata, storage types and q/k permutation); only the expert
tensors and keys are new. Facts from llama.cpp's loader and graph (no code copied):
- experts are 3-D tensors ffn_gate_exps / ffn_up_exps [E, I, hidden] and ffn_down_exps [E, hidden, I] (numpy
  order), the router is ffn_gate_inp [E, hidden]; keys {arch}.expert_count and {arch}.expert_used_count.
- "llama" with experts renormalises the top-k weights (Mixtral); "qwen2moe" never does, always has a shared
  expert (ffn_{gate,up,down}_shexp, gate ffn_gate_inp_shexp [hidden] through a sigmoid), takes the expert
  width from expert_feed_forward_length, and needs output.weight even when the embeddings are tied.
- llama.cpp's own converter keeps the router in float32 whatever the file type: a small tensor whose rounding
  could flip which experts a token picks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fleetlm.compress.gguf import (
    OUT_TYPES,
    GGUFExportError,
    _nbytes,
    _order_key,
    _storage_type,
    _to_numpy,
    _write_metadata,
    permute_rotate_half,
    read_vocab,
)
from fleetlm.model.config import ModelConfig

MOE_GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe"}
ATTN = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
MOE = {"gate.weight": "ffn_gate_inp.weight", "gate_exps": "ffn_gate_exps.weight",
       "up_exps": "ffn_up_exps.weight", "down_exps": "ffn_down_exps.weight",
       "shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
       "shared_expert.up_proj.weight": "ffn_up_shexp.weight",
       "shared_expert.down_proj.weight": "ffn_down_shexp.weight",
       "shared_expert_gate.weight": "ffn_gate_inp_shexp.weight"}
NORMS = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}
F32_ALWAYS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")


def check_exportable(cfg: ModelConfig) -> None:
    """GGUFExportError when llama.cpp's MoE architectures cannot express this config."""
    if cfg.arch not in MOE_GGUF_ARCH:
        raise GGUFExportError(f"{cfg.arch} is not a mixture-of-experts architecture (use fleet export gguf)")
    dense = [i for i in range(cfg.num_layers) if not cfg.is_moe_layer(i)]
    if dense:
        raise GGUFExportError(f"layers {dense} have no experts; llama.cpp's {MOE_GGUF_ARCH[cfg.arch]} wants "
                              "experts in every layer")
    if cfg.arch == "qwen2_moe":
        if cfg.norm_topk_prob:
            raise GGUFExportError("llama.cpp's qwen2moe never renormalises the top-k router weights, so a "
                                  "model with norm_topk_prob=true would decode differently there")
        if not cfg.shared_expert_intermediate_size:
            raise GGUFExportError("llama.cpp's qwen2moe needs a shared expert")
        if cfg.num_heads * cfg.head_dim != cfg.hidden_size:
            raise GGUFExportError("llama.cpp's qwen2moe needs num_heads * head_dim == hidden_size")


def gguf_moe_name(name: str) -> str | None:
    """llama.cpp's name for one of our state-dict names (None for lm_head, which the caller decides on)."""
    globals_ = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}
    if name in globals_:
        return globals_[name]
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "layers":
        raise GGUFExportError(f"tensor {name!r} has no GGUF equivalent")
    layer, rest = parts[1], parts[2]
    if rest in NORMS:
        return f"blk.{layer}.{NORMS[rest]}"
    if rest.startswith("self_attn."):
        proj, kind = rest.removeprefix("self_attn.").split(".")
        if proj in ATTN:
            return f"blk.{layer}.{ATTN[proj]}.{kind}"
    if rest.startswith("mlp.") and rest.removeprefix("mlp.") in MOE:
        return f"blk.{layer}.{MOE[rest.removeprefix('mlp.')]}"
    raise GGUFExportError(f"tensor {name!r} has no GGUF equivalent")


def _tensors(model: torch.nn.Module, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, data in numpy order) for every tensor, q/k permuted for "llama", in llama.cpp's order."""
    permute = MOE_GGUF_ARCH[cfg.arch] == "llama"
    out = []
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings and cfg.arch != "qwen2_moe":
            continue  # llama falls back to token_embd; qwen2moe requires output.weight, so it gets a copy
        gname = gguf_moe_name(name)
        data = t.detach().float()
        if permute and ".attn_q." in gname:
            data = permute_rotate_half(data, cfg.num_heads)
        elif permute and ".attn_k." in gname:
            data = permute_rotate_half(data, cfg.num_kv_heads)
        if gname.endswith("ffn_gate_inp_shexp.weight"):
            data = data.reshape(-1)  # [1, hidden] -> llama.cpp's {n_embd}
        out.append((gname, data))
    out.sort(key=lambda item: _order_key(item[0]))
    return out


def _write_moe_metadata(w, cfg: ModelConfig) -> None:  # noqa: ANN001 (a gguf.GGUFWriter)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.num_experts_per_tok)
    if cfg.arch == "qwen2_moe":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def export_moe_gguf(checkpoint_dir: str | Path, out_path: str | Path, out_type: str = "f16") -> Path:
    """Write a Mixtral- or Qwen2-MoE-style HF checkpoint as a GGUF file that llama.cpp runs.

    out_type as for export_gguf (f32 | f16 | bf16 | q8_0); the routers stay float32. The checkpoint is read
    whole through our loader (which stacks HF's per-expert tensors), so memory is the model's size in f32.
    """
    import gguf

    from fleetlm.model.checkpoint import load_checkpoint, read_config

    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"unknown GGUF type {out_type!r} (choose from {', '.join(OUT_TYPES)})")
    ckpt, out = Path(checkpoint_dir), Path(out_path)
    cfg = read_config(ckpt)
    check_exportable(cfg)
    if not out.parent.is_dir():
        raise GGUFExportError(f"output directory {out.parent} does not exist")
    vocab = read_vocab(ckpt, cfg.vocab_size, cfg)
    model = load_checkpoint(ckpt, dtype=torch.float32)
    tensors = _tensors(model, cfg)
    types = {name: (gguf.GGMLQuantizationType.F32 if name.endswith(F32_ALWAYS)
                    else _storage_type(out_type, name, tuple(data.shape))) for name, data in tensors}

    w = gguf.GGUFWriter(str(out), MOE_GGUF_ARCH[cfg.arch])
    _write_metadata(w, cfg, vocab, out_type, ckpt.resolve().name)
    _write_moe_metadata(w, cfg)
    for name, data in tensors:
        shape = tuple(data.shape)
        nbytes = _nbytes(shape, types[name])
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=types[name])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, data in tensors:
            w.write_tensor_data(_to_numpy(data, types[name]))
    except BaseException:
        w.close()
        out.unlink(missing_ok=True)  # a half-written GGUF would only fail later, inside llama.cpp
        raise
    w.close()
    return out
