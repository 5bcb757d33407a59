"""``memory_step`` for CPU tensors as two compiled loop nests (numba), forward and backward.

On a CPU the step's arithmetic is small (a few hundred thousand flops at the paper's size) and
``fused_reference``'s ~40 ops forward and ~50 backward cost their dispatch, not their work. Here each
direction is one call of a numba-compiled function (and one more for the head parameters' squashing)
that walks the batch once: for every item, the content similarities and softmax, interpolation, shift
and sharpening of every head, then the reads and the write; backward, the same equations as
``fused_reference``'s docstring, in reverse. Float32 and float64 tensors (compute in the tensors' own
dtype; bf16 memory and fp16 go to ``fused_reference``). Compiled on first use (15 s here for the first
dtype, forward and backward; 10 s the next) and cached on disk; the loops release the GIL. A large enough
batch is split over as many threads as torch may use (``threads_for``; numba's thread pool).

Saved for backward: the inputs, ``w`` and the (B, H, 5, N) vectors K, wc, wg, ws and log(max(ws,
1e-30)) (from the head layer's output, one buffer with the squashed parameters too); nothing of size
(B, N, M) but the input memory. Norms are recomputed. Buffers come from torch's allocator, where memory
profiling counts them, and reach the kernels as numpy views of the same memory.
"""

from __future__ import annotations

import contextlib
import math
import os

import numba
import numpy as np
import torch

from . import backend, fused_reference, reference
from .reference import COSINE_EPS, SHARPEN_EPS, SHARPEN_FLOOR

# Reassociation lets LLVM vectorise the sums. No 'nnan'/'ninf': NaN and inf follow IEEE rules. No 'contract': a
# fused multiply-add would keep beta K's rounding error in beta K - max, where the spec has exactly 0 for the
# largest logit, and exp() of it overflows at large beta (NaN weightings at beta 3e9 in float32).
FASTMATH = {"reassoc", "nsz"}
# The rows of the saved (B, H, 5, N) vectors: K, wc, wg, ws and log(max(ws, 1e-30)).
SIMILARITY, CONTENT, GATED, SHIFTED, LOG_FLOORED = range(5)
VECTORS = 5

