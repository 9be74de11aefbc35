"""Sparse upcycling: a dense decoder's MLPs copied into E experts under a new router (Mixtral layout).

Komatsuzaki et al. (2023), "Sparse Upcycling": every expert starts as the dense MLP, the router is new.
With Mixtral's renormalised top-k weights and identical experts, the upcycled model computes exactly what
the dense one did, whatever the router says; training (fleetlm.train.upcycle) makes the experts differ, and
the Switch/Mixtral load-balancing loss keeps the router from sending every token to the same few experts.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from fleetlm.errors import ConfigError
from fleetlm.model.config import ModelConfig
from fleetlm.model.decoder import Transformer
from fleetlm.model.moe import MoEFeedForward


def upcycled_config(config: ModelConfig, num_experts: int, top_k: int,
                    layers: list[int] | None = None) -> ModelConfig:
    """The Mixtral-style config of `config` with `num_experts` experts in `layers` (all when None)."""
    if config.num_experts:
        raise ConfigError(f"the model is already a mixture of {config.num_experts} experts")
    if config.arch not in ("llama", "mistral"):
        raise ConfigError(f"upcycling {config.arch} is not supported (llama or mistral: their attention has "
                          "Mixtral's shape)")
    if num_experts < 2:
        raise ConfigError(f"--experts must be at least 2, got {num_experts}")
    if not 0 < top_k <= num_experts:
        raise ConfigError(f"--top-k must lie in 1..{num_experts}, got {top_k}")
    chosen = list(range(config.num_layers)) if layers is None else sorted(set(layers))
    bad = [i for i in chosen if not 0 <= i < config.num_layers]
    if bad or not chosen:
        raise ConfigError(f"layers {bad or chosen} are not in 0..{config.num_layers - 1}")
    dense = [i for i in range(config.num_layers) if i not in chosen]
    return replace(config, arch="mixtral", num_experts=num_experts, num_experts_per_tok=top_k,
                   moe_intermediate_size=config.intermediate_size, norm_topk_prob=True,
                   mlp_only_layers=dense, router_aux_loss_coef=0.01)


@torch.no_grad()
def upcycle(model: Transformer, num_experts: int, top_k: int, layers: list[int] | None = None,
            noise: float = 0.0, router_std: float = 0.02, seed: int = 0) -> Transformer:
    """A new Mixtral-style Transformer whose MoE layers hold `num_experts` copies of the dense MLP.

    noise: relative Gaussian noise added to each copy (0: exact copies, the upcycled model then equals the
    dense one); router_std: the router's init (small, so that routing starts near uniform but not tied).
    """
    cfg = upcycled_config(model.config, num_experts, top_k, layers)
    gen = torch.Generator().manual_seed(seed)
    dtype = model.embed_tokens.weight.dtype
    with torch.device("meta"):
        moe = Transformer(cfg)
    dense_state = model.state_dict()
    state = {k: v.clone() for k, v in dense_state.items() if ".mlp." not in k or not _is_moe(cfg, k)}
    for i in range(cfg.num_layers):
        if not cfg.is_moe_layer(i):
            continue
        prefix = f"layers.{i}.mlp."
        for ours, hf in (("gate_exps", "gate_proj"), ("up_exps", "up_proj"), ("down_exps", "down_proj")):
            w = dense_state[prefix + hf + ".weight"]
            copies = w[None].repeat(num_experts, 1, 1)
            if noise:
                copies += noise * w.float().std() * torch.randn(copies.shape, generator=gen).to(dtype)
            state[prefix + ours] = copies
        state[prefix + "gate.weight"] = (router_std * torch.randn(num_experts, cfg.hidden_size,
                                                                  generator=gen)).to(dtype)
    moe.load_state_dict(state, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        moe.lm_head.weight = moe.embed_tokens.weight
    moe.inv_freq = model.inv_freq.clone()
    return moe.eval()


def _is_moe(cfg: ModelConfig, name: str) -> bool:
    return cfg.is_moe_layer(int(name.split(".")[1]))


def active_params(model: nn.Module) -> int:
    """Parameters one token goes through: every weight outside the experts, plus k of each layer's E experts
    (the embedding counted once even when tied: it is a lookup, the output projection a matmul)."""
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            expert = sum(p[0].numel() for p in _expert_tensors(m))
            total -= (m.num_experts - m.top_k) * expert
    return total


def _expert_tensors(m: MoEFeedForward) -> list[torch.Tensor]:
    if m.gate_up_exps is not None:
        return [m.gate_up_exps, m.down_exps]
    return [m.gate_exps, m.up_exps, m.down_exps]
