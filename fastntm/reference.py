"""The NTM memory step in plain PyTorch: SPEC.md as code, one equation a function.

This is the executable form of the spec. It is kept literal and readable; speed
comes from the kernels in ``fastntm.kernels`` and from ``fastntm.fused_reference``.
Every function computes in float32 (float64 if given float64) and returns
weightings and reads in the dtype of the head parameters, memory in the dtype of
``mem``.

Shapes: ``mem`` (B, N, M); ``k`` (B, H, M); ``beta``, ``g``, ``gamma`` (B, H);
``s`` (B, H, S) with S = 2K + 1; ``w_prev`` (B, H, N); ``e``, ``a`` (B, W, M).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

COSINE_EPS = 1e-8
SHARPEN_EPS = 1e-16
SHARPEN_FLOOR = 1e-30


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 and fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def content_similarity(mem: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``K[b, h, n] = dot(k, mem[n]) / (max(|k|, eps) * max(|mem[n]|, eps))``, eps = 1e-8.

    ``max(|x|, eps)`` is taken as ``sqrt(max(|x|^2, eps^2))``, the same value: ``vector_norm``'s own
    backward divides by the norm, so second derivatives at a zero memory row or a zero key were NaN."""
    dots = torch.einsum("bhm,bnm->bhn", k, mem)
    k_norm = _floored_norm(k)
    mem_norm = _floored_norm(mem)
    return dots / (k_norm[:, :, None] * mem_norm[:, None, :])


def _floored_norm(x: torch.Tensor) -> torch.Tensor:
    """``max(|x|, eps)`` over the last dimension."""
    return x.square().sum(-1).clamp_min(COSINE_EPS**2).sqrt()


def content_weighting(mem: torch.Tensor, k: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``wc = softmax_n(beta * K)`` (torch.softmax subtracts the max)."""
    return torch.softmax(beta[..., None] * content_similarity(mem, k), dim=-1)


def interpolate(wc: torch.Tensor, w_prev: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``wg = g * wc + (1 - g) * w_prev``."""
    g = g[..., None]
    return g * wc + (1 - g) * w_prev


def circular_shift(wg: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``ws[n] = sum_{j=-K..K} wg[(n - j) mod N] * s[j + K]`` (the paper's eq. 8).

    ``torch.roll(wg, j)[n] == wg[(n - j) mod N]`` for any integer j, so shifts
    wider than N wrap as often as they need to.
    """
    half = (s.shape[-1] - 1) // 2
    return sum(s[..., j + half, None] * torch.roll(wg, shifts=j, dims=-1) for j in range(-half, half + 1))


def sharpen(ws: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """``w[n] = ws[n]^gamma / (sum_m ws[m]^gamma + 1e-16)``, ``ws`` floored at 1e-30 first."""
    powered = ws.clamp_min(SHARPEN_FLOOR) ** gamma[..., None]
    return powered / (powered.sum(dim=-1, keepdim=True) + SHARPEN_EPS)


def address(mem, k, beta, g, s, gamma, w_prev):
    """All heads' weightings ``w`` (B, H, N) on ``mem``: content, interpolation, shift, sharpening."""
    dtype = compute_dtype(mem, k)
    wc = content_weighting(mem.to(dtype), k.to(dtype), beta.to(dtype))
    wg = interpolate(wc, w_prev.to(dtype), g.to(dtype))
    w = sharpen(circular_shift(wg, s.to(dtype)), gamma.to(dtype))
    return w.to(k.dtype)


def read(mem, w):
    """``r[b, h] = sum_n w[b, h, n] * mem[b, n]``, shape (B, R, M)."""
    dtype = compute_dtype(mem, w)
    return torch.einsum("bhn,bnm->bhm", w.to(dtype), mem.to(dtype)).to(w.dtype)


def write(mem, w, e, a):
    """``M_t[n] = M[n] * prod_h (1 - w_h[n] e_h) + sum_h w_h[n] a_h`` over the W write heads."""
    dtype = compute_dtype(mem, w)
    mem_c, w, e, a = mem.to(dtype), w.to(dtype), e.to(dtype), a.to(dtype)
    keep = torch.prod(1 - w[..., None] * e[:, :, None, :], dim=1)
    added = torch.einsum("bwn,bwm->bnm", w, a)
    return (mem_c * keep + added).to(mem.dtype)


def head_parameters(raw, num_reads, num_writes, memory_width, shift_width):
    """``k, beta, g, s, gamma, e, a`` from the head layer's raw output (SPEC.md, head parameters).

    ``raw`` (B, H (M + S + 3) + 2 W M) holds, for each of the H = R + W heads, ``[k (M), beta, g,
    s (S), gamma]``, then for each write head ``[e (M), a (M)]``. ``k = raw``, ``beta = softplus(raw)``,
    ``g = sigmoid(raw)``, ``s = softmax(raw)`` over S, ``gamma = 1 + softplus(raw)``,
    ``e = sigmoid(raw)``, ``a = raw``. Returns k (B, H, M); beta, g, gamma (B, H); s (B, H, S);
    e, a (B, W, M); all in raw's dtype.
    """
    B, H, W, M = raw.shape[0], num_reads + num_writes, num_writes, memory_width
    dtype = compute_dtype(raw)
    x = raw.to(dtype)
    addressing, writing = x[:, : H * (M + shift_width + 3)], x[:, H * (M + shift_width + 3) :]
    k, beta, g, s, gamma = addressing.reshape(B, H, M + shift_width + 3).split((M, 1, 1, shift_width, 1), dim=-1)
    e, a = writing.reshape(B, W, 2 * M).split(M, dim=-1)
    params = (k, F.softplus(beta.squeeze(-1)), torch.sigmoid(g.squeeze(-1)), torch.softmax(s, dim=-1),
              1 + F.softplus(gamma.squeeze(-1)), torch.sigmoid(e), a)
    return params if dtype == raw.dtype else tuple(p.to(raw.dtype) for p in params)


def memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
    """Address all H heads on ``mem``, read with the first ``num_reads``, write with the rest.

    Returns ``(w, r, new_mem)`` with shapes (B, H, N), (B, R, M), (B, N, M).
    """
    w = address(mem, k, beta, g, s, gamma, w_prev)
    r = read(mem, w[:, :num_reads])
    new_mem = write(mem, w[:, num_reads:], e, a)
    return w, r, new_mem


def memory_step_from_heads(mem, raw, w_prev, num_reads, num_writes, shift_width):
    """``memory_step`` on the parameters ``head_parameters`` makes of ``raw`` (M = mem's width)."""
    k, beta, g, s, gamma, e, a = head_parameters(raw, num_reads, num_writes, mem.shape[-1], shift_width)
    return memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)
