"""GGUF export of a Hugging Face Llama-family checkpoint, written with the `gguf` package for llama.cpp.

Facts from llama.cpp that shape this file (learned from its converter and loader, no code copied):
- Llama and Mistral load as architecture "llama", whose RoPE rotates interleaved pairs (0,1),(2,3)...;
  HF stores q/k rows in rotate-half order (i, i + head_dim/2), so q/k rows are permuted per head.
  Qwen2 loads as "qwen2", whose RoPE is rotate-half (NeoX), so its q/k (and biases) stay as they are.
- Llama 3 rope scaling is given as a `rope_freqs.weight` tensor of per-frequency divisors (head_dim/2).
- Byte-level BPE vocabularies are tokenizer model "gpt2" with a pre-tokenizer name that picks the split regex.
- Tied embeddings: no `output.weight`; llama.cpp falls back to `token_embd.weight`.
"""

from __future__ import annotations

import ctypes
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fleetlm.errors import CheckpointError, FleetError
from fleetlm.model.config import ModelConfig
from fleetlm.model.gguf import GLOBAL_NAMES, LAYER_NAMES

OUT_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp file types its quantizer can write (the *_m mixes keep some tensors at a higher width).
QUANT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q6_k")
# HF config arch -> llama.cpp architecture name.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
Q8_BLOCK = 32  # llama.cpp Q8_0 and Q4_0 quantize rows in blocks of 32 values


class GGUFExportError(FleetError):
    """A checkpoint that cannot be written as GGUF, or a GGUF file that cannot be quantized."""


@dataclass
class _Tensor:
    """One output tensor: where to read it, how to transform it, how to store it."""

    gguf_name: str
    hf_name: str | None  # None for tensors we compute (rope_freqs)
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    permute_heads: int = 0  # >0: undo HF's rotate-half row order with this many heads
    data: torch.Tensor | None = None


def gguf_name(hf_name: str) -> str | None:
    """llama.cpp's name for an HF tensor; None for buffers llama.cpp recomputes (rotary inv_freq)."""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    m = _LAYER_RE.match(hf_name)
    if m and m.group(2) in LAYER_NAMES:
        return f"blk.{m.group(1)}.{LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    if "rotary_emb" in hf_name:
        return None
    raise GGUFExportError(f"tensor {hf_name!r} has no GGUF equivalent for this architecture")


def permute_rotate_half(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's rotate-half pairs (i, i+d/2) to llama.cpp's pairs (2i, 2i+1)."""
    head_dim = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: ModelConfig) -> torch.Tensor:
    """Per-frequency divisors for Llama 3 rope scaling, the form llama.cpp reads from `rope_freqs.weight`."""
    rs = cfg.rope_scaling or {}
    factor = float(rs.get("factor", 8.0))
    low, high = float(rs.get("low_freq_factor", 1.0)), float(rs.get("high_freq_factor", 4.0))
    old_ctx = float(rs.get("original_max_position_embeddings", 8192))
    dims = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64)
    inv_freq = 1.0 / (cfg.rope_theta ** (dims / cfg.head_dim))
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, torch.ones_like(wavelen),
                      torch.where(wavelen > old_ctx / low, torch.full_like(wavelen, factor), mid))
    return out.float()


# ----------------------------------------------------------------------------------------------------
# checkpoint reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from None


def _weight_files(ckpt: Path) -> dict[str, Path]:
    """HF tensor name -> safetensors file, for a single file or a sharded checkpoint with an index."""
    from safetensors import safe_open

    index = ckpt / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        return {name: ckpt / fname for name, fname in weight_map.items()}
    single = ckpt / "model.safetensors"
    if not single.is_file():
        raise CheckpointError(f"{ckpt} has no model.safetensors or model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def load_config(ckpt: Path) -> ModelConfig:
    if not ckpt.exists():
        raise CheckpointError(f"checkpoint path {ckpt} does not exist")
    if not (ckpt / "config.json").is_file():
        raise CheckpointError(f"{ckpt} is not a checkpoint directory (no config.json)")
    return ModelConfig.from_hf(_read_json(ckpt / "config.json"))


# ----------------------------------------------------------------------------------------------------
# tokenizer


def _token_content(tok: Any) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok if isinstance(tok, str) else None


def pre_tokenizer_name(tj: dict[str, Any]) -> str:
    """llama.cpp's pre-tokenizer name for this tokenizer.json, chosen by the split regex it uses."""
    pre = tj.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex", "") for p in parts if p.get("type") == "Split"]
    byte_level_regex = any(p.get("type") == "ByteLevel" and p.get("use_regex", True) for p in parts)
    for rx in regexes:
        if r"\p{N}{1,3}" in rx and r"[^\r\n\p{L}\p{N}]?\p{L}+" in rx:
            return "llama-bpe"  # Llama 3's regex: digits in runs of up to three
        if r"\p{N}|" in rx and r"[^\r\n\p{L}\p{N}]?\p{L}+" in rx:
            return "qwen2"  # Qwen2's regex: single digits
    if not regexes and byte_level_regex:
        if any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in parts):
            # llama.cpp's BPE never prepends a space, so the first word would tokenize differently
            warnings.warn("tokenizer adds a prefix space, which llama.cpp does not do", stacklevel=2)
        return "gpt-2"
    raise GGUFExportError(
        "the tokenizer's pre-tokenizer is not one llama.cpp knows (GPT-2, Llama 3 or Qwen2 regex)")


