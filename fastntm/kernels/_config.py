"""Block sizes, regime choice and debug switches shared by the kernel files.

Regimes: *on-chip* when a batch item's whole memory block (next_pow2(N) x
next_pow2(M) fp32) fits one program without spilling, else *large memory*, N
split into blocks of ``BN`` rows across programs.

:func:`force` (or ``FASTNTM_BLOCKS``, read at every host call) overrides the
choice, for tests and for block-size sweeps (``benchmarks/sweep_blocks.py``):
``block_n`` forces the large-memory regime with that ``BN`` (tests use it to run
the multi-block reductions and the shift's halo at small N); ``num_warps`` sets
the large-memory kernels' warps (with ``BN`` then one warp's default rows: the
default's two-warp rows at one warp spilled); ``bwd_block_n`` and ``bwd_warps``
set the large-memory backward's passes over memory apart from the forward's
(``bwd_block_n`` defaults to a forced ``block_n``, else to the backward's own
rows, ``large_block_n``; ``bwd_warps`` to a forced ``num_warps``, else to the
backward's own default; at a shape that runs on-chip they change nothing);
``sim_block_n`` and ``sim_warps`` the forward's similarity pass apart from its
read-write pass (defaulting to a forced ``block_n`` and ``num_warps``, else to
its own, ``sim_blocks``); ``onchip_warps`` and ``onchip_bwd_warps`` the on-chip forward's (and
the standalone read and write's) and backward's, ``vector_block`` the rows of a
vector-pass program, ``sum_rows`` and ``sum_warps`` the sums of block partials
(``Blocks.sum_rows``: the passes over memory's and the sharpening backward's). The
environment takes them
as ``FASTNTM_BLOCKS="block_n=32,num_warps=8"``; a setting the context manager
gives wins over the environment's. One variable, not one per setting: reading
an unset variable costs over a microsecond, and the host path is counted in
microseconds.
``FASTNTM_POISON=1`` or :func:`poison` fills every buffer the kernels allocate
with NaN, so an element a kernel forgets to write shows up in the result.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

ONCHIP_MAX_ELEMENTS = 4096
"""Largest next_pow2(N) * next_pow2(M) that one program holds (checked spill-free by ptxas)."""
BLOCK_ELEMENTS = 2048
"""Target BN * BM a warp of a large-memory program of one or two warps (at four, of the program)."""
SIM_BLOCK_ELEMENTS = 1024
"""Target BN * BM of a similarity-pass program, one warp, but at BM = 64 (``sim_blocks``). A block's partials
are two numbers a head, so block size costs no traffic here."""
MAX_BM = 128
"""Widest slot the kernels take (BM = next_pow2(M)); wider slots use the reference."""
VECTOR_BLOCK = 1024
"""Rows of one (B, H, N)-vector program (the shift-sharpen pass): no memory rows held, so many more."""

REGISTERS_PER_SM = 65536
"""32-bit registers of one SM on sm_80 and sm_90: a program of ``32 * num_warps`` threads gets at most
``REGISTERS_PER_SM // (32 * num_warps)`` registers a thread, or it cannot launch."""

MAXNREG = 255
"""Register limit of the on-chip kernels and of ``_read_write_bwd_kernel``. Left to itself, ptxas caps a
configuration at an occupancy step (72, 96, 128 or 168 registers) and spills a few bytes to stay there: the
on-chip backward at BN=64, BM=32, 8 warps, sm_80; the on-chip forward with bf16 or fp16 tensors at BN=64,
BM=32, 4 warps, sm_90 and BN=64, BM=16, 4 warps, sm_80 (a packed predicate of the final store's mask);
the read-write backward, since its reads' dL/dw became a tensor-core product, unaligned with bf16 tensors
at BN=128, BM=32, 8 warps, sm_80 and BN=16, BM=128, 4 warps, sm_90 (8 to 16 bytes, masks and the mem tile
held through the product). The on-chip kernels run a few programs per batch item (the forward one a read
head and one for the write heads, the backward one), so the occupancy lost (2 or 3 programs of 4 warps per
SM instead of 3 or 5; 8-warp programs fit one per SM either way) shows only when B is several times the SM
count. The read-write backward at the large shape kept its registers (127, fp32, sm_90, as launched); with
bf16 tensors it took 107 where ptxas chose 95 (104 since it adds the given dL/dw, stop 41)."""

