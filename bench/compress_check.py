"""A real model's GPTQ 4-bit output, end to end: it loads in our engine's int4 kernels from its stored codes,
and its GGUF export (Q4_1 blocks) runs in llama.cpp; both answer the same prompts greedily, printed side by
side with the float baseline's answer.

  flock /tmp/bench.lock nice .venv/bin/python bench/compress_check.py --model smollm2-135m-instruct
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

PROMPTS = ["What is the capital of France? Answer in one sentence.",
           "Write a Python function that returns the square of a number."]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=40)
    args = ap.parse_args()

    import llama_cpp

    from fleetlm.compress.gguf import export_compressed_gguf
    from fleetlm.compress.pipeline import compress_to_dir, load_float_model
    from fleetlm.compress.store import load_compressed
    from fleetlm.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "gptq4"
        t0 = time.perf_counter()
        info = compress_to_dir(args.model, out, method="gptq", bits=4, group=args.group, samples=args.samples,
                               seq_len=args.seq_len, progress=True)
        print(f"gptq 4-bit g{args.group}: {info['seconds']:.0f}s, codes {info['codes_mib']:.1f} MiB")
        model = load_compressed(out, kernels=True)
        kinds = sorted({type(m).__name__ for n, m in model.named_modules() if n.startswith("layers.0.")
                        and not list(m.children())})
        print("layer 0 modules on load_compressed:", ", ".join(kinds))
        _, tokenizer = load_float_model(out)
        ours = Engine(model, tokenizer, name="gptq4", dtype="int4")
        base, _ = load_float_model(args.model)
        plain = Engine(base, tokenizer, name="base", dtype="f32")
        gguf = export_compressed_gguf(out, Path(tmp) / "gptq4.gguf")
        print(f"GGUF export {gguf.stat().st_size / 2**20:.1f} MiB")
        llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=512, n_threads=2, verbose=False)
        for prompt in PROMPTS:
            conv = [{"role": "user", "content": prompt}]
            a = ours.chat([conv], max_tokens=args.tokens, temperature=0.0)[0]
            b = llm.create_chat_completion(conv, max_tokens=args.tokens, temperature=0.0)
            c = plain.chat([conv], max_tokens=args.tokens, temperature=0.0)[0]
            print(f"\nPROMPT {prompt!r}\n  ours int4 : {a!r}\n  llama.cpp : "
                  f"{b['choices'][0]['message']['content']!r}\n  float base: {c!r}")
        print(f"total {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
