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

COSINE_EPS = 1e-8
SHARPEN_EPS = 1e-16
SHARPEN_FLOOR = 1e-30


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32 (bf16 and fp16 are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def content_similarity(mem: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``K[b, h, n] = dot(k, mem[n]) / (max(|k|, eps) * max(|mem[n]|, eps))``, eps = 1e-8."""
    dots = torch.einsum("bhm,bnm->bhn", k, mem)
    k_norm = torch.linalg.vector_norm(k, dim=-1).clamp_min(COSINE_EPS)
    mem_norm = torch.linalg.vector_norm(mem, dim=-1).clamp_min(COSINE_EPS)
    return dots / (k_norm[:, :, None] * mem_norm[:, None, :])


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


def memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
    """Address all H heads on ``mem``, read with the first ``num_reads``, write with the rest.

    Returns ``(w, r, new_mem)`` with shapes (B, H, N), (B, R, M), (B, N, M).
    """
    w = address(mem, k, beta, g, s, gamma, w_prev)
    r = read(mem, w[:, :num_reads])
    new_mem = write(mem, w[:, num_reads:], e, a)
    return w, r, new_mem
