"""Pruning: magnitude, Wanda and SparseGPT, unstructured or N:M (2:4), alone or followed by RTN/GPTQ.

What each method keeps (the comparison group is one output row everywhere, so every row ends exactly at the
asked sparsity):
- magnitude: the largest |W_ij| of each row (per row, not per tensor);
- Wanda (Sun et al., 2023): the largest |W_ij| * ||X_j||_2 of each row, X the inputs the block really gets;
- SparseGPT (Frantar & Alistarh, 2023): the OBS column loop of GPTQ with pruning as the "quantizer": in each
  block of 128 columns the mask is picked from w^2 / [U]_ii^2 (U the upper Cholesky factor of H^-1), then
  every column's removed weights are compensated on the columns not yet visited; N:M masks are picked every
  M columns from the weights as they are by then. Joint mode (SparseGPT + GPTQ): the same loop quantizes the
  kept weights too, so pruning and rounding errors are compensated together.
N:M means N nonzeros kept in every M consecutive input weights of a row (2:4: half of them).

Calibration is sequential as in calib.py: each block's statistics come from the outputs of the blocks before
it, already pruned (and quantized). Only one block's Hessians are alive at a time.

Quantizing after pruning must keep the zeros exactly zero: the grids here always hold 0 exactly (8-bit and
symmetric grids do by construction; the asymmetric one is a zero-point grid, m = -z d with d trimmed to 7
significant bits so z d is exact in float16), and pruned weights get the zero code. With GPTQ the pruned
weights are masked out of the error update: their value is pinned to 0 and their whole error is pushed onto
the kept weights, as SparseGPT's joint mode does.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fleetlm.compress.calib import LINEARS, SHARED_INPUT, _progress, _run_block
from fleetlm.compress.grid import CompressError, QuantizedWeight, check_bits, check_group, code_range

PRUNERS = ("magnitude", "wanda", "sparsegpt")
QUANT_AFTER = ("rtn", "gptq")  # quantizers that keep the mask (HQQ moves offsets, AWQ not wired: not here)
BLOCK = 128  # SparseGPT's columns per lazy update and per unstructured mask
META = "pruning.json"


@dataclass
class Sparsity:
    """The fraction of weights zeroed, and for N:M patterns n kept of every m (n = m = 0: unstructured)."""

    fraction: float
    n: int = 0
    m: int = 0

    @property
    def structured(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.structured else f"{self.fraction:g}"


def parse_sparsity(text: str | float) -> Sparsity:
    """"0.5" (unstructured, a fraction in (0, 1)) or "2:4" (n kept of every m, 0 < n < m)."""
    s = str(text).strip()
    nm = re.fullmatch(r"(\d+):(\d+)", s)
    if nm:
        n, m = int(nm[1]), int(nm[2])
        if not 0 < n < m:
            raise CompressError(f"--sparsity {s}: N:M needs 0 < N < M (N nonzeros kept of every M)")
        return Sparsity(1 - n / m, n, m)
    try:
        frac = float(s)
    except ValueError:
        raise CompressError(f"--sparsity {s!r}: give a fraction like 0.5 or a pattern like 2:4") from None
    if not 0 < frac < 1:
        raise CompressError(f"--sparsity {s}: the fraction of weights pruned must be in (0, 1)")
    return Sparsity(frac)


@dataclass
class QuantAfter:
    """Quantization after (or, for SparseGPT + GPTQ, jointly with) pruning."""

    method: str
    bits: int = 4
    group: int = 64
    sym: bool = False


# ------------------------------------------------------------------------------------------------ masks


def _lowest(score: torch.Tensor, count: int) -> torch.Tensor:
    """Mask (True = pruned) of the `count` lowest scores of each row of score [N, C]."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    if count > 0:
        mask.scatter_(1, torch.topk(score, count, dim=1, largest=False).indices, True)
    return mask