@dataclass
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    unk_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | list[dict[str, str]] | None


def read_vocab(ckpt: Path, vocab_size: int, cfg: ModelConfig | None = None) -> GGUFVocab:
    """A checkpoint's byte-level BPE vocabulary, padded to the model's vocab size, in llama.cpp's terms."""
    import gguf
    from tokenizers import Tokenizer

    tj_path = ckpt / "tokenizer.json"
    if not tj_path.is_file():
        raise CheckpointError(f"{ckpt} has no tokenizer.json")
    tj = _read_json(tj_path)
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or (tj.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFExportError("only byte-level BPE tokenizers (GPT-2 style tokenizer.json) can be exported")
    tc = _read_json(ckpt / "tokenizer_config.json") if (ckpt / "tokenizer_config.json").is_file() else {}

    id_to_tok = {int(i): t for t, i in model["vocab"].items()}
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    for i, a in added.items():
        id_to_tok[i] = a["content"]
    if id_to_tok and max(id_to_tok) >= vocab_size:
        raise GGUFExportError(
            f"tokenizer has token id {max(id_to_tok)} but the model's vocab_size is {vocab_size}")
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in id_to_tok:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(id_to_tok[i])
            kind = gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED
            types.append(int(kind))
        else:
            tokens.append(id_to_tok[i])
            types.append(int(gguf.TokenType.NORMAL))
    # tokenizers >= 0.20 may store merges as [left, right] pairs; llama.cpp wants "left right".
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    tok_to_id = {t: i for i, t in id_to_tok.items()}

    def special(key: str) -> int | None:
        content = _token_content(tc.get(key))
        return tok_to_id.get(content) if content is not None else None

    bos, eos = special("bos_token"), special("eos_token")
    if bos is None and cfg is not None and cfg.bos_token_id is not None and "bos_token" not in tc:
        bos = cfg.bos_token_id
    if eos is None and cfg is not None and cfg.eos_token_ids:
        eos = cfg.eos_token_ids[0]
    # Whether BOS/EOS are added: what the tokenizer really does (its post-processor), unless the config says.
    probe = Tokenizer.from_file(str(tj_path))
    plain = probe.encode("a", add_special_tokens=False).ids
    full = probe.encode("a", add_special_tokens=True).ids
    added_front = full[: len(full) - len(plain)] if full[-len(plain):] == plain else full[:1]
    add_bos = bool(tc.get("add_bos_token", bos is not None and bos in added_front))
    add_eos = bool(tc.get("add_eos_token", eos is not None and len(full) > len(plain) and full[-1] == eos))

    template = tc.get("chat_template")
    if template is None and (ckpt / "chat_template.jinja").is_file():
        template = (ckpt / "chat_template.jinja").read_text(encoding="utf-8")
    return GGUFVocab(tokens=tokens, token_types=types, merges=merges, pre=pre_tokenizer_name(tj),
                     bos_id=bos, eos_id=eos, pad_id=special("pad_token"), unk_id=special("unk_token"),
                     add_bos=add_bos, add_eos=add_eos, chat_template=template)


# ----------------------------------------------------------------------------------------------------
# export


def _storage_type(out_type: str, name: str, shape: tuple[int, ...]) -> Any:
    import gguf

    qt = gguf.GGMLQuantizationType
    # Norms, biases and rope factors stay float32 in every llama.cpp file type.
    if len(shape) < 2 or out_type == "f32":
        return qt.F32
    if out_type == "q8_0":
        # a row that does not split into 32-value blocks cannot be Q8_0; llama.cpp's converter keeps it f16
        return qt.Q8_0 if shape[-1] % Q8_BLOCK == 0 else qt.F16
    return {"f16": qt.F16, "bf16": qt.BF16}[out_type]


def _to_numpy(t: torch.Tensor, qtype: Any) -> np.ndarray:
    """Tensor data as llama.cpp stores it, ready to write."""
    import gguf

    qt = gguf.GGMLQuantizationType
    if qtype == qt.F32:
        return t.to(torch.float32).contiguous().numpy()
    if qtype == qt.F16:
        return t.to(torch.float16).contiguous().numpy()
    if qtype == qt.BF16:
        # numpy has no bfloat16: write torch's bf16 bits through an int16 view
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    if qtype == qt.Q8_0:
        return gguf.quants.quantize(t.to(torch.float32).contiguous().numpy(), qt.Q8_0)
    raise GGUFExportError(f"unsupported storage type {qtype}")


def _plan(cfg: ModelConfig, files: dict[str, Path], out_type: str) -> list[_Tensor]:
    from safetensors import safe_open

    permute = cfg.arch in ("llama", "mistral")
    plan: list[_Tensor] = []
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as f:
            for hf in f.keys():
                name = gguf_name(hf)
                if name is None:
                    continue
                if name == "output.weight" and cfg.tie_word_embeddings:
                    continue  # llama.cpp reuses token_embd for tied embeddings
                shape = tuple(f.get_slice(hf).get_shape())
                heads = 0
                if permute and ".attn_q." in name:
                    heads = cfg.num_heads
                elif permute and ".attn_k." in name:
                    heads = cfg.num_kv_heads
                plan.append(_Tensor(name, hf, shape, _storage_type(out_type, name, shape), heads))
    names = {t.gguf_name for t in plan}
    needed = ["token_embd.weight", "output_norm.weight"] + [
        f"blk.{i}.{n}.weight" for i in range(cfg.num_layers) for n in LAYER_NAMES.values()]
    if not cfg.tie_word_embeddings:
        needed.append("output.weight")
    missing = [n for n in needed if n not in names]
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensors (first: {missing[0]})")
    if cfg.rope_type == "llama3":
        plan.append(_Tensor("rope_freqs.weight", None, (cfg.head_dim // 2,), _storage_type("f32", "", (1,)),
                            data=llama3_rope_factors(cfg)))
    plan.sort(key=lambda t: _order_key(t.gguf_name))
    return plan


def _order_key(name: str) -> tuple[int, int, str]:
    """llama.cpp's usual order: token_embd, the blocks by index, then output_norm, output, rope_freqs."""
    m = re.match(r"blk\.(\d+)\.", name)
    if m:
        return (1, int(m.group(1)), name)
    return (0, 0, name) if name == "token_embd.weight" else (2, 0, name)


def _nbytes(shape: tuple[int, ...], qtype: Any) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape[:-1], dtype=np.int64)) * (shape[-1] // block) * size


def _file_type(out_type: str) -> int:
    import gguf

    ft = gguf.LlamaFileType
    types = {"f32": ft.ALL_F32, "f16": ft.MOSTLY_F16, "bf16": ft.MOSTLY_BF16, "q8_0": ft.MOSTLY_Q8_0,
             "q4_0": ft.MOSTLY_Q4_0, "q4_1": ft.MOSTLY_Q4_1}
    return int(types[out_type])


def _write_metadata(w: Any, cfg: ModelConfig, vocab: GGUFVocab, out_type: str, name: str) -> None:
    import gguf

    w.add_name(name)
    w.add_file_type(_file_type(out_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    kind = cfg.rope_type
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    elif kind not in ("default", "llama3"):  # llama3 travels as the rope_freqs tensor
        raise GGUFExportError(f"rope scaling {kind!r} is not supported by the GGUF exporter")

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    for setter, tid in ((w.add_bos_token_id, vocab.bos_id), (w.add_eos_token_id, vocab.eos_id),
                        (w.add_pad_token_id, vocab.pad_id), (w.add_unk_token_id, vocab.unk_id)):
        if tid is not None:
            setter(int(tid))
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)


def _tensor_data(plan: list[_Tensor], files: dict[str, Path]) -> Iterator[tuple[_Tensor, torch.Tensor]]:
    """Tensors in plan order, read one at a time from their safetensors file (memory-mapped)."""
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    try:
        for t in plan:
            if t.data is not None:
                yield t, t.data
                continue
            assert t.hf_name is not None
            path = files[t.hf_name]
            if path not in handles:
                handles[path] = safe_open(str(path), framework="pt").__enter__()
            data = handles[path].get_tensor(t.hf_name)
            if t.permute_heads:
                data = permute_rotate_half(data, t.permute_heads)
            yield t, data
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)


def export_gguf(checkpoint_dir: str | Path, out_path: str | Path, out_type: str = "f16") -> Path:
    """Write the HF checkpoint in `checkpoint_dir` as a llama.cpp GGUF file; returns the output path.

    out_type: "f16" | "bf16" | "q8_0" (Q8_0 for matrices whose rows split in 32-value blocks) | "f32".
    Tensors stream one at a time (read, convert, write), so memory stays near the largest tensor.
    """
    import gguf

    if out_type not in OUT_TYPES:
        raise GGUFExportError(f"unknown GGUF type {out_type!r} (choose from {', '.join(OUT_TYPES)})")
    ckpt, out = Path(checkpoint_dir), Path(out_path)
    cfg = load_config(ckpt)
    files = _weight_files(ckpt)
    vocab = read_vocab(ckpt, cfg.vocab_size, cfg)
    plan = _plan(cfg, files, out_type)
    if not out.parent.is_dir():
        raise GGUFExportError(f"output directory {out.parent} does not exist")

    w = gguf.GGUFWriter(str(out), GGUF_ARCH[cfg.arch])
    _write_metadata(w, cfg, vocab, out_type, ckpt.resolve().name)
    for t in plan:
        # shape in numpy order; the writer reverses it into ggml's order
        nbytes = _nbytes(t.shape, t.qtype)
        w.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), nbytes, raw_dtype=t.qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t, data in _tensor_data(plan, files):
            arr = _to_numpy(data, t.qtype)
            if arr.nbytes != _nbytes(t.shape, t.qtype):
                raise GGUFExportError(f"tensor {t.gguf_name} has {arr.nbytes} bytes, expected "
                                      f"{_nbytes(t.shape, t.qtype)}")
            w.write_tensor_data(arr)
    except BaseException:
        w.close()
        out.unlink(missing_ok=True)  # a half-written GGUF would only fail later, inside llama.cpp
        raise
    w.close()
    return out


