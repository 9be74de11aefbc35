"""Automatic bit widths (fleetlm.compress.mixed): the chooser on synthetic tables, sensitivity on a tiny
model, a mix that saves, loads into our kernels and runs in llama.cpp, and clear errors for bad targets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_runner import run_main
from fleetlm.compress.grid import CompressError
from fleetlm.compress.mixed import KEEP, choose_bits, compress_mixed, mix_tensors, sensitivity, size_bits
from fleetlm.compress.store import load_compressed, read_codes, save_compressed
from fleetlm.model.checkpoint import load_checkpoint

GROUP = 32


def _synthetic(n: int = 24, seed: int = 0) -> tuple[dict, dict]:
    gen = np.random.default_rng(seed)
    shapes, table = {}, {}
    for i in range(n):
        shapes[f"t{i}"] = (int(gen.choice([64, 128, 256])), int(gen.choice([64, 128])))
        kl4 = float(gen.lognormal(-4, 1.5))
        table[f"t{i}"] = {8: kl4 / 200, 4: kl4, 3: 4 * kl4}
    return table, shapes


def _numel(shapes: dict) -> int:
    return sum(a * b for a, b in shapes.values())


def test_target_bpw_is_met_within_one_tensors_step():
    table, shapes = _synthetic()
    numel = _numel(shapes)
    # the largest single upgrade any tensor can take, in bits a weight of the whole mix
    step = max(size_bits(s, KEEP, GROUP) - size_bits(s, 4, GROUP) for s in shapes.values()) / numel
    for target in (5.0, 5.7, 6.5, 8.5, 12.0):
        choice = choose_bits(table, shapes, GROUP, target_bpw=target)
        used = sum(size_bits(shapes[n], b, GROUP) for n, b in choice.bits.items()) / numel
        assert abs(used - choice.bpw) < 1e-9
        assert choice.bpw <= target + 1e-9 and target - choice.bpw <= step, (target, choice.bpw)
        assert abs(choice.predicted_kl - sum(table[n].get(b, 0.0) for n, b in choice.bits.items())) < 1e-12
    # more bits never predicts more KL
    kls = [choose_bits(table, shapes, GROUP, target_bpw=t).predicted_kl for t in (5.0, 6.0, 7.0, 9.0)]
    assert kls == sorted(kls, reverse=True) and kls[0] > kls[-1]


def test_the_sensitive_tensors_get_the_bits_and_3_bits_never_win():
    shapes = {f"t{i}": (128, 128) for i in range(10)}
    table = {f"t{i}": {8: 1e-5, 4: 1e-3, 3: 5e-3} for i in range(10)}
    for hot in ("t3", "t7"):
        table[hot] = {8: 1e-4, 4: 0.5, 3: 2.0}
    per = size_bits((128, 128), 8, GROUP) - size_bits((128, 128), 4, GROUP)
    base = 10 * size_bits((128, 128), 4, GROUP)
    choice = choose_bits(table, shapes, GROUP, target_bpw=(base + 2 * per) / _numel(shapes), keep=False)
    assert {n for n, b in choice.bits.items() if b == 8} == {"t3", "t7"}
    assert 3 not in choice.bits.values()  # 3-bit codes cost what 4-bit ones do (4-bit containers)
    assert size_bits((128, 128), 3, GROUP) == size_bits((128, 128), 4, GROUP)


def test_max_kl_gives_the_smallest_mix_under_the_budget():
    table, shapes = _synthetic(seed=1)
    floor = sum(v[4] for v in table.values())
    choice = choose_bits(table, shapes, GROUP, max_kl=floor)
    assert set(choice.bits.values()) == {4}  # the all-4-bit mix is already within budget
    budget = floor / 10
    choice = choose_bits(table, shapes, GROUP, max_kl=budget)
    assert choice.predicted_kl <= budget
    # any tighter size under the same greedy order passes the budget: the size one upgrade smaller
    smaller = choose_bits(table, shapes, GROUP, target_bpw=choice.bpw - 1e-6)
    assert smaller.predicted_kl > budget
    assert choose_bits(table, shapes, GROUP, max_kl=0.0).bpw == 16.0  # only float16 has no loss
    with pytest.raises(CompressError, match="below the smallest predicted KL"):
        choose_bits(table, shapes, GROUP, max_kl=0.0, keep=False)


def test_bad_targets_are_clear_errors():
    table, shapes = _synthetic()
    cases = [({"target_bpw": 3.0}, "must be between"), ({"target_bpw": 17.0}, "must be between"),
             ({"target_bpw": float("nan")}, "must be between"), ({"max_kl": -1.0}, "must be a number >= 0"),
             ({}, "exactly one of"), ({"target_bpw": 6.0, "max_kl": 0.1}, "exactly one of")]
    for kwargs, message in cases:
        with pytest.raises(CompressError, match=message):
            choose_bits(table, shapes, GROUP, **kwargs)


def test_sensitivity_on_a_tiny_model_is_cached(tiny_llama, tmp_path, monkeypatch):
    model = load_checkpoint(tiny_llama, "float32")
    windows = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    names = mix_tensors(model)
    assert names[-2:] == ["embed_tokens", "lm_head"] and len(names) == 7 * len(model.layers) + 2
    cache = tmp_path / "sens.json"
    table = sensitivity(model, windows, (8, 4, 3), GROUP, cache=cache)
    assert set(table) == set(names)
    assert all(v[3] >= v[4] >= v[8] >= 0 for v in table.values())
    assert sum(v[4] for v in table.values()) > 10 * sum(v[8] for v in table.values()) > 0
    # quantizing one tensor moves only that tensor: the model is unchanged afterwards
    fresh = load_checkpoint(tiny_llama, "float32")
    after, before = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert set(json.loads(cache.read_text())["table"]) == set(names)

    def boom(*_a, **_k):
        raise AssertionError("measured again")

    # 8 bits derived from the 4-bit measurement by the weight-MSE ratio: the same order as measured
    derived = sensitivity(model, windows, (4,), GROUP, scaled=(8,), cache=cache)
    ratios = [derived[n][8] / table[n][8] for n in names]
    assert all(0.1 < r < 10 for r in ratios) and derived["embed_tokens"][4] == table["embed_tokens"][4]
    assert "8" in json.loads(cache.read_text())["table"]["lm_head"]  # the measured value stays cached
    monkeypatch.setattr("fleetlm.compress.mixed._quantize", boom)
    assert sensitivity(model, windows, (8, 4), GROUP, cache=cache) == {
        n: {8: v[8], 4: v[4]} for n, v in table.items()}


def _mix_widths(model) -> dict[str, int]:
    """A hand-made mix: 8 and 4 bits inside the fused groups, a float16 linear, embeddings and head coded."""
    widths = {n: 4 for n in mix_tensors(model)}
    widths.update({"layers.0.self_attn.v_proj": 8, "layers.0.mlp.up_proj": 8,
                   "layers.1.self_attn.o_proj": KEEP, "layers.1.mlp.down_proj": 8, "embed_tokens": 8,
                   "lm_head": 4})
    return widths


@pytest.fixture(scope="module")
def mixed_dir(tiny_checkpoint_factory, tmp_path_factory) -> Path:
    from fleetlm.model.tokenizer import Tokenizer

    ckpt = tiny_checkpoint_factory("llama")
    model = load_checkpoint(ckpt, "float32")
    calib = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))
    codes = compress_mixed(model, _mix_widths(model), "gptq", GROUP, calib)
    out = tmp_path_factory.mktemp("mixed")
    save_compressed(model, codes, Tokenizer.from_dir(ckpt), out, {"method": "gptq"})
    return out


def test_a_mix_saves_and_loads_into_the_kernels(mixed_dir):
    from fleetlm.engine.quant import KernelInt4Linear, KernelInt8Linear

    codes, meta = read_codes(mixed_dir)
    model = load_checkpoint(mixed_dir, "float32")
    want = {n: b for n, b in _mix_widths(model).items() if b != KEEP}
    assert meta["bits"] == "mixed" and {n: q.bits for n, q in codes.items()} == want
    floats = load_compressed(mixed_dir, kernels=False)
    for name, qw in codes.items():
        assert torch.equal(floats.get_submodule(name).weight, qw.dequantize()), name
    kern = load_compressed(mixed_dir, kernels=True)
    l0, l1 = kern.layers[0], kern.layers[1]
    assert l0.self_attn.qkv_proj is None and isinstance(l0.self_attn.v_proj, KernelInt8Linear)
    assert isinstance(l0.self_attn.q_proj, KernelInt4Linear) and isinstance(l0.mlp.up_proj, KernelInt8Linear)
    assert isinstance(l1.self_attn.qkv_proj, KernelInt4Linear)  # one width: fused as before
    assert type(l1.self_attn.o_proj) is torch.nn.Linear  # the float16 choice stays float
    assert isinstance(l1.mlp.down_proj, KernelInt8Linear) and isinstance(kern.lm_head, KernelInt4Linear)
    ids = torch.randint(0, kern.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = floats(ids), kern(ids)
    assert float((a - b).abs().max()) < 0.05 * float(a.abs().max())  # int8 activations only
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_a_mix_exports_to_gguf_that_llama_cpp_runs(mixed_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    import gguf

    from fleetlm.compress.gguf import export_compressed_gguf
    from fleetlm.model.gguf import load_gguf
    from fleetlm.model.tokenizer import Tokenizer

    path = export_compressed_gguf(mixed_dir, tmp_path / "mix.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_v.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"
    assert types["blk.1.attn_output.weight"] == "F16" and types["token_embd.weight"] == "Q8_0"
    assert types["output.weight"] == "Q4_1"
    codes, _ = read_codes(mixed_dir)
    model, _ = load_gguf(path, dtype=torch.float32)
    for name, qw in codes.items():
        assert torch.equal(model.get_submodule(name).weight, qw.dequantize()), name
    tokenizer = Tokenizer.from_dir(mixed_dir)
    ids = tokenizer.encode("The quick brown fox jumps over the lazy dog. 123 4567")
    # logits, not greedy tokens: llama.cpp rounds activations to 8 bits against Q8_0/Q4_1 weights, and the
    # tiny random model's near-ties flip under that (a uniform 4-bit file matched 12 tokens, a mix did not)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=1, verbose=False, type_k=0, type_v=0,
                          logits_all=True)
    llm.eval(ids)
    theirs = np.array(llm.scores[: len(ids)])
    with torch.no_grad():
        ours = load_compressed(mixed_dir, kernels=False)(torch.tensor([ids]))[0].numpy()
    assert np.abs(theirs - ours).max() < 0.05 * np.abs(ours).max()
    assert (theirs.argmax(-1) == ours.argmax(-1)).mean() >= 0.9


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    words = ("alpha beta gamma delta the quick brown fox jumps over a lazy dog while numbers 12 345 6789 "
             "and letters x y z follow one another in a text long enough to calibrate a tiny model ").split()
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(" ".join(np.random.default_rng(0).choice(words, 4000)))
    return path


def test_cli_target_bpw_writes_a_mix_with_its_prediction_checked(tiny_llama, calib_file, tmp_path,
                                                                 monkeypatch, capsys):
    out = tmp_path / "mix"
    code, stdout, err = run_main(monkeypatch, capsys, "compress", str(tiny_llama), "--method", "rtn",
                                 "--group-size", "32", "--calib", str(calib_file), "--target-bpw", "6",
                                 "--out", str(out))
    assert code == 0, err
    assert "measured" in stdout and (out / "sensitivity.json").is_file()
    meta = json.loads((out / "quantization.json").read_text())
    mix = meta["mix"]
    assert 6 - 0.5 < mix["bpw"] <= 6.0 and mix["predicted_kl"] > 0 and mix["measured_kl"] > 0
    # small independent perturbations: the summed prediction is the right order of magnitude
    assert 0.2 < mix["measured_kl"] / mix["predicted_kl"] < 5
    for extra, message in ((["--target-bpw", "2"], "must be between"), (["--max-kl", "-1"], ">= 0"),
                           (["--target-bpw", "6", "--max-kl", "1"], "exactly one of")):
        code, _out, err = run_main(monkeypatch, capsys, "compress", str(tiny_llama), "--group-size", "32",
                                   "--calib", str(calib_file), "--out", str(tmp_path / "bad"), *extra)
        assert code == 2 and message in err and "Traceback" not in err, (extra, err)
