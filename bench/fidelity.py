"""Fidelity of our engine on the catalog's real GGUF models, side by side (docs/FIDELITY.md).

For each model: our f32 logits against transformers' on the same file (`from_pretrained(gguf_file=...)`, which
dequantizes too) and greedy continuations token for token; top-1 agreement with llama.cpp (which multiplies
with quantized activations) over a teacher-forced passage, for our f32/bf16 and for int8/int4, which round
the dequantized weights a second time; what that second rounding costs as agreement with our f32, mean
KL(f32 || width) and perplexity on the passage.

    nice -n 10 .venv/bin/python bench/fidelity.py [--model PATH ...] [--tokens 512] [--no-hf]
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct")
WIDTHS = ("f32", "bf16", "int8", "int4")
# A conversation the passage is rendered in (each model's own chat template): prose, a list, code, digits.
QUESTION = "Explain what a KV cache is in a transformer decoder, and show a tiny Python example."
ANSWER = """A KV cache stores the keys and values that each attention layer computed for earlier tokens, so
that generating the next token only needs the new token's query, key and value. Without it, every step would
run the whole prefix through the model again, and the cost of producing n tokens would grow with n squared.

There are three things to keep in mind:
1. Memory: the cache holds 2 x layers x heads x head_dim numbers per token. For a 24-layer model with two
   key/value heads of 64 dimensions, that is 6,144 values, or 12 KiB per token in bfloat16.
2. Position: each new key is rotated (RoPE) at its own position before it is stored, never again later.
3. Batching: rows of different lengths either pad to the longest one or keep their own positions.

Here is a minimal example:

```python
import torch

def attend(q, k_cache, v_cache, k_new, v_new):
    k = torch.cat([k_cache, k_new], dim=1)  # [batch, seen + 1, dim]
    v = torch.cat([v_cache, v_new], dim=1)
    weights = torch.softmax(q @ k.transpose(1, 2) / k.shape[-1] ** 0.5, dim=-1)
    return weights @ v, k, v
```

Calling `attend` once per generated token keeps the work per step proportional to the length so far, which is
why a 1,000-token answer costs about 1,000 small steps instead of 500,500 full passes. Real engines also
preallocate the cache (a static buffer of, say, 4096 slots) so that no memory is allocated while decoding."""
GREEDY_PROMPTS = ("The capital of France is", "def fibonacci(n):\n",
                  "Once upon a time, in a land of 1234 dragons,")


def model_paths(explicit: list[str]) -> list[Path]:
    """--model paths, else each catalog model: installed, or assembled under /tmp/models."""
    if explicit:
        return [Path(p) for p in explicit]
    try:
        from fleetlm.catalog import installed_path
    except ImportError:  # the catalog is optional for this script
        installed_path = None  # type: ignore[assignment]
    found = []
    for name in MODELS:
        path = installed_path(name) if installed_path else None
        fallback = Path("/tmp/models") / f"{name}.gguf"
        if path is None and fallback.is_file():
            path = fallback
        if path is None:
            print(f"skipping {name}: not installed (fleet models pull {name}) and no {fallback}")
        else:
            found.append(Path(path))
    return found


def passage_ids(tokenizer, n_tokens: int) -> list[int]:
    messages = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    ids = tokenizer.encode(text)
    while len(ids) < n_tokens:  # a second pass of the same answer, should a tokenizer pack it tightly
        ids = ids + tokenizer.encode(ANSWER, add_special_tokens=False)
    return ids[:n_tokens]


@torch.inference_mode()
def our_logits(path: Path, width: str, ids: list[int]) -> tuple[torch.Tensor, float, object]:
    from fleetlm.engine import Engine

    start = time.perf_counter()
    engine = Engine.load(path, dtype=width)
    load_s = time.perf_counter() - start
    return engine.model(torch.tensor([ids]))[0].float(), load_s, engine


def llama_cpp_logits(path: Path, ids: list[int], threads: int) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=len(ids) + 8, n_batch=len(ids), logits_all=True, n_threads=threads,
                verbose=False)
    llm.eval(ids)
    out = torch.from_numpy(llm.scores[: len(ids)].copy()).float()
    llm.close()
    return out


def compare(ref: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || other)) over all positions."""
    agree = float((ref.argmax(-1) == other.argmax(-1)).float().mean())
    kl = torch.nn.functional.kl_div(other.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="none").sum(-1).mean()
    return agree, float(kl)


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return float(nll.exp())


