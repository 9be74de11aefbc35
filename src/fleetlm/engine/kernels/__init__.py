"""Our own CPU GEMM kernels for decoding (int4, int8, bf16 weights; AVX-512 and AVX2), built once per machine.

The C++ sources in csrc/ are compiled by `torch.utils.cpp_extension.load` into the fleet home
(`fleet_home()/kernels/<torch version>-<hash of the sources>`), at `make setup` (`python -m
fleetlm.engine.kernels`) or at first use, and register the operators `torch.ops.fleetlm_kernels.*`.
Everything here also has a pure-PyTorch reference (same packed layouts, same activation quantization), used
by the tests and wherever the extension cannot be built. `FLEET_KERNELS=0` turns the kernels off (the engine
then uses PyTorch's kernels); `FLEET_KERNELS_ISA=avx2` forces the AVX2 path on an AVX-512 CPU.
Every M runs on "rows" kernels (AVX2: passes of 4 rows that unpack each weight line once for all of them, for
speculative decoding's verify step and small batches; weight lines prefetched ahead, which speeds the single
row too); `FLEET_KERNELS_ROWS=0` or `use_rows_kernels(False)` keeps the kernels as they were before them (the
"before" of bench/verify_cost.py; AVX-512's kernels take 4 rows a pass already and have no rows variant).
A row's numbers are the same to the bit in either, alone or among other rows.

Layouts (see csrc/kernels.h): weights in tiles of 16 output rows, each 64-byte line holding the next columns
of all 16 rows, so one streaming load feeds 16 output lanes.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["TILE_N", "QBLOCK", "available", "build", "isa", "pack_bf16", "pack_int4", "pack_int4_codes",
           "pack_int8", "pack_int8_codes", "reference_linear_bf16", "reference_linear_int4",
           "reference_linear_int8", "reference_quantize_rows", "unpack_int4", "unpack_int8", "use_isa",
           "use_rows_kernels"]

TILE_N = 16  # output rows per tile
QBLOCK = 32  # activation (and int8 weight) quantization block
ISA_NAMES = {0: "none", 1: "avx2", 2: "avx512"}
SOURCES = ("ops.cpp", "avx512.cpp", "avx2.cpp", "attention.cpp", "kernels.h", "avx2_lanes.h")
CSRC = Path(__file__).with_name("csrc")
# -fopenmp: without it at::parallel_for compiles to a serial loop (its pragma is ignored), and every op ran
# on one core; the OpenMP calls resolve to PyTorch's own libgomp, already loaded with libtorch_cpu.
CFLAGS = ("-O3", "-fno-math-errno", "-fopenmp")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------------------------------------- building

def build_dir() -> Path:
    """Where this machine's build lives: one folder per torch version and version of the sources."""
    from fleetlm.catalog import fleet_home

    return fleet_home() / "kernels" / f"{torch.__version__}-{_sources_digest()}"


@functools.cache
def _sources_digest() -> str:
    # read once a process: the build id is asked at each measurement-cache lookup (fleet/measure.py)
    digest = hashlib.sha256()
    for name in SOURCES:
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join(CFLAGS).encode())
    return digest.hexdigest()[:12]


def _built_library(folder: Path) -> Path | None:
    found = sorted(folder.glob("fleetlm_kernels*.so"))
    return found[0] if found else None


def build(verbose: bool = False) -> Path:
    """Compile the extension (about a minute on 2 cores) unless this machine has it; returns the library."""
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    from torch.utils import cpp_extension

    if _built_library(folder) is None:
        print(f"fleetlm: compiling our CPU kernels into {folder} (once per machine, about a minute)...",
              file=sys.stderr, flush=True)
    # -march is not set: each ISA file carries its own target options and the CPU is checked at run time,
    # so one build serves AVX2 and AVX-512 machines alike.
    cpp_extension.load(name="fleetlm_kernels", sources=[str(CSRC / s) for s in SOURCES if s.endswith(".cpp")],
                       extra_cflags=list(CFLAGS), build_directory=str(folder),
                       is_python_module=False, verbose=verbose)
    library = _built_library(folder)
    if library is None:
        raise RuntimeError(f"the build in {folder} left no library")
    return library


def _attend_f16_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                     scale: float) -> torch.Tensor:
    return q.new_empty(q.shape, dtype=torch.float32)


