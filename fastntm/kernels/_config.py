"""Block sizes, regime choice and debug switches shared by the kernel files.

Regimes: *on-chip* when a batch item's whole memory block (next_pow2(N) x
next_pow2(M) fp32) fits one program without spilling, else *large memory*, N
split into blocks of ``BN`` rows across programs.

``FASTNTM_BLOCK_N`` (environment, read at every call) or :func:`force_block_n`
forces the large-memory regime with that ``BN``; tests use it to run the
multi-block reductions and the shift's halo at small N.
``FASTNTM_POISON=1`` or :func:`poison` fills every buffer the kernels allocate
with NaN, so an element a kernel forgets to write shows up in the result.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch

ONCHIP_MAX_ELEMENTS = 4096
"""Largest next_pow2(N) * next_pow2(M) that one program holds (checked spill-free by ptxas)."""
BLOCK_ELEMENTS = 2048
"""Target BN * BM of a large-memory program."""
MAX_BM = 128
"""Widest slot the kernels take (BM = next_pow2(M)); wider slots use the reference."""

ONCHIP_MAXNREG = 255
"""Register limit of the on-chip kernels. Left to itself, ptxas caps a configuration at an occupancy step
(96, 128 or 168 registers) and spills a few bytes to stay there: the backward at BN=64, BM=32, 8 warps, sm_80;
the forward with bf16 or fp16 tensors at BN=64, BM=32, 4 warps, sm_90 and BN=64, BM=16, 4 warps, sm_80 (a
packed predicate of the final store's mask). These kernels run one program per batch item, so the occupancy
lost (2 or 3 programs of 4 warps per SM instead of 3 or 5; 8-warp programs fit one per SM either way) shows
only when B is several times the SM count."""

_forced_block_n: int | None = None
_poison: bool = False


@dataclass(frozen=True)
class Blocks:
    onchip: bool
    BN: int
    BM: int
    num_warps: int
    bwd_warps: int
    """Warps of the on-chip backward, which holds more live tiles than the forward (spill-free by ptxas)."""


def n_blocks(N: int, BN: int) -> int:
    return -(-N // BN)


def forced_block_n() -> int | None:
    env = os.environ.get("FASTNTM_BLOCK_N")
    if env:
        return int(env)
    return _forced_block_n


@contextlib.contextmanager
def force_block_n(bn: int | None):
    """Within the block, run the large-memory regime with ``BN = bn`` (a power of two >= 16)."""
    global _forced_block_n
    if bn is not None and (bn < 16 or bn & (bn - 1)):
        raise ValueError(f"block size must be a power of two >= 16, got {bn}")
    old, _forced_block_n = _forced_block_n, bn
    try:
        yield
    finally:
        _forced_block_n = old


@contextlib.contextmanager
def poison(on: bool = True):
    """Within the block, fill every kernel-allocated buffer with NaN."""
    global _poison
    old, _poison = _poison, on
    try:
        yield
    finally:
        _poison = old


def _empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device)


def _poisoned(shape, dtype: torch.dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def allocator():
    """``empty(shape, dtype, device)`` for the buffers of one host call: NaN-filled while poisoning.
    Decided once a call: the environment is slow to read for every buffer."""
    return _poisoned if _poison or os.environ.get("FASTNTM_POISON") == "1" else _empty


def next_pow2(n: int) -> int:
    """``triton.next_power_of_2`` for n >= 1. Host code calls this and ``n_blocks`` rather than Triton's,
    which are constexpr functions now and cost microseconds a call."""
    return 1 << (n - 1).bit_length()


def block_m(M: int) -> int:
    return max(16, next_pow2(M))


def large_block_n(BM: int) -> int:
    return max(16, BLOCK_ELEMENTS // BM)


def choose(N: int, M: int) -> Blocks:
    """The regime and block sizes for a memory of N slots of width M."""
    return _choose(N, M, forced_block_n())


@functools.lru_cache(maxsize=256)
def _choose(N: int, M: int, forced: int | None) -> Blocks:
    BM = block_m(M)
    # At least 64 rows on-chip: fewer configurations to build and check, at the cost of masked rows for tiny N.
    full = max(64, next_pow2(N))
    if forced is None and full * BM <= ONCHIP_MAX_ELEMENTS:
        return Blocks(True, full, BM, 4 if full * BM <= 2048 else 8, 4 if full * BM <= 1024 else 8)
    BN = forced if forced is not None else large_block_n(BM)
    return Blocks(False, BN, BM, 4, 4)


VECTOR_BLOCK = 1024
"""Rows of one (B, H, N)-vector program (the shift-sharpen pass): no memory rows held, so many more."""


def vector_block(N: int) -> int:
    """Block of the vector pass: the forced BN if any (tests), else up to ``VECTOR_BLOCK``."""
    forced = forced_block_n()
    return forced if forced is not None else min(VECTOR_BLOCK, max(16, next_pow2(N)))


def supported(M: int) -> bool:
    return block_m(M) <= MAX_BM