def our_greedy(engine, new_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, our greedy continuation) per prompt, EOS ignored so that every run is full length."""
    from fleetlm.engine import GenerationRequest

    runs = []
    for prompt in GREEDY_PROMPTS:
        p = engine.tokenizer.encode(prompt)
        runs.append((p, [e.token_id for e in engine.generate(GenerationRequest(
            prompt_ids=p, max_tokens=new_tokens, temperature=0.0, ignore_eos=True))]))
    return runs


@torch.inference_mode()
def transformers_check(path: Path, ids: list[int], ours: torch.Tensor,
                       greedy: list[tuple[list[int], list[int]]]) -> dict:
    """Max |logit difference| against transformers in f32 on the passage, and greedy runs compared."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                              dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # run every token, as ignore_eos does on our side
    diff = float((hf(torch.tensor([ids])).logits[0] - ours).abs().max())
    equal = sum(hf.generate(torch.tensor([p]), max_new_tokens=len(mine), do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() == mine for p, mine in greedy)
    del hf
    return {"max_diff": diff, "greedy": f"{equal}/{len(greedy)}"}


def run_model(path: Path, args: argparse.Namespace) -> dict:
    row: dict = {"model": path.stem, "size_mb": path.stat().st_size / 1e6}
    logits: dict[str, torch.Tensor] = {}
    ids: list[int] = []
    for width in WIDTHS:
        if width not in args.widths:
            continue
        if not ids:
            ids = passage_ids(file_tokenizer(path), args.tokens)
        out, load_s, engine = our_logits(path, width, ids)
        row[f"load_{width}"] = load_s
        logits[width] = out
        print(f"  {path.stem} {width}: loaded in {load_s:.1f} s", flush=True)
        greedy = our_greedy(engine, args.new_tokens) if width == "f32" and not args.no_hf else None
        del engine
        gc.collect()
        if greedy is not None:  # our model is freed first: two 1.5B models in f32 would take 14 GB
            row.update(transformers_check(path, ids, out, greedy))
            print(f"  {path.stem} vs transformers: max |diff| {row['max_diff']:.2e}, greedy {row['greedy']}",
                  flush=True)
    logits["llama.cpp"] = llama_cpp_logits(path, ids, args.threads)
    row["tokens"] = len(ids)
    base = "f32" if "f32" in logits else next(iter(logits))
    for name, lg in logits.items():
        row[f"ppl_{name}"] = perplexity(lg, ids)
        if name != "llama.cpp":
            row[f"llama_{name}"], _ = compare(logits["llama.cpp"], lg)
        if name != base:
            row[f"ours_{name}"], row[f"kl_{name}"] = compare(logits[base], lg)
    return row


def file_tokenizer(path: Path) -> object:
    from fleetlm.model.gguf import GGUFFile, gguf_tokenizer

    return gguf_tokenizer(GGUFFile(path))


def print_table(rows: list[dict]) -> None:
    def cell(row: dict, key: str, fmt: str) -> str:
        value = row.get(key)
        return "-" if value is None else (format(value, fmt) if not isinstance(value, str) else value)

    lines = [
        ("tokens scored", "tokens", "d"),
        ("load f32 (s)", "load_f32", ".1f"), ("load bf16 (s)", "load_bf16", ".1f"),
        ("load int8 (s)", "load_int8", ".1f"), ("load int4 (s)", "load_int4", ".1f"),
        ("f32 vs transformers: max |dlogit|", "max_diff", ".2e"),
        ("f32 vs transformers: greedy equal", "greedy", ""),
        *[(f"top-1 = llama.cpp: {w}", f"llama_{w}", ".1%") for w in WIDTHS],
        *[(f"top-1 = our f32: {w}", f"ours_{w}", ".1%") for w in WIDTHS[1:]],
        *[(f"KL(f32 || {w}) nats", f"kl_{w}", ".4f") for w in (*WIDTHS[1:], "llama.cpp")],
        ("top-1 = our f32: llama.cpp", "ours_llama.cpp", ".1%"),
        *[(f"perplexity: {w}", f"ppl_{w}", ".3f") for w in (*WIDTHS, "llama.cpp")],
    ]
    width = max(len(label) for label, _, _ in lines)
    cols = [max(14, len(r["model"])) for r in rows]
    header = [r["model"].rjust(c) for r, c in zip(rows, cols, strict=True)]
    print("| " + " | ".join(["".ljust(width), *header]) + " |")
    print("|" + "|".join(["-" * (width + 2)] + ["-" * (c + 2) for c in cols]) + "|")
    for label, key, fmt in lines:
        if all(r.get(key) is None for r in rows):
            continue
        print("| " + " | ".join([label.ljust(width)] + [cell(r, key, fmt).rjust(c)
                                                        for r, c in zip(rows, cols, strict=True)]) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", default=[],
                    help="a GGUF file (repeatable); default: the catalog's")
    ap.add_argument("--tokens", type=int, default=512, help="teacher-forced passage length")
    ap.add_argument("--new-tokens", type=int, default=32, help="greedy tokens a prompt, against transformers")
    ap.add_argument("--widths", default=",".join(WIDTHS), help="our widths to run (f32,bf16,int8,int4)")
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    args = ap.parse_args()
    args.widths = [w for w in args.widths.split(",") if w]
    rows = []
    for path in model_paths(args.model):
        print(f"{path.stem} ({path.stat().st_size / 1e6:.0f} MB)", flush=True)
        rows.append(run_model(path, args))
        gc.collect()
    if rows:
        print()
        print_table(rows)


if __name__ == "__main__":
    main()
