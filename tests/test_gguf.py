"""GGUF export: llama.cpp (llama-cpp-python) loads our file and decodes greedily as our engine does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from fleetlm.compress.gguf import (
    GGUFExportError,
    export_gguf,
    llama3_rope_factors,
    permute_rotate_half,
    pre_tokenizer_name,
    quantize_gguf,
    read_vocab,
)
from fleetlm.errors import CheckpointError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
llama_cpp = pytest.importorskip("llama_cpp")

PROMPT = "The quick brown fox jumps over the lazy dog. 123 4567"
N_NEW = 24


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint_factory):
    """checkpoint(arch) -> Path of the shared tiny random checkpoint (tests/conftest.py)."""
    return tiny_checkpoint_factory


def _our_ids(ckpt: Path, text: str) -> list[int]:
    from fleetlm.model.tokenizer import Tokenizer

    return Tokenizer.from_dir(ckpt).encode(text)


def _eos_ids(ckpt: Path) -> set[int]:
    cfg = json.loads((ckpt / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    return set(eos if isinstance(eos, list) else [] if eos is None else [eos])


def _reference_greedy(ckpt: Path, ids: list[int], n: int) -> list[int]:
    """Our engine's greedy tokens (float32); transformers' generate until fleetlm.engine lands."""
    try:
        from fleetlm.engine import Engine, GenerationRequest
    except ImportError:
        Engine = None  # noqa: N806
    if Engine is not None:
        engine = Engine.load(str(ckpt), dtype="f32")
        req = GenerationRequest(prompt_ids=ids, max_tokens=n, temperature=0.0)
        return [e.token_id for e in engine.generate([req]) if e.token_id is not None]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                             eos_token_id=sorted(_eos_ids(ckpt)) or None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def _reference_logits(ckpt: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _load(path: Path, logits_all: bool = False, f32_cache: bool = False):
    # llama.cpp keeps its KV cache in f16 by default; f32 (ggml type 0) makes an exact comparison possible
    cache = dict(type_k=0, type_v=0) if f32_cache else {}
    return llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False, logits_all=logits_all,
                           **cache)


def _llama_greedy(llm, ids: list[int], n: int, eos: set[int]) -> list[int]:
    out: list[int] = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) == n or tok in eos:
            break
    return out


def _strip_eos(toks: list[int], eos: set[int]) -> list[int]:
    return toks[:-1] if toks and toks[-1] in eos else toks


# ----------------------------------------------------------------------------------------------------


def test_permute_pairs_rotate_half_rows():
    # head_dim 4, one head: HF rows (0,1 | 2,3) pair 0<->2 and 1<->3; llama.cpp wants them adjacent.
    w = torch.arange(8, dtype=torch.float32).reshape(8, 1)
    out = permute_rotate_half(w, n_heads=2).flatten().tolist()
    assert out == [0, 2, 1, 3, 4, 6, 5, 7]


def test_llama3_rope_factors_match_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from fleetlm.model.config import ModelConfig

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = ModelConfig(arch="llama", hidden_size=512, num_heads=4, num_kv_heads=4, rope_theta=10000.0,
                      rope_scaling=scaling, max_position_embeddings=512)
    factors = llama3_rope_factors(cfg)
    import transformers

    hf = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=10000.0,
                                  rope_scaling=scaling, max_position_embeddings=512)
    inv_scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    inv_plain = 1.0 / (10000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    assert factors.shape == (64,)
    assert 1.0 in factors.tolist() and 8.0 in factors.tolist()  # all three bands occur
    torch.testing.assert_close(inv_plain / factors, inv_scaled.float(), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_f16_greedy_matches_our_engine(checkpoint, tmp_path, arch):
    ckpt = checkpoint(arch)
    out = export_gguf(ckpt, tmp_path / f"{arch}.gguf", "f16")
    llm = _load(out)
    ids = _our_ids(ckpt, PROMPT)
    # llama.cpp tokenizes the text exactly as the checkpoint's tokenizer does
    assert llm.tokenize(PROMPT.encode(), add_bos=True, special=False) == ids
    eos = _eos_ids(ckpt)
    ours = _strip_eos(_reference_greedy(ckpt, ids, N_NEW), eos)
    theirs = _strip_eos(_llama_greedy(llm, ids, N_NEW, eos), eos)
    assert len(ours) >= 8
    assert theirs == ours


def _with_llama3_rope(ckpt: Path, out: Path) -> Path:
    """The same weights with Llama 3 rope scaling in config.json (all three bands occur at head_dim 16)."""
    import shutil

    shutil.copytree(ckpt, out)
    cfg = json.loads((out / "config.json").read_text())
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    # transformers 5 keeps rope_theta and the scaling in one `rope_parameters` dict; 4.x in `rope_scaling`
    key = "rope_parameters" if "rope_parameters" in cfg else "rope_scaling"
    cfg[key] = {**(cfg.get(key) or {}), **llama3}
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2", "llama3-rope"])
def test_f32_logits_match_reference(checkpoint, tmp_path, arch):
    if arch == "llama3-rope":
        ckpt = _with_llama3_rope(checkpoint("llama"), tmp_path / "llama3")
    else:
        ckpt = checkpoint(arch)
    out = export_gguf(ckpt, tmp_path / f"{arch}-f32.gguf", "f32")
    llm = _load(out, logits_all=True, f32_cache=True)
    ids = _our_ids(ckpt, PROMPT)
    llm.eval(ids)
    theirs = np.asarray(llm.scores[: len(ids)])
    ref = _reference_logits(ckpt, ids)
    assert np.abs(theirs - ref).max() < 1e-3
    assert (theirs.argmax(-1) == ref.argmax(-1)).all()


def test_q8_0_export_and_llama_cpp_quantize(checkpoint, tmp_path):
    ckpt = checkpoint("llama")
    ids = _our_ids(ckpt, PROMPT)
    eos = _eos_ids(ckpt)
    ours = _strip_eos(_reference_greedy(ckpt, ids, N_NEW), eos)
    q8 = export_gguf(ckpt, tmp_path / "q8.gguf", "q8_0")
    f16 = export_gguf(ckpt, tmp_path / "f16.gguf", "f16")
    assert q8.stat().st_size < 0.75 * f16.stat().st_size
    for path in (q8, quantize_gguf(f16, tmp_path / "q8-llama.gguf", "q8_0")):
        theirs = _strip_eos(_llama_greedy(_load(path), ids, N_NEW, eos), eos)
        agree = sum(a == b for a, b in zip(theirs, ours, strict=False)) / len(ours)
        assert agree >= 0.5, (path.name, agree)
    q4 = quantize_gguf(f16, tmp_path / "q4.gguf", "q4_0")
    assert q4.stat().st_size < f16.stat().st_size
    assert len(_llama_greedy(_load(q4), ids, 4, set())) == 4


def test_vocab_metadata(checkpoint):
    ckpt = checkpoint("llama")
    cfg = json.loads((ckpt / "config.json").read_text())
    vocab = read_vocab(ckpt, cfg["vocab_size"])
    assert len(vocab.tokens) == cfg["vocab_size"] == len(vocab.token_types)
    assert vocab.merges and all(" " in m for m in vocab.merges)
    assert vocab.eos_id in _eos_ids(ckpt)
    assert vocab.chat_template


def testpre_tokenizer_names():
    llama3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
    qwen2 = llama3.replace(r"\p{N}{1,3}", r"\p{N}")

    def split(rx: str) -> dict:
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated"},
            {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}}

    assert pre_tokenizer_name(split(llama3)) == "llama-bpe"
    assert pre_tokenizer_name(split(qwen2)) == "qwen2"
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    with pytest.raises(GGUFExportError, match="pre-tokenizer"):
        pre_tokenizer_name(split(r"\s+"))


def test_errors(tmp_path, checkpoint):
    with pytest.raises(CheckpointError, match="does not exist"):
        export_gguf(tmp_path / "nope", tmp_path / "x.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        export_gguf(tmp_path / "empty", tmp_path / "x.gguf")
    with pytest.raises(GGUFExportError, match="unknown GGUF type"):
        export_gguf(checkpoint("llama"), tmp_path / "x.gguf", "q2_k")
    with pytest.raises(GGUFExportError, match="does not exist"):
        quantize_gguf(tmp_path / "nope.gguf", tmp_path / "y.gguf", "q4_0")


def test_cli_export_and_error_exit(checkpoint, tmp_path):
    import subprocess
    import sys

    from fleetlm.cli import app

    res = CliRunner().invoke(app, ["export", "gguf", str(checkpoint("qwen2")), str(tmp_path / "q.gguf"),
                                   "--type", "bf16"])
    assert res.exit_code == 0, res.output
    assert len(_llama_greedy(_load(tmp_path / "q.gguf"), [5, 6, 7], 4, set())) == 4  # bf16 loads and runs
    bad = subprocess.run([sys.executable, "-c", "from fleetlm.cli import main; main()", "export", "gguf",
                          str(tmp_path), str(tmp_path / "x.gguf")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2
    assert bad.stderr.strip().startswith("error:") and len(bad.stderr.strip().splitlines()) == 1
