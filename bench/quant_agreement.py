"""Top-1 agreement of int8 / int4 weights with bf16 on a trained model (SmolLM2-135M-Instruct by default).

The decode benchmark's agreement figure uses random weights, whose top-1 margins are tiny; this one teacher-
forces the bf16 model's own greedy answers to task-suite prompts through the quantized model.
    .venv/bin/python bench/quant_agreement.py [--model NAME|FILE.gguf|DIR] [--prompts 40] [--tokens 16]
"""

from __future__ import annotations

import argparse

from fleetlm.bench.agreement import top1_agreement
from fleetlm.catalog import resolve_model
from fleetlm.engine import Engine, GenerationRequest
from fleetlm.tasks.suite import generate, prompt_messages


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="catalog name (installed), .gguf or dir")
    ap.add_argument("--prompts", type=int, default=40, help="test-split prompts (spread over the domains)")
    ap.add_argument("--tokens", type=int, default=16, help="greedy bf16 tokens per prompt")
    args = ap.parse_args()
    location = resolve_model(args.model).location
    ref = Engine.load(location, dtype="bf16")
    tok = ref.tokenizer
    records = generate(n=max(1, args.prompts // 5), seed=7, levels=[1, 2, 3], split="test")
    prompts = [tok.encode(tok.apply_chat_template(prompt_messages(r), add_generation_prompt=True),
                          add_special_tokens=False) for r in records]
    answers = [[e.token_id for e in ref.generate(GenerationRequest(prompt_ids=p, max_tokens=args.tokens,
                                                                   temperature=0.0, ignore_eos=True))]
               for p in prompts]
    for width in ("int8", "int4"):
        quant = Engine.load(location, dtype=width)
        n = sum(len(a) for a in answers)
        agree = sum(top1_agreement(quant.model, p, a) * len(a) for p, a in zip(prompts, answers, strict=True))
        print(f"{width}: top-1 agreement with bf16 over {n} tokens: {agree / n:.3f}")


if __name__ == "__main__":
    main()
