"""Pruning (fleetlm.compress.prune): exact sparsity and 2:4 patterns, Wanda/SparseGPT below magnitude on
correlated inputs, zeros kept through quantization, the CLI round trip on a tiny model, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cli_runner import run_main
from fleetlm.compress.gptq import Hessian
from fleetlm.compress.grid import CompressError, output_error
from fleetlm.compress.prune import (
    QuantAfter,
    Sparsity,
    is_n_m,
    magnitude_mask,
    packed_nm_bytes,
    parse_sparsity,
    prune_model,
    quantize_masked,
    sparsegpt,
    sparsity_of,
    wanda_mask,
    zero_grid,
)


def _correlated(t: int = 1024, k: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs with shared directions and very uneven channel scales (real activations have outliers)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(t, 16, generator=gen) @ torch.randn(16, k, generator=gen)
    return (base + 0.3 * torch.randn(t, k, generator=gen)) * (0.1 + 5 * torch.rand(k, generator=gen) ** 3)


def _weight(n: int = 64, k: int = 128, seed: int = 1) -> torch.Tensor:
    return 0.05 * torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


def _hessian(x: torch.Tensor) -> torch.Tensor:
    h = Hessian(x.shape[1])
    h.add(x)
    return h.h


def test_parse_sparsity():
    assert parse_sparsity("0.5") == Sparsity(0.5)
    assert parse_sparsity("2:4") == Sparsity(0.5, 2, 4)
    assert str(parse_sparsity("4:8")) == "4:8"
    for bad in ("0", "1", "1.5", "-0.2", "half", "4:2", "0:4", "2:2", ""):
        with pytest.raises(CompressError):
            parse_sparsity(bad)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_sparsity_per_row_and_2_4_pattern(method):
    x, w = _correlated(), _weight()
    for sp in (parse_sparsity("0.5"), parse_sparsity("2:4")):
        if method == "magnitude":
            mask = magnitude_mask(w, sp)
            pruned = w.masked_fill(mask, 0)
        elif method == "wanda":
            mask = wanda_mask(w, (x * x).sum(0), sp)
            pruned = w.masked_fill(mask, 0)
        else:
            pruned, mask, _ = sparsegpt(w, _hessian(x), sp)
        assert torch.equal(pruned == 0, mask)  # every kept weight is nonzero, every pruned one exactly 0
        assert (mask.sum(1) == w.shape[1] // 2).all()  # 50% in every row
        if sp.structured:
            assert is_n_m(pruned, 2, 4)
    # an odd fraction over blocks: each row still ends at round(fraction * K)
    pruned, mask, _ = sparsegpt(_weight(k=320), _hessian(_correlated(k=320)), Sparsity(0.3))
    assert (mask.sum(1) == round(0.3 * 320)).all()


def test_wanda_and_sparsegpt_beat_magnitude_on_correlated_inputs():
    x, w = _correlated(), _weight()
    for sp in (Sparsity(0.5), parse_sparsity("2:4")):
        mag = output_error(x, w, w.masked_fill(magnitude_mask(w, sp), 0))
        wanda = output_error(x, w, w.masked_fill(wanda_mask(w, (x * x).sum(0), sp), 0))
        sgpt = output_error(x, w, sparsegpt(w, _hessian(x), sp)[0])
        assert wanda < 0.8 * mag, (wanda, mag)
        assert sgpt < 0.5 * mag and sgpt < wanda, (sgpt, wanda, mag)


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (3, False), (8, False)])
def test_zero_grids_hold_zero_exactly(bits, sym):
    w = _weight()
    d, m = zero_grid(w, bits, 32, sym)
    assert torch.equal(d.half().float(), d) and torch.equal(m.half().float(), m)  # what the file holds
    mask = magnitude_mask(w, Sparsity(0.5))
    qw = quantize_masked(w, mask, bits, 32, sym)
    deq = qw.dequantize()
    assert (deq[mask] == 0).all()
    # and the float16 values stay zero-exact too (what GGUF Q4_1/Q4_0/Q8_0 and our kernels compute)
    q = qw.q.float().view(64, -1, 32)
    half = (q * qw.d.half()[..., None].float() + qw.m.half()[..., None].float()).view(64, 128)
    assert (half[mask] == 0).all()
    # the kept weights are still close: half a grid step (a whole one where Q4_0's grid clips its far end)
    step = qw.d.abs().repeat_interleave(32, 1) * (1.01 if sym else 0.51)
    assert ((deq - w).abs()[~mask] <= step[~mask] + 1e-6).all()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_joint_gptq_keeps_zeros_and_beats_masked_rtn(method):
    x, w = _correlated(), _weight()
    h = _hessian(x)
    sp = parse_sparsity("2:4")
    mask = None
    if method == "magnitude":
        mask = magnitude_mask(w, sp)
    elif method == "wanda":
        mask = wanda_mask(w, (x * x).sum(0), sp)
    new, got, qw = sparsegpt(w, h, sp, mask=mask, quant=QuantAfter("gptq", 4, 32))
    if mask is not None:
        assert torch.equal(got, mask)  # a given mask is kept
    assert torch.equal(qw.dequantize(), new) and (new[got] == 0).all()
    # a kept weight may round to the zero code too: at most 2 nonzeros of every 4, and only a few extra zeros
    assert is_n_m(new, 2, 4, exact=False) and float((new[~got] == 0).float().mean()) < 0.1
    rtn = quantize_masked(w, got, 4, 32).dequantize()
    assert output_error(x, w, new) < output_error(x, w, rtn)


def _tiny_model(tiny_checkpoint_factory):
    from fleetlm.model.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint_factory("llama"), "float32")


@pytest.mark.parametrize("method,quant", [("magnitude", None), ("wanda", None), ("sparsegpt", "gptq"),
                                          ("wanda", "rtn")])
def test_prune_model_every_block_linear(tiny_checkpoint_factory, method, quant):
    model = _tiny_model(tiny_checkpoint_factory)
    gen = torch.Generator().manual_seed(0)
    calib = torch.randint(0, model.embed_tokens.num_embeddings, (8, 32), generator=gen)
    q = QuantAfter(quant, 4, 32) if quant else None
    masks, codes = prune_model(model, method, parse_sparsity("2:4"), calib, quant=q)
    assert len(masks) == 2 * 7 and len(codes) == (14 if quant else 0)
    assert sparsity_of(model) == 0.5 if not quant else 0.5 <= sparsity_of(model) < 0.55
    for key, mask in masks.items():
        w = model.get_submodule(key).weight
        assert (w[mask] == 0).all() and is_n_m(w, 2, 4, exact=not quant)
        if quant:
            assert torch.equal(codes[key].dequantize(), w)
        else:
            assert torch.equal(w == 0, mask)


def test_packed_2_4_size():
    # 2 of 4 values at 16 bits + 2-bit positions: 36 bits per 4 weights against 64 dense
    assert packed_nm_bytes(4096, 2, 4, 16) == 4096 * 36 // 32
    assert packed_nm_bytes(4096, 2, 4, 4) == 4096 * 12 // 32


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    words = ("alpha beta gamma delta the quick brown fox jumps over a lazy dog while numbers 12 345 6789 "
             "and letters x y z follow one another in a text long enough to calibrate a tiny model ").split()
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(np.random.default_rng(0).choice(words, 6000)))
    return path


def test_cli_round_trip_pruned_alone_and_quantized(tiny_checkpoint_factory, calib_file, tmp_path, monkeypatch,
                                                   capsys):
    from fleetlm.compress.store import load_compressed
    from fleetlm.engine import Engine, GenerationRequest
    from fleetlm.model.checkpoint import load_checkpoint
    from fleetlm.model.gguf import load_gguf
    from fleetlm.model.tokenizer import Tokenizer

    ckpt = tiny_checkpoint_factory("llama")
    out = tmp_path / "wanda"
    code, stdout, err = run_main(monkeypatch, capsys, "compress", str(ckpt), "--prune", "wanda", "--sparsity",
                                 "0.5", "--calib", str(calib_file), "--samples", "8", "--seq-len", "32",
                                 "--out", str(out), "--gguf", str(tmp_path / "w.gguf"))
    assert code == 0, err
    assert "50.0% zeros" in stdout
    meta = json.loads((out / "pruning.json").read_text())
    assert meta["pruning"] == "wanda" and meta["measured_sparsity"] == 0.5 and meta["quantization"] is None
    model = load_checkpoint(out, "float32")
    assert sparsity_of(model) == 0.5
    gguf_model, _ = load_gguf(tmp_path / "w.gguf", dtype=torch.float32)
    assert sparsity_of(gguf_model) == 0.5  # f16 GGUF: the zeros survive export
    tok = Tokenizer.from_dir(out)
    req = GenerationRequest(prompt_ids=tok.encode("the quick brown fox"), max_tokens=6, temperature=0.0)
    assert len([e for e in Engine(model, tok, dtype="f32").generate([req]) if e.token_id is not None]) >= 1

    out2 = tmp_path / "sgpt-gptq"
    code, stdout, err = run_main(monkeypatch, capsys, "compress", str(ckpt), "--prune", "sparsegpt",
                                 "--sparsity", "2:4", "--method", "gptq", "--bits", "4", "--group-size", "32",
                                 "--calib", str(calib_file), "--samples", "8", "--seq-len", "32",
                                 "--out", str(out2), "--gguf", str(tmp_path / "q.gguf"))
    assert code == 0, err
    exact = load_compressed(out2, kernels=False)
    assert 0.5 <= sparsity_of(exact) < 0.55
    for block in exact.layers:
        assert is_n_m(block.mlp.down_proj.weight, 2, 4, exact=False)
    q4, _ = load_gguf(tmp_path / "q.gguf", dtype=torch.float32)  # Q4_1 blocks: zeros still exactly zero
    assert sparsity_of(q4) == sparsity_of(exact)
    assert len([e for e in Engine(load_compressed(out2), tok, dtype="int4").generate([req])
                if e.token_id is not None]) >= 1


@pytest.mark.parametrize("args,needle", [
    (["--prune", "wanda", "--sparsity", "1.5"], "must be in (0, 1)"),
    (["--prune", "wanda", "--sparsity", "3:2"], "N:M"),
    (["--prune", "wanda", "--sparsity", "lots"], "fraction like 0.5"),
    (["--prune", "lottery"], "unknown pruning method"),
    (["--prune", "magnitude", "--method", "hqq"], "after pruning"),
])
def test_bad_options_are_one_line_errors(tiny_checkpoint_factory, tmp_path, monkeypatch, capsys, args,
                                         needle):
    code, _out, err = run_main(monkeypatch, capsys, "compress", str(tiny_checkpoint_factory("llama")), *args,
                               "--out", str(tmp_path / "x"))
    assert code == 2 and needle in err and "Traceback" not in err
