"""Automatic bit widths: each tensor's sensitivity (KL of the next-token distribution against the float model
when only that tensor is quantized), a choice of widths for a target size (`--target-bpw`) or a quality budget
(`--max-kl`), and the chosen mix quantized with any method (rtn, gptq, awq, hqq).

- Sensitivity is measured with RTN (or HQQ) on calibration windows, not with the final method: GPTQ would
  cost a Hessian per tensor per width. The prediction for a mix is the sum of its tensors' KLs (additive to
  first order for small, independent perturbations); `compress_mixed_to_dir` measures the real KL of the
  mix on the same windows and records both.
- Sizes are what the files hold: a width's codes plus a float16 scale (and, at 4/3 bits, offset) per group,
  so at group 32 they are exactly GGUF's Q8_0 (8.5 bits a weight) and Q4_1 (5.0); 3-bit codes travel in
  4-bit containers, so 3 bits cost what 4 bits do and never win; float16 ("keep") is 16.
- The mix may hold the embeddings and lm_head (llama.cpp's file types quantize them too), so that sizes
  compare as whole files.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fleetlm.compress.calib import LINEARS, SHARED_INPUT, _run_block
from fleetlm.compress.grid import BITS, CompressError, QuantizedWeight, check_group, rtn

KEEP = 16  # the "width" of a tensor left in float16
SENSITIVITY = "sensitivity.json"
KL_CHUNK = 64  # token positions per log-softmax over the vocabulary (bounds [tokens, V] float32 memory)


@dataclass
class Choice:
    """The widths picked per tensor, with their predicted summed KL and bits per weight."""

    bits: dict[str, int]
    predicted_kl: float
    bpw: float


# --------------------------------------------------------------------------------------------- tensors


def mix_tensors(model: nn.Module, embeddings: bool = True) -> list[str]:
    """The tensors a mix chooses widths for: every block linear, then (embeddings) embed_tokens and, unless
    tied to it, lm_head."""
    names = [f"layers.{i}.{n}" for i in range(len(model.layers)) for n in LINEARS]
    if embeddings:
        names.append("embed_tokens")
        if not model.config.tie_word_embeddings:
            names.append("lm_head")
    return names


def tensor_weight(model: nn.Module, name: str) -> torch.Tensor:
    return model.get_submodule(name).weight


def size_bits(shape: tuple[int, int], bits: int, group: int, sym: bool = False) -> int:
    """Bits a [N, K] tensor takes at `bits` (QuantizedWeight.nbytes' layout), or in float16 (KEEP)."""
    n, k = shape
    if bits == KEEP:
        return 16 * n * k
    code = 8 if bits == 8 else 4  # 3-bit codes in 4-bit containers
    per_group = 16 if bits == 8 or sym else 32  # float16 d (and m)
    return n * k * code + n * (k // group) * per_group


def _quantize(w: torch.Tensor, bits: int, group: int, sym: bool, quantizer: str) -> QuantizedWeight:
    if quantizer == "hqq":
        from fleetlm.compress.hqq import hqq

        return hqq(w, bits, group, sym=sym)
    return rtn(w, bits, group, sym)


# --------------------------------------------------------------------------------------------- sensitivity


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)


def kl_divergence(ref_logp: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over token positions of KL(p_ref || p): reference log-probs [P, V], logits [..., V]."""
    flat = logits.float().reshape(-1, logits.shape[-1])
    total = 0.0
    for i in range(0, flat.shape[0], KL_CHUNK):
        ref = ref_logp[i : i + KL_CHUNK]
        logp = torch.log_softmax(flat[i : i + KL_CHUNK], dim=-1)
        total += float((ref.exp() * (ref - logp)).sum())
    return max(total / flat.shape[0], 0.0)


class _Runner:
    """The float model's hidden states at each block's input on fixed windows, so that quantizing a tensor
    of block i reruns only blocks i.. and the head."""

    def __init__(self, model: nn.Module, windows: torch.Tensor) -> None:
        from fleetlm.model.decoder import rope_cos_sin

        self.model, self.windows = model, windows
        dtype = model.embed_tokens.weight.dtype
        pos = torch.arange(windows.shape[1])[None]
        self.cos, self.sin = rope_cos_sin(model.inv_freq, pos, dtype)
        x = model.embed_tokens(windows)
        self.inputs = []
        for block in model.layers:
            self.inputs.append(x)
            x = _run_block(block, x, self.cos, self.sin)
        self.final = model.norm(x)
        self.ref = _log_probs(model.lm_head(self.final))

    def logits_from(self, start: int, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.inputs[start] if x is None else x
        for block in list(self.model.layers)[start:]:
            x = _run_block(block, x, self.cos, self.sin)
        return self.model.lm_head(self.model.norm(x))

    def logits_with(self, name: str) -> torch.Tensor:
        """Logits with the model as it is now, knowing that only tensor `name` changed."""
        if name == "lm_head":
            return self.model.lm_head(self.final)
        if name == "embed_tokens":
            return self.logits_from(0, self.model.embed_tokens(self.windows))
        return self.logits_from(int(name.split(".")[1]))


def _cache_key(windows: torch.Tensor, group: int, sym: bool, quantizer: str) -> dict[str, Any]:
    return {"group": group, "sym": sym, "quantizer": quantizer, "windows": list(windows.shape),
            "tokens_sum": int(windows.sum())}


def _mse(w: torch.Tensor, bits: int, group: int, sym: bool, quantizer: str) -> float:
    return float(((_quantize(w, bits, group, sym, quantizer).dequantize() - w.float()) ** 2).mean())


@torch.no_grad()
def sensitivity(model: nn.Module, windows: torch.Tensor, widths: Iterable[int] = (8, 4), group: int = 32,
                *, sym: bool = False, quantizer: str = "rtn", tensors: list[str] | None = None,
                scaled: Iterable[int] = (), cache: Path | None = None,
                progress: bool = False) -> dict[str, dict[int, float]]:
    """KL (mean per token, nats) of each tensor at each width, all other tensors float: {name: {bits: kl}}.

    windows [n, T] calibration token ids. scaled: widths not measured but derived from the lowest measured
    one as KL x (weight MSE at that width / weight MSE at the measured one): the second-order estimate
    (KL ~ a quadratic form in the weight error, rounding noise of the same shape), for half the forwards.
    cache: a JSON file read first (entries measured with the same settings are kept) and rewritten after
    each tensor, so a run cut short resumes."""
    widths = sorted(set(widths), reverse=True)
    scaled = sorted(set(scaled) - set(widths), reverse=True)
    for b in [*widths, *scaled]:
        if b not in BITS:
            raise CompressError(f"sensitivity widths must be among {', '.join(map(str, BITS))}, got {b}")
    if quantizer not in ("rtn", "hqq"):
        raise CompressError(f"sensitivity is measured with rtn or hqq, not {quantizer!r}")
    names = tensors if tensors is not None else mix_tensors(model)
    for name in names:
        check_group(group, tensor_weight(model, name).shape[1])
    key = _cache_key(windows, group, sym, quantizer)
    table: dict[str, dict[int, float]] = {}
    if cache is not None and cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            table = {n: {int(b): kl for b, kl in v.items()} for n, v in stored["table"].items()}
    todo = [n for n in names if any(b not in table.get(n, {}) for b in widths)]
    runner = _Runner(model, windows) if todo else None
    items: Iterable[str] = todo
    if progress:
        from tqdm import tqdm

        desc = f"sensitivity ({quantizer}, {'/'.join(map(str, widths))} bits)"
        items = tqdm(todo, desc=desc, unit="tensor")
    for name in items:
        weight = tensor_weight(model, name)
        original = weight.data
        row = table.setdefault(name, {})
        try:
            for b in widths:
                if b in row:
                    continue
                weight.data = _quantize(original, b, group, sym, quantizer).dequantize().to(original.dtype)
                assert runner is not None
                row[b] = kl_divergence(runner.ref, runner.logits_with(name))
        finally:
            weight.data = original
        if cache is not None:
            _write_cache(cache, key, table)
    out = {n: {b: table[n][b] for b in widths} for n in names}
    low = min(widths)
    for name in names:  # derived each time, never cached: the cache holds measurements only
        w = tensor_weight(model, name)
        ref = _mse(w, low, group, sym, quantizer) if scaled else 0.0
        for b in scaled:
            out[name][b] = out[name][low] * _mse(w, b, group, sym, quantizer) / ref if ref > 0 else 0.0
    return out


def _write_cache(cache: Path, key: dict[str, Any], table: dict[str, dict[int, float]]) -> None:
    cache.write_text(json.dumps({"key": key, "table": {n: {str(b): kl for b, kl in v.items()}
                                                            for n, v in table.items()}}, indent=0))


# --------------------------------------------------------------------------------------------- choice


def _hull(options: list[tuple[int, int, float]]) -> list[tuple[int, int, float]]:
    """(bits, size, kl) options of one tensor on their lower convex hull, by size: the ones a greedy
    trade of size for KL can reach in order (dominated ones, e.g. 3 bits at 4 bits' size, drop out)."""
    best: dict[int, tuple[int, int, float]] = {}
    for opt in options:  # one option per size: the lowest KL
        if opt[1] not in best or opt[2] < best[opt[1]][2]:
            best[opt[1]] = opt
    pts: list[tuple[int, int, float]] = []
    for opt in sorted(best.values(), key=lambda o: o[1]):
        if pts and opt[2] >= pts[-1][2]:
            continue  # bigger and no better
        while len(pts) >= 2:
            (_, s1, k1), (_, s2, k2) = pts[-2], pts[-1]
            # drop the middle point if it lies above the line from pts[-2] to opt
            if (k2 - k1) * (opt[1] - s1) >= (opt[2] - k1) * (s2 - s1):
                pts.pop()
            else:
                break
        pts.append(opt)
    return pts


def choose_bits(table: dict[str, dict[int, float]], shapes: dict[str, tuple[int, int]], group: int, *,
                target_bpw: float | None = None, max_kl: float | None = None, sym: bool = False,
                keep: bool = True) -> Choice:
    """Widths per tensor: the smallest summed KL within `target_bpw` bits a weight (over the mix's tensors,
    scales and offsets counted), or the smallest size whose summed KL is at most `max_kl`.

    Greedy on each tensor's convex hull of (size, KL): every tensor starts at its smallest option, then the
    upgrade with the most KL saved per extra bit is taken next (an upgrade that would pass the target is
    skipped, and that tensor stops there). keep: float16 (KL 0) is an option too."""
    if (target_bpw is None) == (max_kl is None):
        raise CompressError("give exactly one of --target-bpw and --max-kl")
    if max_kl is not None and not (max_kl >= 0 and math.isfinite(max_kl)):
        raise CompressError(f"--max-kl must be a number >= 0, got {max_kl}")
    if not table:
        raise CompressError("no tensors to choose widths for")
    hulls: dict[str, list[tuple[int, int, float]]] = {}
    numel = 0
    for name, row in table.items():
        shape = shapes[name]
        numel += shape[0] * shape[1]
        opts = [(b, size_bits(shape, b, group, sym), kl) for b, kl in row.items()]
        if keep:
            opts.append((KEEP, size_bits(shape, KEEP, group, sym), 0.0))
        hulls[name] = _hull(opts)
    at = {name: 0 for name in hulls}
    used = sum(h[0][1] for h in hulls.values())
    kl = sum(h[0][2] for h in hulls.values())
    if target_bpw is not None:
        budget = target_bpw * numel
        top = sum(h[-1][1] for h in hulls.values())
        if not math.isfinite(target_bpw) or budget < used or budget > top:
            raise CompressError(f"--target-bpw must be between {used / numel:.3f} and {top / numel:.3f} "
                                f"bits a weight for these widths, got {target_bpw}")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            heapq.heappush(heap, (-(h[i][2] - h[i + 1][2]) / (h[i + 1][1] - h[i][1]), name))

    for name in hulls:
        push(name)
    while heap:
        if max_kl is not None and kl <= max_kl:
            break
        _, name = heapq.heappop(heap)
        h, i = hulls[name], at[name]
        extra = h[i + 1][1] - h[i][1]
        if target_bpw is not None and used + extra > budget:
            continue  # does not fit; smaller upgrades of other tensors may
        at[name] = i + 1
        used += extra
        kl += h[i + 1][2] - h[i][2]
        push(name)
    if max_kl is not None and kl > max_kl + 1e-12:
        raise CompressError(f"--max-kl {max_kl} is below the smallest predicted KL of these widths "
                            f"({kl:.4g}); allow float16 or a larger budget")
    return Choice({n: hulls[n][i][0] for n, i in at.items()}, kl, used / numel)


# --------------------------------------------------------------------------------------------- quantization


@torch.no_grad()
def compress_mixed(model: nn.Module, widths: dict[str, int], method: str, group: int,
                   calib: torch.Tensor | None = None, *, sym: bool = False, act_order: bool = True,
                   progress: bool = False) -> dict[str, QuantizedWeight]:
    """Quantize `model` in place, each tensor of `widths` at its width (KEEP: left float) with `method`.

    Block linears: rtn/hqq per tensor; gptq per tensor on the Hessian of the inputs each block really gets
    (as calib.compress_model); awq's scale search at the block's lowest width, then RTN at each tensor's.
    embed_tokens and lm_head: RTN (HQQ with hqq) before and after the blocks."""
    from fleetlm.compress.calib import METHODS, _progress, _set_weight

    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if method in ("gptq", "awq") and (calib is None or calib.numel() == 0):
        raise CompressError(f"{method} needs calibration text (--calib)")
    codes: dict[str, QuantizedWeight] = {}
    side = "hqq" if method == "hqq" else "rtn"

    def plain(name: str) -> None:
        b = widths.get(name, KEEP)
        if b == KEEP:
            return
        lin = model.get_submodule(name)
        qw = _quantize(lin.weight, b, group, sym, side)
        _set_weight(lin, qw)
        codes[name] = qw

    plain("embed_tokens")
    layers = list(model.layers)
    if method in ("rtn", "hqq"):
        for i, _block in enumerate(_progress(layers, f"{method} mixed", progress)):
            for name in LINEARS:
                plain(f"layers.{i}.{name}")
    else:
        from fleetlm.model.decoder import rope_cos_sin

        dtype = model.embed_tokens.weight.dtype
        x = model.embed_tokens(calib).to(dtype)
        cos, sin = rope_cos_sin(model.inv_freq, torch.arange(calib.shape[1])[None], dtype)
        for i, block in enumerate(_progress(layers, f"{method} mixed", progress)):
            mine = {n: widths.get(f"layers.{i}.{n}", KEEP) for n in LINEARS}
            if method == "gptq":
                _gptq_block(block, x, cos, sin, mine, group, sym, act_order, i, codes)
            else:
                _awq_block(block, x, cos, sin, mine, group, sym, i, codes)
            x = _run_block(block, x, cos, sin)
    if not model.config.tie_word_embeddings:
        plain("lm_head")
    return codes


def _gptq_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                widths: dict[str, int], group: int, sym: bool, act_order: bool, index: int,
                codes: dict[str, QuantizedWeight]) -> None:
    from fleetlm.compress.calib import _set_weight
    from fleetlm.compress.gptq import Hessian, gptq

    wanted = [n for n in LINEARS if widths[n] != KEEP]
    readers = sorted({SHARED_INPUT.get(n, n) for n in wanted})
    hessians = {n: Hessian(block.get_submodule(n).in_features) for n in readers}
    hooks = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: hessians[n].add(args[0])) for n in readers]
    try:
        _run_block(block, x, cos, sin)
    finally:
        for h in hooks:
            h.remove()
    for name in wanted:
        lin = block.get_submodule(name)
        qw = gptq(lin.weight, hessians[SHARED_INPUT.get(name, name)].h, widths[name], group, sym=sym,
                  act_order=act_order)
        _set_weight(lin, qw)
        codes[f"layers.{index}.{name}"] = qw


