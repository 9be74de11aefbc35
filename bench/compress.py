"""Perplexity and HumanEval pass@1 of a catalog model quantized by RTN, GPTQ, AWQ and HQQ (fleetlm.compress),
side by side with the float baseline and llama.cpp's own quantizer, on held-out text the quantizer never saw.

  flock /tmp/bench.lock nice .venv/bin/python bench/compress.py --model smollm2-135m-instruct --bits 4 \
      --methods base,rtn,gptq,awq,hqq --llama q4_0,q4_k_m,q3_k_m --humaneval 20 --json out.json

- baseline: the shipped model (a GGUF file) dequantized to float32: every other row re-quantizes it;
- ours: block linears quantized (embeddings, norms and lm_head stay float), evaluated as float32 weights equal
  to the codes' values (what the int8/int4 kernels compute, less their int8 activations);
- llama.cpp: the baseline exported to GGUF f16, quantized by llama.cpp's quantizer (llama-cpp-python), loaded
  back through our GGUF reader, evaluated by the same code (embeddings quantized too: its file types do that);
- calibration: the Python 3.11 library reference (python3.11-doc); evaluation: /usr/share/common-licenses
  and the Debian changelogs (fleetlm.compress.calib), windows spread evenly over the text.
- perplexity: the windows in two halves, each half's perplexity printed (their spread says how stable the
  figure is) and the whole set's (the geometric mean of the two: equal token counts);
- HumanEval (--humaneval N): pass@1 on N problems drawn with a fixed seed (the same for every row), greedy,
  chat mode, through our engine on the row's float32 weights (compress.evaluate.humaneval_pass1);
- a run is one model at the bits given; --methods may leave out `base` (give --base-ppl from another run).
Sizes: ours, the codes plus the float tensors in float16 (what our GGUF export writes); llama.cpp, its file.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from fleetlm.compress.calib import compress_model
from fleetlm.compress.evaluate import (
    block_linear_names,
    eval_windows,
    float_bytes,
    humaneval_pass1,
    perplexity,
)
from fleetlm.compress.pipeline import calibration_windows, load_float_model


def llama_cpp_row(base: torch.nn.Module, tokenizer, qtype: str, windows: torch.Tensor, work: Path,
                  args: argparse.Namespace) -> dict:
    from fleetlm.compress.gguf import export_gguf, quantize_gguf
    from fleetlm.model.checkpoint import save_checkpoint
    from fleetlm.model.gguf import load_gguf

    ckpt = work / "f16-ckpt"
    f16 = work / "model-f16.gguf"
    if not f16.exists():
        save_checkpoint(copy.deepcopy(base).half(), ckpt, tokenizer_dir=tokenizer)
        export_gguf(ckpt, f16, "f16")
    out = work / f"model-{qtype}.gguf"
    start = time.perf_counter()
    quantize_gguf(f16, out, qtype)
    seconds = time.perf_counter() - start
    model, _ = load_gguf(out, dtype=torch.float32)
    group = 32 if qtype in ("q4_0", "q4_1", "q8_0") else 256  # K-quants: 256-value super-blocks
    return {"method": f"llama.cpp {qtype.upper()}", "bits": "-", "group": group,
            **measure(model.float(), tokenizer, windows, args), "mib": out.stat().st_size / 2**20,
            "seconds": seconds}


def measure(model: torch.nn.Module, tokenizer, windows: torch.Tensor, args: argparse.Namespace) -> dict:
    """Perplexity of each half of the windows and of all of them, and pass@1 when asked."""
    half = windows.shape[0] // 2
    halves = [perplexity(model, windows[:half]), perplexity(model, windows[half:])] if half else []
    even = half and windows.shape[0] % 2 == 0
    ppl = math.sqrt(halves[0] * halves[1]) if even else perplexity(model, windows)
    out = {"ppl": ppl, "ppl_halves": halves}
    if args.humaneval:
        out["pass1"] = humaneval_pass1(model, tokenizer, args.humaneval, args.he_tokens)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--methods", default="base,rtn,gptq,awq,hqq", help="base: the shipped model's row")
    ap.add_argument("--base-ppl", type=float, help="the baseline's perplexity from another run (no base row)")
    ap.add_argument("--humaneval", type=int, default=0, help="HumanEval problems per row (0: none)")
    ap.add_argument("--he-tokens", type=int, default=256, help="HumanEval max tokens per reply")
    ap.add_argument("--bits", default="4", help="comma-separated: 8,4,3")
    ap.add_argument("--group", type=int, default=64, help="64 divides SmolLM2's 576; 128 for Qwen2.5")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--window-len", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--llama", default="", help="llama.cpp types to add, e.g. q4_0,q8_0")
    ap.add_argument("--no-act-order", action="store_true")
    ap.add_argument("--json", type=Path, help="write the rows to this JSON file (after each row)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    base, tokenizer = load_float_model(args.model)
    windows, n_eval = eval_windows(tokenizer, args.windows, args.window_len)
    calib = calibration_windows(tokenizer, None, args.calib_samples, args.calib_len)
    methods = args.methods.split(",") if args.methods else []
    print(f"model {args.model}: eval {args.windows} x {args.window_len} tokens of {n_eval} "
          f"(licenses + Debian changelogs); calib {args.calib_samples} x {args.calib_len} tokens "
          f"(python3.11-doc library); HumanEval {args.humaneval} problems, {args.he_tokens} tokens",
          flush=True)
    linears = block_linear_names(base)
    rows = []
    if "base" in methods:
        rows.append({"method": "baseline (shipped, dequantized)", "bits": "f32", "group": "-",
                     **measure(base, tokenizer, windows, args), "mib": float_bytes(base, set()) / 2**20,
                     "seconds": 0.0})
        methods.remove("base")
    base_ppl = rows[0]["ppl"] if rows else args.base_ppl
    if base_ppl is None:
        raise SystemExit("error: no baseline: put base in --methods or give --base-ppl")
    if rows:
        print(_row(rows[-1], base_ppl), flush=True)
    for bits in (int(b) for b in args.bits.split(",")):
        for method in methods:
            model = copy.deepcopy(base)
            start = time.perf_counter()
            codes = compress_model(model, method, bits, args.group, calib, act_order=not args.no_act_order)
            seconds = time.perf_counter() - start
            mib = (sum(q.nbytes() for q in codes.values()) + float_bytes(model, linears)) / 2**20
            rows.append({"method": method, "bits": bits, "group": args.group,
                         **measure(model, tokenizer, windows, args), "mib": mib, "seconds": seconds})
            print(_row(rows[-1], base_ppl), flush=True)
            _save(args, rows)
            del model, codes
    if args.llama:
        with tempfile.TemporaryDirectory() as tmp:
            for qtype in args.llama.split(","):
                rows.append(llama_cpp_row(base, tokenizer, qtype, windows, Path(tmp), args))
                print(_row(rows[-1], base_ppl), flush=True)
                _save(args, rows)

    print(f"\n{'method':34} {'bits':>4} {'group':>5} {'ppl':>9} {'+ppl':>8} {'+%':>7} {'halves':>15} "
          f"{'pass@1':>6} {'MiB':>7} {'quant s':>8}")
    for r in rows:
        print(_row(r, base_ppl))
    print(f"total {time.perf_counter() - t0:.0f}s")
    _save(args, rows)


def _save(args: argparse.Namespace, rows: list[dict]) -> None:
    """The rows so far (a run cut short keeps what it measured)."""
    if args.json:
        args.json.write_text(json.dumps([{**r, "model": args.model, "windows": args.windows,
                                          "window_len": args.window_len, "humaneval": args.humaneval,
                                          "he_tokens": args.he_tokens} for r in rows], indent=1))


def _row(r: dict, base: float) -> str:
    inc = r["ppl"] - base
    halves = "/".join(f"{h:.2f}" for h in r.get("ppl_halves", [])) or "-"
    pass1 = f"{100 * r['pass1']:5.1f}%" if "pass1" in r else "-"
    return (f"{r['method']:34} {r['bits']!s:>4} {r['group']!s:>5} {r['ppl']:9.3f} {inc:+8.3f} "
            f"{100 * inc / base:+6.2f}% {halves:>15} {pass1:>6} {r['mib']:7.1f} {r['seconds']:8.1f}")


if __name__ == "__main__":
    main()
