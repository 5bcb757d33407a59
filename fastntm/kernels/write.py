"""The write alone: ``M_t[n] = M[n] prod_h (1 - w_h[n] e_h) + sum_h w_h[n] a_h`` on the kernels of ``memory_step.py``."""

import torch

from .memory_step import T, _mem_bwd, _read_write, _read_write_bwd


@torch.library.custom_op("fastntm::write_fwd", mutates_args=())
def write_fwd(mem: T, w: T, e: T, a: T) -> T:
    return _read_write(mem, w, None, e, a, 0, w.shape[1], normalize=False, wout=None, write=True)[1]


@write_fwd.register_fake
def _(mem, w, e, a):
    return torch.empty_like(mem)


@torch.library.custom_op("fastntm::write_bwd", mutates_args=())
def write_bwd(mem: T, w: T, e: T, a: T, dnew: T) -> tuple[T, T, T, T]:
    W = w.shape[1]
    dw, de, da = _read_write_bwd(mem, w, e, a, None, dnew, 0, W)
    dmem, _ = _mem_bwd(mem, w, e, None, dnew, w, None, None, 0, W)
    return dmem, dw.to(w.dtype), de.to(w.dtype), da.to(w.dtype)


@write_bwd.register_fake
def _(mem, w, e, a, dnew):
    return torch.empty_like(mem), torch.empty_like(w), torch.empty_like(e), torch.empty_like(a)


class Write(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mem, w, e, a):
        args = [t.contiguous() for t in (mem, w, e, a)]
        ctx.save_for_backward(*args)
        return write_fwd(*args)

    @staticmethod
    def backward(ctx, dnew):
        return write_bwd(*ctx.saved_tensors, dnew.contiguous())


def write(mem, w, e, a):
    """New memory (B, N, M) in mem's dtype: ``mem`` (B, N, M); ``w`` (B, W, N); ``e``, ``a`` (B, W, M).

    Example::

        new_mem = write(mem, w[:, 1:], e, a)
    """
    return Write.apply(mem, w, e, a)
