import json

import pytest

from fleetlm.errors import CheckpointError
from fleetlm.model.config import ModelConfig

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
BASE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": True,
    "bos_token_id": 128000,
    "eos_token_id": [128001, 128008, 128009],
}


def test_reads_legacy_rope_scaling_and_transformers5_rope_parameters():
    legacy = ModelConfig.from_hf({**BASE, "rope_theta": 500000.0, "rope_scaling": LLAMA3})
    v5 = ModelConfig.from_hf({**BASE, "rope_parameters": {**LLAMA3, "rope_theta": 500000.0}})
    assert legacy == v5
    assert legacy.rope_theta == 500000.0 and legacy.rope_type == "llama3" and legacy.rope_scaling == LLAMA3
    assert legacy.head_dim == 64 and legacy.eos_token_ids == [128001, 128008, 128009]
    plain = ModelConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None and plain.rope_type == "default" and plain.rope_theta == 1e4


def test_families():
    qwen = ModelConfig.from_hf(
        {
            **BASE,
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "sliding_window": 32768,
            "use_sliding_window": False,
            "eos_token_id": 7,
        }
    )
    assert qwen.arch == "qwen2" and qwen.attention_bias and qwen.sliding_window is None
    assert qwen.eos_token_ids == [7]
    mistral = ModelConfig.from_hf(
        {**BASE, "architectures": ["MistralForCausalLM"], "sliding_window": 4096, "head_dim": None}
    )
    assert mistral.arch == "mistral" and mistral.sliding_window == 4096 and mistral.head_dim == 64
    no_arch = ModelConfig.from_hf({k: v for k, v in BASE.items() if k != "architectures"})
    assert no_arch.arch == "llama"


def test_to_hf_round_trips_and_transformers_reads_it():
    from transformers import AutoConfig

    for arch_cls in ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM"):
        config = ModelConfig.from_hf(
            {
                **BASE,
                "architectures": [arch_cls],
                "rope_theta": 500000.0,
                "rope_scaling": LLAMA3 if arch_cls == "LlamaForCausalLM" else None,
                "sliding_window": 4096,
            }
        )
        hf = config.to_hf()
        assert ModelConfig.from_hf(json.loads(json.dumps(hf))) == config
        loaded = AutoConfig.for_model(**hf)
        assert type(loaded).__name__.lower().startswith(config.arch)
        assert (loaded.num_key_value_heads, loaded.head_dim, loaded.tie_word_embeddings) == (8, 64, True)


@pytest.mark.parametrize(
    "hf,words",
    [
        ({**BASE, "architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
        ({"model_type": "bert"}, "bert"),
        ({**BASE, "mlp_bias": True}, "mlp_bias"),
        ({**BASE, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "longrope"),
        ({**BASE, "num_key_value_heads": 5}, "multiple"),
    ],
)
def test_unsupported_configs_raise_checkpoint_error(hf, words):
    with pytest.raises(CheckpointError, match=words):
        ModelConfig.from_hf(hf)
