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
