"""The compiled decode step: Inductor with freezing, artifacts kept in the fleet home, batch sizes in buckets.

gpt-fast's main trick: the ~35 small ops of each layer (norms, RoPE, cache writes, SiLU, residuals) fuse into
a few C++ kernels, and with freezing the weights become constants that Inductor prepacks for oneDNN itself.
Three things make it usable where users are (`fleet generate`, the gateway):
- Inductor's caches (FX graph cache: generated code and compiled .so files) live under
  `fleet_home()/compile-cache`, so a second process skips code generation and the C++ compiler; Dynamo's
  tracing still runs in every process.
- `warm_up` compiles before the first request (Engine.load, LocalBackend start-up), and the time is reported
  apart, never inside a tokens/s figure.
- The batch dimension is marked dynamic, so one graph serves every batch of 2..max rows (and one graph a
  single row). Our kernels' C++ shape functions (engine/kernels) read the batch size as a number, which
  fixed it: each power-of-two bucket compiled its own graph, minutes each on a real model, in the middle of
  serving; `symbolic_kernel_shapes` gives those ops shape functions that keep it symbolic. `warm_up` checks
  that a batch of 3 reuses the graph of 2; where it does not (a kernel that still fixes the size), batch
  sizes are padded up to power-of-two buckets (1, 2, 4, 8, ...), one graph each. Padding rows write only
  cache slot 0 of free rows, which the next prefill of such a row overwrites.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from fleetlm.engine.generate import decode_one_token

COMPILE_CACHE = "compile-cache"
_shape_library: torch.library.Library | None = None  # kept alive: dropping it would undo the registrations


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


def _int4_shape(x, weight, scales, bias, out_features: int, group: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


def _int8_shape(x, weight, scales, bias, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


def _bf16_shape(x, weight, bias, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


def symbolic_kernel_shapes() -> bool:
    """Register shape functions (Meta) for our kernels' linear ops that keep x's batch size symbolic, in place
    of their C++ ones (which specialize it); returns False when the kernels are not loaded. Idempotent."""
    global _shape_library
    if _shape_library is not None:
        return True
    ops = torch.ops.fleetlm_kernels
    try:
        [getattr(ops, name) for name in ("linear_int4", "linear_int8", "linear_bf16")]
    except (AttributeError, RuntimeError):  # the extension is not loaded (FLEET_KERNELS=0, no compiler)
        return False
    library = torch.library.Library("fleetlm_kernels", "IMPL")
    with warnings.catch_warnings():  # "overriding a previously registered kernel": that is the point
        warnings.simplefilter("ignore")
        for name, fn in (("linear_int4", _int4_shape), ("linear_int8", _int8_shape),
                         ("linear_bf16", _bf16_shape)):
            library.impl(name, fn, "Meta", allow_override=True)
    _shape_library = library
    return True


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
        symbolic_kernel_shapes()
        self._compiled = torch.compile(decode_one_token, dynamic=True)
        self.compile_seconds = 0.0  # spent in warm_up
        # True once warm_up saw a batch of 3 run on the graph of 2: then batches are not padded to buckets
        self.dynamic_batch = False

    def __call__(self, model: nn.Module, token: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        import torch._inductor.config as inductor_config

        batch = token.shape[0]
        limit = max(batch, int(getattr(model, "max_batch_size", batch)))
        rows = batch if self.dynamic_batch else batch_bucket(batch, limit)
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
        for batch in batch_sizes:
            self._run_warm(model, min(batch, int(model.max_batch_size)))
        if 2 in batch_sizes and int(model.max_batch_size) >= 3 and not self.dynamic_batch:
            self.dynamic_batch = self._batch_is_dynamic(model)
        spent = time.perf_counter() - start
        self.compile_seconds += spent
        return spent

    def _run_warm(self, model: nn.Module, batch: int) -> None:
        device = next(model.parameters()).device
        token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        # two steps per variant: the first compiles, the second checks that nothing recompiles
        for step in (1, 2):
            pos = torch.full((batch, 1), step, dtype=torch.long, device=device)
            if batch > 1:
                pos[0, 0] = 0  # rows at different positions: the masked variant a batch uses
            self(model, token, pos)

    def _batch_is_dynamic(self, model: nn.Module) -> bool:
        """Run 3 rows unpadded after the graph of 2 exists: no new graph means one graph serves 2..max."""
        from torch._dynamo.utils import counters

        graphs = counters["stats"]["unique_graphs"]
        self.dynamic_batch = True
        try:
            self._run_warm(model, 3)
        finally:
            self.dynamic_batch = False
        return counters["stats"]["unique_graphs"] == graphs
