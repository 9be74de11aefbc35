"""The compiled decode step: Inductor with freezing, artifacts kept in the fleet home, batch sizes in buckets.

gpt-fast's main trick: the ~35 small ops of each layer (norms, RoPE, cache writes, SiLU, residuals) fuse into
a few C++ kernels, and with freezing the weights become constants that Inductor prepacks for oneDNN itself.
Three things make it usable where users are (`fleet generate`, the gateway):
- Inductor's caches (FX graph cache: generated code and compiled .so files) live under
  `fleet_home()/compile-cache`, so a second process skips code generation and the C++ compiler; Dynamo's
  tracing still runs in every process.
- `warm_up` compiles before the first request (Engine.load, LocalBackend start-up), and the time is reported
  apart, never inside a tokens/s figure.
- Batch sizes are padded up to a few buckets (1, 2, 4, 8, ...): the batch dimension is marked dynamic where
  the kernels allow it (then one graph serves 2..max), otherwise each bucket is one graph. Padding rows write
  only cache slot 0 of free rows, which the next prefill of such a row overwrites.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn

from fleetlm.engine.generate import decode_one_token

COMPILE_CACHE = "compile-cache"


def compile_cache_dir() -> Path:
    """Where Inductor keeps its artifacts: `$TORCHINDUCTOR_CACHE_DIR` if set, else the fleet home's cache."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its default (a temp dir) into the variable at first use: that one is not a choice
    if given and os.path.abspath(given) != os.path.abspath(default_cache_dir()):
        return Path(given)
    from fleetlm.catalog import fleet_home

    return fleet_home() / COMPILE_CACHE


def use_compile_cache() -> Path:
    """Point Inductor's on-disk caches at compile_cache_dir() (before the first compile) and make sure the FX
    graph cache is on; returns the directory."""
    import torch._inductor.config as inductor_config

    path = compile_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)  # read by Inductor at each use, not at import
    inductor_config.fx_graph_cache = True
    return path


def batch_bucket(batch: int, limit: int) -> int:
    """The smallest power of two >= batch, capped at limit (the cache's rows): the padded batch size."""
    bucket = 1
    while bucket < batch:
        bucket *= 2
    return max(batch, min(bucket, limit))


class CompiledDecodeStep:
    """decode_one_token through torch.compile; call it as the engine's decode function (model, token, pos)."""

    def __init__(self) -> None:
        use_compile_cache()
        self._compiled = torch.compile(decode_one_token, dynamic=True)
        self.compile_seconds = 0.0  # spent in warm_up

    def __call__(self, model: nn.Module, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        batch = token.shape[0]
        rows = batch_bucket(batch, max(batch, int(getattr(model, "max_batch_size", batch))))
        if rows > batch:  # padding rows: token 0 at slot 0 of cache rows nobody uses
            token = torch.cat([token, token.new_zeros(rows - batch, 1)])
            input_pos = torch.cat([input_pos, input_pos.new_zeros(rows - batch, input_pos.shape[1])])
        if rows > 1:
            # one graph for every batch of 2+ rows where the kernels' shapes allow it (else per bucket)
            torch._dynamo.maybe_mark_dynamic(token, 0)
            torch._dynamo.maybe_mark_dynamic(input_pos, 0)
        # What depends on tensor values is read here, in eager mode, so the compiled step is one graph
        # (one guard check per step, not one per graph break). Several rows always take the masked variant:
        # all rows at one position is rare in a continuous batch, and a second variant would compile twice.
        kv_len = int(input_pos.max()) + 1
        unmasked = (rows == 1 and model.sees_all(input_pos, kv_len)) if hasattr(model, "sees_all") else None
        # The options are switched on around each call (compiling happens at the first calls); as
        # torch.compile options they were not applied (plain aten::mm, 68 ms a step instead of 50).
        # cpp_wrapper: the graph's ~170 kernel calls made from C++, not Python (bf16: 48-52 vs 55-57 ms).
        with inductor_config.patch(freezing=True, cpp_wrapper=True):
            logits = self._compiled(model, token, input_pos, kv_len, unmasked)
        return logits[:batch]

    @torch.inference_mode()
    def warm_up(self, model: nn.Module, batch_sizes: tuple[int, ...] = (1,)) -> float:
        """Compile for these batch sizes on the model's current caches (they must be the ones used later:
        Dynamo guards on the cache tensors); returns the seconds it took, also added to compile_seconds."""
        start = time.perf_counter()
        device = next(model.parameters()).device
        for batch in batch_sizes:
            batch = min(batch, int(model.max_batch_size))
            token = torch.zeros(batch, 1, dtype=torch.long, device=device)
            # two steps per variant: the first compiles, the second checks that nothing recompiles
            for step in (1, 2):
                pos = torch.full((batch, 1), step, dtype=torch.long, device=device)
                if batch > 1:
                    pos[0, 0] = 0  # rows at different positions: the masked variant a batch uses
                self(model, token, pos)
        spent = time.perf_counter() - start
        self.compile_seconds += spent
        return spent
