"""The compiled decode step on a long cache: filled slots only, one graph from the first slot to the last."""

import torch
from torch._dynamo.utils import counters

from fleetlm.engine.compiled import CompiledDecodeStep
from fleetlm.model import load_checkpoint


@torch.inference_mode()
def test_compiled_step_is_not_recompiled_per_token_up_to_the_last_slot(tiny_llama):
    """After the warm-up (1 and 2 rows), steps at every fill up to the cache's last slot, one row and two rows
    at different fills, run on the same graphs and give eager's logits."""
    torch._dynamo.reset()
    model = load_checkpoint(tiny_llama).eval()
    slots = 40
    model.setup_caches(max_batch_size=2, max_seq_length=slots)
    step = CompiledDecodeStep()
    step.warm_up(model, (1, 2))
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for fill in (3, 17, slots - 2, slots - 1):  # the last one attends over every slot of the cache
        for rows in (1, 2):
            tok = torch.randint(0, vocab, (rows, 1), generator=gen)
            pos = torch.tensor([[fill], [fill // 2]])[:rows]
            want = model(tok, pos)[:, -1]  # eager, kv_len = fill + 1
            got = step(model, tok, pos)
            worst = max(worst, (got - want).abs().max().item())
            assert got.shape == (rows, vocab)
    assert worst <= 1e-3, worst
    assert counters["stats"]["unique_graphs"] == graphs  # no graph per token, none at the last slot
