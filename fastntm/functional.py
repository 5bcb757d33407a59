"""The NTM memory ops, as users and the model call them.

Each op checks its inputs (``fastntm.validation``), then runs the implementation
that ``fastntm.backend`` picks: the fused Triton kernels or the reference path.
The equations are those of SPEC.md and ``fastntm.reference``.

Example::

    import torch, fastntm.functional as F
    B, N, M, R, W = 2, 128, 20, 1, 1
    H = R + W
    mem = torch.randn(B, N, M)
    w, r, new_mem = F.memory_step(
        mem, torch.randn(B, H, M), torch.rand(B, H) * 10, torch.rand(B, H),
        torch.softmax(torch.randn(B, H, 3), -1), 1 + torch.rand(B, H),
        torch.softmax(torch.randn(B, H, N), -1), torch.rand(B, W, M), torch.randn(B, W, M),
        num_reads=R)
"""

from __future__ import annotations

import torch

from . import validation
from .backend import autocast_off, implementation

__all__ = ["head_parameters", "address", "read", "write", "memory_step", "memory_step_from_heads"]


def head_parameters(raw, *, num_reads: int, num_writes: int, memory_width: int, shift_width: int,
                    backend: str = "auto") -> tuple[torch.Tensor, ...]:
    """The head layer's raw output split into ``k, beta, g, s, gamma, e, a`` and squashed.

    ``raw`` (B, H (M + S + 3) + 2 W M), H = R + W: for each head ``[k (M), beta, g, s (S), gamma]``,
    then for each write head ``[e (M), a (M)]``. ``k = raw``, ``beta = softplus(raw)``,
    ``g = sigmoid(raw)``, ``s = softmax(raw)`` over S, ``gamma = 1 + softplus(raw)``,
    ``e = sigmoid(raw)``, ``a = raw``. Returns k (B, H, M); beta, g, gamma (B, H); s (B, H, S);
    e, a (B, W, M); in raw's dtype, ready for ``memory_step``. ``k`` and ``a`` may be views of ``raw``, as
    ``torch.split``'s outputs are: clone one before editing it in place.
    """
    validation.check_head_parameters(raw, num_reads, num_writes, memory_width, shift_width)
    with autocast_off(raw.device):
        return implementation(backend, raw.device).head_parameters(raw, num_reads, num_writes, memory_width,
                                                                    shift_width)


def address(mem, k, beta, g, s, gamma, w_prev, *, backend: str = "auto") -> torch.Tensor:
    """Weightings of all heads on ``mem``, shape (B, H, N).

    ``K = cos(k, mem[n])``; ``wc = softmax(beta K)``; ``wg = g wc + (1 - g) w_prev``;
    ``ws[n] = sum_j wg[(n - j) mod N] s[j + K]``; ``w = ws^gamma / (sum ws^gamma + 1e-16)``.

    Args: ``mem`` (B, N, M); ``k`` (B, H, M); ``beta`` >= 0, ``g`` in [0, 1] and
    ``gamma`` >= 1, each (B, H); ``s`` (B, H, S), S odd; ``w_prev`` (B, H, N).
    """
    validation.check_addressing(mem, k, beta, g, s, gamma, w_prev)
    with autocast_off(mem.device):
        return implementation(backend, mem.device).address(mem, k, beta, g, s, gamma, w_prev)


def read(mem, w, *, backend: str = "auto") -> torch.Tensor:
    """Reads ``r[b, h] = sum_n w[b, h, n] mem[b, n]``: ``mem`` (B, N, M), ``w`` (B, R, N) -> (B, R, M)."""
    validation.check_read(mem, w)
    with autocast_off(mem.device):
        return implementation(backend, mem.device).read(mem, w)


def write(mem, w, e, a, *, backend: str = "auto") -> torch.Tensor:
    """Erase then add, all write heads at once, -> (B, N, M).

    ``M_t[n] = M[n] * prod_h (1 - w_h[n] e_h) + sum_h w_h[n] a_h``, with ``w`` (B, W, N),
    ``e`` in [0, 1] and ``a`` each (B, W, M).
    """
    validation.check_write(mem, w, e, a)
    with autocast_off(mem.device):
        return implementation(backend, mem.device).write(mem, w, e, a)


def memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, *, num_reads: int, backend: str = "auto"):
    """One NTM memory step: address all H heads on ``mem``, read with the first
    ``num_reads`` heads, write with the other ``W = H - num_reads``.

    Returns ``(w, r, new_mem)``: (B, H, N), (B, num_reads, M), (B, N, M). Reads see
    the memory before the write. Arguments as in ``address`` and ``write``.
    """
    validation.check_memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)
    with autocast_off(mem.device):
        return implementation(backend, mem.device).memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)


def memory_step_from_heads(mem, raw, w_prev, *, num_reads: int, num_writes: int, shift_width: int,
                           backend: str = "auto"):
    """``memory_step`` on the parameters ``head_parameters`` makes of the head layer's raw output, as one op.

    ``raw`` (B, H (M + S + 3) + 2 W M) with M = mem's width, H = num_reads + num_writes, W = num_writes,
    S = shift_width, laid out as ``head_parameters`` reads it; ``w_prev`` (B, H, N) in raw's dtype.
    Returns ``(w, r, new_mem)`` as ``memory_step`` does, and the same values and gradients as the two
    ops in turn. On the reference path it is one autograd node, where the two were a dozen: ``FastNTM``
    takes its steps through it.
    """
    validation.check_memory_step_from_heads(mem, raw, w_prev, num_reads, num_writes, shift_width)
    with autocast_off(mem.device):
        return implementation(backend, mem.device).memory_step_from_heads(mem, raw, w_prev, num_reads, num_writes,
                                                                           shift_width)