@functools.cache
def _load() -> bool:
    if os.environ.get("FLEET_KERNELS", "1") == "0":
        return False
    try:
        library = _built_library(build_dir())
        if library is not None:
            torch.ops.load_library(str(library))
        else:
            build()
        ok = int(torch.ops.fleetlm_kernels.best_isa_level()) > 0
        # attend_f16's fake in Python: its batch size stays symbolic in a compiled step (a C++ Meta
        # function reads concrete sizes, and the step then compiled one graph per batch size)
        torch.library.register_fake("fleetlm_kernels::attend_f16", _attend_f16_fake)
    except Exception as exc:  # a compiler missing or failing must never stop the engine: PyTorch's kernels
        warnings.warn(f"fleetlm: our CPU kernels are unavailable ({type(exc).__name__}: {str(exc)[:200]}); "
                      "using PyTorch's kernels", RuntimeWarning, stacklevel=3)
        return False
    return ok


# A constant to torch.compile: attend_f16 asks inside the compiled decode step, and dynamo traces through
# functools.cache into _load (file globs, hashing), which broke the step's graph at every layer (each layer
# then compiled as its own frame, up to the recompile limit, and ran eagerly past it).
@torch.compiler.assume_constant_result
def available() -> bool:
    """The kernels are built (building them at the first call) and this CPU has AVX2 or AVX-512.

    False when FLEET_KERNELS=0, on other architectures, or when the build fails (one warning)."""
    return os.environ.get("FLEET_KERNELS", "1") != "0" and _load()