def quantize_gguf(in_path: str | Path, out_path: str | Path, qtype: str = "q4_0", threads: int = 0) -> Path:
    """Quantize a GGUF file with llama.cpp's own quantizer (llama-cpp-python's `llama_model_quantize`)."""
    if qtype not in QUANT_TYPES:
        raise GGUFExportError(f"unknown quantization {qtype!r} (choose from {', '.join(QUANT_TYPES)})")
    src, dst = Path(in_path), Path(out_path)
    if not src.is_file():
        raise GGUFExportError(f"GGUF file {src} does not exist")
    try:
        import llama_cpp
    except ImportError:
        raise GGUFExportError("quantizing GGUF needs llama-cpp-python (pip install llama-cpp-python)") \
            from None
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise GGUFExportError(f"llama.cpp could not quantize {src} to {qtype} (code {rc})")
    return dst


# ----------------------------------------------------------------------------------------------------
# export of codes chosen by fleetlm.compress (GPTQ, AWQ, HQQ, RTN), written block for block without rounding


def code_type(bits: int, sym: bool) -> str:
    """The GGUF block type that holds a grid exactly: Q8_0 (8-bit), Q4_0 (symmetric 4/3-bit: m = -8 d, or
    -4 d in 3 bits, which Q4_0 cannot express, so 3-bit symmetric goes to Q4_1 too), Q4_1 (asymmetric)."""
    if bits == 8:
        return "q8_0"
    return "q4_0" if sym and bits == 4 else "q4_1"


