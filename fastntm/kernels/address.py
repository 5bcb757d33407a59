"""Addressing alone (SPEC.md steps 1-4) on the fused memory-step kernels, without the read and write.

The kernels are those of ``memory_step.py`` run with ``rw=False``: on-chip, one
launch per batch item for all heads; large memory, the similarity and
shift-sharpen passes and a final normalisation.
"""

import torch

from .. import reference
from ..fused_reference import differentiate_literal, hand_derived_serves
from .memory_step import _backward, _contig, _forward, _given, _op, _save, memory_step_bwd, memory_step_fwd


class Address(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mem, k, beta, g, s, gamma, w_prev):
        inputs = (mem, k, beta, g, s, gamma, w_prev)
        args = [_contig(t) for t in inputs]
        none = k.new_empty((k.shape[0], 0, k.shape[2]))
        w, _, _, K, mx, se = _op(memory_step_fwd, _forward)(*args, none, none, k.shape[1], False)
        _save(ctx, inputs, args, none, w, K, mx, se)
        return w

    @staticmethod
    def backward(ctx, dw):
        saved = ctx.saved_tensors
        if not hand_derived_serves((dw,)):
            return differentiate_literal(ctx, reference.address, _given(ctx, saved, 7), (), (dw,))
        mem, k, beta, g, s, gamma, w_prev, none, w, K, mx, se = saved[:12]
        grads = _op(memory_step_bwd, _backward)(mem, k, beta, g, s, gamma, w_prev, none, none, w, K, mx, se,
                                                _contig(dw), None, None, k.shape[1])
        return grads[:7]


def address(mem, k, beta, g, s, gamma, w_prev):
    """All heads' weightings ``w`` (B, H, N) on ``mem``, in the parameters' dtype.

    ``K = cos(k, mem[n])``; ``wc = softmax(beta K)``; ``wg = g wc + (1 - g) w_prev``;
    ``ws[n] = sum_j wg[(n - j) mod N] s[j + K]``; ``w = ws^gamma / (sum ws^gamma + 1e-16)``.
    Shapes: ``mem`` (B, N, M); ``k`` (B, H, M); ``beta``, ``g``, ``gamma`` (B, H); ``s`` (B, H, S);
    ``w_prev`` (B, H, N).

    Example::

        w = address(mem, k, beta, g, s, gamma, w_prev)
    """
    return Address.apply(mem, k, beta, g, s, gamma, w_prev)