ONCHIP_BWD_WARPS = 4
"""Warps of the on-chip backward's programs, at every on-chip size. At the paper's size (BN 128, BM 32, the
largest on-chip tile) each of six H100 runs of ``benchmarks.sweep_blocks`` timed forward + backward in a
CUDA graph 1-8% faster at 4 warps than at 8 (``benchmarks/results/h100-2026-11-26-e/``: 11.2 against 11.7
us); a smaller tile holds fewer values a thread at the same warps."""

ENV = "FASTNTM_BLOCKS"


class Overrides(NamedTuple):
    """Forced parts of the block choice; None leaves a part to the dispatch. A tuple: hashed in the cache key
    of every :func:`choose`."""

    block_n: int | None = None
    num_warps: int | None = None
    bwd_block_n: int | None = None
    bwd_warps: int | None = None
    onchip_warps: int | None = None
    onchip_bwd_warps: int | None = None
    vector_block: int | None = None
    sim_block_n: int | None = None
    sim_warps: int | None = None
    sum_rows: int | None = None
    sum_warps: int | None = None


# (least, largest) of each setting, all powers of two. 32 warps is the most threads (1024) a program has.
RANGES = {"block_n": (16, 1024), "num_warps": (1, 32), "bwd_block_n": (16, 1024), "bwd_warps": (1, 32),
          "onchip_warps": (1, 32), "onchip_bwd_warps": (1, 32),
          "vector_block": (16, 8192), "sim_block_n": (16, 1024), "sim_warps": (1, 32),
          "sum_rows": (16, 2048), "sum_warps": (1, 32)}

_forced = Overrides()
_poison: bool = False


@dataclass(frozen=True)
class Blocks:
    onchip: bool
    BN: int
    BM: int
    num_warps: int
    bwd_warps: int
    """Warps of the backward: on-chip, of its one kernel, which holds more live tiles than the forward
    (spill-free by ptxas); large memory, of its passes over memory."""
    BV: int
    """Rows of a vector-pass program (the large-memory forward's shift-sharpen pass)."""
    bwd_BN: int
    """Rows of a program of the large-memory backward's passes over memory (on-chip: BN)."""
    sim_BN: int
    sim_warps: int
    """Rows and warps of a program of the large-memory forward's similarity pass (on-chip: BN, num_warps)."""
    sum_rows: int
    sum_warps: int
    """Most rows a load and warps of ``_sum_blocks_kernel`` (``SUM_ROWS``, ``SUM_WARPS``; see ``sum_block_rows``)."""

    @property
    def memory_bwd(self) -> tuple[int, int]:
        """(rows, warps) of a program of the backward's passes over memory (``_read_write_bwd_kernel``,
        ``_mem_bwd_kernel``): the large-memory backward's, or on-chip the standalone read and write's."""
        return (self.BN, self.num_warps) if self.onchip else (self.bwd_BN, self.bwd_warps)


