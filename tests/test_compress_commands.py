"""`fleet compress` end to end on a tiny checkpoint: the output loads exactly into our kernels and generates,
its GGUF holds the same codes and llama.cpp runs it; bad input gives one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import run_main
from fleetlm.compress.calib import compress_model, token_windows
from fleetlm.compress.gguf import code_blocks, export_compressed_gguf
from fleetlm.compress.grid import CompressError, rtn
from fleetlm.compress.store import load_compressed, read_codes

PROMPT = "The quick brown fox jumps over the lazy dog. 123 4567"


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    words = ("alpha beta gamma delta the quick brown fox jumps over a lazy dog while numbers 12 345 6789 "
             "and letters x y z follow one another in a text long enough to calibrate a tiny model ").split()
    gen = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(gen.choice(words, 6000)))
    return path


@pytest.fixture(scope="module")
def compressed(tiny_checkpoint_factory, calib_file, tmp_path_factory):
    """(method, bits) -> (checkpoint, output dir) of `fleet compress` at group 32, written once."""
    from fleetlm.compress.pipeline import compress_to_dir

    ckpt = tiny_checkpoint_factory("llama")
    cache: dict[tuple[str, int], Path] = {}

    def make(method: str, bits: int = 4) -> tuple[Path, Path]:
        if (method, bits) not in cache:
            out = tmp_path_factory.mktemp(f"compressed-{method}-{bits}")
            compress_to_dir(ckpt, out, method=method, bits=bits, group=32, calib=[calib_file], samples=16,
                            seq_len=32)
            cache[method, bits] = out
        return ckpt, cache[method, bits]

    return make


def _greedy(model, tokenizer, n: int = 12, dtype: str = "int4") -> list[int]:
    from fleetlm.engine import Engine, GenerationRequest

    engine = Engine(model, tokenizer, dtype=dtype)
    req = GenerationRequest(prompt_ids=tokenizer.encode(PROMPT), max_tokens=n, temperature=0.0)
    return [e.token_id for e in engine.generate([req]) if e.token_id is not None]


def test_cli_writes_a_model_that_loads_and_generates(tiny_checkpoint_factory, calib_file, tmp_path,
                                                     monkeypatch, capsys):
    ckpt = tiny_checkpoint_factory("llama")
    out = tmp_path / "gptq"
    code, stdout, err = run_main(monkeypatch, capsys, "compress", str(ckpt), "--method", "gptq",
                                 "--bits", "4", "--group-size", "32", "--calib", str(calib_file),
                                 "--samples", "16", "--seq-len", "32", "--out", str(out),
                                 "--gguf", str(tmp_path / "g.gguf"))
    assert code == 0, err
    assert "wrote" in stdout and (tmp_path / "g.gguf").is_file()
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["method"] == "gptq" and meta["bits"] == 4 and meta["group_size"] == 32
    assert len(meta["linears"]) == 2 * 7
    from fleetlm.model.tokenizer import Tokenizer

    tokens = _greedy(load_compressed(out, kernels=True), Tokenizer.from_dir(out))
    assert len(tokens) >= 4
    # the kernels hold exactly the stored codes: unpacking gives them back
    from fleetlm.engine.kernels import unpack_int4

    codes, _ = read_codes(out)
    model = load_compressed(out, kernels=True)
    down = model.layers[0].mlp.down_proj
    q, d, m = unpack_int4(down.weight, down.scales, down.out_features, down.in_features)
    want = codes["layers.0.mlp.down_proj"]
    assert torch.equal(q[:, : want.q.shape[1]].to(torch.int16), want.q)
    torch.testing.assert_close(d, want.d) and torch.testing.assert_close(m, want.m)


def test_compressed_float_copy_matches_codes(compressed):
    _ckpt, out = compressed("awq")
    codes, meta = read_codes(out)
    assert meta["method"] == "awq" and meta["calibration"]["samples"] == 16
    model = load_compressed(out, kernels=False)
    for name, qw in codes.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize())


def test_methods_on_a_real_block_stack_beat_rtn(tiny_checkpoint_factory):
    """Logit error against the float model on held-out tokens: GPTQ and AWQ at 3 bits below RTN."""
    from fleetlm.model.checkpoint import load_checkpoint

    ckpt = tiny_checkpoint_factory("llama")
    base = load_checkpoint(ckpt, "float32")
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, base.config.vocab_size, (32, 32), generator=gen)
    held = torch.randint(0, base.config.vocab_size, (8, 32), generator=gen)
    with torch.no_grad():
        ref = base(held)
    errors = {}
    for method in ("rtn", "gptq", "awq", "hqq"):
        model = load_checkpoint(ckpt, "float32")
        compress_model(model, method, 3, 32, calib)
        with torch.no_grad():
            errors[method] = float(((model(held) - ref) ** 2).mean())
    assert errors["gptq"] < errors["rtn"] and errors["awq"] < errors["rtn"], errors


def test_gguf_blocks_hold_the_codes_exactly():
    import gguf

    w = 0.05 * torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    for bits, sym, qtype in ((8, False, "q8_0"), (4, False, "q4_1"), (4, True, "q4_0"), (3, False, "q4_1")):
        for group in (32, 64, 128):
            qw = rtn(w, bits, group, sym)
            blocks = code_blocks(qw.q, qw.d, qw.m, group, qtype)
            back = gguf.quants.dequantize(blocks, getattr(gguf.GGMLQuantizationType, qtype.upper()))
            np.testing.assert_array_equal(back.reshape(16, 128), qw.dequantize().numpy())


@pytest.mark.parametrize("bits", [8, 4])
def test_gguf_export_runs_in_llama_cpp_like_our_engine(compressed, tmp_path, bits):
    llama_cpp = pytest.importorskip("llama_cpp")
    from fleetlm.model.gguf import load_gguf
    from fleetlm.model.tokenizer import Tokenizer

    _ckpt, out = compressed("gptq", bits)
    path = export_compressed_gguf(out, tmp_path / "gptq.gguf")
    # our GGUF reader gives back exactly the codes' values (Q8_0 at 8 bits, Q4_1 at 4)
    model, _ = load_gguf(path, dtype=torch.float32)
    codes, _ = read_codes(out)
    for name, qw in codes.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize()), name
    tokenizer = Tokenizer.from_dir(out)
    ids = tokenizer.encode(PROMPT)
    # an f32 KV cache (ggml type 0): llama.cpp's default f16 cache alone changed a token at step 4
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False, type_k=0, type_v=0)
    theirs = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
        theirs.append(int(tok))
        if len(theirs) == 12:
            break
    ours = _greedy(load_compressed(out, kernels=False), tokenizer, 12, dtype="f32")
    assert len(ours) == 12 and theirs == ours


def test_bad_input_is_a_clear_error(tiny_checkpoint_factory, tmp_path, monkeypatch, capsys):
    ckpt = tiny_checkpoint_factory("llama")
    cases = [
        (["--method", "smart"], "unknown method"),
        (["--bits", "5"], "bits must be one of"),
        (["--group-size", "48"], "group size must be one of"),
        (["--method", "gptq", "--calib", str(tmp_path / "missing.txt")], "does not exist"),
    ]
    for extra, message in cases:
        code, _out, err = run_main(monkeypatch, capsys, "compress", str(ckpt), "--out", str(tmp_path / "o"),
                                   *extra)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
    code, _out, err = run_main(monkeypatch, capsys, "compress", str(tmp_path / "nothing"), "--out",
                               str(tmp_path / "o"))
    assert code == 2 and "error:" in err
    with pytest.raises(CompressError, match="fewer than"):
        token_windows(list(range(100)), 8, 32)
