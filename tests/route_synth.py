"""Synthetic routing folders in RouteLLM's layout, shared by the route tests (not a test module itself)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

WEAK = "mistralai/Mixtral-8x7B-Instruct-v0.1"
STRONG = "gpt-4-1106-preview"

SUBJECTS = {
    "easy_history": ("Which king ruled {n} lands?", 0.95, 0.97),
    "hard_algebra": ("Solve x^2 + {n}x = {m} for x.", 0.2, 0.9),
    "mid_biology": ("Which organelle makes protein number {n}?", 0.6, 0.85),
}


def make_routellm_folder(root: Path, per_subject: int = 40, gsm_rows: int = 80, seed: int = 0) -> Path:
    """A tiny folder laid out like RouteLLM's evals data, with outcomes that depend on the subject."""
    rng = np.random.default_rng(seed)
    (root / "mmlu").mkdir(parents=True)
    (root / "gsm8k").mkdir()
    contaminated = []
    for subject, (template, p_weak, p_strong) in SUBJECTS.items():
        with (root / "mmlu" / f"mmlu_{subject}.csv").open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["prompt", WEAK, STRONG])
            for i in range(per_subject):
                prompt = template.format(n=i, m=i * 3) + "\nA. one\nB. two\nC. three\nD. four\nAnswer:"
                w.writerow([prompt, rng.random() < p_weak, rng.random() < p_strong])
                if i == 0 and subject == "easy_history":
                    contaminated.append(
                        {"train_prompt": "x", "eval_prompt": prompt, "train_idx": 0, "eval_idx": 0}
                    )
    (root / "mmlu" / "contaminated_prompts.jsonl").write_text(
        "".join(json.dumps(c) + "\n" for c in contaminated)
    )
    with (root / "gsm8k" / "gsm8k_responses.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", WEAK, STRONG, WEAK + "_response", STRONG + "_response"])
        for _ in range(gsm_rows):
            a, b = int(rng.integers(2, 50)), int(rng.integers(2, 50))
            prompt = f"Tom has {a} apples and buys {b} more. How many apples does he have?"
            weak_ok = rng.random() < 0.6
            # a wrong weak answer carries an arithmetic slip that the calculator can catch
            claimed = a + b if weak_ok else a + b + int(rng.integers(1, 5))
            weak_resp = f"He has {a} + {b} = {claimed} apples.\n#### {claimed}"
            strong_resp = f"{a} + {b} = {a + b}\n#### {a + b}"
            w.writerow([prompt, weak_ok, rng.random() < 0.9, weak_resp, strong_resp])
    (root / "gsm8k" / "contaminated_prompts.jsonl").write_text("")
    return root