def code_blocks(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int, qtype: str) -> np.ndarray:
    """Codes q [N, K] with grid d, m [N, K / group] as GGUF blocks of 32 (uint8 [N, K / 32 * block bytes]).

    Q8_0: f16 d, 32 int8. Q4_0: f16 d, 16 bytes (code j in the low nibble of byte j, code j+16 in its high
    nibble), w = (q - 8) d. Q4_1: f16 d, f16 m, the same 16 bytes, w = q d + m."""
    n, k = q.shape
    if k % Q8_BLOCK or group % Q8_BLOCK:
        raise GGUFExportError(f"rows of {k} with groups of {group} do not split into blocks of {Q8_BLOCK}")
    per = group // Q8_BLOCK
    nb = k // Q8_BLOCK
    d16 = d.repeat_interleave(per, dim=1).to(torch.float16).contiguous().numpy().view(np.uint8)
    d16 = d16.reshape(n, nb, 2)
    if qtype == "q8_0":
        qs = q.to(torch.int8).contiguous().numpy().view(np.uint8).reshape(n, nb, Q8_BLOCK)
        return np.concatenate([d16, qs], axis=-1).reshape(n, -1)
    if qtype == "q4_0" and not bool(torch.allclose(m, -8 * d)):
        raise GGUFExportError("Q4_0 needs symmetric codes (m = -8 d): compress with --sym")
    c = q.to(torch.uint8).reshape(n, nb, 2, 16)
    qs = (c[:, :, 0] | (c[:, :, 1] << 4)).contiguous().numpy()
    if qtype == "q4_0":
        return np.concatenate([d16, qs], axis=-1).reshape(n, -1)
    m16 = m.repeat_interleave(per, dim=1).to(torch.float16).contiguous().numpy().view(np.uint8)
    m16 = m16.reshape(n, nb, 2)
    return np.concatenate([d16, m16, qs], axis=-1).reshape(n, -1)


