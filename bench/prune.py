"""Perplexity (and HumanEval pass@1) of a catalog model pruned by magnitude, Wanda and SparseGPT at 50%
unstructured and 2:4, each alone and followed by 4-bit quantization; sizes of a 2:4 packed layout; decode.

  flock /tmp/bench.lock nice .venv/bin/python bench/prune.py --model smollm2-135m-instruct \
      --configs magnitude:0.5,wanda:0.5,sparsegpt:0.5 --json /tmp/prune-smol.json

- baseline: the shipped model (its GGUF dequantized to float32): every row prunes that;
- a config is PRUNER:SPARSITY[:QUANT] (QUANT rtn or gptq, 4-bit, --group): e.g. sparsegpt:2:4:gptq;
  dense:QUANT is the unpruned model quantized the same way (the reference for the pruned + quantized rows);
- pruned rows are evaluated as float32 weights with the zeros (quantized rows: the codes' values);
- calibration: the Python 3.11 library reference; evaluation: licenses + Debian changelogs
  (compress.evaluate);
- sizes of the block linears only: dense (float16, or the 4-bit codes with their scales), a 2:4 packed layout
  (2:4 rows: the 2 kept values of every 4 plus a 2-bit position each), and gzip -6 of the float16 bytes
  (of the 4-bit codes, a nibble each, for quantized rows);
- --decode: tok/s of our engine's int4 kernels on the RTN model against the 2:4 + RTN model (the same dense
  kernels: the zeros are multiplied like any other weight, there is no sparse kernel).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import tempfile
import time
from pathlib import Path

import torch

from fleetlm.compress.calib import compress_model
from fleetlm.compress.evaluate import block_linear_names, eval_windows, humaneval_pass1, perplexity
from fleetlm.compress.pipeline import calibration_windows, load_float_model
from fleetlm.compress.prune import QuantAfter, packed_nm_bytes, parse_sparsity, prune_model, sparsity_of


def parse_config(text: str) -> tuple[str, str, str | None]:
    parts = text.split(":")
    method, rest = parts[0], parts[1:]
    quant = rest.pop() if rest and rest[-1] in ("rtn", "gptq") else None
    return method, ":".join(rest), quant


def sizes(model: torch.nn.Module, codes: dict, linears: set[str], two_four: bool) -> dict:
    """MiB of the block linears: float16, 2:4 packed, gzip of their bytes (float16 or 4-bit codes)."""
    numel = sum(model.get_submodule(n).weight.numel() for n in linears)
    if codes:
        raw = b"".join(_nibbles(codes[n].q) for n in sorted(linears))
        scales = sum(q.d.numel() * (2 if q.sym else 4) for q in codes.values())
        value_bits, dense = 4, sum(q.nbytes() for q in codes.values())
    else:
        raw = b"".join(model.get_submodule(n).weight.detach().half().numpy().tobytes()
                       for n in sorted(linears))
        scales, value_bits, dense = 0, 16, numel * 2
    packed = (packed_nm_bytes(numel, 2, 4, value_bits) + scales) / 2**20 if two_four else None
    return {"dense_mib": dense / 2**20, "packed_2_4_mib": packed,
            "gzip_mib": (len(gzip.compress(raw, 6)) + scales) / 2**20}


def _nibbles(q: torch.Tensor) -> bytes:
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous().numpy().tobytes()


def decode_speed(base: torch.nn.Module, tokenizer, calib: torch.Tensor, tokens: int,  # noqa: ANN001
                 group: int) -> list[dict]:
    """tok/s of the int4 kernels on RTN vs 2:4 + RTN (same kernels), one stream, greedy."""
    from fleetlm.compress.store import load_compressed, save_compressed
    from fleetlm.engine import Engine, GenerationRequest

    rows = []
    prompt = tokenizer.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    with tempfile.TemporaryDirectory() as tmp:
        for label in ("rtn 4-bit (dense)", "magnitude 2:4 + rtn 4-bit"):
            model = copy.deepcopy(base)
            if label.startswith("magnitude"):
                _m, codes = prune_model(model, "magnitude", parse_sparsity("2:4"), calib,
                                        quant=QuantAfter("rtn", 4, group))
            else:
                codes = compress_model(model, "rtn", 4, group)
            out = Path(tmp) / label.split()[0]
            save_compressed(model, codes, tokenizer, out, {"method": "rtn"})
            engine = Engine(load_compressed(out), tokenizer, dtype="int4")
            req = GenerationRequest(prompt_ids=prompt, max_tokens=8, temperature=0.0)
            list(engine.generate([req]))  # warm-up
            speeds = []
            for _ in range(3):
                req = GenerationRequest(prompt_ids=prompt, max_tokens=tokens, temperature=0.0,
                                        ignore_eos=True)
                start = time.perf_counter()
                n = sum(1 for e in engine.generate([req]) if e.token_id is not None)
                speeds.append(n / (time.perf_counter() - start))
            rows.append({"model": label, "tok_s": sorted(speeds)[1], "runs": speeds})
            print(f"decode {label:30} {sorted(speeds)[1]:6.1f} tok/s (median of 3, {tokens} tokens incl. "
                  f"prefill; runs {', '.join(f'{s:.1f}' for s in speeds)})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--configs", default="magnitude:0.5,wanda:0.5,sparsegpt:0.5",
                    help="comma-separated PRUNER:SPARSITY[:rtn|gptq]; '' for the baseline only")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--humaneval", type=int, default=0, help="HumanEval problems per row (0: none)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the dense row (its ppl is in --json)")
    ap.add_argument("--decode", type=int, default=0, help="also time decode of this many tokens")
    ap.add_argument("--json", type=Path, help="rows appended to this JSON file as they come")
    args = ap.parse_args()
    torch.manual_seed(0)

    t0 = time.perf_counter()
    base, tokenizer = load_float_model(args.model)
    windows, n_eval = eval_windows(tokenizer, args.windows, args.window_len)
    calib = calibration_windows(tokenizer, None, args.calib_samples, args.calib_len)
    print(f"model {args.model}: eval {args.windows} x {args.window_len} tokens of {n_eval} (licenses + "
          f"Debian changelogs); calib {args.calib_samples} x {args.calib_len} tokens (python3.11-doc)",
          flush=True)
    linears = block_linear_names(base)
    rows = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    if not args.no_baseline:
        row = {"config": "dense", "ppl": perplexity(base, windows), "sparsity": sparsity_of(base),
               "seconds": 0.0, **sizes(base, {}, linears, False)}
        if args.humaneval:
            row["pass1"] = humaneval_pass1(base, tokenizer, args.humaneval, progress=False)
        rows.append(_tag(row, args))
        print(_line(row), flush=True)
        _save(args, rows)
    if args.decode:  # first: seconds, and a run cut short by its time limit still has it
        for r in decode_speed(base, tokenizer, calib[:4], args.decode, args.group):
            rows.append(_tag({"config": "decode", **r}, args))
        _save(args, rows)
    for config in filter(None, args.configs.split(",")):
        method, sparsity, quant = parse_config(config)
        model = copy.deepcopy(base)
        start = time.perf_counter()
        if method == "dense":  # quantization alone, no pruning
            codes = compress_model(model, quant, 4, args.group, calib)
        else:
            _masks, codes = prune_model(model, method, parse_sparsity(sparsity), calib,
                                        quant=QuantAfter(quant, 4, args.group) if quant else None,
                                        progress=False)
        seconds = time.perf_counter() - start
        row = {"config": config, "ppl": perplexity(model, windows), "sparsity": sparsity_of(model),
               "seconds": seconds, **sizes(model, codes, linears, sparsity == "2:4" and method != "dense")}
        if args.humaneval:
            row["pass1"] = humaneval_pass1(model, tokenizer, args.humaneval, progress=False)
        rows.append(_tag(row, args))
        print(_line(row), flush=True)
        _save(args, rows)
        del model, codes
    print(f"total {time.perf_counter() - t0:.0f}s")


def _tag(row: dict, args: argparse.Namespace) -> dict:
    return {**row, "model": args.model, "windows": args.windows, "window_len": args.window_len,
            "calib": [args.calib_samples, args.calib_len], "humaneval_n": args.humaneval, "group": args.group}


def _save(args: argparse.Namespace, rows: list[dict]) -> None:
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _line(r: dict) -> str:
    p1 = f" pass@1 {r['pass1']:.3f}" if "pass1" in r else ""
    packed = "-" if r["packed_2_4_mib"] is None else f"{r['packed_2_4_mib']:.1f}"
    return (f"{r['config']:24} ppl {r['ppl']:9.3f}  zeros {100 * r['sparsity']:5.1f}%  linears MiB dense "
            f"{r['dense_mib']:6.1f} 2:4-packed {packed:>6} gzip {r['gzip_mib']:6.1f}  "
            f"{r['seconds']:6.1f}s{p1}")


if __name__ == "__main__":
    main()
