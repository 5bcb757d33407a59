"""The write alone: ``M_t[n] = M[n] prod_h (1 - w_h[n] e_h) + sum_h w_h[n] a_h`` on the kernels of ``memory_step.py``."""

import torch

from .. import reference
from ..fused_reference import differentiate_literal, hand_derived_serves
from .memory_step import T, _contig, _given, _mem_bwd, _op, _read_write, _read_write_bwd, _save, _unaliased


def _write_fwd(mem: T, w: T, e: T, a: T) -> T:
    return _read_write(mem, w, None, e, a, 0, w.shape[1], normalize=False, wout=None, write=True)[1]


def _write_bwd(mem: T, w: T, e: T, a: T, dnew: T) -> tuple[T, T, T, T]:
    W = w.shape[1]
    dw, de, da = _read_write_bwd(mem, w, e, a, None, dnew, 0, W, w.dtype)
    dmem, _ = _mem_bwd(mem, w, e, None, dnew, w, None, 0, W)
    return dmem, dw.to(w.dtype), de, da


write_fwd = torch.library.custom_op("fastntm::write_fwd", _write_fwd, mutates_args=())


def _write_bwd_op(mem: T, w: T, e: T, a: T, dnew: T) -> tuple[T, T, T, T]:
    return _unaliased(_write_bwd(mem, w, e, a, dnew))


write_bwd = torch.library.custom_op("fastntm::write_bwd", _write_bwd_op, mutates_args=())


@write_fwd.register_fake
def _(mem, w, e, a):
    return torch.empty_like(mem)


@write_bwd.register_fake
def _(mem, w, e, a, dnew):
    return torch.empty_like(mem), torch.empty_like(w), torch.empty_like(e), torch.empty_like(a)


class Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mem, w, e, a):
        inputs = (mem, w, e, a)
        args = [_contig(t) for t in inputs]
        _save(ctx, inputs, args)
        return _op(write_fwd, _write_fwd)(*args)

    @staticmethod
    def backward(ctx, dnew):
        saved = ctx.saved_tensors
        if not hand_derived_serves((dnew,)):
            return differentiate_literal(ctx, reference.write, _given(ctx, saved, 4), (), (dnew,))
        return _op(write_bwd, _write_bwd)(*saved[:4], _contig(dnew))


def write(mem, w, e, a):
    """New memory (B, N, M) in mem's dtype: ``mem`` (B, N, M); ``w`` (B, W, N); ``e``, ``a`` (B, W, M).

    Example::

        new_mem = write(mem, w[:, 1:], e, a)
    """
    return Write.apply(mem, w, e, a)
