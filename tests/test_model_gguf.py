"""GGUF loading (model/gguf.py): every tensor type dequantized in place, on small GGUFs written here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from fleetlm.model.gguf import (  # noqa: E402 - needs gguf
    LOAD_TYPES,
    GGUFFile,
    GGUFLoadError,
    _dequantized,
    load_gguf,
)

QT = gguf.GGMLQuantizationType
# The types gguf.quants can also write; max |error| / max |w| that each may cost on Gaussian weights.
WRITABLE = {"F32": 0.0, "F16": 1e-3, "BF16": 8e-3, "Q8_0": 0.01, "Q5_1": 0.04, "Q5_0": 0.06, "Q4_1": 0.08,
            "Q4_0": 0.12}
HIDDEN, FF, LAYERS, HEADS, KV_HEADS = 64, 128, 2, 4, 2
SPECIALS = ("<|im_start|>", "<|im_end|>")


def _byte_level_tokens() -> list[str]:
    """GPT-2's 256 byte symbols (printable bytes as themselves, the rest shifted past U+0100)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted, n = {}, 0
    for b in range(256):
        if b not in printable:
            shifted[b] = 256 + n
            n += 1
    return [chr(b) if b in printable else chr(shifted[b]) for b in range(256)]


def write_gguf(path: Path, qtype: str = "F32", arch: str = "qwen2", seed: int = 0, *, pre: str = "qwen2",
               tokenizer_model: str = "gpt2", drop: tuple[str, ...] = (),
               relabel: dict[str, Any] | None = None) -> dict[str, np.ndarray]:
    """A tiny random model as GGUF, its matrices stored as `qtype`; returns the float32 originals by name.

    relabel: tensor name -> a GGMLQuantizationType written in its header in place of the real one.
    """
    rng = np.random.default_rng(seed)
    tokens = _byte_level_tokens() + ["Ġt", "he", *SPECIALS]
    types = [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)) + [gguf.TokenType.CONTROL] * len(SPECIALS)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (HIDDEN,), b + "ffn_norm.weight": (HIDDEN,),
            b + "attn_q.weight": (HEADS * head_dim, HIDDEN), b + "attn_output.weight": (HIDDEN, HIDDEN),
            b + "attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            b + "attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            b + "ffn_gate.weight": (FF, HIDDEN), b + "ffn_up.weight": (FF, HIDDEN),
            b + "ffn_down.weight": (HIDDEN, FF),
        })
        if arch == "qwen2":
            shapes.update({b + "attn_q.bias": (HEADS * head_dim,), b + "attn_k.bias": (KV_HEADS * head_dim,),
                           b + "attn_v.bias": (KV_HEADS * head_dim,)})
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(256)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges(["Ġ t", "h e"])
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    originals: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        if name in drop:
            continue
        noise = rng.standard_normal(shape).astype(np.float32)
        data = 1.0 + 0.1 * noise if "norm" in name else 0.2 * noise
        originals[name] = data
        kind = QT[qtype] if len(shape) == 2 else QT.F32
        stored = gguf.quants.quantize(data, kind) if kind != QT.F32 else data
        # quantized data is bytes per row; the writer works the element shape out from the type
        w.add_tensor(name, stored, raw_dtype=(relabel or {}).get(name, kind))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return originals


def _our_name(name: str) -> str:
    from fleetlm.model.gguf import _our_tensor_name

    return _our_tensor_name(name)


@pytest.mark.parametrize("qtype", list(WRITABLE))
def test_each_tensor_type_loads_close_to_the_weights_it_stores(tmp_path, qtype):
    path = tmp_path / f"m-{qtype}.gguf"
    originals = write_gguf(path, qtype)
    model, _ = load_gguf(path, dtype=torch.float32)
    state = model.state_dict()
    for name, w in originals.items():
        ours = state[_our_name(name)]
        assert tuple(ours.shape) == w.shape, name
        # exactly llama.cpp's dequantization of what was stored ...
        kind = QT[qtype] if w.ndim == 2 else QT.F32
        stored = gguf.quants.quantize(w, kind) if kind != QT.F32 else w
        expect = torch.from_numpy(np.asarray(gguf.quants.dequantize(stored, kind), dtype=np.float32))
        torch.testing.assert_close(ours, expect.reshape(w.shape), rtol=0, atol=0)
        # ... which is the weight up to the type's rounding
        err = np.abs(ours.numpy() - w).max() / np.abs(w).max()
        assert err <= WRITABLE[qtype if w.ndim == 2 else "F32"] + 1e-7, (name, err)


def test_bf16_load_is_the_f32_load_rounded_once(tmp_path):
    path = tmp_path / "q4_1.gguf"
    write_gguf(path, "Q4_1")
    f32, _ = load_gguf(path, dtype=torch.float32)
    bf16, _ = load_gguf(path, dtype=torch.bfloat16)
    for (name, a), (_, b) in zip(f32.state_dict().items(), bf16.state_dict().items(), strict=True):
        assert b.dtype == torch.bfloat16, name
        assert torch.equal(a.to(torch.bfloat16), b), name


def test_dequantizing_in_row_chunks_equals_the_whole_tensor(tmp_path):
    path = tmp_path / "q5_0.gguf"
    write_gguf(path, "Q5_0")
    t = next(t for t in GGUFFile(path).tensors if t.name == "token_embd.weight")
    whole = _dequantized(t, torch.float32)
    assert torch.equal(_dequantized(t, torch.float32, rows_per_chunk=7), whole)  # 262 rows: a ragged end
    assert torch.equal(_dequantized(t, torch.bfloat16, rows_per_chunk=7), whole.to(torch.bfloat16))