# Every loop over the memory's width M is innermost, and every constant is made in the tensors' dtype
# (``real``): a Python float would promote float32 arithmetic to float64, and stop its vectorising. Sums over
# the N slots do accumulate in float64 (``0.0``, and the ``*_sums`` arrays): in float32 their error grew with N
# (at N 8,192 the step's gradients missed the float64 reference by 1.8e-5, where torch's blocked sums miss
# by 2e-6).


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _fill_halo(padded, half):
    """``padded`` (N + 2 half) holds a circle of N at [half, N + half): copy it into the K = half slots on
    each side, so that ``padded[j] = circle[(j - half) mod N]`` (the modulo only where it wraps)."""
    N = padded.shape[0] - 2 * half
    for j in range(half):
        padded[j] = padded[half + (j - half) % N]
        padded[N + half + j] = padded[half + j % N]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _forward_scratch(mem, s):
    """Per-thread work arrays of ``_forward_item``: |M_n|, the shift's unrolled circle, the reads' sums."""
    N, M, half = mem.shape[1], mem.shape[2], (s.shape[2] - 1) // 2
    # wg[(j - K) mod N] at j: the circle unrolled by K each side
    return np.empty(N, mem.dtype), np.empty(N + 2 * half, mem.dtype), np.empty(M)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _forward_item(b, mem, k, beta, g, g_rest, s, gamma, w_prev, e, a, num_reads, w, r, new_mem, vectors, scratch):
    """``memory_step`` of batch item ``b`` into ``w``, ``r``, ``new_mem``, and the vectors backward reads into
    ``vectors``; the equations (SPEC.md's) head each section. ``g_rest`` holds ``1 - g``, made by the caller:
    given both ``g`` and ``1 - g``, LLVM's reassociation rewrote ``g wc + (1 - g) w_prev`` as
    ``w_prev + g (wc - w_prev)``, which at ``g = 1`` loses every ``wc`` below an ulp of ``w_prev`` (and with
    it the sharpening's gradient there: dL/dg wholly wrong in some draws)."""
    N, M = mem.shape[1], mem.shape[2]
    H, S, W = k.shape[1], s.shape[2], e.shape[1]
    half = (S - 1) // 2
    real = mem.dtype.type
    zero, one = real(0), real(1)
    eps, floor, sharpen_eps = real(COSINE_EPS), real(SHARPEN_FLOOR), real(SHARPEN_EPS)
    mem_norm, padded, read_sums = scratch
    for n in range(N):
        total = zero
        for m in range(M):
            total += mem[b, n, m] * mem[b, n, m]
        mem_norm[n] = max(math.sqrt(total), eps)
    for h in range(H):
        similarity, content, gated = vectors[b, h, SIMILARITY], vectors[b, h, CONTENT], vectors[b, h, GATED]
        shifted, log_floored = vectors[b, h, SHIFTED], vectors[b, h, LOG_FLOORED]
        total = zero
        for m in range(M):
            total += k[b, h, m] * k[b, h, m]
        k_norm = max(math.sqrt(total), eps)
        # Content: K = dot / (|k| |M_n|), wc = softmax(beta K).
        largest = real(-np.inf)
        for n in range(N):
            dot = zero
            for m in range(M):
                dot += k[b, h, m] * mem[b, n, m]
            similarity[n] = dot / (k_norm * mem_norm[n])
            largest = max(largest, beta[b, h] * similarity[n])
        total = 0.0
        for n in range(N):
            content[n] = math.exp(beta[b, h] * similarity[n] - largest)
            total += content[n]
        # Interpolate: wg = g wc + (1 - g) w_prev.
        for n in range(N):
            content[n] /= total
            gated[n] = g[b, h] * content[n] + g_rest[b, h] * w_prev[b, h, n]
        # Shift: ws[n] = sum_j s[j + K] wg[n - j] = sum_i s[i] padded[n + 2K - i].
        for n in range(N):
            padded[half + n] = gated[n]
        _fill_halo(padded, half)
        for n in range(N):
            shifted[n] = zero
        for i in range(S):
            tap, offset = s[b, h, i], 2 * half - i
            for n in range(N):
                shifted[n] += tap * padded[n + offset]
        # Sharpen: w = c^gamma / (sum c^gamma + 1e-16), c = max(ws, 1e-30).
        total = 0.0
        for n in range(N):
            log_floored[n] = math.log(max(shifted[n], floor))
            w[b, h, n] = math.exp(gamma[b, h] * log_floored[n])
            total += w[b, h, n]
        for n in range(N):
            w[b, h, n] /= total + sharpen_eps
    # Read with the first heads: r = w M; write with the others: M P + sum_h w_h a_h, P = prod_h (1 - w_h e_h).
    for h in range(num_reads):
        read_sums[:] = 0.0
        for n in range(N):
            weight = w[b, h, n]
            for m in range(M):
                read_sums[m] += weight * mem[b, n, m]
        r[b, h] = read_sums
    if W == 1:  # the common case in one pass over each row
        for n in range(N):
            weight = w[b, num_reads, n]
            for m in range(M):
                new_mem[b, n, m] = mem[b, n, m] * (one - weight * e[b, 0, m]) + weight * a[b, 0, m]
    else:
        for n in range(N):
            for m in range(M):
                new_mem[b, n, m] = mem[b, n, m]
            for h in range(W):
                weight = w[b, num_reads + h, n]
                for m in range(M):
                    new_mem[b, n, m] *= one - weight * e[b, h, m]
            for h in range(W):
                weight = w[b, num_reads + h, n]
                for m in range(M):
                    new_mem[b, n, m] += weight * a[b, h, m]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _backward_scratch(mem, k, s, e):
    """Per-thread work arrays of ``_backward_item``."""
    N, M, H, W, half = mem.shape[1], mem.shape[2], k.shape[1], e.shape[1], (s.shape[2] - 1) // 2
    real = mem.dtype
    # |M_n|; sum_h dK K at each slot (dmem's norm term); dL/dw; dws with its circle unrolled by K each side;
    # dwg; dL/d(dot); the write's erase factor and its dL/d(erase); sums of de, da and dk over the slots.
    return (np.empty(N, real), np.empty(N, real), np.empty((H, N), real), np.empty(N + 2 * half, real),
            np.empty(N, real), np.empty((H, N), real), np.empty(M, real), np.empty(M, real), np.empty((W, M)),
            np.empty((W, M)), np.empty((H, M)))


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _backward_item(b, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads, w, vectors, dw, dr, dnew,
                   dmem, dk, dbeta, dg, ds, dgamma, dw_prev, de, da, scratch):
    """The gradient of every input of ``_forward_item`` for batch item ``b`` from ``dw``, ``dr``, ``dnew`` (each
    of size 0 where no gradient came), written whole; the equations head each section."""
    N, M = mem.shape[1], mem.shape[2]
    H, S, W = k.shape[1], s.shape[2], e.shape[1]
    half = (S - 1) // 2
    real = mem.dtype.type
    zero, one = real(0), real(1)
    eps, floor = real(COSINE_EPS), real(SHARPEN_FLOOR)
    has_dw, has_dr, has_dnew = dw.size > 0, dr.size > 0, dnew.size > 0
    mem_norm, norm_terms, d_weights, d_shifted, d_gated, d_dot, keep, d_erase, de_sums, da_sums, dk_sums = scratch
    for n in range(N):
        total = zero
        for m in range(M):
            total += mem[b, n, m] * mem[b, n, m]
        mem_norm[n] = math.sqrt(total)
        norm_terms[n] = zero
    for h in range(H):
        for n in range(N):
            d_weights[h, n] = dw[b, h, n] if has_dw else zero
    de_sums[:] = 0.0
    da_sums[:] = 0.0
    # Write: dM = dM_t P; dE_h = dM_t M prod_{h' != h} E_h'; dw_h += sum(dM_t a_h - dE_h e_h);
    # de_h = -w_h^T dE_h; da_h = w_h^T dM_t. Read: dw_R += dr M^T; dM += w_R^T dr.
    for n in range(N):
        if has_dnew and W == 1:  # the common case in one pass over each row
            weight, total = w[b, num_reads, n], zero
            for m in range(M):
                d_new = dnew[b, n, m]
                dmem[b, n, m] = d_new * (one - weight * e[b, 0, m])
                d_erased = d_new * mem[b, n, m]
                total += d_new * a[b, 0, m] - d_erased * e[b, 0, m]
                de_sums[0, m] -= weight * d_erased
                da_sums[0, m] += weight * d_new
            d_weights[num_reads, n] += total
        elif has_dnew:
            for m in range(M):
                keep[m] = dnew[b, n, m]
            for h in range(W):
                weight = w[b, num_reads + h, n]
                for m in range(M):
                    keep[m] *= one - weight * e[b, h, m]
            for m in range(M):
                dmem[b, n, m] = keep[m]
            for h in range(W):
                for m in range(M):
                    d_erase[m] = dnew[b, n, m] * mem[b, n, m]
                for other in range(W):  # the other heads' factors multiplied in, not this one's divided out
                    if other != h:
                        weight = w[b, num_reads + other, n]
                        for m in range(M):
                            d_erase[m] *= one - weight * e[b, other, m]
                weight, total = w[b, num_reads + h, n], zero
                for m in range(M):
                    total += dnew[b, n, m] * a[b, h, m] - d_erase[m] * e[b, h, m]
                    de_sums[h, m] -= weight * d_erase[m]
                    da_sums[h, m] += weight * dnew[b, n, m]
                d_weights[num_reads + h, n] += total
        else:
            for m in range(M):
                dmem[b, n, m] = zero
        if has_dr:
            for h in range(num_reads):
                weight, total = w[b, h, n], zero
                for m in range(M):
                    total += dr[b, h, m] * mem[b, n, m]
                    dmem[b, n, m] += weight * dr[b, h, m]
                d_weights[h, n] += total
    for h in range(H):
        similarity, content, gated = vectors[b, h, SIMILARITY], vectors[b, h, CONTENT], vectors[b, h, GATED]
        shifted, log_floored = vectors[b, h, SHIFTED], vectors[b, h, LOG_FLOORED]
        # Sharpen: dp p = (dw - sum(dw w)) w; dgamma = sum(dp p log c); dws = dp p gamma / c, 0 below the floor.
        total = 0.0
        for n in range(N):
            total += d_weights[h, n] * w[b, h, n]
        d_gamma = 0.0
        for n in range(N):
            dp_p = (d_weights[h, n] - total) * w[b, h, n]
            d_gamma += dp_p * log_floored[n]
            d_shifted[n + half] = dp_p * gamma[b, h] / shifted[n] if shifted[n] >= floor else zero
        dgamma[b, h] = d_gamma
        _fill_halo(d_shifted, half)
        # Shift: ds[i] = sum_n dws[n + i - K] wg[n]; dwg[n] = sum_i s[i] dws[n + i - K].
        for i in range(S):
            total = 0.0
            for n in range(N):
                total += d_shifted[n + i] * gated[n]
            ds[b, h, i] = total
        for n in range(N):
            d_gated[n] = zero
        for i in range(S):
            tap = s[b, h, i]
            for n in range(N):
                d_gated[n] += tap * d_shifted[n + i]
        # Interpolate: dwc = g dwg; dg = sum(dwg (wc - w_prev)); dw_prev = (1 - g) dwg.
        d_g, total = 0.0, 0.0
        for n in range(N):
            d_g += d_gated[n] * (content[n] - w_prev[b, h, n])
            dw_prev[b, h, n] = (one - g[b, h]) * d_gated[n]
            total += g[b, h] * d_gated[n] * content[n]
        dg[b, h] = d_g
        # Softmax of z = beta K: dz = wc (dwc - sum(dwc wc)); dbeta = sum(dz K); dK = beta dz.
        k_norm_sq = zero
        for m in range(M):
            k_norm_sq += k[b, h, m] * k[b, h, m]
        k_norm = math.sqrt(k_norm_sq)
        d_beta, k_term = 0.0, 0.0
        for n in range(N):
            dz = content[n] * (g[b, h] * d_gated[n] - total)
            d_beta += dz * similarity[n]
            d_similarity = beta[b, h] * dz
            d_dot[h, n] = d_similarity / (max(k_norm, eps) * max(mem_norm[n], eps))
            k_term += d_similarity * similarity[n]
            norm_terms[n] += d_similarity * similarity[n]
        dbeta[b, h] = d_beta
        # Cosine: dk = ddot M - sum_n(dK K) k / |k|^2, the norm term only above the floor (the rest below).
        k_scale = k_term / k_norm_sq if k_norm >= eps else 0.0
        for m in range(M):
            dk_sums[h, m] = -k_scale * k[b, h, m]
    # dM += ddot^T k - sum_h(dK K) M_n / |M_n|^2; dk += ddot M.
    for n in range(N):
        scale = norm_terms[n] / (mem_norm[n] * mem_norm[n]) if mem_norm[n] >= eps else zero
        for m in range(M):
            dmem[b, n, m] -= scale * mem[b, n, m]
        for h in range(H):
            d = d_dot[h, n]
            for m in range(M):
                dmem[b, n, m] += d * k[b, h, m]
                dk_sums[h, m] += d * mem[b, n, m]
    dk[b] = dk_sums
    de[b] = de_sums
    da[b] = da_sums


