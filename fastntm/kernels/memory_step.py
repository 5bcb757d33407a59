"""The fused NTM memory step (SPEC.md): address all heads, read, write; forward and backward.

Forward, two regimes (``_config.choose``):

* on-chip: one launch; a program per read head and one for the write heads of each
  batch item holds the item's whole memory (N x M) in registers and does its heads'
  addressing and the read, or the write; the shift takes its source rows from the
  program's own vector (``tl.gather``, through shared memory), not from global memory;
* large memory: N split in blocks of BN rows, three passes:
  1. ``_similarity_kernel``: cosine logits ``K`` (stored, fp32; the dot
     products of up to 8 heads one tensor-core product, tf32 three times
     over) and per-block max / sum-exp partials of ``beta * K``, merged a head
     a program by ``_softmax_merge_kernel``;
  2. ``_shift_sharpen_kernel``: ``wg[n] = g exp(beta K[n] - max) / sumexp
     + (1 - g) w_prev[n]`` is made once at the block's rows, and each shift tap
     takes its rows from it by ``tl.gather``; the rows of the neighbouring
     blocks that the taps need (the halo) are remade one at a time from the
     stored logits, so no block waits for another. Stores ``ws^gamma`` and
     per-block sums;
  3. ``_read_write_kernel``: normalise ``w``, per-block read partials, write.
  The read partials are summed by ``_sum_blocks_kernel``, the sharpening's (one
  number a block) by torch: each in a fixed order, as in the merge, so results
  are bit-identical run to run; no atomics anywhere.

Backward recomputes from small saved vectors (the logits ``K`` and the softmax
sums), never from a saved memory. On-chip, two launches:
``_onchip_heads_bwd_kernel``, a program a head and batch item: the head's dL/dw
from its read or the write, its addressing chain backward (the shift's
neighbours by ``tl.gather``, as in the forward), its dL/dk, and the cosine's
factors of its rows to small scratch buffers; then ``_onchip_mem_bwd_kernel``,
a program a batch item: dL/dmem from the write, the reads and every head's
factors. Large memory, two
passes over memory with three over (B, H, N) vectors between:

* ``_read_write_bwd_kernel`` (one pass over mem and dnew): dL/dw from the reads
  and the write plus the given dL/dw, per-block partials of dL/de and dL/da;
* the addressing chain backward (``_address_bwd``), blocks of rows of one head
  a program, as the forward's shift-sharpen pass: ``_sharpen_bwd_kernel`` (the
  sharpening's sums, and ``v = ws^gamma / ws``, stored), ``_interp_bwd_kernel``
  (dL/dws at the shift's taps, the halo's from the stored factors; dL/dw_prev,
  dL/dwc stored; dL/dgamma, dL/ds, dL/dg); then, blocks of rows of every head a program,
  ``_softmax_bwd_kernel`` (the softmax backward: dL/dK over |k| stored, with
  sum_h dL/dK K a row; dL/dbeta); each reduction over N that a later pass
  needs as block partials summed between the launches (the sharpening's by
  ``_sum_blocks_kernel``, the shift pass's one number a block by torch);
* ``_mem_bwd_kernel`` (one pass): dL/dmem from the write, the reads and the
  cosine similarity, and per-block partials of dL/dk;
* ``_sum_blocks_kernel`` sums the memory passes' partials (of dL/de and dL/da
  in one launch, of dL/dk in another);
* ``_head_grads_kernel``, a program a head: dL/dk, dL/dbeta, dL/dg, dL/ds and
  dL/dgamma from their partials, in the parameters' dtype.

Compute is fp32; loads and stores are in each tensor's dtype. The (B, H, N),
(B, H, M) and (B, H) tensors are made contiguous and indexed from their shapes;
the memory tensors' batch and row strides are passed explicitly.
"""

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from ..fused_reference import differentiate_literal, hand_derived_serves
from . import _config

SHARPEN_EPS = 1e-16


# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def _sum_blocks_kernel(p_x, p_y, NB, X, NX, BR: tl.constexpr, BX: tl.constexpr):
    """``y[b, :] = sum_j x[b, j, :]`` over the NB block partials of a (B, NB, X) tensor, a strip of BX columns
    of one batch item a program (the grid: NX strips times B), summed BR rows a load, in a fixed order.

    In place of torch's sum over dim 1, which took 15.6 us in the large forward for the reads' 17 MB of
    partials, 65.8 us for the step's four such sums (H100, ``benchmarks.kernel_profile``); here each program
    loads 64-byte row strips of BR rows at once and neighbouring programs the neighbouring strips, so a
    load's rows are whole sectors. The passes that write partials store them ``evict_last`` and this loads
    them ``evict_first``: the pass over memory between streams hundreds of MB through L2, which took the
    partials with it (the reads' sum 12.1 us without the hints, 8.5 us with them, 4.2 us alone with its
    partials in L2; the step's four 50.1 -> 38.3 us)."""
    pid = tl.program_id(0)
    i_x, i_b = pid % NX, (pid // NX).to(tl.int64)
    o_r = tl.arange(0, BR)
    o_x = i_x * BX + tl.arange(0, BX)
    m_x = o_x < X
    p_tile = p_x + i_b * NB * X + o_r[:, None] * X + o_x[None, :]
    b_acc = tl.zeros([BR, BX], dtype=tl.float32)
    for r0 in range(0, NB, BR):
        b_acc += tl.load(p_tile, mask=(o_r < NB - r0)[:, None] & m_x[None, :], other=0.0,
                         eviction_policy="evict_first")
        p_tile += BR * X
    tl.store(p_y + i_b * X + o_x, tl.sum(b_acc, 0).to(p_y.dtype.element_ty), mask=m_x)


@triton.jit
def _block_and_item(NB):
    """(row block, batch item or (b, h) row) of this program, on a grid of NB blocks times the items flattened
    to one dimension: CUDA's second grid dimension stops at 65,535 (B, or B * H, could pass it), its first
    at 2^31 - 1. The block varies fastest, as it did in dimension 0."""
    pid = tl.program_id(0)
    return pid % NB, (pid // NB).to(tl.int64)


@triton.jit
def _chunked_columns(BM: tl.constexpr, BC: tl.constexpr):
    """Column offsets of a tile held as (rows, BM / BC, BC): rows of chunks of BC columns (``BM / BC, BC``)."""
    return tl.arange(0, BM // BC)[:, None] * BC + tl.arange(0, BC)[None, :]


@triton.jit
def _chunked_row_sums(b_x):
    """Sums of the rows of a (rows, BM / BC, BC) tile whose row's chunks sit in one thread's registers: over
    the chunks first, in registers, then over the lanes of a chunk. The other order shuffles every chunk's
    partial: the similarity pass issued 21% more instructions (32-row blocks, M = 64, fp32, sm_90)."""
    return tl.sum(tl.sum(b_x, 1), 1)


@triton.jit
def _cosine(b_mem, b_mn, b_k):
    """``K[n] = dot(k, mem[n]) / (max(|k|, eps) max(|mem[n]|, eps))`` for the rows of the chunked ``b_mem``."""
    b_kn = tl.maximum(tl.sqrt(tl.sum(tl.sum(b_k * b_k, 1), 0)), 1e-8)
    return _chunked_row_sums(b_mem * b_k[None, :, :]) / (b_kn * b_mn)


@triton.jit
def _tap_shifts(K, N):
    """``(-K mod N, K mod N)`` for the shift's ``S = 2K + 1`` taps: the shifts of a loop's first tap, going up
    from ``-K`` or down from ``K``. A loop over taps takes each next shift with ``_next_shift``, not a modulo:
    an integer division costs tens of instructions (the on-chip forward's tap took 57 with two of them, 28
    without; sass model, sm_90), and here one serves both."""
    k = K % N
    return tl.where(k == 0, 0, N - k), k


@triton.jit
def _next_shift(d, step, N):
    """``(d + step) mod N`` for ``d`` in [0, N) and ``step`` of 1 or -1."""
    d += step
    return tl.where(d < 0, d + N, tl.where(d >= N, d - N, d))


@triton.jit
def _circular(o_n, d, N):
    """``(o_n - d) mod N`` at rows ``0 <= o_n < N`` for a shift ``d`` in [0, N) (masked rows get any value;
    their loads are masked): a compare and a select a row, where an integer division a row costs tens of
    instructions, and the shift taps sit on every addressing kernel's critical path."""
    o = o_n - d
    return tl.where(o < 0, o + N, o)


@triton.jit
def _rolled(b_x, d, o_n, N):
    """``x[(n - d) mod N]`` at rows ``0 <= n < N`` of a vector held on chip (through shared memory), ``d`` in
    [0, N): the on-chip kernels' shift, where every source row is in the program. Masked rows get some row
    of x."""
    return tl.gather(b_x, _circular(o_n, d, N), 0)


@triton.jit
def _softmax_at(b_K, b_beta, b_max, b_sum):
    """``wc = softmax(beta K)`` from logits and the softmax's max and sum: one formula, so that every kernel
    that makes or remakes it agrees bit for bit.

    The exponent is at most 0 at every row of the memory (``max`` is its largest ``beta K``; only a fused
    multiply-add can put it an ulp above). The clamp is for rows past N, whose logit a masked load gives
    as 0: ``exp(0 - max)`` was inf where every row's ``beta K`` is below -88, and 0 * inf made the
    backward's block sums NaN. A product with the sum's reciprocal, which the compiler takes once, not a
    division at every row (7% of the shift-sharpen pass's instructions, sass model, sm_90)."""
    return tl.exp(tl.minimum(b_beta * b_K - b_max, 0.0)) * (1.0 / b_sum)


@triton.jit
def _wg(b_K, b_wp, b_beta, b_g, b_max, b_sum):
    """``wg = g softmax(beta K) + (1 - g) w_prev`` (see ``_softmax_at``)."""
    return b_g * _softmax_at(b_K, b_beta, b_max, b_sum) + (1.0 - b_g) * b_wp


@triton.jit
def _erase_add(b_keep, b_add, b_w, p_e, p_a, o_hw, o_m, m_m):
    """One write head's factor ``1 - w e`` of the erase product and term ``w a`` of the add sum."""
    b_e = tl.load(p_e + o_hw + o_m, mask=m_m, other=0.0).to(tl.float32)
    b_a = tl.load(p_a + o_hw + o_m, mask=m_m, other=0.0).to(tl.float32)
    return b_keep * (1.0 - b_w[:, None, None] * b_e[None, :, :]), b_add + b_w[:, None, None] * b_a[None, :, :]


@triton.jit
def _store_written(p_rows, b_mem, b_keep, b_add, s_new_n, o_n, o_m, m_nm):
    """``M_t = M * prod(1 - w e) + sum(w a)`` at rows ``o_n`` from ``p_rows`` (new_mem at the block's first row)."""
    b_new = b_mem * b_keep + b_add
    tl.store(p_rows + o_n[:, None, None] * s_new_n + o_m[None, :, :], b_new.to(p_rows.dtype.element_ty), mask=m_nm)


@triton.jit
def _wg_row(p_K, p_wp, o, b_beta, b_g, b_max, b_sum):
    """``wg`` of one head at the one row ``o`` (in [0, N)), from the stored logits."""
    return _wg(tl.load(p_K + o), tl.load(p_wp + o).to(tl.float32), b_beta, b_g, b_max, b_sum)


@triton.jit
def _shift(p_K, p_wp, p_s, b_beta, b_g, b_max, b_sum, n0, o_n, m_n, N, K: tl.constexpr, BN: tl.constexpr):
    """``ws[n] = sum_j s[j + K] wg[(n - j) mod N]``, ``j`` from ``-K`` to ``K``, at the block's rows ``o_n``
    (from row ``n0``) of one head (not 0 on masked rows).

    ``wg`` is made once at the block's rows, from the stored logits, and each tap takes its rows from that
    vector (``tl.gather``, through shared memory). The few rows a tap needs from past the block's ends (the
    halo: up to ``|j|`` a tap, wrapping around N as often as the shift does) are made a row at a time, each
    next row by ``_next_shift``. ``K`` is a constant, so the taps' loops unroll: with a runtime ``K``, their
    nested loops left ptxas short of predicate registers in unspecialized builds (8 to 24-byte stack
    frames). The halo's work grows as K^2 (K (K + 1) / 2 rows a side), against 2K + 1 loads of every row
    before: S = 3, the paper's, makes 2. The taps are summed in the order ``j = -K .. K``.

    Where each tap remade ``wg`` at its source rows from the logits, the shift-sharpen pass issued 19.0
    warp-instructions a memory row against 11.6, and the sharpening backward 23.2 against 16.5 (sass model,
    large shape, fp32, sm_90).
    """
    r = tl.arange(0, BN)
    rows = tl.minimum(N - n0, BN)
    b_wg = _wg(tl.load(p_K + o_n, mask=m_n, other=0.0), tl.load(p_wp + o_n, mask=m_n, other=0.0).to(tl.float32),
               b_beta, b_g, b_max, b_sum)
    b_ws = tl.zeros([BN], dtype=tl.float32)
    after = _next_shift(n0 + rows - 1, 1, N)  # the row after the block's last, mod N
    before = _next_shift(n0, -1, N)  # the row before its first
    for t in tl.static_range(K):  # j = t - K < 0: source rows r - j, past the block's end for its last -j rows
        i = r + (K - t)
        b_src = tl.gather(b_wg, tl.minimum(i, BN - 1), 0)
        o, past = after, i - rows  # the u-th row past the block's last is at past == u
        for u in tl.static_range(K - t):
            b_src = tl.where(past == u, _wg_row(p_K, p_wp, o, b_beta, b_g, b_max, b_sum), b_src)
            o = _next_shift(o, 1, N)
        b_ws += tl.load(p_s + t).to(tl.float32) * b_src
    b_ws += tl.load(p_s + K).to(tl.float32) * b_wg
    for j in tl.static_range(1, K + 1):  # source rows r - j, before the block's start for its first j rows
        i = r - j
        b_src = tl.gather(b_wg, tl.maximum(i, 0), 0)
        o, ahead = before, j - 1 - r  # the u-th row before the block's first is at ahead == u
        for u in tl.static_range(j):
            b_src = tl.where(ahead == u, _wg_row(p_K, p_wp, o, b_beta, b_g, b_max, b_sum), b_src)
            o = _next_shift(o, -1, N)
        b_ws += tl.load(p_s + K + j).to(tl.float32) * b_src
    return b_ws


@triton.jit
def _sharpened(b_ws, b_gamma, m_n):
    """``(log c, p)`` with ``c = max(ws, 1e-30)`` and ``p = c^gamma`` (0 on masked rows): one formula, so that
    the backward's recomputed ``p`` is the forward's, bit for bit."""
    b_logc = tl.log(tl.maximum(b_ws, 1e-30))
    return b_logc, tl.where(m_n, tl.exp(b_gamma * b_logc), 0.0)


@triton.jit
def _onchip_address(b_mem, b_mn, p_k, p_beta, p_g, p_s, p_gamma, p_wp, p_w, p_K, p_max, p_sum,
                    i_bh, o_n, o_m, m_n, m_m, N, M, K, BN: tl.constexpr):
    """One head's weighting over the whole memory; returns it rounded to w's dtype (as the reference reads with it).

    Every load comes before the first store: the compiler keeps a load after a store to a pointer that may
    alias it, and at the paper's size each load's latency would lie on the head's chain."""
    b_beta = tl.load(p_beta + i_bh).to(tl.float32)
    b_g = tl.load(p_g + i_bh).to(tl.float32)
    b_gamma = tl.load(p_gamma + i_bh).to(tl.float32)
    b_wp = tl.load(p_wp + i_bh * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_K = _cosine(b_mem, b_mn, tl.load(p_k + i_bh * M + o_m, mask=m_m, other=0.0).to(tl.float32))
    b_z = tl.where(m_n, b_beta * b_K, float("-inf"))
    b_max = tl.max(b_z, 0)
    b_sum = tl.sum(tl.exp(b_z - b_max), 0)
    b_wg = _wg(b_K, b_wp, b_beta, b_g, b_max, b_sum)
    S = 2 * K + 1
    b_ws = tl.zeros([BN], dtype=tl.float32)
    d, _ = _tap_shifts(K, N)
    for j in range(S):
        b_ws += tl.load(p_s + i_bh * S + j).to(tl.float32) * _rolled(b_wg, d, o_n, N)
        d = _next_shift(d, 1, N)
    _, b_p = _sharpened(b_ws, b_gamma, m_n)
    b_P = tl.sum(b_p, 0)
    b_w = (b_p / (b_P + 1e-16)).to(p_w.dtype.element_ty)
    tl.store(p_K + i_bh * N + o_n, b_K, mask=m_n)
    tl.store(p_max + i_bh, b_max)
    tl.store(p_sum + i_bh, b_sum)
    tl.store(p_w + i_bh * N + o_n, b_w, mask=m_n)
    return b_w.to(tl.float32)


@triton.jit
def _memory_step_onchip_kernel(p_mem, p_k, p_beta, p_g, p_s, p_gamma, p_wp, p_e, p_a,
                               p_w, p_r, p_new, p_K, p_max, p_sum,
                               s_mem_b, s_mem_n, s_new_b, s_new_n, H, R, W, K,
                               RW: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                               N: tl.constexpr, M: tl.constexpr):
    """The step of batch item ``i_b``: program ``i_g < R`` addresses read head ``i_g`` and reads with it;
    program ``R`` (``RW`` only) addresses the write heads [R, H) and stores new_mem. ``RW=False``: address only
    (R = H).

    ``W = H - R`` comes as an argument, not computed here: Triton makes an argument equal to 1 a constant,
    so with one write head (the paper's) the loop over write heads and the keep and add tiles it carries
    are gone (sass model, paper size, sm_90: 1,643 -> 1,427 warp-instructions a warp, 156 -> 80 registers).
    ``N`` and ``M`` are constants, as in the two on-chip backward kernels: a model's memory keeps one
    size, so each kernel compiles once for it, and the masks, the shift's wrap-around and the divisions
    by N fold (1,427 -> 1,158, 80 -> 46 registers; the per-head backward 1,792 -> 1,457, the dL/dmem
    kernel 879 -> 492). The shift comes as ``K`` (``S = 2K + 1`` taps), as in the per-head backward, so
    that the paper's S = 3 makes K = 1 a constant and the loops over taps unroll whole (counted 1,158 ->
    953, the per-head backward 1,457 -> 1,213; part of that is the model's overcount of partly unrolled
    loops going away, see ``benchmarks/sass_model.py``).

    A program per read head rather than one for the whole item: the paper-size step is bound by the
    latency of each head's chain of reductions (an H100 took 10.1 us with both heads in one program), and
    the programs run side by side. Each loads the item's memory, which is small here.

    The memory is held as (BN, BM / BC, BC): rows of chunks of BC columns (``_onchip_chunk``). Where rows
    load element by element (M = 20, the paper's: not 16-aligned), Triton spread a (BN, BM) tile's row
    over all 32 lanes of a warp, so every row vector of the addressing chain sat on every lane (16
    values a thread at BN = 128, 8 warps) and each row sum took five shuffle levels. With BC = 4 a row
    spans 4 lanes, its chunks in one thread's registers, and a row vector takes 2 values a thread:
    1,646 warp-instructions a warp at the paper's shape, 3,116 before (``benchmarks/sass_model.py``,
    sm_90, before ``_next_shift``). Rows that load 16 bytes a thread already span few lanes: BC = BM
    there, a (BN, 1, BM) tile.
    """
    i_b = tl.program_id(0).to(tl.int64)
    i_g = tl.program_id(1)
    o_n = tl.arange(0, BN)
    o_m = _chunked_columns(BM, BC)
    m_n = o_n < N
    m_m = o_m < M
    m_nm = m_n[:, None, None] & m_m[None, :, :]
    b_mem = tl.load(p_mem + i_b * s_mem_b + o_n[:, None, None] * s_mem_n + o_m[None, :, :], mask=m_nm,
                    other=0.0).to(tl.float32)
    b_mn = tl.maximum(tl.sqrt(_chunked_row_sums(b_mem * b_mem)), 1e-8)
    if i_g < R:
        b_w = _onchip_address(b_mem, b_mn, p_k, p_beta, p_g, p_s, p_gamma, p_wp, p_w, p_K, p_max, p_sum,
                              i_b * H + i_g, o_n, o_m, m_n, m_m, N, M, K, BN)
        if RW:
            b_r = tl.sum(b_w[:, None, None] * b_mem, 0)
            tl.store(p_r + (i_b * R + i_g) * M + o_m, b_r.to(p_r.dtype.element_ty), mask=m_m)
    elif RW:
        b_keep = tl.full([BN, BM // BC, BC], 1.0, dtype=tl.float32)
        b_add = tl.zeros([BN, BM // BC, BC], dtype=tl.float32)
        for hw in range(W):
            b_w = _onchip_address(b_mem, b_mn, p_k, p_beta, p_g, p_s, p_gamma, p_wp, p_w, p_K, p_max, p_sum,
                                  i_b * H + R + hw, o_n, o_m, m_n, m_m, N, M, K, BN)
            b_keep, b_add = _erase_add(b_keep, b_add, b_w, p_e, p_a, (i_b * W + hw) * M, o_m, m_m)
        _store_written(p_new + i_b * s_new_b, b_mem, b_keep, b_add, s_new_n, o_n, o_m, m_nm)


@triton.jit
def _tf32_split(b_x, ROUND: tl.constexpr):
    """``(hi, lo)`` with ``hi + lo == x`` exactly: ``hi`` is ``x`` with tf32's 10 mantissa bits, cut (its low 13
    bits cleared) or, with ``ROUND``, rounded to the nearest (ties away from zero: half the dropped bits' unit
    added first). A tensor core reads a tf32 operand's top 19 bits, so it reads ``hi`` whole and ``lo`` (under
    2^-10 |x| cut, 2^-11 rounded) to within 2^-10 of itself. Two or three integer and float instructions an
    element, where a rounding conversion took more.

    A cut ``hi`` is never larger than ``x``: ``lo`` has ``x``'s sign, and what the three products leave out
    (``mem_lo k_lo``, ``lo`` past tf32) leans one way in every term, which near the key, where the terms agree
    in sign, adds up. The memory tile is cut nonetheless: rounded, the similarity pass (as launched at the
    large shape, sm_90) took 245 registers, where with the tile cut it takes 136, and 9% more instructions (a
    float rounding, ``x (1 + 2^-12)`` cut, took 245 too). The small operand (the keys, dL/dr) is rounded:
    3 registers and 2% more instructions than both cut, and half their error near the key (``python -m
    benchmarks.tf32_error``, M 8 / 64: cosine error 2.5e-7 / 2.8e-7 both cut, 1.2e-7 / 1.4e-7 now, 0.5e-7 /
    0.9e-7 both rounded, 0.2e-7 / 0.8e-7 for fp32 multiply-adds). Rounding takes ``x`` within about 2^-12
    (relative) of the largest float to inf, far past where the norms' squares overflow."""
    b_bits = b_x.to(tl.uint32, bitcast=True)
    if ROUND:
        b_bits += 0x1000
    b_hi = (b_bits & 0xFFFFE000).to(tl.float32, bitcast=True)
    return b_hi, b_x - b_hi


@triton.jit
def _tf32x3_dot(b_a_hi, b_a_lo, b_b, A_IS_TF32: tl.constexpr):
    """``a b`` in fp32 on the tensor cores: ``a_hi b_lo + a_lo b_hi + a_hi b_hi``, the small terms first, with
    ``a``'s parts from ``_tf32_split`` (split once, before the loads of every ``b`` it meets: split after them,
    the similarity pass took 168 registers, not 133, at stop 23) and ``b``'s split here. Two products where ``a`` is a
    tf32 value already (``A_IS_TF32``: loaded from bf16 or fp16), ``a_lo`` unused."""
    b_b_hi, b_b_lo = _tf32_split(b_b, ROUND=True)
    b_dot = tl.dot(b_a_hi, b_b_lo, input_precision="tf32")
    if not A_IS_TF32:
        b_dot = tl.dot(b_a_lo, b_b_hi, b_dot, input_precision="tf32")
    return tl.dot(b_a_hi, b_b_hi, b_dot, input_precision="tf32")


@triton.jit
def _similarity_kernel(p_mem, p_k, p_beta, p_K, p_pmax, p_psum, s_mem_b, s_mem_n, N, M, H, NB,
                       BN: tl.constexpr, BM: tl.constexpr, BH: tl.constexpr, HG: tl.constexpr):
    """Large memory, pass 1: logits of every head on rows of block ``i_n``; max and sum-exp partials.

    Rows are int32 offsets ``o_n`` from the block's first row ``n0`` (int64), in every large-memory kernel:
    a tile of 64-bit offsets or pointers takes twice the registers.

    The dot products of BH heads at a time are one (BN, BM) x (BM, BH) product on the tensor cores, in tf32
    three times over: with ``x = x_hi + x_lo`` (``_tf32_split``), ``mem k = mem_hi k_hi + mem_hi k_lo +
    mem_lo k_hi``, each product of tf32 values exact in fp32 and summed in fp32; what is left out,
    ``mem_lo k_lo`` and the ``lo`` parts' last bits, is within about 2^-21 |mem[n, m] k[m]| a term; near the
    key, where the terms agree in sign, the cosine's error is about 2x fp32's at M = 64 and 5x at M = 8
    (``_tf32_split``, which cuts the memory tile and rounds the keys). A bf16 or fp16 slot is tf32 already
    (``mem_lo = 0``): two products. The logits are the product times the reciprocals of the norms (a division
    a logit took 13 instructions). Looping over heads on CUDA cores took 204 warp-instructions a head and
    block (one warp, BN 32, BM 64, fp32, sm_90) and 1,346 a block of 5 heads; this takes 952 (936 with the
    keys' split cut; ``benchmarks/sass_model.py``).

    The block is loaded as (BN, BM / BC, BC): rows of chunks of BC elements, one 32-byte sector, with the
    chunk axis the slowest, so Triton gives a sector to two lanes and a row's chunks to the same two and the
    row norms are sums in registers and one shuffle (as a (BN, BM) tile: four shuffle levels a row, and 153
    against 84 instructions for the load).
    """
    BC: tl.constexpr = 256 // p_mem.dtype.element_ty.primitive_bitwidth
    i_n, i_b = _block_and_item(NB)
    i_n = i_n.to(tl.int64)
    n0 = i_n * BN
    o_n = tl.arange(0, BN)
    o_c = _chunked_columns(BM, BC)
    m_n = o_n < N - n0
    b_mem = tl.load(p_mem + i_b * s_mem_b + n0 * s_mem_n + o_n[:, None, None] * s_mem_n + o_c[None, :, :],
                    mask=m_n[:, None, None] & (o_c < M)[None, :, :], other=0.0).to(tl.float32)
    b_rmn = 1.0 / tl.maximum(tl.sqrt(_chunked_row_sums(b_mem * b_mem)), 1e-8)
    b_mem_hi, b_mem_lo = _tf32_split(tl.reshape(b_mem, (BN, BM)), ROUND=False)
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    for g in tl.static_range(HG):
        o_h = g * BH + tl.arange(0, BH)
        m_h = o_h < H
        i_bh = i_b * H + o_h
        # k as (BM, BH): the product's second operand.
        b_k = tl.load(p_k + i_bh[None, :] * M + o_m[:, None], mask=m_m[:, None] & m_h[None, :],
                      other=0.0).to(tl.float32)
        b_rkn = 1.0 / tl.maximum(tl.sqrt(tl.sum(b_k * b_k, 0)), 1e-8)
        b_beta = tl.load(p_beta + i_bh, mask=m_h, other=0.0).to(tl.float32)
        b_dot = _tf32x3_dot(b_mem_hi, b_mem_lo, b_k, p_mem.dtype.element_ty != tl.float32)
        b_K = b_dot * b_rmn[:, None] * b_rkn[None, :]
        tl.store(p_K + i_bh[None, :] * N + n0 + o_n[:, None], b_K, mask=m_n[:, None] & m_h[None, :])
        b_z = tl.where(m_n[:, None], b_beta[None, :] * b_K, float("-inf"))
        b_max = tl.max(b_z, 0)
        tl.store(p_pmax + i_bh * NB + i_n, b_max, mask=m_h)
        tl.store(p_psum + i_bh * NB + i_n, tl.sum(tl.exp(b_z - b_max[None, :]), 0), mask=m_h)


@triton.jit
def _softmax_merge_kernel(p_pmax, p_psum, p_max, p_sum, NB, BN: tl.constexpr):
    """Large memory, between passes 1 and 2: head ``i_bh``'s softmax max and sum from its ``NB`` block
    partials, ``max = max_j m_j`` and ``sum = sum_j s_j exp(m_j - max)``, in a fixed order. One launch where
    torch took five (max, subtract, exp, multiply, sum), each a few microseconds at any size.

    One pass over the partials, each lane's sum rescaled as its max grows (an online softmax), where two
    passes (the max, then the sum) waited twice on their loads; 80 programs at the large shape, so the
    launch is their latency."""
    i_bh = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, BN)
    # A lane with no partial yet holds float32's lowest finite value, not -inf: -inf - -inf would be NaN,
    # where this is 0 (its sum, 0, times exp(0)). Every block's max is finite (a block has a row) and at least
    # that, so the head's max is a partial's.
    b_max = tl.full([BN], -3.4028234663852886e38, dtype=tl.float32)
    b_sum = tl.zeros([BN], dtype=tl.float32)
    for i0 in range(0, NB, BN):
        m = i0 + o < NB
        b_m = tl.load(p_pmax + i_bh * NB + i0 + o, mask=m, other=-3.4028234663852886e38)
        b_new = tl.maximum(b_max, b_m)
        b_sum = b_sum * tl.exp(b_max - b_new) + tl.load(p_psum + i_bh * NB + i0 + o, mask=m, other=0.0) * tl.exp(
            b_m - b_new)
        b_max = b_new
    b_mx = tl.max(b_max, 0)
    tl.store(p_max + i_bh, b_mx)
    tl.store(p_sum + i_bh, tl.sum(b_sum * tl.exp(b_max - b_mx), 0))


@triton.jit
def _shifted_block(p_K, p_wp, p_beta, p_g, p_s, p_max, p_sum, i_n, i_bh, N, K: tl.constexpr, BN: tl.constexpr):
    """``ws`` of head ``i_bh`` on block ``i_n`` (``_shift``, from the stored logits), its rows and their mask:
    the large-memory sharpening passes, forward and backward, make it the same way."""
    n0 = i_n * BN
    o_n = n0 + tl.arange(0, BN)
    m_n = o_n < N
    b_ws = _shift(p_K + i_bh * N, p_wp + i_bh * N, p_s + i_bh * (2 * K + 1), tl.load(p_beta + i_bh).to(tl.float32),
                  tl.load(p_g + i_bh).to(tl.float32), tl.load(p_max + i_bh), tl.load(p_sum + i_bh), n0, o_n, m_n, N, K,
                  BN)
    return b_ws, o_n, m_n


@triton.jit
def _shift_sharpen_kernel(p_K, p_wp, p_beta, p_g, p_s, p_gamma, p_max, p_sum, p_pw, p_pP, N, K: tl.constexpr, NB,
                          BN: tl.constexpr):
    """Large memory, pass 2: ``ws^gamma`` of head ``i_bh`` on block ``i_n`` (fp32) and its block sum.

    This pass and the sharpening's backward take the shift's half-width ``K`` (``S = 2K + 1`` taps) as a
    constant, a build for each S (``_shift``); the shift pass of the backward and the on-chip kernels take it
    at run time, where Triton makes K = 1 (S = 3) a constant and their tap loops unroll."""
    i_n, i_bh = _block_and_item(NB)
    b_ws, o_n, m_n = _shifted_block(p_K, p_wp, p_beta, p_g, p_s, p_max, p_sum, i_n, i_bh, N, K, BN)
    _, b_p = _sharpened(b_ws, tl.load(p_gamma + i_bh).to(tl.float32), m_n)
    tl.store(p_pw + i_bh * N + o_n, b_p, mask=m_n)
    tl.store(p_pP + i_bh * NB + i_n, tl.sum(b_p, 0))


@triton.jit
def _load_w(p_w, p_P, p_wout, i_bh, o_row, o_n, m_n, NORMALIZE: tl.constexpr, STORE: tl.constexpr):
    """Head ``i_bh``'s weighting at rows ``o_n`` from offset ``o_row`` of the (B, H, N) vectors: given
    (``p_w``), or ``ws^gamma / (P + eps)`` in w's dtype, stored to ``p_wout`` where ``STORE``."""
    if NORMALIZE:
        b_w = tl.load(p_w + o_row + o_n, mask=m_n, other=0.0) / (tl.load(p_P + i_bh) + 1e-16)
        b_w = b_w.to(p_wout.dtype.element_ty)
        if STORE:
            tl.store(p_wout + o_row + o_n, b_w, mask=m_n)
    else:
        b_w = tl.load(p_w + o_row + o_n, mask=m_n, other=0.0)
    return b_w.to(tl.float32)


@triton.jit
def _read_write_kernel(p_mem, p_w, p_P, p_e, p_a, p_wout, p_rpart, p_new,
                       s_mem_b, s_mem_n, s_new_b, s_new_n, N, M, R, W, NB,
                       NORMALIZE: tl.constexpr, WRITE: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """Reads of heads [0, R) as per-block partials ``(B, NB, R, M)``; write of heads [R, R + W) on block ``i_n``."""
    i_n, i_b = _block_and_item(NB)
    i_n = i_n.to(tl.int64)
    n0 = i_n * BN
    o_n = tl.arange(0, BN)
    o_m = tl.arange(0, BM)
    m_n = o_n < N - n0
    m_m = o_m < M
    m_nm = m_n[:, None] & m_m[None, :]
    b_mem = tl.load(p_mem + i_b * s_mem_b + n0 * s_mem_n + o_n[:, None] * s_mem_n + o_m[None, :],
                    mask=m_nm, other=0.0).to(tl.float32)
    H = R + W
    for h in range(R):
        b_w = _load_w(p_w, p_P, p_wout, i_b * H + h, (i_b * H + h) * N + n0, o_n, m_n, NORMALIZE, True)
        b_r = tl.sum(b_w[:, None] * b_mem, 0)
        tl.store(p_rpart + ((i_b * NB + i_n) * R + h) * M + o_m, b_r, mask=m_m, eviction_policy="evict_last")
    if WRITE:
        # The erase of every head, then the adds, on new_mem itself: a tile that starts as the loaded block
        # keeps its layout through the loops. Tiles started from constants (1 and 0) got another layout, and
        # two shared-memory conversions of the block at the end (at M a multiple of 16). The store's
        # addresses before the loops: after them, ptxas spilled (BN=256, BM=16, 8 warps, bf16, sm_90).
        p_rows = p_new + i_b * s_new_b + n0 * s_new_n + o_n[:, None] * s_new_n + o_m[None, :]
        b_new = b_mem
        for h in range(R, H):
            b_w = _load_w(p_w, p_P, p_wout, i_b * H + h, (i_b * H + h) * N + n0, o_n, m_n, NORMALIZE, True)
            b_e = tl.load(p_e + (i_b * W + h - R) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
            b_new *= 1.0 - b_w[:, None] * b_e[None, :]
        for h in range(R, H):
            b_w = _load_w(p_w, p_P, p_wout, i_b * H + h, (i_b * H + h) * N + n0, o_n, m_n, NORMALIZE, False)
            b_a = tl.load(p_a + (i_b * W + h - R) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
            b_new += b_w[:, None] * b_a[None, :]
        tl.store(p_rows, b_new.to(p_new.dtype.element_ty), mask=m_nm)


@triton.jit(do_not_specialize=("RD", "WD", "HAS_DW"))
def _read_write_bwd_kernel(p_mem, p_w, p_e, p_a, p_dr, p_dnew, p_dwin, p_dw, p_depart, p_dapart,
                           s_mem_b, s_mem_n, s_dnew_b, s_dnew_n, N, M, R, W, NB, RD, WD, HAS_DW,
                           RG: tl.constexpr, BH: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """dL/dw (fp32, all R + W heads): from the reads and the write, plus the given dL/dw ``p_dwin`` (in its
    dtype) where ``HAS_DW``: the total that the addressing backward takes, so that no vector pass reads and
    rewrites it. dL/de, dL/da as per-block partials (B, NB, W, M).

    ``RD`` (R or 0) and ``WD`` (W or 0) say whether dL/dr and dL/dnew_mem were given; the ``RG`` products
    cover all R read heads either way (their dL/dw is at least the given one). The write heads'
    loop runs over W either way (without dL/dnew_mem it loads zeros, and stores the given dL/dw or 0), so that
    Triton's constant for W = 1 compiles it to straight code: 10% fewer instructions at the large shape
    (sass model, sm_90), where a loop over WD, a runtime value, stayed a loop. The
    erase product without head h is rebuilt from the other heads, never by dividing by
    ``1 - w e`` (unstable where it is near zero).

    The reads' ``dw_h[n] = mem[n] dr_h`` are ``RG`` (BN, BM) x (BM, BH) products on the tensor cores, tf32
    three times over as in ``_similarity_kernel``: 875 warp-instructions a warp where a loop over heads took
    1,170 (two warps, BN 32, BM 64, fp32, sm_90, the large shape's 4 reads; ``benchmarks/sass_model.py``;
    935 since the pass adds the given dL/dw, stop 41).
    They come before dL/dnew_mem is loaded, so that its tile is not held through them beside mem's parts
    (after the write heads, ptxas spilled in six configurations), and launch with ``_config.MAXNREG``.
    """
    i_n, i_b = _block_and_item(NB)
    i_n = i_n.to(tl.int64)
    n0 = i_n * BN
    o_n = tl.arange(0, BN)
    o_m = tl.arange(0, BM)
    m_n = o_n < N - n0
    m_m = o_m < M
    m_nm = m_n[:, None] & m_m[None, :]
    H = R + W
    b_mem = tl.load(p_mem + i_b * s_mem_b + n0 * s_mem_n + o_n[:, None] * s_mem_n + o_m[None, :],
                    mask=m_nm, other=0.0).to(tl.float32)
    if RG > 0:
        b_mem_hi, b_mem_lo = _tf32_split(b_mem, ROUND=False)
    for g in tl.static_range(RG):
        o_h = g * BH + tl.arange(0, BH)
        b_dr = tl.load(p_dr + (i_b * R + o_h[None, :]) * M + o_m[:, None], mask=m_m[:, None] & (o_h < RD)[None, :],
                       other=0.0).to(tl.float32)
        o_rdw = (i_b * H + o_h[None, :]) * N + n0 + o_n[:, None]
        m_rdw = m_n[:, None] & (o_h < R)[None, :]
        b_rdw = _tf32x3_dot(b_mem_hi, b_mem_lo, b_dr, p_mem.dtype.element_ty != tl.float32)
        b_rdw += tl.load(p_dwin + o_rdw, mask=m_rdw & (HAS_DW != 0), other=0.0).to(tl.float32)
        tl.store(p_dw + o_rdw, b_rdw, mask=m_rdw)
    # Loaded once, before the loop (masked off without dL/dnew_mem): its addresses, a tile of 64-bit
    # pointers where rows are not 16-aligned, no longer live through it (2 warps spilled, sm_80 and sm_90).
    b_dnew = tl.load(p_dnew + i_b * s_dnew_b + n0 * s_dnew_n + o_n[:, None] * s_dnew_n + o_m[None, :],
                     mask=m_nm & (WD != 0), other=0.0).to(tl.float32)
    o_wb = (i_b * H + R) * N + n0  # the write heads' rows of (B, H, N) vectors at the block
    p_ww = p_w + o_wb
    for hw in range(W):
        # dnew * mem * (the other heads' erase factors), built in place: no tile of the factors alone.
        b_derase = b_dnew * b_mem
        for h2 in range(W):
            b_w2 = tl.load(p_ww + h2 * N + o_n, mask=m_n, other=0.0).to(tl.float32)
            b_e2 = tl.load(p_e + (i_b * W + h2) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
            b_derase *= tl.where(h2 == hw, 1.0, 1.0 - b_w2[:, None] * b_e2[None, :])
        b_w = tl.load(p_ww + hw * N + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_e = tl.load(p_e + (i_b * W + hw) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_a = tl.load(p_a + (i_b * W + hw) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_dw = tl.sum(b_dnew * b_a[None, :] - b_derase * b_e[None, :], 1)
        o_part = ((i_b * NB + i_n) * W + hw) * M + o_m
        tl.store(p_depart + o_part, -tl.sum(b_derase * b_w[:, None], 0), mask=m_m, eviction_policy="evict_last")
        tl.store(p_dapart + o_part, tl.sum(b_dnew * b_w[:, None], 0), mask=m_m, eviction_policy="evict_last")
        # The given dL/dw last, where the tiles are no longer held (W = 1): loaded beside them, the large shape's
        # launch took 138 registers where 127 (fp32, sm_90), past 128, so 7 programs to an SM, not 8.
        b_dw += tl.load(p_dwin + o_wb + hw * N + o_n, mask=m_n & (HAS_DW != 0), other=0.0).to(tl.float32)
        tl.store(p_dw + o_wb + hw * N + o_n, b_dw, mask=m_n)


@triton.jit
def _sharpen_bwd_kernel(p_dw, p_K, p_wp, p_beta, p_g, p_s, p_gamma, p_max, p_sum, p_v, p_psums,
                        N, K: tl.constexpr, NB, BN: tl.constexpr):
    """Addressing backward, pass 1, head ``i_bh`` on block ``i_n``: the sharpening, up to its sums.

    With ``c = max(ws, 1e-30)``, ``p = c^gamma``, ``w = p / Pe`` (``Pe = P + eps``, ``P = sum_n p``) and
    ``dot1 = sum_n dw w``: ``dws = (dw - dot1) gamma w / c = (dw - dot1) gamma (v / Pe)``, with ``v = p / c``
    where ``ws >= 1e-30``, else 0; and ``dgamma = sum_n (dw - dot1) w log c``. ``P`` and ``dot1`` are sums
    over every row, so this pass stores what the next needs to finish at any row: ``v`` (fp32), without
    gamma, which the next pass multiplies in with ``1 / Pe``: ``gamma p / c`` overflowed fp32 where ``p`` is
    near its largest (gamma 11,000 with ``ws`` at the (1 + 2^-8)^2 that the value checks allow), and made the
    gradients NaN. From the total ``dw`` (fp32: the reads', the write's and the given, from
    ``_read_write_bwd``), block partials (B, H, NB, 4) of ``P``, ``sum_n dw p``, ``sum_n dw p log c`` and
    ``sum_n p log c``. ``ws`` and ``p`` are recomputed as the forward does (``_shifted_block``,
    ``_sharpened``), the halo from the stored logits: ``p`` and its block sums are the forward's, bit for bit.
    One recompute, where a pass for the sums and another for dws took one each.

    Not the saved ``w``: in bf16 its rounding, through ``dot1 = sum_n dw w``, spoils dL/dgamma (a difference
    of nearly equal sums).
    """
    i_n, i_bh = _block_and_item(NB)
    b_gamma = tl.load(p_gamma + i_bh).to(tl.float32)
    b_ws, o_n, m_n = _shifted_block(p_K, p_wp, p_beta, p_g, p_s, p_max, p_sum, i_n, i_bh, N, K, BN)
    # Masked rows get p = 0 and load dw = 0, so they add nothing below.
    b_logc, b_p = _sharpened(b_ws, b_gamma, m_n)
    b_dw = tl.load(p_dw + i_bh * N + o_n, mask=m_n, other=0.0)
    tl.store(p_v + i_bh * N + o_n, tl.where(b_ws >= 1e-30, b_p / tl.maximum(b_ws, 1e-30), 0.0), mask=m_n)
    b_plogc = b_p * b_logc
    p_blk = p_psums + (i_bh * NB + i_n) * 4
    tl.store(p_blk, tl.sum(b_p, 0))
    tl.store(p_blk + 1, tl.sum(b_dw * b_p, 0))
    tl.store(p_blk + 2, tl.sum(b_dw * b_plogc, 0))
    tl.store(p_blk + 3, tl.sum(b_plogc, 0))


@triton.jit
def _interp_bwd_kernel(p_dw, p_v, p_psums, p_sums, p_K, p_wp, p_beta, p_g, p_s, p_gamma, p_max, p_sum, p_dwp,
                       p_dwc, p_parts, p_pdot, N, K, NB, SP, BN: tl.constexpr):
    """Addressing backward, pass 2, head ``i_bh`` on block ``i_n``: the sharpening's end, the shift and the
    interpolation.

    From pass 1's sums over blocks (given, (B, H, 4); the first two, ``P`` and ``sum_n dw p``): ``Pe = P + eps``,
    ``dot1 = sum_n dw p / Pe``; then at any row ``dws = (dw - dot1) (v gamma / Pe)`` from the total dL/dw
    and pass 1's ``v`` (``v gamma / Pe = gamma w / c``, at most about gamma where ``p`` is large).
    ``dwg[n] = sum_j s[j + K] dws[(n + j) mod N]`` (the halo from the stored vectors);
    ``dw_prev = (1 - g) dwg`` (stored in its dtype); ``dwc = g dwg`` (stored, fp32). Block partials,
    ``S + 2`` values from ``p_parts`` every ``SP``: dL/dgamma, ``(sum_n dw p log c - dot1 sum_n p log c) / Pe``
    from this block's partials of pass 1; ``ds[j + K] = sum_n dws[n] wg[(n - j) mod N]
    = sum_n wg[n] dws[(n + j) mod N]``; ``dg = sum_n dwg (wc - w_prev)``; and of ``dot2 = sum_n dwc wc``
    (B, H, NB). dL/ds is taken here, from the taps' dws that dwg needs and this block's own wg.
    """
    S = 2 * K + 1
    i_n, i_bh = _block_and_item(NB)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    b_rPe = 1.0 / (tl.load(p_sums + i_bh * 4) + 1e-16)
    b_dot1 = tl.load(p_sums + i_bh * 4 + 1) * b_rPe
    b_scale = tl.load(p_gamma + i_bh).to(tl.float32) * b_rPe
    b_g = tl.load(p_g + i_bh).to(tl.float32)
    b_K = tl.load(p_K + i_bh * N + o_n, mask=m_n, other=0.0)
    b_wp = tl.load(p_wp + i_bh * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    # Rows past N: wc finite (_softmax_at), dws 0 (masked loads), so they add nothing to the sums.
    b_wc = _softmax_at(b_K, tl.load(p_beta + i_bh).to(tl.float32), tl.load(p_max + i_bh), tl.load(p_sum + i_bh))
    b_wg = b_g * b_wc + (1.0 - b_g) * b_wp  # as _wg makes it
    p_blk = p_parts + (i_bh * NB + i_n) * SP
    p_sharpen = p_psums + (i_bh * NB + i_n) * 4
    tl.store(p_blk, (tl.load(p_sharpen + 2) - b_dot1 * tl.load(p_sharpen + 3)) * b_rPe)
    b_dwg = tl.zeros([BN], dtype=tl.float32)
    _, d = _tap_shifts(K, N)
    for j in range(S):
        o_src = i_bh * N + _circular(o_n, d, N)
        b_v = tl.load(p_v + o_src, mask=m_n, other=0.0)
        b_dws = (tl.load(p_dw + o_src, mask=m_n, other=0.0) - b_dot1) * (b_v * b_scale)
        b_dwg += tl.load(p_s + i_bh * S + j).to(tl.float32) * b_dws
        tl.store(p_blk + 1 + j, tl.sum(b_wg * b_dws, 0))
        d = _next_shift(d, -1, N)
    tl.store(p_blk + 1 + S, tl.sum(b_dwg * (b_wc - b_wp), 0))
    tl.store(p_dwp + i_bh * N + o_n, ((1.0 - b_g) * b_dwg).to(p_dwp.dtype.element_ty), mask=m_n)
    b_dwc = b_g * b_dwg
    tl.store(p_dwc + i_bh * N + o_n, b_dwc, mask=m_n)
    tl.store(p_pdot + i_bh * NB + i_n, tl.sum(b_dwc * b_wc, 0))


@triton.jit
def _softmax_bwd_kernel(p_K, p_dwc, p_beta, p_max, p_sum, p_dot, p_k, p_ck, p_cn, p_pdbeta, N, M, H, NB, SP,
                        BN: tl.constexpr, BM: tl.constexpr):
    """Addressing backward, pass 3, block ``i_n`` of item ``i_b``, every head: the softmax backward and the
    cosine's factors of each row, for ``_mem_bwd_kernel``.

    From dL/dwc and ``dot2 = sum_n dwc wc`` (given): ``dz = wc (dwc - dot2)``, ``dK = beta dz``. Stores
    ``ck = dK / max(|k|, eps)`` (B, H, N) and ``cn = sum_h dK K`` (B, N), fp32; block partials of
    ``dbeta = sum_n dz K``, every ``SP`` values from ``p_pdbeta``. Here, a row to a thread, rather than in the
    pass over memory, whose programs hold each row's vector values on many threads. The key's norm is taken
    here, M products a program and head, where torch took two launches for it.
    """
    i_n, i_b = _block_and_item(NB)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_m = tl.arange(0, BM)
    b_cn = tl.zeros([BN], dtype=tl.float32)
    for h in range(H):
        i_bh = i_b * H + h
        b_k = tl.load(p_k + i_bh * M + o_m, mask=o_m < M, other=0.0).to(tl.float32)
        b_kn = tl.maximum(tl.sqrt(tl.sum(b_k * b_k, 0)), 1e-8)
        b_K = tl.load(p_K + i_bh * N + o_n, mask=m_n, other=0.0)
        b_beta = tl.load(p_beta + i_bh).to(tl.float32)
        b_wc = tl.where(m_n, _softmax_at(b_K, b_beta, tl.load(p_max + i_bh), tl.load(p_sum + i_bh)), 0.0)
        b_dwc = tl.load(p_dwc + i_bh * N + o_n, mask=m_n, other=0.0)
        b_dz = b_wc * (b_dwc - tl.load(p_dot + i_bh))
        tl.store(p_pdbeta + (i_bh * NB + i_n) * SP, tl.sum(b_dz * b_K, 0))
        b_dK = b_beta * b_dz
        tl.store(p_ck + i_bh * N + o_n, b_dK / b_kn, mask=m_n)
        b_cn += b_dK * b_K
    tl.store(p_cn + i_b * N + o_n, b_cn, mask=m_n)


@triton.jit(do_not_specialize=("RD", "HAS_DNEW"))
def _mem_bwd_kernel(p_mem, p_w, p_e, p_dr, p_dnew, p_k, p_ck, p_cn, p_dmem, p_dkpart,
                    s_mem_b, s_mem_n, s_dnew_b, s_dnew_n, s_dmem_b, s_dmem_n, N, M, R, W, HK, NB, RD, HAS_DNEW,
                    HAS_DK: tl.constexpr, BN: tl.constexpr, BM: tl.constexpr):
    """dL/dmem on block ``i_n``: write (``dnew * keep``), reads (``sum_h w_h dr_h``), cosine of the HK addressing
    heads; per-block partials (B, NB, HK, M) of ``sum_n c[n] mem[n]`` for dL/dk.

    The cosine's backward from ``_softmax_bwd_kernel``'s factors: with ``c = ck / max(|mem[n]|, eps)``
    (``ck = dK / max(|k|, eps)``), ``dmem[n] += sum_h c k_h - cn mem[n] / max(|mem[n]|, eps)^2``
    (``cn = sum_h dK K``; no norm term where ``|mem[n]| < eps``, which is clamped).

    ``RD`` (R or 0) and ``HAS_DNEW`` (0 or 1) say whether dL/dr and dL/dnew_mem were given: runtime values
    that Triton is told not to specialize (it makes an argument equal to 1 a constant), so one compiled
    kernel serves every combination (a masked-off load moves no data). The erase loop runs over W either
    way (on a zero dL/dnew_mem without one), so that W = 1 is straight code (4% fewer instructions at the
    large shape)."""
    i_n, i_b = _block_and_item(NB)
    i_n = i_n.to(tl.int64)
    # Rows as int32 offsets from the block's int64 base: tiles of 64-bit offsets cost registers, and with
    # bf16 tensors ptxas spilled rather than go past 96 of them (HAS_DK=0, BN * BM = 2048, 4 warps, sm_90).
    n0 = i_n * BN
    o_n = tl.arange(0, BN)
    o_m = tl.arange(0, BM)
    m_n = o_n < N - n0
    m_m = o_m < M
    m_nm = m_n[:, None] & m_m[None, :]
    H = R + W
    # The store's addresses first: made after the loops, ptxas spilled (fp32 parameters, bf16 memory, sm_90).
    p_rows = p_dmem + i_b * s_dmem_b + n0 * s_dmem_n + o_n[:, None] * s_dmem_n + o_m[None, :]
    b_dnew = tl.load(p_dnew + i_b * s_dnew_b + n0 * s_dnew_n + o_n[:, None] * s_dnew_n + o_m[None, :],
                     mask=m_nm & (HAS_DNEW != 0), other=0.0).to(tl.float32)
    for h in range(W):
        b_w = tl.load(p_w + (i_b * H + R + h) * N + n0 + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_e = tl.load(p_e + (i_b * W + h) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_dnew *= 1.0 - b_w[:, None] * b_e[None, :]
    b_dmem = b_dnew
    for h in range(RD):
        b_w = tl.load(p_w + (i_b * H + h) * N + n0 + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_dr = tl.load(p_dr + (i_b * R + h) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_dmem += b_w[:, None] * b_dr[None, :]
    if HAS_DK:
        b_mem = tl.load(p_mem + i_b * s_mem_b + n0 * s_mem_n + o_n[:, None] * s_mem_n + o_m[None, :],
                        mask=m_nm, other=0.0).to(tl.float32)
        b_norm = tl.sqrt(tl.sum(b_mem * b_mem, 1))
        b_inv = 1.0 / tl.maximum(b_norm, 1e-8)
        for h in range(HK):
            i_bh = i_b * HK + h
            b_k = tl.load(p_k + i_bh * M + o_m, mask=m_m, other=0.0).to(tl.float32)
            b_c = tl.load(p_ck + i_bh * N + n0 + o_n, mask=m_n, other=0.0) * b_inv
            b_dmem += b_c[:, None] * b_k[None, :]
            tl.store(p_dkpart + ((i_b * NB + i_n) * HK + h) * M + o_m, tl.sum(b_c[:, None] * b_mem, 0), mask=m_m,
                     eviction_policy="evict_last")
        b_cn = tl.load(p_cn + i_b * N + n0 + o_n, mask=m_n, other=0.0)
        b_cn = tl.where(b_norm >= 1e-8, b_cn * b_inv * b_inv, 0.0)
        b_dmem -= b_cn[:, None] * b_mem
    tl.store(p_rows, b_dmem.to(p_dmem.dtype.element_ty), mask=m_nm)


@triton.jit
def _head_grads_kernel(p_part, p_dkrows, p_k, p_beta, p_dk, p_dbeta, p_dg, p_ds, p_dgamma, NB, M, S, SP,
                       BN: tl.constexpr, BP: tl.constexpr, BM: tl.constexpr):
    """Large-memory backward, last, head ``i_bh``: dL/dgamma, dL/ds, dL/dg and dL/dbeta, the sums of their
    ``NB`` block partials (a row of ``SP = S + 3`` values a block, in that order), taken in a fixed order;
    and ``dk = dk_rows - beta dbeta k / max(|k|, eps)^2`` (the norm's term only where ``|k| >= eps``), with
    ``dk_rows = sum_n c[n] mem[n]`` from ``_mem_bwd_kernel`` and ``sum_n dK K = beta dbeta``. Stored in the
    parameters' dtype: one launch where torch took about fifteen, each a few microseconds at any size.

    The columns in chunks of ``BP``, so that one compiled kernel takes any S.
    """
    i_bh = tl.program_id(0).to(tl.int64)
    o_b = tl.arange(0, BN)
    dt = p_dk.dtype.element_ty
    b_dbeta = tl.zeros([], dtype=tl.float32)
    for c0 in range(0, SP, BP):
        o_c = c0 + tl.arange(0, BP)
        b_acc = tl.zeros([BN, BP], dtype=tl.float32)
        for i0 in range(0, NB, BN):
            m = (i0 + o_b < NB)[:, None] & (o_c < SP)[None, :]
            b_acc += tl.load(p_part + (i_bh * NB + i0 + o_b)[:, None] * SP + o_c[None, :], mask=m, other=0.0)
        b_tot = tl.sum(b_acc, 0)
        # One value a column; each scalar gradient is stored from the lane of its column.
        tl.store(p_dgamma + i_bh + o_c * 0, b_tot.to(dt), mask=o_c == 0)
        tl.store(p_ds + i_bh * S + o_c - 1, b_tot.to(dt), mask=(o_c >= 1) & (o_c <= S))
        tl.store(p_dg + i_bh + o_c * 0, b_tot.to(dt), mask=o_c == S + 1)
        tl.store(p_dbeta + i_bh + o_c * 0, b_tot.to(dt), mask=o_c == S + 2)
        b_dbeta += tl.sum(tl.where(o_c == S + 2, b_tot, 0.0), 0)
    o_m = tl.arange(0, BM)
    m_m = o_m < M
    b_k = tl.load(p_k + i_bh * M + o_m, mask=m_m, other=0.0).to(tl.float32)
    b_norm = tl.sqrt(tl.sum(b_k * b_k, 0))
    b_kn = tl.maximum(b_norm, 1e-8)
    b_coef = tl.where(b_norm >= 1e-8, tl.load(p_beta + i_bh).to(tl.float32) * b_dbeta / (b_kn * b_kn), 0.0)
    b_dk = tl.load(p_dkrows + i_bh * M + o_m, mask=m_m, other=0.0) - b_coef * b_k
    tl.store(p_dk + i_bh * M + o_m, b_dk.to(dt), mask=m_m)


@triton.jit
def _add2(a0, a1, b0, b1):
    """``tl.reduce``'s combine function of two sums taken together."""
    return a0 + b0, a1 + b1


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    """``tl.reduce``'s combine function of three sums taken together."""
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def _onchip_address_bwd(b_dw, b_K, b_wp, b_beta, b_g, b_gamma, b_max, b_sum, p_s,
                        p_dbeta, p_dg, p_ds, p_dgamma, p_dwp, i_bh, o_n, m_n, N, K, BN: tl.constexpr):
    """One head's addressing chain backward on (N,) vectors, from ``b_dw`` (dL/dw, fp32, 0 on masked rows),
    the logits ``b_K`` and ``b_wp`` (w_prev), and the head's parameters and softmax sums, loaded.

    Recomputes ``wc``, ``wg``, ``ws`` and ``ws^gamma``; stores dL/dbeta, dL/dg, dL/ds, dL/dgamma,
    dL/dw_prev of the head; returns dL/dK (fp32, 0 on masked rows) and ``sum_n dL/dK K`` (= beta dL/dbeta).

    Sums over N that wait on the same values are one reduction (``tl.reduce`` of several operands, each
    summed in the order ``tl.sum`` takes): at the paper's size each sum is a round through shared memory
    and two barriers across the program's warps.
    """
    b_wc = tl.where(m_n, _softmax_at(b_K, b_beta, b_max, b_sum), 0.0)
    # Forward again: interpolate, shift (the source rows from shared memory) and sharpen.
    b_wg = b_g * b_wc + (1.0 - b_g) * b_wp
    S = 2 * K + 1
    d, d_last = _tap_shifts(K, N)
    b_ws = tl.zeros([BN], dtype=tl.float32)
    for j in range(S):
        b_ws += tl.load(p_s + i_bh * S + j).to(tl.float32) * _rolled(b_wg, d, o_n, N)
        d = _next_shift(d, 1, N)
    b_logc, b_p = _sharpened(b_ws, b_gamma, m_n)
    b_P, b_dwp = tl.reduce((b_p, b_dw * b_p), 0, _add2)
    b_Pe = b_P + 1e-16
    # Sharpening backward (dL/dgamma's sum is taken with the interpolation's, below).
    b_dp = (b_dw - b_dwp / b_Pe) / b_Pe
    b_dgamma_n = b_dp * b_p * b_logc
    b_dws = tl.where(m_n & (b_ws >= 1e-30), b_dp * b_gamma * tl.exp((b_gamma - 1.0) * b_logc), 0.0)
    # Shift backward: dL/dwg[n] = sum_j s[j + K] dL/dws[n + j]; dL/ds[j + K] = sum_n dL/dws[n] wg[n - j]
    # = sum_n wg[n] dL/dws[n + j], so both take the one gathered dL/dws[n + j] of each tap.
    b_dwg = tl.zeros([BN], dtype=tl.float32)
    d = d_last
    for j in range(S):
        b_dws_dst = _rolled(b_dws, d, o_n, N)
        b_dwg += tl.load(p_s + i_bh * S + j).to(tl.float32) * b_dws_dst
        tl.store(p_ds + i_bh * S + j, tl.sum(tl.where(m_n, b_wg * b_dws_dst, 0.0), 0).to(p_ds.dtype.element_ty))
        d = _next_shift(d, -1, N)
    # Interpolation and softmax backward.
    b_dwc = b_g * b_dwg
    b_dgamma, b_dg, b_dwc_wc = tl.reduce((b_dgamma_n, b_dwg * (b_wc - b_wp), b_dwc * b_wc), 0, _add3)
    tl.store(p_dgamma + i_bh, b_dgamma.to(p_dgamma.dtype.element_ty))
    tl.store(p_dg + i_bh, b_dg.to(p_dg.dtype.element_ty))
    tl.store(p_dwp + i_bh * N + o_n, ((1.0 - b_g) * b_dwg).to(p_dwp.dtype.element_ty), mask=m_n)
    b_dz = b_wc * (b_dwc - b_dwc_wc)
    b_dbeta = tl.sum(b_dz * b_K, 0)
    tl.store(p_dbeta + i_bh, b_dbeta.to(p_dbeta.dtype.element_ty))
    return b_dz * b_beta, b_beta * b_dbeta


@triton.jit(do_not_specialize=("HAS_DW", "HAS_DR", "HAS_DNEW"))
def _onchip_heads_bwd_kernel(p_mem, p_k, p_beta, p_g, p_s, p_gamma, p_wp, p_e, p_a, p_w, p_K, p_max, p_sum,
                             p_dw, p_dr, p_dnew, p_dk, p_dbeta, p_dg, p_ds, p_dgamma, p_dwp, p_de, p_da, p_c, p_cn,
                             s_mem_b, s_mem_n, s_dnew_b, s_dnew_n, H, R, W, K,
                             HAS_DW, HAS_DR, HAS_DNEW, BN: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                             N: tl.constexpr, M: tl.constexpr):
    """Backward, memory held on-chip, phase 1: head ``i_h`` of batch item ``i_b``, a program each.

    dL/dw of the head, from its read or from the write (with the head's dL/de and dL/da), plus the given
    dL/dw; its addressing chain backward (``_onchip_address_bwd``); dL/dk, which needs this head's dL/dK
    alone: ``dk = sum_n c[n] mem[n] - (sum_n dK K) k / max(|k|, eps)^2`` with
    ``c = dK / (max(|k|, eps) max(|mem[n]|, eps))`` (no norm term where ``|k| < eps``, which is clamped).
    Stores the head's rows of the cosine's factors for ``_onchip_mem_bwd_kernel`` (fp32, (B, H, N) each):
    ``c``, and ``cn = dK K / max(|mem[n]|, eps)^2`` (0 where ``|mem[n]| < eps``, clamped).

    A program a head rather than one a batch item: at the paper's size the backward is bound by the
    latency of each head's chain of reductions, and the heads' chains now run side by side.
    ``HAS_DW``, ``HAS_DR``, ``HAS_DNEW`` (0 or 1) say which of dL/dw, dL/dr, dL/dnew_mem were given:
    unspecialized runtime values, so one compiled kernel serves every combination (a masked-off load moves no
    data). The erase product without head h is rebuilt from the other heads, never by dividing by
    ``1 - w e`` (unstable near zero). Every load but the shift's taps comes before the first store (see
    ``_onchip_address``). Tiles of chunked rows, as in ``_memory_step_onchip_kernel``.
    """
    i_b = tl.program_id(0).to(tl.int64)
    i_h = tl.program_id(1)
    i_bh = i_b * H + i_h
    o_n = tl.arange(0, BN)
    o_m = _chunked_columns(BM, BC)
    m_n = o_n < N
    m_m = o_m < M
    m_nm = m_n[:, None, None] & m_m[None, :, :]
    b_mem = tl.load(p_mem + i_b * s_mem_b + o_n[:, None, None] * s_mem_n + o_m[None, :, :], mask=m_nm,
                    other=0.0).to(tl.float32)
    b_k = tl.load(p_k + i_bh * M + o_m, mask=m_m, other=0.0).to(tl.float32)
    b_K = tl.load(p_K + i_bh * N + o_n, mask=m_n, other=0.0)
    b_wp = tl.load(p_wp + i_bh * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_beta = tl.load(p_beta + i_bh).to(tl.float32)
    b_g = tl.load(p_g + i_bh).to(tl.float32)
    b_gamma = tl.load(p_gamma + i_bh).to(tl.float32)
    b_max = tl.load(p_max + i_bh)
    b_sum = tl.load(p_sum + i_bh)
    b_dw = tl.load(p_dw + i_bh * N + o_n, mask=m_n & (HAS_DW != 0), other=0.0).to(tl.float32)
    if i_h < R:
        b_dr = tl.load(p_dr + (i_b * R + i_h) * M + o_m, mask=m_m & (HAS_DR != 0), other=0.0).to(tl.float32)
        b_dw += _chunked_row_sums(b_mem * b_dr[None, :, :])
    else:
        hw = i_h - R
        b_dnew = tl.load(p_dnew + i_b * s_dnew_b + o_n[:, None, None] * s_dnew_n + o_m[None, :, :],
                         mask=m_nm & (HAS_DNEW != 0), other=0.0).to(tl.float32)
        b_derase = b_dnew * b_mem
        for h2 in range(W):
            b_w2 = tl.load(p_w + (i_b * H + R + h2) * N + o_n, mask=m_n, other=0.0).to(tl.float32)
            b_e2 = tl.load(p_e + (i_b * W + h2) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
            b_derase *= tl.where(h2 == hw, 1.0, 1.0 - b_w2[:, None, None] * b_e2[None, :, :])
        b_w = tl.load(p_w + i_bh * N + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_e = tl.load(p_e + (i_b * W + hw) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_a = tl.load(p_a + (i_b * W + hw) * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_dw += _chunked_row_sums(b_dnew * b_a[None, :, :] - b_derase * b_e[None, :, :])
        o_hw = (i_b * W + hw) * M + o_m
        b_de, b_da = tl.reduce((b_derase * b_w[:, None, None], b_dnew * b_w[:, None, None]), 0, _add2)
        tl.store(p_de + o_hw, (-b_de).to(p_de.dtype.element_ty), mask=m_m)
        tl.store(p_da + o_hw, b_da.to(p_da.dtype.element_ty), mask=m_m)
    b_dK, b_dKK = _onchip_address_bwd(b_dw, b_K, b_wp, b_beta, b_g, b_gamma, b_max, b_sum, p_s,
                                      p_dbeta, p_dg, p_ds, p_dgamma, p_dwp, i_bh, o_n, m_n, N, K, BN)
    b_norm = tl.sqrt(_chunked_row_sums(b_mem * b_mem))
    b_mn = tl.maximum(b_norm, 1e-8)
    b_knorm = tl.sqrt(tl.sum(tl.sum(b_k * b_k, 1), 0))
    b_kn = tl.maximum(b_knorm, 1e-8)
    b_c = b_dK / (b_kn * b_mn)
    tl.store(p_c + i_bh * N + o_n, b_c, mask=m_n)
    tl.store(p_cn + i_bh * N + o_n, tl.where(b_norm >= 1e-8, b_dK * b_K / (b_mn * b_mn), 0.0), mask=m_n)
    b_ck = tl.where(b_knorm >= 1e-8, b_dKK / (b_kn * b_kn), 0.0)
    b_dk = tl.sum(b_c[:, None, None] * b_mem, 0) - b_ck * b_k
    tl.store(p_dk + i_bh * M + o_m, b_dk.to(p_dk.dtype.element_ty), mask=m_m)


@triton.jit(do_not_specialize=("RD", "HAS_DNEW"))
def _onchip_mem_bwd_kernel(p_mem, p_k, p_w, p_e, p_dr, p_dnew, p_c, p_cn, p_dmem,
                           s_mem_b, s_mem_n, s_dnew_b, s_dnew_n, s_dmem_b, s_dmem_n, R, W, RD, HAS_DNEW,
                           BN: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, N: tl.constexpr, M: tl.constexpr):
    """Backward, memory held on-chip, phase 2: dL/dmem of batch item ``i_b`` from the write, the reads and
    the cosine of every head, from the factors ``c`` and ``cn`` that phase 1 stored:
    ``dmem[n] = dnew prod_h (1 - w_h e_h) + sum_h w_h dr_h + sum_h c_h[n] k_h - (sum_h cn_h[n]) mem[n]``.
    With W = 0 the step returns new_mem = mem, and dL/dnew_mem flows to dL/dmem unchanged. ``RD`` (R or 0)
    and ``HAS_DNEW`` (0 or 1): whether dL/dr and dL/dnew_mem were given.

    One loop over the heads, its loads independent of each other (a read head's ``e`` and a write head's
    ``dr`` are masked off, so its factor is 1 and its term 0): each trip waits for its loads once. Loops
    of their own for the erase, the reads and the cosine waited W + R + H times, and at the paper's size
    the kernel is that latency. Tiles of chunked rows, as in ``_memory_step_onchip_kernel``."""
    i_b = tl.program_id(0).to(tl.int64)
    o_n = tl.arange(0, BN)
    o_m = _chunked_columns(BM, BC)
    m_n = o_n < N
    m_m = o_m < M
    m_nm = m_n[:, None, None] & m_m[None, :, :]
    H = R + W
    b_mem = tl.load(p_mem + i_b * s_mem_b + o_n[:, None, None] * s_mem_n + o_m[None, :, :], mask=m_nm,
                    other=0.0).to(tl.float32)
    b_keep = tl.load(p_dnew + i_b * s_dnew_b + o_n[:, None, None] * s_dnew_n + o_m[None, :, :],
                     mask=m_nm & (HAS_DNEW != 0), other=0.0).to(tl.float32)
    b_add = tl.zeros([BN, BM // BC, BC], dtype=tl.float32)
    b_cn = tl.zeros([BN], dtype=tl.float32)
    for h in range(H):
        i_bh = i_b * H + h
        b_w = tl.load(p_w + i_bh * N + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_e = tl.load(p_e + (i_b * W + h - R) * M + o_m, mask=m_m & (h >= R) & (HAS_DNEW != 0),
                      other=0.0).to(tl.float32)
        b_dr = tl.load(p_dr + (i_b * R + h) * M + o_m, mask=m_m & (h < RD), other=0.0).to(tl.float32)
        b_k = tl.load(p_k + i_bh * M + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_c = tl.load(p_c + i_bh * N + o_n, mask=m_n, other=0.0)
        b_cn += tl.load(p_cn + i_bh * N + o_n, mask=m_n, other=0.0)
        b_keep *= 1.0 - b_w[:, None, None] * b_e[None, :, :]
        b_add += b_w[:, None, None] * b_dr[None, :, :] + b_c[:, None, None] * b_k[None, :, :]
    b_dmem = b_keep + b_add - b_cn[:, None, None] * b_mem
    tl.store(p_dmem + i_b * s_dmem_b + o_n[:, None, None] * s_dmem_n + o_m[None, :, :],
             b_dmem.to(p_dmem.dtype.element_ty), mask=m_nm)


# ----------------------------------------------------------------------------
# Host functions: allocate, choose blocks, launch
# ----------------------------------------------------------------------------


def _nz(t, fallback):
    """``t``, or ``fallback`` where ``t`` is empty: a kernel never reads it, but it gets a real pointer."""
    return fallback if t is None or t.numel() == 0 else t


def _sum_blocks(parts, dtype, empty, rows: int, num_warps: int, cols: int = 16):
    """(B, *rest) in ``dtype``, from the call's allocator ``empty``: the sum over dim 1 of block partials
    ``parts`` (B, NB, *rest), fp32 and contiguous, by ``_sum_blocks_kernel``: loads of up to ``rows`` rows
    (``_config.sum_block_rows``) of ``cols`` columns, ``num_warps`` (the dispatch's: ``Blocks.sum_rows``,
    ``Blocks.sum_warps``)."""
    assert parts.is_contiguous(), "the kernel indexes the partials from their shape"
    B, NB = parts.shape[:2]
    if NB == 1:  # one block (standalone reads of an on-chip memory): nothing to sum, no launch
        return parts[:, 0].to(dtype)
    X = math.prod(parts.shape[2:])
    out = empty((B, *parts.shape[2:]), dtype, parts.device)
    NX = _config.n_blocks(X, cols)
    if B * NX:
        _sum_blocks_kernel[(B * NX,)](parts, out, NB, X, NX, BR=_config.sum_block_rows(NB, rows), BX=cols,
                                      num_warps=num_warps)
    return out


def _onchip_chunk(mem, BM: int) -> int:
    """Columns of a row chunk of the on-chip kernels' tiles (see ``_memory_step_onchip_kernel``): BM where
    mem's rows load 16 bytes a thread, as Triton specializes (M and the row stride multiples of 16, the
    pointer 16-byte aligned), else 4."""
    rows_vectorize = mem.shape[2] % 16 == 0 and mem.stride(1) % 16 == 0 and mem.data_ptr() % 16 == 0
    return BM if rows_vectorize else 4


def _read_write(mem, w, P, e, a, R: int, W: int, normalize: bool, wout, write: bool, blk=None):
    """Launch ``_read_write_kernel`` over blocks of mem; returns (r in w's dtype, new_mem or None).
    ``blk``: the caller's block choice, else this call's own."""
    empty = _config.allocator()
    B, N, M = mem.shape
    blk = blk or _config.choose(N, M)
    NB = _config.n_blocks(N, blk.BN)
    rpart = empty((B, NB, R, M), torch.float32, mem.device)
    new = empty((B, N, M), mem.dtype, mem.device) if write else mem
    _read_write_kernel[(NB * B,)](
        mem, w, _nz(P, w), _nz(e, mem), _nz(a, mem), _nz(wout, w), _nz(rpart, mem), new,
        mem.stride(0), mem.stride(1), new.stride(0), new.stride(1), N, M, R, W, NB,
        NORMALIZE=normalize, WRITE=write, BN=blk.BN, BM=blk.BM, num_warps=blk.num_warps)
    r = _sum_blocks(rpart, wout.dtype if wout is not None else w.dtype, empty, blk.sum_rows, blk.sum_warps)
    return r, (new if write else None)


def _forward(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads: int, rw: bool):
    """(w, r, new_mem, K, max, sumexp); with ``rw=False`` only the addressing (r, new_mem empty)."""
    empty = _config.allocator()
    B, N, M = mem.shape
    H, S = k.shape[1], s.shape[2]
    R = num_reads if rw else H
    W = H - R
    dev = mem.device
    blk = _config.choose(N, M)
    w = empty((B, H, N), k.dtype, dev)
    K = empty((B, H, N), torch.float32, dev)
    mx = empty((B, H), torch.float32, dev)
    se = empty((B, H), torch.float32, dev)
    if blk.onchip:
        r = empty((B, R if rw else 0, M), k.dtype, dev)
        new = empty((B, N, M) if rw else (0,), mem.dtype, dev)
        programs = R + (1 if rw else 0)  # one a read head, one for the write heads (a copy where W = 0)
        _memory_step_onchip_kernel[(B, programs)](
            mem, k, beta, g, s, gamma, w_prev, _nz(e, mem), _nz(a, mem), w, _nz(r, w), _nz(new, mem),
            K, mx, se,
            mem.stride(0), mem.stride(1), new.stride(0) if rw else 0, new.stride(1) if rw else 0,
            H, R, W, (S - 1) // 2, N=N, M=M, RW=rw, BN=blk.BN, BM=blk.BM, BC=_onchip_chunk(mem, blk.BM),
            num_warps=blk.num_warps, maxnreg=_config.maxnreg(blk.num_warps))
        return w, r, new, K, mx, se
    NB = _config.n_blocks(N, blk.sim_BN)
    BH = _config.PRODUCT_HEADS
    pmax = empty((B, H, NB), torch.float32, dev)
    psum = empty((B, H, NB), torch.float32, dev)
    _similarity_kernel[(NB * B,)](mem, k, beta, K, pmax, psum, mem.stride(0), mem.stride(1), N, M, H, NB,
                                BN=blk.sim_BN, BM=blk.BM, BH=BH, HG=_config.n_blocks(H, BH),
                                num_warps=blk.sim_warps)
    # Chunks of the vector pass's rows, up to 1,024 (at 8,192, which a sweep may force, 4 warps spilled).
    _softmax_merge_kernel[(B * H,)](pmax, psum, mx, se, NB, BN=min(blk.BV, 1024), num_warps=4)
    NBV = _config.n_blocks(N, blk.BV)
    pw = empty((B, H, N), torch.float32, dev)
    pP = empty((B, H, NBV), torch.float32, dev)
    _shift_sharpen_kernel[(NBV * B * H,)](K, w_prev, beta, g, s, gamma, mx, se, pw, pP, N, (S - 1) // 2, NBV,
                                        BN=blk.BV, num_warps=4)
    P = pP.sum(dim=-1)
    if not rw:
        torch.div(pw, P[..., None] + SHARPEN_EPS, out=w)  # rounded once, to w's dtype, without an fp32 copy
        return w, mem.new_empty((B, 0, M), dtype=k.dtype), mem.new_empty((0,)), K, mx, se
    r, new = _read_write(mem, pw, P, e, a, R, W, normalize=True, wout=w, write=True, blk=blk)
    return w, r, new, K, mx, se


def _address_bwd(k, beta, g, s, gamma, w_prev, K, mx, se, dw, blk):
    """The addressing chain backward down to the logits, from dL/dw (``dw``, fp32, the total: the reads',
    the write's and the given, from ``_read_write_bwd``): (ck, cn, parts, dw_prev), with ``ck`` and
    ``cn`` the cosine's factors that ``_mem_bwd_kernel`` takes (``_softmax_bwd_kernel``), ``parts`` the block
    partials (B, H, NB, S + 3) of dL/dgamma, dL/ds, dL/dg and dL/dbeta, for ``_head_grads_kernel``, and
    dw_prev in its dtype.

    Two passes over blocks of ``blk.BV`` rows of each head (the sharpening, up to its sums; its end, the shift,
    with dL/ds, and the interpolation), then one over blocks of every head (the softmax), the per-(b, h)
    sums that a pass needs reduced before it (``_sum_blocks``, and torch for the shift pass's one number a
    block). The four gradients' partials share one buffer,
    each block's in a row, so that one launch finishes them all. The shift's taps read dws's two factors
    at rows of neighbouring blocks, so no pass writes a buffer that it reads there.
    """
    empty = _config.allocator()
    B, H, N = K.shape
    S = s.shape[2]
    dev = K.device
    BV = blk.BV
    NB = _config.n_blocks(N, BV)
    grid = (NB * B * H,)
    v = empty((B, H, N), torch.float32, dev)
    psums = empty((B, H, NB, 4), torch.float32, dev)
    _sharpen_bwd_kernel[grid](dw, K, w_prev, beta, g, s, gamma, mx, se, v, psums, N, (S - 1) // 2, NB,
                              BN=BV, num_warps=4)
    # All four columns summed, of which pass 2 takes P and sum dw p (the other two it takes a block at a time):
    # torch took 12 us (H100, large shape) to sum the first two alone, a strided view.
    sums = _sum_blocks(psums.view(B * H, NB, 4), torch.float32, empty, blk.sum_rows, blk.sum_warps)
    dwp = empty((B, H, N), w_prev.dtype, dev)
    parts = empty((B, H, NB, S + 3), torch.float32, dev)  # per block: dgamma, ds (S), dg, dbeta
    pdot = empty((B, H, NB), torch.float32, dev)
    dwc = empty((B, H, N), torch.float32, dev)
    _interp_bwd_kernel[grid](dw, v, psums, sums, K, w_prev, beta, g, s, gamma, mx, se, dwp, dwc, parts, pdot,
                             N, (S - 1) // 2, NB, S + 3, BN=BV, num_warps=4)
    dot = pdot.sum(-1)
    ck = empty((B, H, N), torch.float32, dev)
    cn = empty((B, N), torch.float32, dev)
    _softmax_bwd_kernel[(NB * B,)](K, dwc, beta, mx, se, dot, k, ck, cn, parts[..., S + 2], N, k.shape[2], H, NB,
                                   S + 3, BN=BV, BM=_config.block_m(k.shape[2]), num_warps=4)
    return ck, cn, parts, dwp


def _head_grads(k, beta, parts, dk_rows, sum_rows: int):
    """(dk, dbeta, dg, ds, dgamma) in the parameters' dtype, from ``_address_bwd``'s block partials and the
    memory pass's part of dL/dk (B, H, M), fp32: ``_head_grads_kernel``, a program a head, taking the
    partials 64 rows a load, or ``sum_rows`` (``Blocks.sum_rows``) where that is fewer."""
    B, H, NB, SP = parts.shape
    M = k.shape[2]
    empty = _config.allocator()
    dk = empty((B, H, M), k.dtype, k.device)
    dbeta, dg, dgamma = (empty((B, H), k.dtype, k.device) for _ in range(3))
    ds = empty((B, H, SP - 3), k.dtype, k.device)
    _head_grads_kernel[(B * H,)](parts, dk_rows, k, beta, dk, dbeta, dg, ds, dgamma, NB, M, SP - 3, SP,
                                 BN=min(64, sum_rows), BP=8, BM=_config.block_m(M), num_warps=4)
    return dk, dbeta, dg, ds, dgamma


def _read_write_bwd(mem, w, e, a, dr, dnew, R: int, W: int, grad_dtype, blk=None, dw_given=None):
    """dL/dw (fp32, B, R + W, N): from the reads and the write, plus ``dw_given`` (B, R + W, N) where given;
    dL/de, dL/da (in ``grad_dtype``). Without dL/dr and dL/dnew_mem, no pass over memory: dL/dw is the
    given one in fp32 (itself where it is fp32), or zeros."""
    empty = _config.allocator()
    B, N, M = mem.shape
    blk = blk or _config.choose(N, M)
    BN, warps = blk.memory_bwd
    NB = _config.n_blocks(N, BN)
    BH = _config.PRODUCT_HEADS
    has_dr, has_dnew = dr is not None and R > 0, dnew is not None and W > 0
    if not (has_dr or has_dnew):
        dw = torch.zeros((B, R + W, N), dtype=torch.float32, device=mem.device) if dw_given is None else \
            dw_given.to(torch.float32)
    else:
        dw = empty((B, R + W, N), torch.float32, mem.device)
        eapart = empty((2, B, NB, W, M), torch.float32, mem.device)  # dL/de's and dL/da's, summed in one launch
        depart, dapart = eapart
        dn = dnew if has_dnew else mem
        _read_write_bwd_kernel[(NB * B,)](
            mem, w, _nz(e, mem), _nz(a, mem), dr if has_dr else mem, dn, w if dw_given is None else dw_given, dw,
            _nz(depart, mem), _nz(dapart, mem), mem.stride(0), mem.stride(1), dn.stride(0), dn.stride(1), N, M,
            R, W, NB, R if has_dr else 0, W if has_dnew else 0, int(dw_given is not None),
            RG=_config.n_blocks(R, BH), BH=BH, BN=BN, BM=blk.BM, num_warps=warps, maxnreg=_config.maxnreg(warps))
    if not has_dnew:
        zeros = torch.zeros((2, B, W, M), dtype=grad_dtype, device=mem.device)
        return dw, zeros[0], zeros[1]
    de, da = _sum_blocks(eapart.view(2 * B, NB, W * M), grad_dtype, empty, blk.sum_rows, blk.sum_warps).view(
        2, B, W, M)
    return dw, de, da


def _mem_bwd(mem, w, e, dr, dnew, k, addr, R: int, W: int, blk=None):
    """dL/dmem (mem's dtype) and the per-row part of dL/dk (fp32), or None without ``addr``.

    ``addr``: (ck, cn), the cosine's factors from ``_address_bwd``; or None where no head addresses memory
    (standalone read and write).
    """
    empty = _config.allocator()
    B, N, M = mem.shape
    blk = blk or _config.choose(N, M)
    BN, warps = blk.memory_bwd
    NB = _config.n_blocks(N, BN)
    # With W = 0 the step still returns new_mem = mem, so dnew flows to dmem.
    has_dr, has_dnew, has_dk = dr is not None and R > 0, dnew is not None, addr is not None
    HK = k.shape[1] if has_dk else 0
    ck, cn = addr if has_dk else (mem, mem)
    dmem = empty((B, N, M), mem.dtype, mem.device)
    dkpart = empty((B, NB, HK, M), torch.float32, mem.device)
    dn = dnew if has_dnew else mem
    _mem_bwd_kernel[(NB * B,)](
        mem, w, _nz(e, mem), dr if has_dr else mem, dn, k if has_dk else mem, ck, cn, dmem, _nz(dkpart, mem),
        mem.stride(0), mem.stride(1), dn.stride(0), dn.stride(1), dmem.stride(0), dmem.stride(1),
        N, M, R, W, HK, NB, R if has_dr else 0, int(has_dnew), HAS_DK=has_dk,
        BN=BN, BM=blk.BM, num_warps=warps)
    if not has_dk:
        return dmem, None
    return dmem, _sum_blocks(dkpart, torch.float32, empty, blk.sum_rows, blk.sum_warps)


def _onchip_bwd(mem, k, beta, g, s, gamma, w_prev, e, a, w, K, mx, se, dw, dr, dnew, R: int, blk):
    """Every gradient in two launches: ``_onchip_heads_bwd_kernel``, a program a head and batch item, then
    ``_onchip_mem_bwd_kernel``, a program a batch item."""
    empty = _config.allocator()
    B, N, M = mem.shape
    H, S = k.shape[1], s.shape[2]
    W = H - R
    dev, pd = mem.device, k.dtype
    dmem = empty((B, N, M), mem.dtype, dev)
    dk = empty((B, H, M), pd, dev)
    dbeta, dg, dgamma = (empty((B, H), pd, dev) for _ in range(3))
    ds = empty((B, H, S), pd, dev)
    dwp = empty((B, H, N), pd, dev)
    de = empty((B, W, M), pd, dev)
    da = empty((B, W, M), pd, dev)
    c, cn = empty((B, H, N), torch.float32, dev), empty((B, H, N), torch.float32, dev)
    has_dr = dr is not None and R > 0
    dr = dr if has_dr else mem
    dn = mem if dnew is None else dnew
    options = dict(BN=blk.BN, BM=blk.BM, BC=_onchip_chunk(mem, blk.BM), num_warps=blk.bwd_warps,
                   maxnreg=_config.maxnreg(blk.bwd_warps))
    _onchip_heads_bwd_kernel[(B, H)](
        mem, k, beta, g, s, gamma, w_prev, _nz(e, mem), _nz(a, mem), w, K, mx, se,
        w if dw is None else dw, dr, dn, dk, dbeta, dg, ds, dgamma, dwp, _nz(de, dk), _nz(da, dk), c, cn,
        mem.stride(0), mem.stride(1), dn.stride(0), dn.stride(1), H, R, W, (S - 1) // 2,
        int(dw is not None), int(has_dr), int(dnew is not None), N=N, M=M, **options)
    _onchip_mem_bwd_kernel[(B,)](
        mem, k, w, _nz(e, mem), dr, dn, c, cn, dmem,
        mem.stride(0), mem.stride(1), dn.stride(0), dn.stride(1), dmem.stride(0), dmem.stride(1), R, W,
        R if has_dr else 0, int(dnew is not None), N=N, M=M, **options)
    return dmem, dk, dbeta, dg, ds, dgamma, dwp, de, da


def _backward(mem, k, beta, g, s, gamma, w_prev, e, a, w, K, mx, se, dw, dr, dnew, num_reads: int):
    """Gradients of (mem, k, beta, g, s, gamma, w_prev, e, a) given any of dw, dr, dnew (None = zero)."""
    H = k.shape[1]
    R, W = num_reads, H - num_reads
    blk = _config.choose(mem.shape[1], mem.shape[2])
    if blk.onchip:
        return _onchip_bwd(mem, k, beta, g, s, gamma, w_prev, e, a, w, K, mx, se, dw, dr, dnew, R, blk)
    pd = k.dtype
    dw_total, de, da = _read_write_bwd(mem, w, e, a, dr, dnew, R, W, pd, blk, dw_given=dw)
    ck, cn, parts, dwp = _address_bwd(k, beta, g, s, gamma, w_prev, K, mx, se, dw_total, blk)
    dmem, dk_rows = _mem_bwd(mem, w, e, dr, dnew, k, (ck, cn), R, W, blk)
    dk, dbeta, dg, ds, dgamma = _head_grads(k, beta, parts, dk_rows, blk.sum_rows)
    return dmem, dk, dbeta, dg, ds, dgamma, dwp.to(pd), de, da


# ----------------------------------------------------------------------------
# torch.library registrations (opaque to torch.compile, no graph breaks; eager calls skip them, see _op)
# ----------------------------------------------------------------------------

T = torch.Tensor


def _unaliased(grads):
    """``grads`` with the last, dL/da, copied out of the buffer it shares with dL/de (``_read_write_bwd`` sums
    both in one launch). A custom op's outputs may not alias each other: torch checks it wherever the op runs
    (under torch.compile, say), and refuses the call. Eager calls skip the ops (``_op``) and the copy."""
    return (*grads[:-1], grads[-1].clone())


@torch.library.custom_op("fastntm::memory_step_fwd", mutates_args=())
def memory_step_fwd(mem: T, k: T, beta: T, g: T, s: T, gamma: T, w_prev: T, e: T, a: T,
                    num_reads: int, rw: bool) -> tuple[T, T, T, T, T, T]:
    return _forward(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads, rw)


@memory_step_fwd.register_fake
def _(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads, rw):
    B, N, M = mem.shape
    H = k.shape[1]
    f32 = torch.float32
    r = k.new_empty((B, num_reads if rw else 0, M))
    new = mem.new_empty((B, N, M) if rw else (0,))
    return (k.new_empty((B, H, N)), r, new, mem.new_empty((B, H, N), dtype=f32),
            mem.new_empty((B, H), dtype=f32), mem.new_empty((B, H), dtype=f32))


@torch.library.custom_op("fastntm::memory_step_bwd", mutates_args=())
def memory_step_bwd(mem: T, k: T, beta: T, g: T, s: T, gamma: T, w_prev: T, e: T, a: T, w: T, K: T,
                    mx: T, se: T, dw: Optional[T], dr: Optional[T], dnew: Optional[T],
                    num_reads: int) -> tuple[T, T, T, T, T, T, T, T, T]:
    return _unaliased(_backward(mem, k, beta, g, s, gamma, w_prev, e, a, w, K, mx, se, dw, dr, dnew, num_reads))


@memory_step_bwd.register_fake
def _(mem, k, beta, g, s, gamma, w_prev, e, a, w, K, mx, se, dw, dr, dnew, num_reads):
    return tuple(torch.empty_like(t) for t in (mem, k, beta, g, s, gamma, w_prev, e, a))


# ----------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------


def _op(custom_op, host_fn):
    """``custom_op`` where something traces the call (torch.compile, export, ``torch.jit.trace``, a dispatch
    mode such as fake tensors), which sees through the op but not through a launch; else ``host_fn``, the
    function the op wraps: an eager call skips the op's dispatch, tens of microseconds of host time."""
    tracing = torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack()
    return custom_op if tracing else host_fn


def _contig(t):
    """``t.contiguous()``, without its dispatch where ``t`` already is (the common case)."""
    return t if t is None or t.is_contiguous() else t.contiguous()


def _save(ctx, inputs, args, *extra) -> None:
    """``ctx.save_for_backward(*args, *extra)``, ``args`` being the ``inputs`` as the kernels take them, then
    each input that ``args`` holds a copy of: a backward that differentiates the reference
    (``fused_reference.differentiate_literal``) needs the inputs with their history, which a copy made
    inside ``forward`` lacks."""
    ctx.copied = [i for i, (given, taken) in enumerate(zip(inputs, args)) if given is not taken]
    ctx.save_for_backward(*args, *extra, *(inputs[i] for i in ctx.copied))


def _given(ctx, saved, n: int) -> list:
    """The ``n`` inputs as given, from ``saved = ctx.saved_tensors`` (see ``_save``)."""
    given = list(saved[:n])
    for i, t in zip(ctx.copied, saved[len(saved) - len(ctx.copied):]):
        given[i] = t
    return given


class MemoryStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
        inputs = (mem, k, beta, g, s, gamma, w_prev, e, a)
        args = [_contig(t) for t in inputs]
        w, r, new, K, mx, se = _op(memory_step_fwd, _forward)(*args, num_reads, True)
        _save(ctx, inputs, args, w, K, mx, se)
        ctx.num_reads = num_reads
        ctx.set_materialize_grads(False)
        return w, r, new

    @staticmethod
    def backward(ctx, dw, dr, dnew):
        saved = ctx.saved_tensors
        if not hand_derived_serves((dw, dr, dnew)):
            return differentiate_literal(ctx, reference.memory_step, _given(ctx, saved, 9), (ctx.num_reads,),
                                         (dw, dr, dnew))
        grads = _op(memory_step_bwd, _backward)(*saved[:13], _contig(dw), _contig(dr), _contig(dnew),
                                               ctx.num_reads)
        return (*grads, None)


# ----------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------


def memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
    """One NTM memory step, fused: address all H heads on ``mem``, read with the first
    ``num_reads``, write with the rest (SPEC.md; same signature as ``fastntm.reference``).

    Shapes: ``mem`` (B, N, M); ``k`` (B, H, M); ``beta``, ``g``, ``gamma`` (B, H);
    ``s`` (B, H, S); ``w_prev`` (B, H, N); ``e``, ``a`` (B, H - num_reads, M).
    Returns ``(w, r, new_mem)``: (B, H, N) and (B, num_reads, M) in the parameters'
    dtype, (B, N, M) in mem's dtype. Differentiable in every tensor input.

    Example::

        w, r, new_mem = memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads=1)
    """
    args = (mem, k, beta, g, s, gamma, w_prev, e, a)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args):
        return MemoryStep.apply(*args, num_reads)
    # Nothing to differentiate: no autograd node, whose bookkeeping is a good share of an eager call.
    w, r, new, *_ = _op(memory_step_fwd, _forward)(*[_contig(t) for t in args], num_reads, True)
    return w, r, new