def n_blocks(N: int, BN: int) -> int:
    return -(-N // BN)


SUM_ROWS = 256
SUM_WARPS = 8
"""Rows of block partials a load of ``_sum_blocks_kernel`` takes at most, and its warps. In the large step's
profile on the H100 (``benchmarks/results/h100-2026-11-26-h``, run 2) its four sums took 49.6 us at 256 rows
and 8 warps, 64.7 at 512, 78.8 at 1,024, and 50.2 at 2,048 rows and 16 warps (the 512 and 2,048 figures from
that call's printed output, their files not fetched)."""


def sum_block_rows(NB: int, rows: int) -> int:
    """Rows a load of ``_sum_blocks_kernel`` takes over NB block partials, given at most ``rows``: no more than
    NB's power of two, and at least 16."""
    return min(rows, max(16, next_pow2(NB)))


def maxnreg(num_warps: int) -> int:
    """``MAXNREG``, or less where a program of ``num_warps`` could not launch with it (over 8 warps)."""
    return min(MAXNREG, REGISTERS_PER_SM // (32 * num_warps))


def large_warps(M: int) -> tuple[int, int]:
    """Warps of a large-memory program of M-wide rows: (forward, and the standalone read and write;
    the backward's passes over memory). At one or two warps a program holds ``BLOCK_ELEMENTS`` a warp.

    The forward at two warps and 64 rows where BM = 64 and M is a multiple of 16: the H100 ran the large
    shape's forward 2.2-2.4% faster in CUDA graphs than at one warp and 32 rows (``benchmarks.sweep_blocks``:
    389.2 against 398.1 us, ``benchmarks/results/h100-2026-11-26-g``; 401.2 against 411.1 us,
    ``h100-2026-11-26-e``), with half the read partials to write and sum. Not at BM = 128 (ptxas spilled the
    read-write pass: unaligned, bf16, sm_90), nor at M = 40 (254 registers as launched, where one warp takes
    168). The counts below are of the one-warp forward.

    Few warps sum a block's rows with few or no barriers (one warp: shuffles alone), and hold several
    rows a thread, so a value a row costs little. At the large shape (fp32, sm_90) the forward's kernels
    issue 110 M warp-instructions at one warp against 297 M at four, and the backward (two passes over
    memory at those warps, four vector passes between then) 292 M at two against 378 M at four
    (``python -m benchmarks.sass_model``); at four warps an H200 ran the forward at the pace of issue,
    not of memory. Where ptxas spilled (``tests/test_kernels_static.py``), four warps, as before: the
    backward at one warp; one or two warps at BM <= 32 (64 or 128 rows a block) with rows not 16-aligned;
    the backward at two warps with M not a multiple of 16 (M = 40: ptxas capped ``_mem_bwd_kernel`` at
    168 registers and spilled). Chosen from that model; on the H100 (8cfa511, ``benchmarks.sweep_blocks``)
    the fastest forward + backward of the sweep's configurations, the forward within 1% of its best."""
    BM = block_m(M)
    if BM < 64:
        return 4, 4
    return (2 if BM == 64 and M % 16 == 0 else 1), (2 if M % 16 == 0 else 4)


def _validated(settings: dict, where: str) -> dict:
    for name, value in settings.items():
        if name not in RANGES:
            raise ValueError(f"{where}unknown setting {name!r}; known: {', '.join(RANGES)}")
        if value is None:
            continue
        lo, hi = RANGES[name]
        if isinstance(value, bool) or not isinstance(value, int) or value & (value - 1) or not lo <= value <= hi:
            raise ValueError(f"{where}{name} must be a power of two in [{lo}, {hi}], got {value!r}")
    return settings


@functools.lru_cache(maxsize=16)
def _parse_env(text: str) -> Overrides:
    settings = {}
    for item in text.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"{ENV}: expected comma-separated name=value, got {item!r} in {text!r}")
        try:
            settings[name] = int(value)
        except ValueError:
            raise ValueError(f"{ENV}: {name} must be an integer, got {value!r}") from None
    return Overrides(**_validated(settings, f"{ENV}: "))


@functools.lru_cache(maxsize=64)
def _merge(forced: Overrides, env: Overrides) -> Overrides:
    return Overrides(*(f if f is not None else e for f, e in zip(forced, env)))


def overrides() -> Overrides:
    """What :func:`force` and ``FASTNTM_BLOCKS`` force now (one read of the environment)."""
    env = os.environ.get(ENV)
    return _merge(_forced, _parse_env(env)) if env else _forced


@contextlib.contextmanager
def force(**settings: int | None):
    """Within the block, force the named parts of the block choice (see the module docstring): each a power
    of two within ``RANGES``, or None for the dispatch's own choice. Settings not named keep their value."""
    global _forced
    new = _forced._replace(**_validated(settings, ""))
    old, _forced = _forced, new
    try:
        yield
    finally:
        _forced = old


def force_block_n(bn: int | None):
    """Within the block, run the large-memory regime with ``BN = bn`` (a power of two >= 16)."""
    return force(block_n=bn)


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


def large_block_n(BM: int, warps: int = 1) -> int:
    """Rows of a large-memory program of ``warps`` warps: ``BLOCK_ELEMENTS`` a warp up to two warps."""
    return max(16, BLOCK_ELEMENTS * (warps if warps <= 2 else 1) // BM)


def sim_blocks(BM: int, rows: int | None = None, warps: int | None = None) -> tuple[int, int]:
    """(rows, warps) of a similarity-pass program, given the forced ones (None: the dispatch's). At BM = 64,
    64 rows at two warps; with the warps forced to one, 32 rows (the same elements a thread; 64 rows at one
    warp took 255 registers); a forced block of fewer than 64 rows keeps one warp. Other widths
    ``SIM_BLOCK_ELEMENTS`` at one warp.

    At BM = 64: 16 rows a program fit twice the programs to an SM (64 registers, 32 to an SM, where ncu had
    found the pass at 25% occupancy, limited by registers), but on the H100 32 rows ran the forward 1.7% and
    2.1% faster in two sweeps (404.3 against 411.1 us, ``benchmarks/results/h100-2026-11-26-e``; 389.8 against
    398.1, ``h100-2026-11-26-g``). Since the pass's products went to the tensor cores, 64 rows at two warps ran
    the forward 0.5% faster than 32 at one in two sweeps, in CUDA graphs (359.7 against 361.6 us and 360.2
    against 361.9, ``h100-2026-11-27-b`` runs 1 and 2), with half the softmax partials to merge: in run 3's
    profile the pass and the merge took 118.7 + 2.7 us where 32 rows at one warp took 119.3 + 3.8. Other widths
    are as they were: not timed, and at BM = 16 twice the rows took 255 registers (unaligned, bf16)."""
    if rows is None:
        rows = (32 if warps == 1 else 64) if BM == 64 else max(16, SIM_BLOCK_ELEMENTS // BM)
    return rows, warps or (2 if BM == 64 and rows >= 64 else 1)


PRODUCT_HEADS = 8
"""Heads of one tensor-core product (an mma's width): the similarity pass's logits, the backward's dL/dw of
the reads. More heads take further products (straight code, a compile for each count of groups). At 16 the
similarity pass's product took up to 219 registers (BN 32, BM 64, fp32, sm_80) and its two groups spilled
(BN 16, BM 128, sm_90)."""


def vector_block(N: int) -> int:
    """The dispatch's own block of the vector pass: up to ``VECTOR_BLOCK`` rows."""
    return min(VECTOR_BLOCK, max(16, next_pow2(N)))


def choose(N: int, M: int) -> Blocks:
    """The regime and block sizes for a memory of N slots of width M. Host code calls this once a call and
    passes the result on: each call reads the environment."""
    return _choose(N, M, overrides())


@functools.lru_cache(maxsize=256)
def _choose(N: int, M: int, forced: Overrides) -> Blocks:
    BM = block_m(M)
    # At least 64 rows on-chip: fewer configurations to build and check, at the cost of masked rows for tiny N.
    full = max(64, next_pow2(N))
    if forced.block_n is None and full * BM <= ONCHIP_MAX_ELEMENTS:
        warps = forced.onchip_warps or (4 if full * BM <= 2048 else 8)
        return Blocks(True, full, BM, warps, forced.onchip_bwd_warps or ONCHIP_BWD_WARPS,
                      vector_block(N), full, full, warps, forced.sum_rows or SUM_ROWS, forced.sum_warps or SUM_WARPS)
    warps, bwd_warps = large_warps(M)
    BN = forced.block_n or large_block_n(BM, 1 if forced.num_warps else warps)
    sim_BN, sim_warps = sim_blocks(BM, forced.sim_block_n or forced.block_n, forced.sim_warps or forced.num_warps)
    # A forced BN alone forces the vector pass's and the backward's blocks too: tests at small N get several.
    return Blocks(False, BN, BM, forced.num_warps or warps, forced.bwd_warps or forced.num_warps or bwd_warps,
                  forced.vector_block or forced.block_n or vector_block(N),
                  forced.bwd_block_n or forced.block_n or large_block_n(BM),
                  sim_BN, sim_warps,
                  forced.sum_rows or SUM_ROWS, forced.sum_warps or SUM_WARPS)


def supported(M: int) -> bool:
    # int(): under torch.jit.trace a size is a traced tensor (the trace then keeps this decision as a constant).
    return block_m(int(M)) <= MAX_BM
