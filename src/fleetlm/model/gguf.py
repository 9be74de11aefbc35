"""GGUF files into our decoder and tokenizer: llama.cpp's tensors dequantized, its vocabulary as a BPE.

Facts from llama.cpp that shape this file (no code copied):
- architecture "llama" stores q/k rows in interleaved-pair order (its RoPE rotates (0,1),(2,3)...), so they
  are permuted back to Hugging Face's rotate-half order; "qwen2" is rotate-half already.
- `rope_freqs.weight` (Llama 3 scaling) divides each rotary frequency.
- Tied embeddings: no `output.weight`; the output projection is `token_embd.weight`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetlm.errors import FleetError
from fleetlm.model.config import ModelConfig

# HF per-layer tensor suffix -> llama.cpp per-block name.
LAYER_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# llama.cpp's split regexes for the byte-level BPE pre-tokenizers the exporter writes (by tokenizer.ggml.pre).
PRE_REGEX = {
    "llama-bpe": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+",
    "qwen2": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+",
}
# Pre-tokenizers whose only split before GPT-2's own regex is one digit at a time (llama.cpp gives StarCoder,
# SmolLM and a few others the regexes \p{N}, then GPT-2's).
SINGLE_DIGIT_GPT2 = ("smollm", "starcoder", "refact", "codeshell")
# Control tokens that llama.cpp also treats as end of generation, beside the file's eos/eot ids.
END_OF_GENERATION = ("<|eot_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "</s>",
                     "<end_of_turn>", "<|eom_id|>")
# GGUF architecture -> ours (Mistral GGUFs say "llama"; their sliding window is not in the file).
LOAD_ARCH = {"llama": "llama", "qwen2": "qwen2"}
# Tensor types we dequantize (all through gguf.quants): what llama.cpp's usual file types are made of
# (Q4_K_M files mix Q4_K, Q6_K, Q5_0, Q8_0; Q4_1 files keep a Q8_0 embedding).
LOAD_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K")
DEQUANT_CHUNK = 1 << 22  # values dequantized at a time (16 MB of float32 scratch)


class GGUFLoadError(FleetError):
    """A GGUF file our engine cannot load (unknown architecture, tokenizer or tensor type, bad file)."""


def _meta(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def unpermute_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_rotate_half: llama.cpp's interleaved q/k rows back to HF's rotate-half order."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_model_config(reader: Any) -> ModelConfig:
    """Our ModelConfig from a GGUF file's metadata and tensor shapes."""
    arch = _meta(reader, "general.architecture")
    if arch not in LOAD_ARCH:
        raise GGUFLoadError(f"GGUF architecture {arch!r} is not supported "
                            f"(supported: {', '.join(LOAD_ARCH)})")
    names = {t.name: t for t in reader.tensors}

    def need(key: str) -> Any:
        value = _meta(reader, f"{arch}.{key}")
        if value is None:
            raise GGUFLoadError(f"GGUF file lacks the {arch}.{key} metadata")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_meta(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dims = int(_meta(reader, f"{arch}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFLoadError(f"partial rotary embeddings ({rope_dims} of {head_dim} dims) are not supported")
    if "token_embd.weight" not in names:
        raise GGUFLoadError("GGUF file has no token_embd.weight tensor")
    rope_scaling = None
    if _meta(reader, f"{arch}.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    eos = _meta(reader, "tokenizer.ggml.eos_token_id")
    bos = _meta(reader, "tokenizer.ggml.bos_token_id")
    bias = "blk.0.attn_q.bias" in names
    if arch == "llama" and bias != ("blk.0.attn_output.bias" in names):
        raise GGUFLoadError("a llama GGUF with biases on q/k/v but not on the output (or the reverse)")
    return ModelConfig(
        arch=LOAD_ARCH[arch],
        vocab_size=int(names["token_embd.weight"].shape[1]),  # ggml order: [hidden, vocab]
        hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_layers=int(need("block_count")),
        num_heads=heads,
        num_kv_heads=int(_meta(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(_meta(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(_meta(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(_meta(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=bias or arch == "qwen2",
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=[] if eos is None else [int(eos)],
    )


def _our_tensor_name(name: str) -> str | None:
    """Our state-dict name for a GGUF tensor name; None for rope_freqs (handled apart)."""
    if name == "rope_freqs.weight":
        return None
    globals_ = {v: k.removeprefix("model.") for k, v in GLOBAL_NAMES.items()}
    if name in globals_:
        return globals_[name]
    m = re.match(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$", name)
    layer_names = {v: k for k, v in LAYER_NAMES.items()}
    if m and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    raise GGUFLoadError(f"GGUF tensor {name!r} has no place in our decoder")


def _dequantized(t: Any, dtype: torch.dtype, rows_per_chunk: int | None = None) -> torch.Tensor:
    """A GGUF tensor in numpy order at `dtype`: llama.cpp's dequantization (the gguf package's), done a
    few rows at a time into the output, so a tensor never exists in float32 whole unless `dtype` is float32
    (the 1.5B model's embedding is 0.9 GB in float32)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    if qtype.name not in LOAD_TYPES:
        raise GGUFLoadError(f"tensor {t.name} is {qtype.name}; loadable types: {', '.join(LOAD_TYPES)}")
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    raw = np.asarray(t.data)
    if qtype.name in ("F32", "F16"):  # numpy reads these as they are: torch converts them at memory speed
        return torch.from_numpy(np.array(raw).reshape(shape)).to(dtype)  # a copy: the file is mmapped
    if qtype.name == "BF16":  # stored as raw bytes; the bits are torch's bfloat16
        bits = torch.from_numpy(np.array(raw).view(np.int16).reshape(shape))  # a copy: the file is mmapped
        return bits.view(torch.bfloat16).to(dtype)
    cols = shape[-1]
    rows = raw.reshape(-1, raw.shape[-1])  # one row of blocks per output row
    out = torch.empty((rows.shape[0], cols), dtype=dtype)
    step = rows_per_chunk or max(1, DEQUANT_CHUNK // cols)
    for start in range(0, rows.shape[0], step):
        block = gguf.quants.dequantize(rows[start : start + step], qtype)
        out[start : start + step] = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
    return out.reshape(shape)


def gguf_tokenizer(reader: Any) -> Any:
    """Our Tokenizer (a `tokenizers` byte-level BPE + the chat template) from a GGUF file's vocabulary."""
    import gguf
    from tokenizers import AddedToken, decoders, models, processors
    from tokenizers import Tokenizer as Backend

    from fleetlm.model.tokenizer import Tokenizer

    kind = _meta(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFLoadError(f"GGUF tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens: list[str] = _meta(reader, "tokenizer.ggml.tokens") or []
    types: list[int] = _meta(reader, "tokenizer.ggml.token_type") or [int(gguf.TokenType.NORMAL)] * len(
        tokens)
    merges = [tuple(m.split(" ", 1)) for m in (_meta(reader, "tokenizer.ggml.merges") or [])]
    pre = _meta(reader, "tokenizer.ggml.pre", "gpt-2")
    tt = gguf.TokenType
    vocab = {tok: i for i, tok in enumerate(tokens) if types[i] != tt.UNUSED}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre == "llama-bpe"))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=types[i] == tt.CONTROL, normalized=False)
             for i in range(len(tokens)) if types[i] in (tt.CONTROL, tt.USER_DEFINED)]
    backend.add_tokens(added)

    def token(key: str) -> str | None:
        tid = _meta(reader, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(tid)] if tid is not None and 0 <= int(tid) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    if _meta(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])])
    else:
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
    config = {"bos_token": bos, "eos_token": eos, "pad_token": token("padding"),
              "unk_token": token("unknown")}
    eog = [i for i, t in enumerate(tokens) if types[i] == tt.CONTROL and t in END_OF_GENERATION]
    eot = _meta(reader, "tokenizer.ggml.eot_token_id")
    extra = ([] if eot is None else [int(eot)]) + eog
    return Tokenizer(backend, {k: v for k, v in config.items() if v is not None},
                     _meta(reader, "tokenizer.chat_template"), extra)


def _pre_tokenizer(pre: str) -> Any:
    """The `tokenizers` pre-tokenizer that splits text as llama.cpp does for `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's regex inside
    if pre in ("gpt-2", "default"):
        return byte_level
    if pre in SINGLE_DIGIT_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in PRE_REGEX:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(PRE_REGEX[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    known = ", ".join(["gpt-2", *SINGLE_DIGIT_GPT2, *PRE_REGEX])
    raise GGUFLoadError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: {known})")


def load_gguf(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(Transformer, Tokenizer) from a GGUF file, every tensor dequantized to `dtype` (see LOAD_TYPES).

    The inverse of export_gguf: q/k rows go back to rotate-half order (llama), rope_freqs becomes the
    decoder's inverse frequencies, and the vocabulary becomes a `tokenizers` BPE with its chat template.
    """
    import gguf

    from fleetlm.model.decoder import Transformer, rope_inv_freq

    path = Path(path)
    if not path.is_file():
        raise GGUFLoadError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise GGUFLoadError(f"{path} is not a readable GGUF file ({exc})") from None
    cfg = gguf_model_config(reader)
    tokenizer = gguf_tokenizer(reader)
    with torch.device("meta"):
        model = Transformer(cfg)
    state: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            # llama.cpp divides each frequency by these factors (Llama 3 scaling): do the same to ours
            model.inv_freq = rope_inv_freq(cfg) / _dequantized(t, torch.float32)
            continue
        name = _our_tensor_name(t.name)
        data = _dequantized(t, dtype)
        if cfg.arch == "llama" and ".attn_q." in t.name:
            data = unpermute_rotate_half(data, cfg.num_heads)
        elif cfg.arch == "llama" and ".attn_k." in t.name:
            data = unpermute_rotate_half(data, cfg.num_kv_heads)
        state[name] = data
    expected = {k for k in model.state_dict() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    missing = sorted(expected - state.keys())
    if missing:
        raise GGUFLoadError(f"{path} lacks {len(missing)} tensor(s), e.g. {missing[0]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[-1]
        raise GGUFLoadError(f"{path}: tensors do not match the metadata: {first}") from None
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval(), tokenizer