def score_mask(score: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    """Mask (True = pruned) of the lowest scores: round(fraction * K) per row, or m - n per m columns."""
    n_rows, k = score.shape
    if sp.structured:
        if k % sp.m:
            raise CompressError(f"input width {k} is not a multiple of {sp.m} ({sp})")
        groups = score.reshape(n_rows * (k // sp.m), sp.m)
        return _lowest(groups, sp.m - sp.n).reshape(n_rows, k)
    return _lowest(score, round(sp.fraction * k))


def magnitude_mask(w: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    return score_mask(w.abs().float(), sp)


def wanda_mask(w: torch.Tensor, sumsq: torch.Tensor, sp: Sparsity) -> torch.Tensor:
    """Wanda's mask: score |W_ij| * ||X_j||_2; sumsq [K] the inputs' sum of squares per channel."""
    return score_mask(w.abs().float() * sumsq.float().sqrt()[None], sp)


# ------------------------------------------------------------------------------------------------ grids


def _trim(d: torch.Tensor) -> torch.Tensor:
    """d rounded up to 7 significant bits and at least 2^-14, so z * d (z < 16) is exact in float16."""
    d = d.clamp(min=2.0**-14)
    e = torch.floor(torch.log2(d)) - 6
    return torch.ceil(d / 2.0**e) * 2.0**e


def zero_grid(w: torch.Tensor, bits: int, group: int, sym: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid (d, m) [N, K / group] for w [N, K] whose codes include an exact 0, float16-exact."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    if bits == 8:
        d = (g.abs().amax(-1) / 127.0).half().float()
        return torch.where(d == 0, torch.full_like(d, 2.0**-14), d), torch.zeros(n, k // group)
    if sym:
        half = 2 ** (bits - 1)
        idx = g.abs().argmax(-1, keepdim=True)
        d = (g.gather(-1, idx).squeeze(-1) / -half).half().float()
        d = torch.where(d == 0, torch.full_like(d, 2.0**-14), d)
        return d, -half * d  # code `half` is exactly 0
    top = 2**bits - 1
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    d = _trim((hi - lo) / top)
    z = torch.round(-lo / d).clamp(0, top)
    return d, -z * d


def zero_codes(d: torch.Tensor, m: torch.Tensor, bits: int) -> torch.Tensor:
    """The code that stands for 0 under each grid (d, m)."""
    if bits == 8:
        return torch.zeros_like(d)
    return torch.round(-m / d)


def _codes(w: torch.Tensor, mask: torch.Tensor, d: torch.Tensor, m: torch.Tensor, z: torch.Tensor,
           bits: int) -> torch.Tensor:
    """Nearest codes for w [N, C] under grids d, m, z [N, C]; pruned entries get the zero code."""
    lo, hi = code_range(bits)
    q = torch.round((w - m) / d).clamp(lo, hi)
    return torch.where(mask, z, q)


def _expand(t: torch.Tensor, group: int) -> torch.Tensor:
    return t.repeat_interleave(group, dim=1)


def quantize_masked(w: torch.Tensor, mask: torch.Tensor, bits: int, group: int,
                    sym: bool = False) -> QuantizedWeight:
    """Round-to-nearest on a zero grid, pruned entries on the zero code (they dequantize to exactly 0)."""
    check_bits(bits)
    check_group(group, w.shape[1])
    w = w.float().masked_fill(mask, 0.0)
    d, m = zero_grid(w, bits, group, sym)
    q = _codes(w, mask, _expand(d, group), _expand(m, group), _expand(zero_codes(d, m, bits), group), bits)
    return QuantizedWeight(q.to(torch.int16), d, m, bits, group, sym)


# ------------------------------------------------------------------------------------------------ SparseGPT


def inverse_upper(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(U float32 upper with U^T U = (H + damp mean(diag H) I)^-1, dead inputs) for the OBS loop.

    One Cholesky and one triangular inverse instead of gptq.py's Cholesky, inverse and Cholesky again (13x
    faster at K = 1536 here): with J the flip, J H J = L L^T gives H^-1 = V^T V for V = J L^-1 J, upper."""
    H = h.double().clone()
    dead = H.diagonal() == 0  # inputs always 0: their weights do nothing; pin them to 0 (they score lowest)
    H[dead, dead] = 1.0
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    base = float(H.diagonal().mean()) or 1.0
    for factor in (damp, damp * 10, damp * 100, 1.0):
        lower, info = torch.linalg.cholesky_ex((H + factor * base * eye).flip(0, 1))
        if int(info) == 0:
            inv = torch.linalg.solve_triangular(lower, eye, upper=False)
            return inv.flip(0, 1).float(), dead
    raise ValueError("the Hessian is not positive definite even after dampening")


@torch.no_grad()
def sparsegpt(w: torch.Tensor, h: torch.Tensor | tuple[torch.Tensor, torch.Tensor], sp: Sparsity | None, *,
              mask: torch.Tensor | None = None, quant: QuantAfter | None = None, damp: float = 0.01,
              block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor, QuantizedWeight | None]:
    """The OBS column loop on w [N, K] with inputs' Hessian h [K, K] (or inverse_upper(h) already made, for
    linears that share inputs): (new weight, mask, codes or None).

    mask None: SparseGPT picks it (adaptive, per block of columns, or every m columns for N:M); a given mask
    is kept as it is (GPTQ after magnitude/Wanda, with the pruned weights pinned to 0). quant: the kept
    weights are quantized in the same loop (grids fitted lazily per group, GPTQ without act-order)."""
    n, k = w.shape
    U, dead = h if isinstance(h, tuple) else inverse_upper(h, damp)
    if U.shape != (k, k):
        raise ValueError(f"Hessian is {tuple(U.shape)}, expected ({k}, {k})")
    if mask is None and sp is None:
        raise ValueError("give a sparsity or a mask")
    if sp is not None and sp.structured and k % sp.m:
        raise CompressError(f"input width {k} is not a multiple of {sp.m} ({sp})")
    if quant is not None:
        check_bits(quant.bits)
        check_group(quant.group, k)
        if block % quant.group:
            raise ValueError(f"block {block} must be a multiple of group {quant.group}")
    W = w.detach().float().clone()
    W[:, dead] = 0.0
    fixed = mask is not None
    M = mask.clone() if fixed else torch.zeros(n, k, dtype=torch.bool)
    out = torch.zeros_like(W)
    groups = k // quant.group if quant else 0
    Q = torch.zeros(n, k, dtype=torch.int16) if quant else None
    d_all, m_all = torch.zeros(n, groups), torch.zeros(n, groups)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thousands of small ops (as gptq.py): a second thread costs more than it gives
    try:
        for b0 in range(0, k, block):
            b1 = min(b0 + block, k)
            W1, U1 = W[:, b0:b1].clone(), U[b0:b1, b0:b1]
            diag = U1.diagonal()
            E1 = torch.zeros_like(W1)
            if not fixed and not sp.structured:
                # exact per row overall: this block's share is the difference of the rounded running totals
                count = round(sp.fraction * b1) - round(sp.fraction * b0)
                M[:, b0:b1] = _lowest(W1**2 / diag[None] ** 2, count)
            for i in range(b1 - b0):
                col = b0 + i
                if not fixed and sp.structured and i % sp.m == 0:
                    M[:, col : col + sp.m] = _lowest(W1[:, i : i + sp.m] ** 2 / diag[None, i : i + sp.m] ** 2,
                                                     sp.m - sp.n)
                x, pruned = W1[:, i], M[:, col]
                if quant is not None:
                    if col % quant.group == 0:
                        g = col // quant.group
                        span = W1[:, i : i + quant.group].masked_fill(M[:, col : col + quant.group], 0.0)
                        d, m = zero_grid(span, quant.bits, quant.group, quant.sym)
                        d_all[:, g], m_all[:, g] = d[:, 0], m[:, 0]
                    g = col // quant.group
                    d, m = d_all[:, g], m_all[:, g]
                    q = _codes(x, pruned, d, m, zero_codes(d, m, quant.bits), quant.bits)
                    Q[:, col] = q.to(torch.int16)
                    val = q * d + m
                else:
                    val = x.masked_fill(pruned, 0.0)
                out[:, col] = val
                err = (x - val) / U1[i, i]
                W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
                E1[:, i] = err
            W[:, b1:] -= E1 @ U[b0:b1, b1:]
    finally:
        torch.set_num_threads(threads)
    qw = None
    if quant is not None:
        qw = QuantizedWeight(Q, d_all, m_all, quant.bits, quant.group, quant.sym)
        out = qw.dequantize()
    return out, M, qw


# ------------------------------------------------------------------------------------------------ model


class _Stats:
    """A linear's inputs: sum of squares per channel (Wanda), and H = 2/n X^T X if asked (SparseGPT, GPTQ)."""

    def __init__(self, in_features: int, hessian: bool) -> None:
        from fleetlm.compress.gptq import Hessian

        self.sumsq = torch.zeros(in_features, dtype=torch.float64)
        self.hessian = Hessian(in_features) if hessian else None
        self._upper: tuple[torch.Tensor, torch.Tensor] | None = None

    def upper(self) -> tuple[torch.Tensor, torch.Tensor]:
        """inverse_upper of the Hessian, made once for all the linears that read these inputs."""
        if self._upper is None:
            self._upper = inverse_upper(self.hessian.h)
        return self._upper

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sumsq += (x * x).sum(0).double()
        if self.hessian is not None:
            self.hessian.add(x)


def _check(method: str, sp: Sparsity, quant: QuantAfter | None, model: nn.Module) -> None:
    if method not in PRUNERS:
        raise CompressError(f"unknown pruning method {method!r}: choose one of {', '.join(PRUNERS)}")
    if quant is not None:
        if quant.method not in QUANT_AFTER:
            raise CompressError(f"--method {quant.method} after pruning: choose one of "
                                f"{', '.join(QUANT_AFTER)} (their grids keep pruned weights at exactly 0)")
        check_bits(quant.bits)
    for name in LINEARS:
        lin = model.layers[0].get_submodule(name) if len(model.layers) else None
        if not isinstance(lin, nn.Linear):
            raise CompressError(f"layer 0 has no plain linear {name} (a fused or MoE model?)")
        if sp.structured and lin.in_features % sp.m:
            raise CompressError(f"{name}'s input width {lin.in_features} is not a multiple of {sp.m} ({sp})")
        if quant is not None:
            check_group(quant.group, lin.in_features)


def needs_calibration(method: str, quant: QuantAfter | None) -> bool:
    return method != "magnitude" or (quant is not None and quant.method == "gptq")


@torch.no_grad()
def prune_model(model: nn.Module, method: str, sp: Sparsity, calib: torch.Tensor | None = None, *,
                quant: QuantAfter | None = None,
                progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, QuantizedWeight]]:
    """Prune (and quantize) every block linear of a float model in place: (masks, codes) by module name
    ("layers.3.mlp.down_proj"; masks True where pruned; codes empty without quant). Embeddings, norms and
    lm_head stay dense and float. calib [n, T] token ids: needed by wanda, sparsegpt and by gptq after."""
    _check(method, sp, quant, model)
    masks: dict[str, torch.Tensor] = {}
    codes: dict[str, QuantizedWeight] = {}
    desc = f"{method} {sp}" + (f" + {quant.method} {quant.bits}-bit" if quant else "")
    layers = list(model.layers)
    if not needs_calibration(method, quant):
        for i, block in enumerate(_progress(layers, desc, progress)):
            for name in LINEARS:
                _finish(block.get_submodule(name), f"layers.{i}.{name}", magnitude_mask(
                    block.get_submodule(name).weight, sp), None, quant, masks, codes)
        return masks, codes
    if calib is None or calib.numel() == 0:
        raise CompressError(f"{method}{' + gptq' if quant else ''} needs calibration text (--calib)")
    from fleetlm.model.decoder import rope_cos_sin

    dtype = model.embed_tokens.weight.dtype
    x = model.embed_tokens(calib).to(dtype)
    cos, sin = rope_cos_sin(model.inv_freq, torch.arange(calib.shape[1])[None], dtype)
    hessian = method == "sparsegpt" or (quant is not None and quant.method == "gptq")
    for i, block in enumerate(_progress(layers, desc, progress)):
        readers = [n for n in LINEARS if n not in SHARED_INPUT]
        stats = {n: _Stats(block.get_submodule(n).in_features, hessian) for n in readers}
        hooks = [block.get_submodule(n).register_forward_pre_hook(
            lambda _m, args, s=stats[n]: s.add(args[0])) for n in readers]
        try:
            _run_block(block, x, cos, sin)
        finally:
            for hk in hooks:
                hk.remove()
        for name in LINEARS:
            lin = block.get_submodule(name)
            st = stats[SHARED_INPUT.get(name, name)]
            if method == "magnitude":
                mask = magnitude_mask(lin.weight, sp)
            elif method == "wanda":
                mask = wanda_mask(lin.weight, st.sumsq, sp)
            else:
                mask = None
            _finish(lin, f"layers.{i}.{name}", mask, st, quant, masks, codes, sp)
        stats.clear()
        x = _run_block(block, x, cos, sin)  # the next block sees this block pruned (and quantized)
    return masks, codes


def _finish(lin: nn.Linear, key: str, mask: torch.Tensor | None, st: _Stats | None, quant: QuantAfter | None,
            masks: dict, codes: dict, sp: Sparsity | None = None) -> None:
    """Apply one linear's mask (picking it with SparseGPT when mask is None) and the quantization after."""
    w = lin.weight.data
    qw = None
    if mask is None or (quant is not None and quant.method == "gptq"):
        # SparseGPT (alone or joint with GPTQ), or GPTQ with the pruned weights pinned to 0
        joint = quant if quant is not None and quant.method == "gptq" else None
        new, mask, qw = sparsegpt(w, st.upper(), sp, mask=mask, quant=joint)
        w = new
    if quant is not None and qw is None:
        qw = quantize_masked(w, mask, quant.bits, quant.group, quant.sym)
    if qw is not None:
        codes[key] = qw
        w = qw.dequantize()
    lin.weight.data = w.masked_fill(mask, 0.0).to(lin.weight.dtype)
    masks[key] = mask


def sparsity_of(model: nn.Module) -> float:
    """Fraction of exact zeros over the decoder blocks' linears."""
    zeros = total = 0
    for block in model.layers:
        for name in LINEARS:
            w = block.get_submodule(name).weight
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)


def is_n_m(w: torch.Tensor, n: int, m: int, exact: bool = True) -> bool:
    """Whether every m consecutive input weights of every row hold exactly n nonzeros (at most n when not
    exact: quantizing after pruning may round a kept weight to 0 as well)."""
    rows, k = w.shape
    if k % m:
        return False
    count = (w.reshape(rows, k // m, m) != 0).sum(-1)
    return bool((count == n).all() if exact else (count <= n).all())


# ------------------------------------------------------------------------------------------------ sizes


def packed_nm_bytes(numel: int, n: int, m: int, value_bits: int) -> int:
    """Bytes of an N:M layout: the n kept values of every m at value_bits plus ceil(log2 m) bits of index each
    (2:4: 2 values + two 2-bit positions per 4 weights, as sparse tensor cores store them)."""
    kept = numel * n // m
    return math.ceil(kept * (value_bits + math.ceil(math.log2(m))) / 8)


# ------------------------------------------------------------------------------------------------ CLI


def prune_to_dir(ref: str | Path, out: str | Path, *, prune: str, sparsity: str,
                 quant: QuantAfter | None = None, calib: list[Path] | None = None, samples: int = 128,
                 seq_len: int = 256, progress: bool = False) -> dict[str, Any]:
    """Prune `ref` (and quantize it) into `out`: a float16 checkpoint with the zeros (pruning alone) or
    compress/store.py's layout with the codes (pruned + quantized); pruning.json says what was done."""
    from fleetlm.compress.pipeline import calibration_windows, load_float_model

    sp = parse_sparsity(sparsity)
    if prune not in PRUNERS:
        raise CompressError(f"unknown pruning method {prune!r}: choose one of {', '.join(PRUNERS)}")
    if quant is not None and quant.method not in QUANT_AFTER:
        raise CompressError(f"--method {quant.method} after pruning: choose one of {', '.join(QUANT_AFTER)}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CompressError(f"--out {out} exists and is not a directory")
    model, tokenizer = load_float_model(ref)
    windows = (calibration_windows(tokenizer, calib, samples, seq_len) if needs_calibration(prune, quant)
               else None)
    start = time.perf_counter()
    _masks, codes = prune_model(model, prune, sp, windows, quant=quant, progress=progress)
    seconds = time.perf_counter() - start
    meta = {"pruning": prune, "sparsity": str(sp), "fraction": sp.fraction, "comparison_group": "row",
            "measured_sparsity": round(sparsity_of(model), 6), "source": str(ref),
            "seconds": round(seconds, 1),
            "quantization": asdict(quant) if quant else None,
            "calibration": None if windows is None else {
                "paths": [str(p) for p in (calib or ["default"])], "samples": samples, "seq_len": seq_len}}
    if codes:
        from fleetlm.compress.store import save_compressed

        save_compressed(model, codes, tokenizer, out, {"method": quant.method, "source": str(ref),
                                                       "seconds": round(seconds, 1), "pruning": meta})
    else:
        from fleetlm.model.checkpoint import save_checkpoint

        save_checkpoint(model.half(), out, tokenizer_dir=tokenizer)
    (out / META).write_text(json.dumps(meta, indent=2) + "\n")
    return {"out": out, "seconds": seconds, "sparsity": meta["measured_sparsity"], "quantized": bool(codes),
            "codes_mib": sum(q.nbytes() for q in codes.values()) / 2**20}
