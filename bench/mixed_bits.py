"""The automatic bit-width mix (fleetlm.compress.mixed) at the file size of llama.cpp's Q4_K_M of the same
weights, against that Q4_K_M and a uniform 4-bit mix of the same method: held-out perplexity, GGUF MiB, KL.

  flock /tmp/bench.lock nice .venv/bin/python bench/mixed_bits.py --model qwen2.5-coder-0.5b-instruct \
      --work /tmp/mixed-qwen --stage all

Stages cache their results in --work (rows.json, sensitivity.json), so a run cut short (or run stage by stage
under the lock: llama, sens, mix, uniform) resumes where it stopped.
- baseline: the shipped model (a GGUF file) dequantized to float32; every row re-quantizes it;
- llama.cpp Q4_K_M: the baseline exported to GGUF f16, quantized by llama.cpp (bench/compress.py
  llama_cpp_row), loaded back through our GGUF reader; its file size is the mix's target;
- the mix: every block linear, embed_tokens and lm_head (llama.cpp quantizes both) at 8 or 4 bits or float16,
  group 32 (so our sizes are exactly GGUF's Q8_0 / Q4_1 blocks), chosen from RTN sensitivities on
  calibration windows, then quantized with --method; target bits a weight = (Q4_K_M file bytes - the bytes
  our f16 export spends on everything else) / the mix's weights; its MiB is the GGUF file we write;
- uniform 4-bit: the same tensors all at 4 bits with the same method (embeddings and head RTN 4-bit).
Texts: calibration, the Python 3.11 library reference; evaluation, the licenses and Debian changelogs.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleetlm.compress.evaluate import eval_windows, perplexity  # noqa: E402
from fleetlm.compress.gguf import export_compressed_gguf  # noqa: E402
from fleetlm.compress.mixed import (  # noqa: E402
    choose_bits,
    compress_mixed,
    measured_kl,
    mix_tensors,
    sensitivity,
    tensor_weight,
)
from fleetlm.compress.pipeline import calibration_windows, load_float_model  # noqa: E402
from fleetlm.compress.store import save_compressed  # noqa: E402

GROUP = 32


def _rows(work: Path) -> dict:
    path = work / "rows.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save(work: Path, rows: dict) -> None:
    (work / "rows.json").write_text(json.dumps(rows, indent=1))


def _humaneval(args: argparse.Namespace, model: torch.nn.Module, tokenizer) -> float | None:  # noqa: ANN001
    if not args.humaneval:
        return None
    from fleetlm.compress.evaluate import humaneval_pass1

    return humaneval_pass1(model, tokenizer, args.humaneval)


def _mix_row(args, name: str, base, tokenizer, widths: dict, calib, sens, windows, work: Path,  # noqa: ANN001
             extra: dict) -> dict:
    model = copy.deepcopy(base)
    start = time.perf_counter()
    codes = compress_mixed(model, widths, args.method, GROUP, calib, progress=True)
    seconds = time.perf_counter() - start
    kl = measured_kl(base, model, sens)
    ppl = perplexity(model, windows)
    out = work / name
    save_compressed(model, codes, tokenizer, out, {"method": args.method, "source": args.model})
    gguf = export_compressed_gguf(out, work / f"{name}.gguf")
    row = {"ppl": ppl, "mib": gguf.stat().st_size / 2**20, "seconds": seconds, "measured_kl": kl,
           "humaneval": _humaneval(args, model, tokenizer), **extra}
    gguf.unlink()  # keep the work directory small; the size is recorded
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--stage", default="all", help="all | llama | sens | mix | uniform (comma-separated)")
    ap.add_argument("--method", default="gptq")
    ap.add_argument("--llama", default="q4_k_m", help="the llama.cpp file type whose size the mix matches")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--window-len", type=int, default=256)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=128)
    ap.add_argument("--sens-samples", type=int, default=1)
    ap.add_argument("--sens-len", type=int, default=64)
    ap.add_argument("--measure", default="8,4", help="widths whose KL is measured (the others of 8,4 are "
                    "derived from the lowest by the weight-MSE ratio)")
    ap.add_argument("--humaneval", type=int, default=0, help="HumanEval problems per row (0: none)")
    args = ap.parse_args()
    stages = {"llama", "sens", "mix", "uniform"} if args.stage == "all" else set(args.stage.split(","))
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, tokenizer = load_float_model(args.model)
    windows, n_eval = eval_windows(tokenizer, args.windows, args.window_len)
    sens = calibration_windows(tokenizer, None, args.sens_samples, args.sens_len)
    rows = _rows(args.work)
    if "baseline" not in rows:
        rows["baseline"] = {"ppl": perplexity(base, windows), "humaneval": _humaneval(args, base, tokenizer)}
        _save(args.work, rows)
    print(f"model {args.model}: eval {args.windows} x {args.window_len} tokens of {n_eval}; baseline ppl "
          f"{rows['baseline']['ppl']:.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    names = mix_tensors(base)
    shapes = {n: tuple(tensor_weight(base, n).shape) for n in names}
    numel = sum(a * b for a, b in shapes.values())
    llama_key = f"llama.cpp {args.llama.upper()}"

    if "llama" in stages and llama_key not in rows:
        from compress import llama_cpp_row  # bench/compress.py

        row = llama_cpp_row(base, tokenizer, args.llama, windows, args.work,
                            argparse.Namespace(humaneval=0, he_tokens=256))
        f16 = (args.work / "model-f16.gguf").stat().st_size
        row["file_bytes"] = (args.work / f"model-{args.llama}.gguf").stat().st_size
        row["other_bytes"] = f16 - 2 * numel  # everything our f16 export writes that is not a mix tensor
        row["humaneval"] = None
        if args.humaneval:  # measured here, by the same function as the other rows
            from fleetlm.model.gguf import load_gguf

            model, _ = load_gguf(args.work / f"model-{args.llama}.gguf", dtype=torch.float32)
            row["humaneval"] = _humaneval(args, model, tokenizer)
        for p in args.work.glob("model-*.gguf"):
            p.unlink()
        rows[llama_key] = row
        _save(args.work, rows)
        print(f"{llama_key}: ppl {row['ppl']:.3f}, {row['mib']:.1f} MiB", flush=True)

    table = None
    if stages & {"sens", "mix"}:
        start = time.perf_counter()
        measured = tuple(int(b) for b in args.measure.split(","))
        scaled = tuple(b for b in (8, 4) if b not in measured)
        table = sensitivity(base, sens, measured, GROUP, tensors=names, scaled=scaled,
                            cache=args.work / "sensitivity.json", progress=True)
        print(f"sensitivity: {len(table)} tensors, measured {measured}, scaled {scaled}, in "
              f"{time.perf_counter() - start:.0f}s", flush=True)

    calib = None
    if stages & {"mix", "uniform"} and args.method in ("gptq", "awq"):
        calib = calibration_windows(tokenizer, None, args.calib_samples, args.calib_len)
    if "mix" in stages and "mix" not in rows:
        if llama_key not in rows:
            raise SystemExit(f"run --stage llama first: the mix's size is {llama_key}'s")
        ref = rows[llama_key]
        target = (ref["file_bytes"] - ref["other_bytes"]) * 8 / numel
        assert table is not None
        choice = choose_bits(table, shapes, GROUP, target_bpw=target)
        chosen = list(choice.bits.values())
        extra = {"target_bpw": target, "bpw": choice.bpw, "predicted_kl": choice.predicted_kl,
                 "by_bits": {str(b): chosen.count(b) for b in sorted(set(chosen))},
                 "bits": choice.bits}
        rows["mix"] = _mix_row(args, "mix", base, tokenizer, choice.bits, calib, sens, windows, args.work,
                               extra)
        _save(args.work, rows)
    if "uniform" in stages and "uniform4" not in rows:
        widths = {n: 4 for n in names}
        predicted = sum(table[n][4] for n in names) if table is not None else None
        rows["uniform4"] = _mix_row(args, "uniform4", base, tokenizer, widths, calib, sens, windows,
                                    args.work, {"bpw": 5.0, "predicted_kl": predicted})
        _save(args.work, rows)

    base_ppl = rows["baseline"]["ppl"]
    print(f"\n{'row':28} {'ppl':>9} {'+%':>7} {'MiB':>7} {'bpw':>6} {'KL pred':>9} {'KL meas':>9} {'HE':>5}")
    for key in ("baseline", llama_key, "mix", "uniform4"):
        r = rows.get(key)
        if r is None:
            continue
        he = "-" if r.get("humaneval") is None else f"{100 * r['humaneval']:.0f}%"

        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        print(f"{key:28} {r['ppl']:9.3f} {100 * (r['ppl'] - base_ppl) / base_ppl:+6.2f}% "
              f"{num(r.get('mib'), '7.1f'):>7} {num(r.get('bpw'), '6.3f'):>6} "
              f"{num(r.get('predicted_kl'), '9.4f'):>9} {num(r.get('measured_kl'), '9.4f'):>9} {he:>5}")
    if "mix" in rows:
        print(f"mix widths: {rows['mix']['by_bits']} (target {rows['mix']['target_bpw']:.3f} bits a weight)")
    print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