def test_our_reader_reads_what_the_gguf_package_reads(tmp_path):
    path = tmp_path / "q4_1.gguf"
    write_gguf(path, "Q4_1", arch="llama")
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    assert ours.metadata.keys() == {k for k in theirs.fields if not k.startswith("GGUF.")}
    for key, field in theirs.fields.items():
        if not key.startswith("GGUF."):
            expect = field.contents()
            assert ours.meta(key) == pytest.approx(expect) if isinstance(expect, float) else expect, key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == int(b.tensor_type) and a.shape == tuple(int(d) for d in b.shape)
        as_bytes = [np.asarray(x.data).view(np.uint8).ravel() for x in (a, b)]
        assert np.array_equal(*as_bytes), a.name


def test_the_catalog_file_types_are_all_loadable():
    # SmolLM2 Q4_1 (+ a Q8_0 embedding), Qwen2.5-Coder Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0), norms in F32
    assert {"F32", "Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"} <= set(LOAD_TYPES)
    assert {"F16", "BF16", "Q4_0", "Q5_K"} <= set(LOAD_TYPES)


# K-quants: gguf.quants cannot write them, so llama.cpp's own quantizer makes them from an exported model
# whose rows split into 256-value super-blocks.
K_QUANTS = {"q2_k": ("Q2_K", 0.45), "q3_k_m": ("Q3_K", 0.25), "q4_k_m": ("Q4_K", 0.12),
            "q5_k_m": ("Q5_K", 0.06), "q6_k": ("Q6_K", 0.03)}


@pytest.fixture(scope="module")
def k_quant_source(tiny_checkpoint_factory, tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from fleetlm.compress.gguf import export_gguf

    ckpt = tiny_checkpoint_factory("qwen2", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                   num_key_value_heads=2)
    return ckpt, export_gguf(ckpt, tmp_path_factory.mktemp("kq") / "f32.gguf", "f32")


@pytest.mark.parametrize("ftype", list(K_QUANTS))
def test_k_quants_written_by_llama_cpp_load_close_to_the_checkpoint(k_quant_source, tmp_path, ftype):
    from fleetlm.compress.gguf import quantize_gguf
    from fleetlm.model.checkpoint import load_checkpoint

    ckpt, f32 = k_quant_source
    path = quantize_gguf(f32, tmp_path / f"{ftype}.gguf", ftype)
    kind, bound = K_QUANTS[ftype]
    stored = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(str(path)).tensors}
    assert kind in stored
    model, _ = load_gguf(path)
    reference = load_checkpoint(ckpt).state_dict()
    for name, w in model.state_dict().items():
        ref = reference[name]
        rel_rms = float((w - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
        assert rel_rms <= bound, (name, rel_rms)


def test_engine_loads_a_gguf_file_at_each_width(tmp_path):
    from fleetlm.engine import Engine

    path = tmp_path / "tiny-chat.gguf"
    write_gguf(path, "Q8_0")
    for dtype in ("f32", "bf16", "int8", "int4"):
        engine = Engine.load(path, dtype=dtype)
        assert engine.name == "tiny-chat" and engine.dtype == dtype
        text = engine.complete(["the"], max_tokens=4, temperature=0.0)[0]
        assert isinstance(text, str)
        assert engine.last_stats.prompt_tokens == 2  # "t" + "he": the file's two merges


# ----------------------------------------------------------------------------------------------------
# files the engine cannot take: a clear GGUFLoadError, never a traceback from numpy or torch


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "whole.gguf"
    write_gguf(path, "Q8_0")
    data = path.read_bytes()
    for keep in (10, len(data) // 3, len(data) - 100):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(GGUFLoadError, match="not a readable GGUF"):
            load_gguf(cut)


def test_unknown_architecture_is_refused(tmp_path):
    path = tmp_path / "gemma.gguf"
    write_gguf(path, arch="gemma2")
    with pytest.raises(GGUFLoadError, match="architecture 'gemma2' is not supported"):
        load_gguf(path)


def test_unknown_tensor_type_is_refused(tmp_path):
    # IQ4_NL blocks have Q4_0's size (32 values in 18 bytes), so the file is well formed but unloadable
    path = tmp_path / "iq4.gguf"
    write_gguf(path, "Q4_0", relabel={"blk.1.ffn_up.weight": QT.IQ4_NL})
    with pytest.raises(GGUFLoadError, match=r"blk\.1\.ffn_up\.weight is IQ4_NL; loadable types"):
        load_gguf(path)


def test_missing_tensor_unknown_tokenizer_and_pre_tokenizer_are_refused(tmp_path):
    write_gguf(tmp_path / "a.gguf", drop=("blk.1.ffn_down.weight",))
    with pytest.raises(GGUFLoadError, match="lacks 1 tensor"):
        load_gguf(tmp_path / "a.gguf")
    write_gguf(tmp_path / "b.gguf", tokenizer_model="llama")
    with pytest.raises(GGUFLoadError, match="tokenizer 'llama' is not supported"):
        load_gguf(tmp_path / "b.gguf")
    write_gguf(tmp_path / "c.gguf", pre="mystery")
    with pytest.raises(GGUFLoadError, match="pre-tokenizer 'mystery' is not supported"):
        load_gguf(tmp_path / "c.gguf")
    with pytest.raises(GGUFLoadError, match="does not exist"):
        load_gguf(tmp_path / "none.gguf")