def _awq_block(block: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               widths: dict[str, int], group: int, sym: bool, index: int,
               codes: dict[str, QuantizedWeight]) -> None:
    from fleetlm.compress.awq import apply_awq, scale_pairs
    from fleetlm.compress.calib import AWQ_TOKENS, _set_weight

    wanted = [n for n in LINEARS if widths[n] != KEEP]
    if not wanted:
        return
    stride = max(1, x.shape[0] * x.shape[1] // AWQ_TOKENS)
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for pair, _prev, _linears, reader in scale_pairs(block):
        captured[pair] = []
        hooks.append(reader.register_forward_pre_hook(
            lambda _m, args, p=pair: captured[p].append(args[0].reshape(-1, args[0].shape[-1])[::stride])))
    try:
        _run_block(block, x, cos, sin)
    finally:
        for h in hooks:
            h.remove()
    # folding keeps the float function, so float16 tensors stay exact; the search targets the lowest width
    apply_awq(block, {p: torch.cat(v) for p, v in captured.items()}, min(widths[n] for n in wanted), group,
              sym)
    for name in wanted:
        lin = block.get_submodule(name)
        qw = rtn(lin.weight, widths[name], group, sym)
        _set_weight(lin, qw)
        codes[f"layers.{index}.{name}"] = qw


# --------------------------------------------------------------------------------------------- end to end


@torch.no_grad()
def measured_kl(ref: nn.Module, model: nn.Module, windows: torch.Tensor) -> float:
    """KL(ref || model) per token on windows, whole models (the check on a mix's predicted KL)."""
    total = 0.0
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        total += kl_divergence(_log_probs(ref(ids)), model(ids))
    return total / windows.shape[0]


def compress_mixed_to_dir(ref: str | Path, out: str | Path, *, target_bpw: float | None = None,
                          max_kl: float | None = None, method: str = "gptq", group: int = 32,
                          calib: list[Path] | None = None, samples: int = 128, seq_len: int = 256,
                          sens_samples: int = 4, sens_len: int = 64, widths: Iterable[int] = (8, 4),
                          sensitivity_quantizer: str = "rtn", embeddings: bool = True, keep: bool = True,
                          sym: bool = False, act_order: bool = True,
                          progress: bool = False) -> dict[str, Any]:
    """`fleet compress --target-bpw/--max-kl`: sensitivity (cached in out/sensitivity.json), choice, the mix
    quantized with `method`, its measured KL against the prediction, written in compress/store.py's layout."""
    import copy
    import time

    from fleetlm.compress.calib import METHODS
    from fleetlm.compress.pipeline import calibration_windows, load_float_model
    from fleetlm.compress.store import save_compressed

    if method not in METHODS:
        raise CompressError(f"unknown method {method!r}: choose one of {', '.join(METHODS)}")
    if (target_bpw is None) == (max_kl is None):
        raise CompressError("give exactly one of --target-bpw and --max-kl")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressError(f"--out {out} exists and is not a directory")
    model, tokenizer = load_float_model(ref)
    names = mix_tensors(model, embeddings)
    for name in names:
        check_group(group, tensor_weight(model, name).shape[1])
    # the sensitivity windows are the calibration text's first sens_samples windows (never the eval text)
    sens = calibration_windows(tokenizer, calib, sens_samples, sens_len)
    windows = calibration_windows(tokenizer, calib, samples, seq_len) if method in ("gptq", "awq") else None
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    table = sensitivity(model, sens, widths, group, sym=sym, quantizer=sensitivity_quantizer, tensors=names,
                        cache=out / SENSITIVITY, progress=progress)
    sens_s = time.perf_counter() - start
    shapes = {n: tuple(tensor_weight(model, n).shape) for n in names}
    choice = choose_bits(table, shapes, group, target_bpw=target_bpw, max_kl=max_kl, sym=sym, keep=keep)
    base = copy.deepcopy(model)
    start = time.perf_counter()
    codes = compress_mixed(model, choice.bits, method, group, windows, sym=sym, act_order=act_order,
                           progress=progress)
    quant_s = time.perf_counter() - start
    if not codes:
        raise CompressError("the choice keeps every tensor in float16: nothing to quantize")
    kl = measured_kl(base, model, sens)
    del base
    chosen = list(choice.bits.values())
    counts = {str(b): chosen.count(b) for b in sorted(set(chosen))}
    mix = {"target_bpw": target_bpw, "max_kl": max_kl, "bpw": round(choice.bpw, 4),
           "predicted_kl": choice.predicted_kl, "measured_kl": kl, "tensors_by_bits": counts,
           "kept_f16": sorted(n for n, b in choice.bits.items() if b == KEEP),
           "sensitivity": {"quantizer": sensitivity_quantizer, "widths": sorted(set(widths)),
                           "windows": [sens_samples, sens_len], "seconds": round(sens_s, 1)}}
    meta = {"method": method, "source": str(ref), "seconds": round(quant_s, 1), "mix": mix,
            "calibration": None if windows is None else {
                "paths": [str(p) for p in (calib or [])] or "default", "samples": samples,
                "seq_len": seq_len},
            "act_order": act_order if method == "gptq" else None}
    save_compressed(model, codes, tokenizer, out, meta)
    return {"out": out, "choice": choice, "measured_kl": kl, "sensitivity_s": sens_s, "quant_s": quant_s,
            "codes_mib": sum(q.nbytes() for q in codes.values()) / 2**20}