def isa() -> str:
    """The instruction set the kernels use now: "avx512", "avx2" or "none"."""
    return ISA_NAMES[int(torch.ops.fleetlm_kernels.isa_level())] if _load() else "none"


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Run the kernels on one ISA path ("avx2" on an AVX-512 CPU: the AVX2 code); yields the one in use."""
    levels = {v: k for k, v in ISA_NAMES.items()}
    if name not in levels:
        raise ValueError(f"unknown ISA {name!r}: choose one of {', '.join(levels)}")
    ops = torch.ops.fleetlm_kernels
    before = int(ops.isa_level())
    try:
        yield ISA_NAMES[int(ops.set_isa_level(levels[name]))]
    finally:
        ops.set_isa_level(before)


@contextlib.contextmanager
def use_rows_kernels(on: bool) -> Iterator[bool]:
    """Run on the rows kernels (True) or the kernels as they were before them (False); yields the setting."""
    if not _load():
        raise RuntimeError("our CPU kernels are not available here")
    ops = torch.ops.fleetlm_kernels
    before = int(ops.set_rows_kernels(int(on)))
    try:
        yield bool(int(ops.rows_kernels()))
    finally:
        ops.set_rows_kernels(before)


# ---------------------------------------------------------------------------------------------- packing

def _tiles(t: torch.Tensor, n_pad: int, k_pad: int) -> torch.Tensor:
    """[N, K] -> [N_pad, K_pad] with zeros appended."""
    n, k = t.shape
    return torch.nn.functional.pad(t, (0, k_pad - k, 0, n_pad - n))


Packed = tuple[torch.Tensor, torch.Tensor]


def pack_int4_codes(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, group: int) -> Packed:
    """Lay out 4-bit codes q [N, K] (0..15) with per-group scale d and offset m [N, ceil(K/group)]
    (w = q * d + m) into (weight uint8 [tiles, kp * 8], scales float16 [tiles, kp/group, 2, 16]).
    GGUF's Q4_0 is m = -8 d; Q4_1 and Q4_K's sub-blocks are group 32 with their own m."""
    if group % QBLOCK:
        raise ValueError(f"int4 group must be a multiple of {QBLOCK}, got {group}")
    n, k = q.shape
    n_pad, kp = _round_up(n, TILE_N), _round_up(k, group)
    t = n_pad // TILE_N
    codes = _tiles(q.to(torch.uint8), n_pad, kp).view(t, TILE_N, kp // 8, 8).permute(0, 2, 1, 3)
    weight = (codes[..., :4] | (codes[..., 4:] << 4)).contiguous().view(t, kp * 8)
    groups = kp // group
    d16, m16 = (_tiles(s.float(), n_pad, groups).view(t, TILE_N, groups).permute(0, 2, 1) for s in (d, m))
    scales = torch.stack([d16, m16], dim=2).to(torch.float16).contiguous()  # [t, groups, 2, 16]
    return weight, scales


PACK_ROWS = 2048  # rows packed at a time: temporaries stay in cache (the vocabulary projection: 4x faster)


def _by_rows(pack, weight: torch.Tensor, *args) -> Packed:
    parts = [pack(weight[i : i + PACK_ROWS], *args) for i in range(0, weight.shape[0], PACK_ROWS)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def pack_int4(weight: torch.Tensor, group: int = 64) -> Packed:
    """Asymmetric 4-bit per group of `group` input columns (min/max, as GGUF's Q4_1), packed for linear_int4.

    The codes are chosen against the float16-rounded scale and offset that the kernel will use."""
    if weight.shape[0] > PACK_ROWS:
        return _by_rows(pack_int4, weight, group)
    w = weight.detach().float()
    n, k = w.shape
    kp = _round_up(k, group)
    # padding columns repeat the last real column, so they never widen its group's range (their x is 0)
    padded = torch.cat([w, w[:, -1:].expand(n, kp - k)], dim=1) if kp > k else w
    groups = padded.view(n, kp // group, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    d = ((hi - lo) / 15.0).to(torch.float16).float()
    m = lo.to(torch.float16).float()
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round((groups - m[..., None]) * inv[..., None]).clamp(0, 15).view(n, kp)[:, :k]
    return pack_int4_codes(q, d, m, group)


def unpack_int4(weight: torch.Tensor, scales: torch.Tensor, n: int,
                k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of pack_int4_codes: q [N, kp] uint8, d and m [N, groups] float32 (kp: padded K)."""
    t = weight.shape[0]
    kp = weight.shape[1] // 8
    b = weight.view(t, kp // 8, TILE_N, 4)
    q = torch.cat([b & 0x0F, b >> 4], dim=-1).permute(0, 2, 1, 3).reshape(t * TILE_N, kp)[:n]
    s = scales.float().permute(0, 3, 1, 2).reshape(t * TILE_N, -1, 2)[:n]
    return q, s[..., 0], s[..., 1]


def pack_int8_codes(q: torch.Tensor, d: torch.Tensor) -> Packed:
    """Lay out int8 codes q [N, K] (-127..127) with one scale per block of 32 columns d [N, ceil(K/32)]
    (GGUF's Q8_0) into (weight uint8 [tiles, kp * 16] holding q + 128, scales float16 [tiles, kp/32, 16])."""
    n, k = q.shape
    n_pad, kp = _round_up(n, TILE_N), _round_up(k, QBLOCK)
    t = n_pad // TILE_N
    codes = (_tiles(q.to(torch.int16), n_pad, kp) + 128).to(torch.uint8)
    weight = codes.view(t, TILE_N, kp // 4, 4).permute(0, 2, 1, 3).contiguous().view(t, kp * 16)
    blocks = kp // QBLOCK
    scales = _tiles(d.float(), n_pad, blocks).view(t, TILE_N, blocks).permute(0, 2, 1).to(torch.float16)
    return weight, scales.contiguous()


def pack_int8(weight: torch.Tensor) -> Packed:
    """Symmetric int8 per block of 32 input columns (GGUF's Q8_0), packed for linear_int8."""
    if weight.shape[0] > PACK_ROWS:
        return _by_rows(pack_int8, weight)
    w = weight.detach().float()
    n, k = w.shape
    kp = _round_up(k, QBLOCK)
    blocks = _tiles(w, n, kp).view(n, kp // QBLOCK, QBLOCK)
    d = (blocks.abs().amax(-1) / 127.0).to(torch.float16).float()
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None]).clamp(-127, 127).view(n, kp)[:, :k]
    return pack_int8_codes(q, d)


def unpack_int8(weight: torch.Tensor, scales: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_int8_codes: q [N, kp] int16 (-127..127) and d [N, kp/32] float32."""
    t, kp = weight.shape[0], weight.shape[1] // 16
    q = weight.view(t, kp // 4, TILE_N, 4).permute(0, 2, 1, 3).reshape(t * TILE_N, kp)[:n]
    q = q.to(torch.int16) - 128
    d = scales.float().permute(0, 2, 1).reshape(t * TILE_N, -1)[:n]
    return q, d


def pack_bf16(weight: torch.Tensor) -> torch.Tensor:
    """bf16 weights [N, K] as tiles for linear_bf16: bfloat16 [tiles, kp * 16], kp = K rounded up to 32."""
    if weight.shape[0] > PACK_ROWS:
        return torch.cat([pack_bf16(weight[i : i + PACK_ROWS]) for i in range(0, weight.shape[0], PACK_ROWS)])
    n, k = weight.shape
    n_pad, kp = _round_up(n, TILE_N), _round_up(k, QBLOCK)
    w = _tiles(weight.detach().to(torch.bfloat16), n_pad, kp)
    t = n_pad // TILE_N
    return w.view(t, TILE_N, kp // 2, 2).permute(0, 2, 1, 3).contiguous().view(t, kp * 16)


def unpack_bf16(weight: torch.Tensor, n: int) -> torch.Tensor:
    t, kp = weight.shape[0], weight.shape[1] // 16
    return weight.view(t, kp // 2, TILE_N, 2).permute(0, 2, 1, 3).reshape(t * TILE_N, kp)[:n]


# ---------------------------------------------------------------------------------------------- references

def reference_quantize_rows(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                              torch.Tensor]:
    """What the kernels do to activations: int8 per block of 32 (scale amax/127, round half to even), with
    each block's integer and float sums: (q [M, kp] int8, d, sq int32, sf [M, kp/32])."""
    xf = torch.nn.functional.pad(x.float(), (0, kp - x.shape[1]))
    blocks = xf.view(x.shape[0], kp // QBLOCK, QBLOCK)
    d = blocks.abs().amax(-1) / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv[..., None]).clamp(-127, 127)
    return (q.to(torch.int8).view(x.shape[0], kp), d, q.sum(-1).to(torch.int32), blocks.sum(-1))


def _dequantized_rows(x: torch.Tensor, kp: int) -> tuple[torch.Tensor, torch.Tensor]:
    q, d, _, sf = reference_quantize_rows(x, kp)
    return (q.float().view(x.shape[0], -1, QBLOCK) * d[..., None]).view(x.shape[0], kp), sf


def reference_linear_int4(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None, out_features: int, group: int) -> torch.Tensor:
    """linear_int4 in PyTorch: sum_g d[n,g] * <q_g, xq_g * dx> + m[n,g] * sum_g(x) (+ bias), f32 math."""
    kp = weight.shape[1] // 8
    q, d, m = unpack_int4(weight, scales, out_features, kp)
    xh, sf = _dequantized_rows(x, kp)
    w = (q.float().view(out_features, -1, group) * d[..., None]).view(out_features, kp)
    y = xh @ w.t() + sf.view(x.shape[0], -1, group // QBLOCK).sum(-1) @ m.t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def reference_linear_int8(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                          bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    kp = weight.shape[1] // 16
    q, d = unpack_int8(weight, scales, out_features)
    xh, _ = _dequantized_rows(x, kp)
    w = (q.float().view(out_features, -1, QBLOCK) * d[..., None]).view(out_features, kp)
    y = xh @ w.t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def reference_linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                          out_features: int) -> torch.Tensor:
    """linear_bf16 in PyTorch: bf16 weights, activations rounded to bf16 (as vdpbf16ps takes them)."""
    w = unpack_bf16(weight, out_features).float()
    xb = torch.nn.functional.pad(x.to(torch.bfloat16).float(), (0, w.shape[1] - x.shape[1]))
    y = xb @ w.t()
    return (y if bias is None else y + bias.float()).to(x.dtype)


def reference_attend_f16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         mask: torch.Tensor | None) -> torch.Tensor:
    """attend_f16 in PyTorch: q [B, H, D] over float16 k, v [B, H_kv, L, D] widened to f32; mask [B, L]."""
    b, h, d = q.shape
    h_kv = k.shape[1]
    grouped = q.float().reshape(b, h_kv, h // h_kv, d)
    m = None if mask is None else mask[:, None, None, :]
    y = torch.nn.functional.scaled_dot_product_attention(grouped, k.float(), v.float(), attn_mask=m)
    return y.reshape(b, h, d)


# ---------------------------------------------------------------------------------------------- attention

def attend_f16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """One query per row and head, q [B, H, 1, D], over a float16 KV cache k, v [B, H_kv, L, D] (mask None
    or bool [B, 1, 1, L]) -> [B, H, 1, D] float32: our kernel (attention.cpp) where it runs and the head
    size is a multiple of 8, else the reference. Half the bytes of an f32 cache, and each cached row is
    read once for all the query heads that share it."""
    b, h, _, d = q.shape
    flat = None if mask is None else mask.reshape(b, -1)
    if d % 8 or not available():
        return reference_attend_f16(q.reshape(b, h, d), k, v, flat).reshape(b, h, 1, d)
    return torch.ops.fleetlm_kernels.attend_f16(q.reshape(b, h, d), k, v, flat, d ** -0.5).reshape(b, h, 1, d)
