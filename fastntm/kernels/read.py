"""Reads alone: ``r[b, h] = sum_n w[b, h, n] mem[b, n]`` on the read/write kernels of ``memory_step.py``."""

import torch

from .. import reference
from ..fused_reference import differentiate_literal, hand_derived_serves
from .memory_step import T, _contig, _given, _mem_bwd, _op, _read_write, _read_write_bwd, _save


def _read_fwd(mem: T, w: T) -> T:
    return _read_write(mem, w, None, None, None, w.shape[1], 0, normalize=False, wout=None, write=False)[0]


def _read_bwd(mem: T, w: T, dr: T) -> tuple[T, T]:
    R = w.shape[1]
    dw, _, _ = _read_write_bwd(mem, w, None, None, dr, None, R, 0, w.dtype)
    dmem, _ = _mem_bwd(mem, w, None, dr, None, w, None, R, 0)
    return dmem, dw.to(w.dtype)


read_fwd = torch.library.custom_op("fastntm::read_fwd", _read_fwd, mutates_args=())
read_bwd = torch.library.custom_op("fastntm::read_bwd", _read_bwd, mutates_args=())


@read_fwd.register_fake
def _(mem, w):
    return w.new_empty((w.shape[0], w.shape[1], mem.shape[2]))


@read_bwd.register_fake
def _(mem, w, dr):
    return torch.empty_like(mem), torch.empty_like(w)


class Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mem, w):
        args = [_contig(mem), _contig(w)]
        _save(ctx, (mem, w), args)
        return _op(read_fwd, _read_fwd)(*args)

    @staticmethod
    def backward(ctx, dr):
        saved = ctx.saved_tensors
        if not hand_derived_serves((dr,)):
            return differentiate_literal(ctx, reference.read, _given(ctx, saved, 2), (), (dr,))
        return _op(read_bwd, _read_bwd)(*saved[:2], _contig(dr))


def read(mem, w):
    """Reads ``r`` (B, R, M) in w's dtype: ``mem`` (B, N, M), ``w`` (B, R, N).

    Example::

        r = read(mem, w[:, :1])
    """
    return Read.apply(mem, w)
