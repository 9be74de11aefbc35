"""GGUF files into our decoder and tokenizer: llama.cpp's tensors dequantized, its vocabulary as a BPE.

Facts from llama.cpp that shape this file (no code copied):
- architecture "llama" stores q/k rows in interleaved-pair order (its RoPE rotates (0,1),(2,3)...), so they
  are permuted back to Hugging Face's rotate-half order; "qwen2" is rotate-half already.
- `rope_freqs.weight` (Llama 3 scaling) divides each rotary frequency.
- Tied embeddings: no `output.weight`; the output projection is `token_embd.weight`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
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
# llama.cpp ends generation on the file's eos/eot ids, on tokens spelled like these (whatever their type:
# the llama.cpp of llama-cpp-python 0.3.36 stops at Qwen2.5's plain-text "</s>" too) ...
END_OF_GENERATION = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
                     "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>",
                     "<end_of_utterance>", "</s>")
# ... and on the first token found of each fill-in-the-middle kind (padding, repository, file separator).
FIM_END_OF_GENERATION = (("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"),
                         ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
                         ("<|file_sep|>",))
# GGUF architecture -> ours (Mistral GGUFs say "llama"; their sliding window is not in the file; a "llama"
# with experts is Mixtral).
LOAD_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen2moe": "qwen2_moe"}
# llama.cpp's names of a mixture-of-experts block's tensors -> ours under layers.{i}.mlp (model/moe.py).
MOE_NAMES = {"ffn_gate_inp.weight": "gate.weight", "ffn_gate_exps.weight": "gate_exps",
             "ffn_up_exps.weight": "up_exps", "ffn_down_exps.weight": "down_exps",
             "ffn_gate_shexp.weight": "shared_expert.gate_proj.weight",
             "ffn_up_shexp.weight": "shared_expert.up_proj.weight",
             "ffn_down_shexp.weight": "shared_expert.down_proj.weight",
             "ffn_gate_inp_shexp.weight": "shared_expert_gate.weight"}
# Tensor types we dequantize (all through gguf.quants): what llama.cpp's usual file types are made of
# (Q4_K_M files mix Q4_K, Q6_K, Q5_0, Q8_0; Q4_1 files keep a Q8_0 embedding).
LOAD_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
              "Q6_K")
DEQUANT_CHUNK = 1 << 22  # values dequantized at a time (16 MB of float32 scratch)


class GGUFLoadError(FleetError):
    """A GGUF file our engine cannot load (unknown architecture, tokenizer or tensor type, bad file)."""


# ----------------------------------------------------------------------------------------------------
# reading the file: the gguf package's GGUFReader makes a numpy view per array element, which took 17 s
# for Qwen2.5's 152k tokens and 151k merges on a loaded 2-core machine; this reader parses the same
# layout (GGUF v2/v3, little-endian) with struct and keeps the tensors as views of one memory map.

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
            12: "<d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    """One tensor of a GGUF file: its shape in ggml order (fastest dimension first) and its bytes."""

    name: str
    tensor_type: int
    shape: tuple[int, ...]
    data: np.ndarray  # float32/float16 elements for F32/F16, else one row of raw blocks per row


class GGUFFile:
    """A GGUF file's metadata (key -> value) and tensors, read once; the tensor data stays memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._pos = 0
        try:
            self._map = np.memmap(self.path, mode="r")
            self._buf = memoryview(self._map)
            self.metadata, self.tensors = self._parse()
        except (OSError, struct.error, UnicodeDecodeError, ValueError, IndexError) as exc:
            raise GGUFLoadError(f"{self.path} is not a readable GGUF file ({exc})") from None

    def meta(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def _take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._buf, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        if self._pos + n > len(self._buf):
            raise ValueError("a string runs past the end of the file")
        text = bytes(self._buf[self._pos : self._pos + n]).decode("utf-8")
        self._pos += n
        return text

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._take("<I"), self._take("<Q")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item in _NUMPY:
                dtype = np.dtype(_NUMPY[item])
                end = self._pos + count * dtype.itemsize
                if end > len(self._buf):
                    raise ValueError("an array runs past the end of the file")
                values = np.frombuffer(self._buf[self._pos : end], dtype=dtype).tolist()
                self._pos = end
                return values
            return [self._value(item) for _ in range(count)]  # arrays of arrays
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self._take(_SCALARS[kind])

    def _parse(self) -> tuple[dict[str, Any], list[GGUFTensor]]:
        import gguf

        if bytes(self._buf[:4]) != b"GGUF":
            raise ValueError("no GGUF magic number")
        self._pos = 4
        version = self._take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (this reader knows versions 2 and 3, little-endian)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        metadata = {}
        for _ in range(n_kv):
            key = self._string()
            metadata[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._take("<Q") for _ in range(self._take("<I")))
            infos.append((name, dims, self._take("<I"), self._take("<Q")))
        align = int(metadata.get("general.alignment", 32))
        start = -(-self._pos // align) * align
        tensors = []
        for name, dims, kind, offset in infos:
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError:
                raise ValueError(f"tensor {name} has unknown type {kind}") from None
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            rows = int(np.prod(dims[1:], dtype=np.int64))
            row_bytes = dims[0] // block * size
            begin = start + offset
            if begin + rows * row_bytes > len(self._map):
                raise ValueError(f"tensor {name} runs past the end of the file (truncated?)")
            raw = self._map[begin : begin + rows * row_bytes].reshape(rows, row_bytes)
            if qtype.name in ("F32", "F16"):
                raw = raw.view(np.float32 if qtype.name == "F32" else np.float16)
            tensors.append(GGUFTensor(name, kind, dims, raw.reshape(*reversed(dims[1:]), raw.shape[-1])))
        return metadata, tensors


def _meta(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.meta(key, default)


def unpermute_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of permute_rotate_half: llama.cpp's interleaved q/k rows back to HF's rotate-half order."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def gguf_model_config(reader: GGUFFile) -> ModelConfig:
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
        **_moe_config(reader, arch),
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
        attention_bias=bias or arch in ("qwen2", "qwen2moe"),
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=[] if eos is None else [int(eos)],
    )


def _moe_config(reader: GGUFFile, arch: str) -> dict[str, Any]:
    """arch and the expert fields of our config: a "llama" with experts is Mixtral, qwen2moe Qwen2-MoE."""
    experts = int(_meta(reader, f"{arch}.expert_count", 0) or 0)
    if not experts:
        if arch == "qwen2moe":
            raise GGUFLoadError("a qwen2moe GGUF without qwen2moe.expert_count")
        return {"arch": LOAD_ARCH[arch]}
    used = int(_meta(reader, f"{arch}.expert_used_count", 0) or 0)
    if arch == "llama":  # llama.cpp renormalises a llama's top-k weights (Mixtral)
        return {"arch": "mixtral", "num_experts": experts, "num_experts_per_tok": used}
    if arch != "qwen2moe":
        raise GGUFLoadError(f"experts in a {arch} GGUF are not supported")
    width = _meta(reader, f"{arch}.expert_feed_forward_length")
    if width is None:
        raise GGUFLoadError("a qwen2moe GGUF without qwen2moe.expert_feed_forward_length")
    return {"arch": "qwen2_moe", "num_experts": experts, "num_experts_per_tok": used, "norm_topk_prob": False,
            "moe_intermediate_size": int(width),
            "shared_expert_intermediate_size": int(_meta(reader, f"{arch}.expert_shared_feed_forward_length",
                                                         0) or 0)}


def _our_tensor_name(name: str) -> str | None:
    """Our state-dict name for a GGUF tensor name; None for rope_freqs (handled apart)."""
    if name == "rope_freqs.weight":
        return None
    globals_ = {v: k.removeprefix("model.") for k, v in GLOBAL_NAMES.items()}
    if name in globals_:
        return globals_[name]
    m = re.match(r"^blk\.(\d+)\.(\w+\.weight)$", name)
    if m and m.group(2) in MOE_NAMES:
        return f"layers.{m.group(1)}.mlp.{MOE_NAMES[m.group(2)]}"
    m = re.match(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$", name)
    layer_names = {v: k for k, v in LAYER_NAMES.items()}
    if m and m.group(2) in layer_names:
        return f"layers.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"
    raise GGUFLoadError(f"GGUF tensor {name!r} has no place in our decoder")


def _dequantized(t: GGUFTensor, dtype: torch.dtype, rows_per_chunk: int | None = None) -> torch.Tensor:
    """A GGUF tensor in numpy order at `dtype`: llama.cpp's dequantization (the gguf package's), done a
    few rows at a time into the output, so a tensor never exists in float32 whole unless `dtype` is float32
    (the 1.5B model's embedding is 0.9 GB in float32)."""
    import gguf

    qtype = gguf.GGMLQuantizationType(t.tensor_type)
    if qtype.name not in LOAD_TYPES:
        raise GGUFLoadError(f"tensor {t.name} is {qtype.name}; loadable types: {', '.join(LOAD_TYPES)}")
    shape = tuple(reversed(t.shape))
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


def gguf_tokenizer(reader: GGUFFile) -> Any:
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
    # Every id has a token, unused padding ones too ([PAD151665]...: no merge makes them, but the model can
    # emit them); a spelling that repeats keeps its first id.
    vocab = {tok: i for i, tok in reversed(list(enumerate(tokens)))}
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
    return Tokenizer(backend, {k: v for k, v in config.items() if v is not None},
                     _meta(reader, "tokenizer.chat_template"), _end_of_generation(reader, tokens))


def _end_of_generation(reader: GGUFFile, tokens: list[str]) -> list[int]:
    """The ids llama.cpp stops generating at, beside eos (it picks them by their spelling)."""
    ids = {tok: i for i, tok in reversed(list(enumerate(tokens)))}  # the first id of a repeated spelling
    fim = [next(ids[t] for t in kind if t in ids) for kind in FIM_END_OF_GENERATION
           if any(t in ids for t in kind)]
    named = [i for i, t in enumerate(tokens) if t in END_OF_GENERATION]
    declared = [_meta(reader, f"tokenizer.ggml.{key}_token_id") for key in ("eot", "eom")]
    return fim + named + [int(i) for i in declared if i is not None]


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
    from fleetlm.model.decoder import Transformer, rope_inv_freq

    path = Path(path)
    if not path.is_file():
        raise GGUFLoadError(f"GGUF file {path} does not exist")
    reader = GGUFFile(path)
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
        interleaved = cfg.arch in ("llama", "mixtral")  # llama.cpp's "llama" rotates adjacent pairs
        if interleaved and ".attn_q." in t.name:
            data = unpermute_rotate_half(data, cfg.num_heads)
        elif interleaved and ".attn_k." in t.name:
            data = unpermute_rotate_half(data, cfg.num_kv_heads)
        elif t.name.endswith("ffn_gate_inp_shexp.weight"):
            data = data.reshape(1, -1)  # llama.cpp's {n_embd} -> our nn.Linear(hidden, 1)
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
