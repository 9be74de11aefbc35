"""Perplexity of a catalog model quantized by RTN, GPTQ, AWQ and HQQ (fleetlm.compress), side by side with the
float baseline and llama.cpp's own quantizer, on held-out text the quantizer never saw.

  flock /tmp/bench.lock nice .venv/bin/python bench/compress.py --model smollm2-135m-instruct --bits 4

- baseline: the shipped model (a GGUF file) dequantized to float32: every other row re-quantizes it;
- ours: block linears quantized (embeddings, norms and lm_head stay float), evaluated as float32 weights equal
  to the codes' values (what the int8/int4 kernels compute, less their int8 activations);
- llama.cpp: the baseline exported to GGUF f16, quantized by llama.cpp's quantizer (llama-cpp-python), loaded
  back through our GGUF reader, evaluated by the same code (embeddings quantized too: its file types do that);
- calibration: the Python 3.11 library reference (python3.11-doc); evaluation: /usr/share/common-licenses
  and the Debian changelogs (fleetlm.compress.calib), windows spread evenly over the text.
Sizes: ours, the codes plus the float tensors in float16 (what our GGUF export writes); llama.cpp, its file.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

from fleetlm.compress.calib import compress_model
from fleetlm.compress.evaluate import block_linear_names, eval_windows, float_bytes, perplexity
from fleetlm.compress.pipeline import calibration_windows, load_float_model


def llama_cpp_row(base: torch.nn.Module, tokenizer, qtype: str, windows: torch.Tensor, work: Path) -> dict:
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
    return {"method": f"llama.cpp {qtype.upper()}", "bits": "-", "group": 32,
            "ppl": perplexity(model, windows), "mib": out.stat().st_size / 2**20, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--methods", default="rtn,gptq,awq,hqq")
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
    base_ppl = perplexity(base, windows)
    print(f"model {args.model}: eval {args.windows} x {args.window_len} tokens of {n_eval} "
          f"(licenses + Debian changelogs); calib {args.calib_samples} x {args.calib_len} tokens "
          f"(python3.11-doc library); baseline ppl {base_ppl:.3f} ({time.perf_counter() - t0:.0f}s)",
          flush=True)
    linears = block_linear_names(base)
    rows = [{"method": "baseline (shipped, dequantized)", "bits": "f32", "group": "-", "ppl": base_ppl,
             "mib": float_bytes(base, set()) / 2**20, "seconds": 0.0}]
    for bits in (int(b) for b in args.bits.split(",")):
        for method in args.methods.split(","):
            model = copy.deepcopy(base)
            start = time.perf_counter()
            codes = compress_model(model, method, bits, args.group, calib, act_order=not args.no_act_order)
            seconds = time.perf_counter() - start
            mib = (sum(q.nbytes() for q in codes.values()) + float_bytes(model, linears)) / 2**20
            ppl = perplexity(model, windows)
            rows.append({"method": method, "bits": bits, "group": args.group, "ppl": ppl, "mib": mib,
                         "seconds": seconds})
            print(_row(rows[-1], base_ppl), flush=True)
            _save(args, rows)
            del model, codes
    if args.llama:
        with tempfile.TemporaryDirectory() as tmp:
            for qtype in args.llama.split(","):
                rows.append(llama_cpp_row(base, tokenizer, qtype, windows, Path(tmp)))
                print(_row(rows[-1], base_ppl), flush=True)

    print(f"\n{'method':34} {'bits':>4} {'group':>5} {'ppl':>9} {'+ppl':>8} {'+%':>7} {'MiB':>7} "
          f"{'quant s':>8}")
    for r in rows:
        print(_row(r, base_ppl))
    print(f"total {time.perf_counter() - t0:.0f}s")
    _save(args, rows)


def _save(args: argparse.Namespace, rows: list[dict]) -> None:
    """The rows so far (a run cut short keeps what it measured)."""
    if args.json:
        args.json.write_text(json.dumps([{**r, "model": args.model, "windows": args.windows,
                                          "window_len": args.window_len} for r in rows], indent=1))


def _row(r: dict, base: float) -> str:
    inc = r["ppl"] - base
    return (f"{r['method']:34} {r['bits']!s:>4} {r['group']!s:>5} {r['ppl']:9.3f} {inc:+8.3f} "
            f"{100 * inc / base:+6.2f}% {r['mib']:7.1f} {r['seconds']:8.1f}")


if __name__ == "__main__":
    main()