def export_compressed_gguf(compressed_dir: str | Path, out_path: str | Path) -> Path:
    """Write a `fleet compress` output directory as GGUF: its block linears from the stored codes (Q8_0, Q4_0
    or Q4_1, see code_type, each tensor at its own width in a mix), everything else as
    `export_gguf(..., "f16")` writes it."""
    import gguf

    from fleetlm.compress.store import hf_name, read_codes

    ckpt, out = Path(compressed_dir), Path(out_path)
    codes, meta = read_codes(ckpt)
    by_hf = {hf_name(name): qw for name, qw in codes.items()}
    qnames = {h: code_type(qw.bits, qw.sym) for h, qw in by_hf.items()}
    qname = max(set(qnames.values()), key=list(qnames.values()).count)  # the file type: the most common
    cfg = load_config(ckpt)
    files = _weight_files(ckpt)
    vocab = read_vocab(ckpt, cfg.vocab_size, cfg)
    plan = _plan(cfg, files, "f16")
    for t in plan:
        if t.hf_name in by_hf:
            t.qtype = getattr(gguf.GGMLQuantizationType, qnames[t.hf_name].upper())
    if not out.parent.is_dir():
        raise GGUFExportError(f"output directory {out.parent} does not exist")
    w = gguf.GGUFWriter(str(out), GGUF_ARCH[cfg.arch])
    _write_metadata(w, cfg, vocab, qname, ckpt.resolve().name)
    for t in plan:
        w.add_tensor_info(t.gguf_name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.qtype),
                          raw_dtype=t.qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for t, data in _tensor_data(plan, files):
            qw = by_hf.get(t.hf_name or "")
            if qw is None:
                arr = _to_numpy(data, t.qtype)
            else:
                q, d, m = qw.q, qw.d, qw.m
                if t.permute_heads:  # the same row order as the float tensor (grids are per row)
                    q, d, m = (permute_rotate_half(x, t.permute_heads) for x in (q, d, m))
                arr = code_blocks(q, d, m, qw.group, qnames[t.hf_name or ""])
            if arr.nbytes != _nbytes(t.shape, t.qtype):
                raise GGUFExportError(f"tensor {t.gguf_name} has {arr.nbytes} bytes, expected "
                                      f"{_nbytes(t.shape, t.qtype)}")
            w.write_tensor_data(arr)
    except BaseException:
        w.close()
        out.unlink(missing_ok=True)
        raise
    w.close()
    return out
