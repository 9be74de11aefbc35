"""The decoder's configuration, read from and written to a Hugging Face `config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fleetlm.errors import CheckpointError

# Hugging Face class name -> our arch name (and back).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
}
MOE_ARCHS = ("mixtral", "qwen2_moe")
HF_CLASS = {arch: cls for cls, arch in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


@dataclass
class ModelConfig:
    arch: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 0  # 0 means hidden_size // num_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: q/k/v only; llama: q/k/v/o (as in transformers)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # mistral and mixtral only
    # Mixture of experts (mixtral, qwen2_moe; num_experts 0: a dense MLP in every layer).
    num_experts: int = 0
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 0  # each expert's width; 0 means intermediate_size (Mixtral)
    norm_topk_prob: bool = True  # renormalise the k kept router weights (Mixtral always; Qwen2-MoE's flag)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (0: none)
    decoder_sparse_step: int = 1  # Qwen2-MoE: layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: list[int] = field(default_factory=list)  # ... and i is not listed here
    router_aux_loss_coef: float = 0.01  # the load-balancing loss's weight in training

    def __post_init__(self) -> None:
        if self.arch not in HF_CLASS:
            raise CheckpointError(
                f"unsupported architecture {self.arch!r} (supported: {', '.join(HF_CLASS)})"
            )
        if self.arch in MOE_ARCHS and self.num_experts <= 0:
            raise CheckpointError(f"{self.arch} needs num_experts >= 1, got {self.num_experts}")
        if self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise CheckpointError(f"num_experts_per_tok={self.num_experts_per_tok} must lie in "
                                  f"1..num_experts={self.num_experts}")
        if self.num_experts and self.arch not in MOE_ARCHS:
            raise CheckpointError(f"num_experts is set but {self.arch} has no experts (use mixtral or "
                                  "qwen2_moe)")
        if self.decoder_sparse_step < 1:
            raise CheckpointError(f"decoder_sparse_step must be >= 1, got {self.decoder_sparse_step}")
        if not self.moe_intermediate_size:
            self.moe_intermediate_size = self.intermediate_size
        if not self.head_dim:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.rope_scaling is not None:
            kind = self.rope_type
            if kind not in ROPE_TYPES:
                raise CheckpointError(
                    f"unsupported rope_scaling type {kind!r} (supported: {', '.join(ROPE_TYPES)})"
                )

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer i has experts (Qwen2-MoE may keep some layers dense)."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a transformers `config.json` dict; CheckpointError for an architecture we do not run."""
        archs = hf.get("architectures") or []
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None and not archs:
            arch = {a: a for a in HF_CLASS}.get(hf.get("model_type", ""))
        if arch is None:
            name = ", ".join(archs) or hf.get("model_type") or "unknown"
            raise CheckpointError(f"unsupported architecture {name} (supported: {', '.join(ARCHITECTURES)})")
        if hf.get("mlp_bias"):
            raise CheckpointError("unsupported config: mlp_bias=true")
        # transformers 5 moved rope_theta and rope_scaling into one `rope_parameters` dict.
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_theta = float(hf.get("rope_theta") or rope.pop("rope_theta", None) or 10000.0)
        rope.pop("rope_theta", None)
        rope_scaling = (
            rope if rope and rope.get("rope_type", rope.get("type", "default")) != "default" else None
        )
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])]
        # Released Qwen2 models run full attention (use_sliding_window=false); we do the same for qwen2.
        sliding = hf.get("sliding_window") if arch in ("mistral", "mixtral") else None
        n_heads = int(hf["num_attention_heads"])
        return cls(
            **_moe_fields(hf, arch),
            arch=arch,
            vocab_size=int(hf["vocab_size"]),
            hidden_size=int(hf["hidden_size"]),
            intermediate_size=int(hf["intermediate_size"]),
            num_layers=int(hf["num_hidden_layers"]),
            num_heads=n_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
            head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=(True if arch == "qwen2" else bool(hf.get("qkv_bias", True)) if arch == "qwen2_moe"
                            else bool(hf.get("attention_bias", False))),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            sliding_window=int(sliding) if sliding else None,
        )

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """A config.json dict that transformers loads as the matching *ForCausalLM."""
        hf: dict[str, Any] = {
            "architectures": [HF_CLASS[self.arch]],
            "model_type": self.arch,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (
                self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else (self.eos_token_ids or None)
            ),
            "dtype": torch_dtype,
            "torch_dtype": torch_dtype,  # the key transformers < 4.56 reads
            "initializer_range": 0.02,
            "use_cache": True,
        }
        if self.arch == "llama":
            hf["attention_bias"] = self.attention_bias
            hf["mlp_bias"] = False
        if self.arch == "qwen2":
            hf["use_sliding_window"] = False
        if self.arch in ("mistral", "mixtral"):
            hf["sliding_window"] = self.sliding_window
        if self.arch == "mixtral":
            hf.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                      router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False)
            if self.mlp_only_layers:  # not a Mixtral field: only fleetlm reads such a partly upcycled model
                hf["mlp_only_layers"] = self.mlp_only_layers
        if self.arch == "qwen2_moe":
            hf.update(num_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok,
                      moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                      shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                      decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=self.mlp_only_layers,
                      router_aux_loss_coef=self.router_aux_loss_coef, output_router_logits=False,
                      use_sliding_window=False, qkv_bias=True)
        return hf


def _moe_fields(hf: dict[str, Any], arch: str) -> dict[str, Any]:
    """The expert fields of a Mixtral or Qwen2-MoE config.json (none for a dense architecture)."""
    if arch == "mixtral":
        return dict(num_experts=int(hf["num_local_experts"]),
                    num_experts_per_tok=int(hf["num_experts_per_tok"]),
                    router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.02)),
                    mlp_only_layers=[int(i) for i in hf.get("mlp_only_layers") or []])
    if arch == "qwen2_moe":
        return dict(
            num_experts=int(hf["num_experts"]), num_experts_per_tok=int(hf["num_experts_per_tok"]),
            moe_intermediate_size=int(hf["moe_intermediate_size"]),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
            decoder_sparse_step=int(hf.get("decoder_sparse_step") or 1),
            mlp_only_layers=[int(i) for i in hf.get("mlp_only_layers") or []],
            router_aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.001)))
    return {}