# Each direction runs ``*_item`` over the batch two ways: on the calling thread, or split into contiguous parts
# over numba's threads. A split gives the same bits for any number of parts (every part runs the same compiled
# loop nest). The one-thread driver is another compile of the same loops: LLVM inlines ``*_item`` into each
# driver and may vectorise a sum differently in each, so the two can differ in the last bits (seen once, between
# drivers compiled in different processes and loaded from numba's cache).
@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _forward(mem, k, beta, g, g_rest, s, gamma, w_prev, e, a, num_reads, w, r, new_mem, vectors):
    scratch = _forward_scratch(mem, s)
    for b in range(mem.shape[0]):
        _forward_item(b, mem, k, beta, g, g_rest, s, gamma, w_prev, e, a, num_reads, w, r, new_mem, vectors, scratch)


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def _forward_threaded(threads, mem, k, beta, g, g_rest, s, gamma, w_prev, e, a, num_reads, w, r, new_mem, vectors):
    B = mem.shape[0]
    for part in numba.prange(threads):
        scratch = _forward_scratch(mem, s)
        for b in range(part * B // threads, (part + 1) * B // threads):
            _forward_item(b, mem, k, beta, g, g_rest, s, gamma, w_prev, e, a, num_reads, w, r, new_mem, vectors,
                          scratch)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _backward(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads, w, vectors, dw, dr, dnew,
              dmem, dk, dbeta, dg, ds, dgamma, dw_prev, de, da):
    scratch = _backward_scratch(mem, k, s, e)
    for b in range(mem.shape[0]):
        _backward_item(b, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads, w, vectors, dw, dr, dnew,
                       dmem, dk, dbeta, dg, ds, dgamma, dw_prev, de, da, scratch)


@numba.njit(cache=True, nogil=True, parallel=True, fastmath=FASTMATH, error_model="numpy")
def _backward_threaded(threads, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads, w, vectors, dw, dr, dnew,
                       dmem, dk, dbeta, dg, ds, dgamma, dw_prev, de, da):
    B = mem.shape[0]
    for part in numba.prange(threads):
        scratch = _backward_scratch(mem, k, s, e)
        for b in range(part * B // threads, (part + 1) * B // threads):
            _backward_item(b, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads, w, vectors, dw, dr, dnew,
                           dmem, dk, dbeta, dg, ds, dgamma, dw_prev, de, da, scratch)


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _sigmoid(x, one):
    return one / (one + math.exp(-x))


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _squash(raw, k, beta, g, s, gamma, e, a):
    """``head_parameters``: k, beta, g, s, gamma, e, a from the head layer's raw output (B, H (M + S + 3) + 2 W M);
    ``softplus(x) = x`` above 20, as torch's."""
    B, H, M = k.shape
    S, W = s.shape[2], e.shape[1]
    real = raw.dtype.type
    one, threshold = real(1), real(20)
    width, writes = M + S + 3, H * (M + S + 3)
    for b in range(B):
        for h in range(H):
            x = raw[b, h * width : (h + 1) * width]
            for m in range(M):
                k[b, h, m] = x[m]
            beta[b, h] = x[M] if x[M] > threshold else math.log1p(math.exp(x[M]))
            g[b, h] = _sigmoid(x[M + 1], one)
            largest = x[M + 2]
            for i in range(1, S):
                largest = max(largest, x[M + 2 + i])
            total = real(0)
            for i in range(S):
                s[b, h, i] = math.exp(x[M + 2 + i] - largest)
                total += s[b, h, i]
            for i in range(S):
                s[b, h, i] /= total
            z = x[M + S + 2]
            gamma[b, h] = one + (z if z > threshold else math.log1p(math.exp(z)))
        for h in range(W):
            x = raw[b, writes + 2 * M * h : writes + 2 * M * (h + 1)]
            for m in range(M):
                e[b, h, m] = _sigmoid(x[m], one)
                a[b, h, m] = x[M + m]


@numba.njit(cache=True, nogil=True, fastmath=FASTMATH, error_model="numpy")
def _squash_backward(raw, g, s, e, dk, dbeta, dg, ds, dgamma, de, da, d_raw):
    """``d_raw`` from the squashed parameters' gradients: ``dx_beta = dbeta sigmoid(x)``, ``dx_g = dg g (1 - g)``,
    ``dx_s = s (ds - sum(ds s))``, ``dx_gamma = dgamma sigmoid(x)``, ``dx_e = de e (1 - e)``, k and a as they are."""
    B, H, M = dk.shape
    S, W = ds.shape[2], de.shape[1]
    one = raw.dtype.type(1)
    width, writes = M + S + 3, H * (M + S + 3)
    for b in range(B):
        for h in range(H):
            o = h * width
            for m in range(M):
                d_raw[b, o + m] = dk[b, h, m]
            d_raw[b, o + M] = dbeta[b, h] * _sigmoid(raw[b, o + M], one)
            d_raw[b, o + M + 1] = dg[b, h] * g[b, h] * (one - g[b, h])
            total = raw.dtype.type(0)
            for i in range(S):
                total += ds[b, h, i] * s[b, h, i]
            for i in range(S):
                d_raw[b, o + M + 2 + i] = s[b, h, i] * (ds[b, h, i] - total)
            d_raw[b, o + M + S + 2] = dgamma[b, h] * _sigmoid(raw[b, o + M + S + 2], one)
        for h in range(W):
            o = writes + 2 * M * h
            for m in range(M):
                d_raw[b, o + m] = de[b, h, m] * e[b, h, m] * (one - e[b, h, m])
                d_raw[b, o + M + m] = da[b, h, m]


SUPPORTED_DTYPES = (torch.float32, torch.float64)


def serves(*tensors: torch.Tensor) -> bool:
    """Whether these kernels take a call on ``tensors``: plain CPU tensors (or parameters) of one dtype, float32
    or float64 (bf16 memory and fp16 compute in float32 through ``fused_reference``), outside anything that
    traces or transforms the call (``torch.compile``, ``torch.jit.trace``, a dispatch mode such as ``make_fx``'s
    or ``FakeTensorMode``, a ``torch.func`` transform, forward-mode tangents), which a call into numba would
    escape: there ``fused_reference``, whose ops they see, serves."""
    dtype = tensors[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        return False
    for t in tensors:
        if t.dtype != dtype or t.device.type != "cpu" or (type(t) is not torch.Tensor
                                                          and type(t) is not torch.nn.Parameter):
            return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._len_torch_dispatch_stack():
        return False
    return not backend.transformed(tensors)


THREAD_WORK = 4 * 128 * 20
"""The least B N M a thread takes: four paper-size items. With less, splitting the batch costs about what it
saves (the memory step forward + backward on two threads at the paper's size, against one: 0.97 of its time
at B 4, 0.91 at B 8, 0.70 at B 32; a 2-core VM)."""
_threading = {"safe": None}  # numba's threading layer is thread-safe; None until first asked


def _threading_is_safe() -> bool:
    """Whether numba's threading layer takes calls from several Python threads at once: OpenMP's and TBB's do;
    the fallback, workqueue, aborts the process on a concurrent call (and is slower here: 1.1x one thread)."""
    if _threading["safe"] is None:
        numba.get_num_threads()  # numba picks its threading layer on first use
        _threading["safe"] = numba.threading_layer() in ("omp", "tbb")
    return _threading["safe"]


def _after_fork_in_child() -> None:
    # GNU OpenMP's threads do not survive a fork: numba terminates a child that starts a parallel loop once its
    # parent has started numba's threads, which anything in the parent may have done (not only this module).
    # A forked child runs its batches on one thread.
    _threading["safe"] = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def threads_for(B: int, N: int, M: int) -> int:
    """How many threads a step's batch is split over (contiguous parts of the batch, one a thread): as many as
    torch may use (``torch.set_num_threads``) and numba has (``NUMBA_NUM_THREADS``), at most one per item and
    per ``THREAD_WORK``; one where numba's threading layer is not thread-safe, and in a forked child.
    ``torch.set_num_threads(1)`` keeps every batch on the calling thread."""
    threads = min(B, torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, B * N * M // THREAD_WORK)
    return threads if threads > 1 and _threading_is_safe() else 1


@contextlib.contextmanager
def _pool_threads(threads: int):
    """At most ``threads`` of numba's pool for the parallel loops inside: a loop of fewer parts than the pool has
    threads would wake them all. The setting is the calling thread's, restored after. (Set here, not in the
    kernels: numba does not cache a kernel that sets it.)"""
    pool = numba.get_num_threads()
    if threads >= pool:
        yield
        return
    numba.set_num_threads(threads)
    try:
        yield
    finally:
        numba.set_num_threads(pool)


def _on_threads(threads: int, one_thread, split, *arrays) -> None:
    """``one_thread(*arrays)``, or ``split(threads, *arrays)`` with ``threads`` of numba's pool."""
    if threads == 1:
        one_thread(*arrays)
        return
    with _pool_threads(threads):
        split(threads, *arrays)


NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _empty(like: torch.Tensor, shape) -> torch.Tensor:
    """Every buffer the kernels write: a tensor of ``like``'s dtype and device (the CPU: ``serves``), from torch's
    allocator (which memory profiling sees, where numpy's it does not); a test fills them with NaN: an element a
    kernel forgets then fails it."""
    return like.new_empty(shape)


def _returned(like: torch.Tensor, shape) -> tuple[torch.Tensor, np.ndarray]:
    """A buffer of ``_empty``'s, and the array the kernel writes into it."""
    tensor = _empty(like, shape)
    return tensor, tensor.numpy()


def _block(like: torch.Tensor, shapes) -> tuple[torch.Tensor, list[np.ndarray]]:
    """One buffer for arrays of ``shapes`` and its arrays (views, in order): forward saves its block for backward
    as one tensor (through ``save_for_backward``, so that saved-tensor hooks, checkpointing's among them, see it);
    backward takes the head parameters' gradients from one."""
    tensor, array = _returned(like, (sum(math.prod(shape) for shape in shapes),))
    return tensor, _split(array, shapes)


def _split(flat: np.ndarray, shapes) -> list[np.ndarray]:
    views, start = [], 0
    for shape in shapes:
        size = math.prod(shape)
        views.append(flat[start : start + size].reshape(shape))
        start += size
    return views


def _array(t: torch.Tensor) -> np.ndarray:
    """``t``'s values as a C-contiguous array (a copy only where ``t`` is not contiguous). Each torch call here
    costs microseconds, and a step makes dozens: none is made that the tensor does not need."""
    if t.requires_grad:
        t = t.detach()
    return (t if t.is_contiguous() else t.contiguous()).numpy()


def _arrays(*tensors: torch.Tensor) -> tuple[np.ndarray, ...]:
    return tuple(_array(t) for t in tensors)


def _incoming(like: torch.Tensor, *grads: torch.Tensor | None) -> tuple[np.ndarray, ...]:
    """The incoming gradients as arrays of ``like``'s dtype; one that did not come (None) as an array of size 0."""
    missing = np.empty((0, 0, 0), NUMPY_DTYPES[like.dtype])
    return tuple(missing if t is None else _array(t if t.dtype == like.dtype else t.to(like.dtype)) for t in grads)


class MemoryStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
        ctx.set_materialize_grads(False)
        arrays = _arrays(mem, k, beta, g, s, gamma, w_prev, e, a)
        (B, N, M), H = arrays[0].shape, arrays[1].shape[1]
        (w, w_array), (r, r_array), (new_mem, new_array), (vectors, vectors_array) = (
            _returned(mem, shape) for shape in ((B, H, N), (B, num_reads, M), (B, N, M), (B, H, VECTORS, N)))
        _on_threads(threads_for(B, N, M), _forward, _forward_threaded, *arrays[:4], 1 - arrays[3], *arrays[4:],
                    num_reads, w_array, r_array, new_array, vectors_array)
        ctx.num_reads = num_reads
        ctx.save_for_backward(mem, k, beta, g, s, gamma, w_prev, e, a, w, vectors)
        return w, r, new_mem

    @staticmethod
    def backward(ctx, dw, dr, dnew):
        saved = ctx.saved_tensors
        if not fused_reference.hand_derived_serves((dw, dr, dnew)):
            return fused_reference.differentiate_literal(ctx, reference.memory_step, saved[:9], (ctx.num_reads,),
                                                         (dw, dr, dnew))
        arrays = _arrays(*saved)
        grads, grad_arrays = zip(*(_returned(saved[0], t.shape) for t in arrays[:9]))
        _on_threads(threads_for(*arrays[0].shape), _backward, _backward_threaded, *arrays[:9], ctx.num_reads,
                    *arrays[9:], *_incoming(saved[0], dw, dr, dnew), *grad_arrays)
        return (*grads, None)


def memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
    """``fastntm.reference.memory_step`` as one autograd node computed by numba; ``fused_reference``'s where
    these kernels do not serve (``serves``)."""
    if not serves(mem, k, beta, g, s, gamma, w_prev, e, a):
        return fused_reference.memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)
    return MemoryStep.apply(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)


def _from_heads_saved(B, N, M, layout) -> list[tuple[int, ...]]:
    """Shapes of what the step from the head layer saves beyond its inputs and ``w``: the vectors, then the
    squashed parameters k, beta, g, s, gamma, e, a."""
    R, W, S = layout
    H = R + W
    return [(B, H, VECTORS, N), (B, H, M), (B, H), (B, H), (B, H, S), (B, H), (B, W, M), (B, W, M)]


class MemoryStepFromHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mem, raw, w_prev, num_reads, num_writes, shift_width):
        ctx.set_materialize_grads(False)
        mem_array, raw_array, w_prev_array = _arrays(mem, raw, w_prev)
        B, N, M = mem_array.shape
        layout = (num_reads, num_writes, shift_width)
        (w, w_array), (r, r_array), (new_mem, new_array) = (_returned(mem, shape) for shape in (
            (B, num_reads + num_writes, N), (B, num_reads, M), (B, N, M)))
        block, (vectors, *params) = _block(mem, _from_heads_saved(B, N, M, layout))
        k, beta, g, s, gamma, e, a = params
        # Two calls, not one kernel calling both: numba would compile the pair anew (7 s a dtype, cold).
        _squash(raw_array, k, beta, g, s, gamma, e, a)
        _on_threads(threads_for(B, N, M), _forward, _forward_threaded, mem_array, k, beta, g, 1 - g, s, gamma,
                    w_prev_array, e, a, num_reads, w_array, r_array, new_array, vectors)
        ctx.layout = layout
        ctx.save_for_backward(mem, raw, w_prev, w, block)
        return w, r, new_mem

    @staticmethod
    def backward(ctx, dw, dr, dnew):
        saved = ctx.saved_tensors
        if not fused_reference.hand_derived_serves((dw, dr, dnew)):
            return fused_reference.differentiate_literal(ctx, reference.memory_step_from_heads, saved[:3], ctx.layout,
                                                         (dw, dr, dnew))
        mem, raw, w_prev, w, block = _arrays(*saved)
        B, N, M = mem.shape
        vectors, *params = _split(block, _from_heads_saved(B, N, M, ctx.layout))
        k, beta, g, s, gamma, e, a = params
        (dmem, dmem_array), (d_raw, d_raw_array), (dw_prev, dw_prev_array) = (
            _returned(saved[0], t.shape) for t in (mem, raw, w_prev))
        dk, dbeta, dg, ds, dgamma, de, da = _block(saved[0], [p.shape for p in params])[1]
        _on_threads(threads_for(B, N, M), _backward, _backward_threaded, mem, k, beta, g, s, gamma, w_prev, e, a,
                    ctx.layout[0], w, vectors, *_incoming(saved[0], dw, dr, dnew), dmem_array, dk, dbeta, dg, ds,
                    dgamma, dw_prev_array, de, da)
        _squash_backward(raw, g, s, e, dk, dbeta, dg, ds, dgamma, de, da, d_raw_array)
        return dmem, d_raw, dw_prev, None, None, None


def memory_step_from_heads(mem, raw, w_prev, num_reads, num_writes, shift_width):
    """``fastntm.reference.memory_step_from_heads`` as one autograd node computed by numba (squashing included);
    ``fused_reference``'s where these kernels do not serve (``serves``)."""
    if not serves(mem, raw, w_prev):
        return fused_reference.memory_step_from_heads(mem, raw, w_prev, num_reads, num_writes, shift_width)
    return MemoryStepFromHeads.apply(mem, raw, w_prev, num_reads, num_writes, shift_width)
