"""The head layer's raw output split and squashed (SPEC.md, head parameters), forward and backward.

``raw`` (B, H (M + S + 3) + 2 W M): for each head ``[k (M), beta, g, s (S), gamma]``, then for
each write head ``[e (M), a (M)]``::

    k = raw   beta = softplus(raw)   g = sigmoid(raw)   s = softmax(raw) over S
    gamma = 1 + softplus(raw)        e = sigmoid(raw)   a = raw

One launch each way, where the model's PyTorch ops took eight forward (five activations, the add,
two copies making k and a contiguous) and ten backward (``benchmarks/launch_count.py``). Under a CUDA graph a training step's
time is mostly its launches, several dozen per time step. One program per head: program
``(b, j)`` squashes head j's addressing slice for j < H, write head ``j - H``'s erase and add
vectors for j >= H. Backward recomputes from ``raw``, the only tensor saved:
``softplus' = sigmoid``, ``sigmoid' = sigmoid (1 - sigmoid)``,
``dL/dx_s = s (dL/ds - sum_j dL/ds_j s_j)``.
"""

import torch
import triton
import triton.language as tl

from . import _config
from .. import reference
from ..fused_reference import differentiate_literal, hand_derived_serves
from .memory_step import T, _contig, _given, _nz, _op, _save

# ----------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------


@triton.jit
def _sigmoid(x):
    # exp of a non-positive number only: no overflow for any finite x.
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _softplus(x):
    # log1p(exp(x)) with log1p(y) = log(u) y / (u - 1), u = 1 + y (exact to rounding where u rounds to 1).
    # Above 20 softplus(x) is x, as torch.nn.functional.softplus takes it.
    y = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + y
    log1p = tl.where(u == 1.0, y, tl.log(u) * y / tl.where(u == 1.0, 1.0, u - 1.0))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _softplus_grad(x):
    return tl.where(x > 20.0, 1.0, _sigmoid(x))


@triton.jit
def _softmax(p_x, m_x):
    """The softmax of the masked vector at ``p_x``, fp32 (0 at masked lanes)."""
    b_x = tl.load(p_x, mask=m_x, other=-float("inf")).to(tl.float32)
    b_x = tl.exp(b_x - tl.max(b_x, 0))
    return b_x / tl.sum(b_x, 0)


@triton.jit
def _head_parameters_kernel(p_raw, p_k, p_beta, p_g, p_s, p_gamma, p_e, p_a, s_raw, H, W, M, S,
                            BL: tl.constexpr):
    i_p = tl.program_id(0)
    i_b, i_j = (i_p // (H + W)).to(tl.int64), i_p % (H + W)
    o_l = tl.arange(0, BL)
    m_m, m_s = o_l < M, o_l < S
    p_row = p_raw + i_b * s_raw
    if i_j < H:
        i_bh = i_b * H + i_j
        p_h = p_row + i_j * (M + S + 3)
        tl.store(p_k + i_bh * M + o_l, tl.load(p_h + o_l, mask=m_m), mask=m_m)
        b_beta = tl.load(p_h + M).to(tl.float32)
        b_g = tl.load(p_h + M + 1).to(tl.float32)
        b_gamma = tl.load(p_h + M + S + 2).to(tl.float32)
        tl.store(p_beta + i_bh, _softplus(b_beta).to(p_beta.dtype.element_ty))
        tl.store(p_g + i_bh, _sigmoid(b_g).to(p_g.dtype.element_ty))
        tl.store(p_gamma + i_bh, (1.0 + _softplus(b_gamma)).to(p_gamma.dtype.element_ty))
        b_s = _softmax(p_h + M + 2 + o_l, m_s)
        tl.store(p_s + i_bh * S + o_l, b_s.to(p_s.dtype.element_ty), mask=m_s)
    else:
        i_bw = i_b * W + (i_j - H)
        p_w = p_row + H * (M + S + 3) + (i_j - H) * 2 * M
        b_e = tl.load(p_w + o_l, mask=m_m).to(tl.float32)
        tl.store(p_e + i_bw * M + o_l, _sigmoid(b_e).to(p_e.dtype.element_ty), mask=m_m)
        tl.store(p_a + i_bw * M + o_l, tl.load(p_w + M + o_l, mask=m_m), mask=m_m)


@triton.jit
def _head_parameters_bwd_kernel(p_raw, p_dk, p_dbeta, p_dg, p_ds, p_dgamma, p_de, p_da, p_draw, s_raw, s_draw,
                                H, W, M, S, BL: tl.constexpr):
    i_p = tl.program_id(0)
    i_b, i_j = (i_p // (H + W)).to(tl.int64), i_p % (H + W)
    o_l = tl.arange(0, BL)
    m_m, m_s = o_l < M, o_l < S
    p_row = p_raw + i_b * s_raw
    p_drow = p_draw + i_b * s_draw
    if i_j < H:
        i_bh = i_b * H + i_j
        p_h = p_row + i_j * (M + S + 3)
        p_dh = p_drow + i_j * (M + S + 3)
        tl.store(p_dh + o_l, tl.load(p_dk + i_bh * M + o_l, mask=m_m), mask=m_m)
        b_beta = tl.load(p_h + M).to(tl.float32)
        b_g = _sigmoid(tl.load(p_h + M + 1).to(tl.float32))
        b_gamma = tl.load(p_h + M + S + 2).to(tl.float32)
        b_dbeta = tl.load(p_dbeta + i_bh).to(tl.float32) * _softplus_grad(b_beta)
        b_dg = tl.load(p_dg + i_bh).to(tl.float32) * b_g * (1.0 - b_g)
        b_dgamma = tl.load(p_dgamma + i_bh).to(tl.float32) * _softplus_grad(b_gamma)
        tl.store(p_dh + M, b_dbeta.to(p_draw.dtype.element_ty))
        tl.store(p_dh + M + 1, b_dg.to(p_draw.dtype.element_ty))
        tl.store(p_dh + M + S + 2, b_dgamma.to(p_draw.dtype.element_ty))
        b_s = _softmax(p_h + M + 2 + o_l, m_s)
        b_ds = tl.load(p_ds + i_bh * S + o_l, mask=m_s, other=0.0).to(tl.float32)
        b_dx = b_s * (b_ds - tl.sum(b_ds * b_s, 0))
        tl.store(p_dh + M + 2 + o_l, b_dx.to(p_draw.dtype.element_ty), mask=m_s)
    else:
        i_bw = i_b * W + (i_j - H)
        o_w = H * (M + S + 3) + (i_j - H) * 2 * M
        b_e = _sigmoid(tl.load(p_row + o_w + o_l, mask=m_m).to(tl.float32))
        b_de = tl.load(p_de + i_bw * M + o_l, mask=m_m).to(tl.float32) * b_e * (1.0 - b_e)
        tl.store(p_drow + o_w + o_l, b_de.to(p_draw.dtype.element_ty), mask=m_m)
        tl.store(p_drow + o_w + M + o_l, tl.load(p_da + i_bw * M + o_l, mask=m_m), mask=m_m)


# ----------------------------------------------------------------------------
# Host functions
# ----------------------------------------------------------------------------


def block_size(M: int, S: int) -> int:
    """One tile for k, e, a (M) and s (S)."""
    return max(16, _config.next_pow2(max(M, S)))


def supported(M: int, S: int) -> bool:
    return block_size(M, S) <= _config.MAX_BM


def _forward(raw: T, H: int, W: int, M: int, S: int) -> tuple[T, T, T, T, T, T, T]:
    empty = _config.allocator()
    B, dev, dtype = raw.shape[0], raw.device, raw.dtype
    k, s = empty((B, H, M), dtype, dev), empty((B, H, S), dtype, dev)
    beta, g, gamma = (empty((B, H), dtype, dev) for _ in range(3))
    e, a = empty((B, W, M), dtype, dev), empty((B, W, M), dtype, dev)
    if B:
        _head_parameters_kernel[(B * (H + W),)](raw, k, beta, g, s, gamma, _nz(e, k), _nz(a, k), raw.stride(0),
                                                H, W, M, S, BL=block_size(M, S), num_warps=1)
    return k, beta, g, s, gamma, e, a


def _backward(raw: T, dk: T, dbeta: T, dg: T, ds: T, dgamma: T, de: T, da: T, H: int, W: int, M: int, S: int) -> T:
    draw = _config.allocator()(raw.shape, raw.dtype, raw.device)
    B = raw.shape[0]
    if B:
        _head_parameters_bwd_kernel[(B * (H + W),)](raw, dk, dbeta, dg, ds, dgamma, _nz(de, dk), _nz(da, dk), draw,
                                                    raw.stride(0), draw.stride(0), H, W, M, S,
                                                    BL=block_size(M, S), num_warps=1)
    return draw


head_parameters_fwd = torch.library.custom_op("fastntm::head_parameters_fwd", _forward, mutates_args=())
head_parameters_bwd = torch.library.custom_op("fastntm::head_parameters_bwd", _backward, mutates_args=())


@head_parameters_fwd.register_fake
def _(raw, H, W, M, S):
    B = raw.shape[0]
    return (raw.new_empty((B, H, M)), raw.new_empty((B, H)), raw.new_empty((B, H)), raw.new_empty((B, H, S)),
            raw.new_empty((B, H)), raw.new_empty((B, W, M)), raw.new_empty((B, W, M)))


@head_parameters_bwd.register_fake
def _(raw, dk, dbeta, dg, ds, dgamma, de, da, H, W, M, S):
    return torch.empty_like(raw)


# ----------------------------------------------------------------------------
# autograd
# ----------------------------------------------------------------------------


def _rows(raw: T) -> T:
    """``raw`` as the kernels take it: rows at any stride, elements of a row adjacent."""
    return raw if raw.stride(1) == 1 else raw.contiguous()


class HeadParameters(torch.autograd.Function):
    @staticmethod
    def forward(ctx, raw, H, W, M, S):
        rows = _rows(raw)
        _save(ctx, (raw,), (rows,))
        ctx.sizes = (H, W, M, S)
        return _op(head_parameters_fwd, _forward)(rows, H, W, M, S)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        if not hand_derived_serves(grads):
            H, W, M, S = ctx.sizes
            return differentiate_literal(ctx, reference.head_parameters, _given(ctx, saved, 1), (H - W, W, M, S),
                                         grads)
        raw = saved[0]
        draw = _op(head_parameters_bwd, _backward)(raw, *(_contig(g) for g in grads), *ctx.sizes)
        return draw, None, None, None, None


# ----------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------


def head_parameters(raw, num_reads, num_writes, memory_width, shift_width):
    """``k, beta, g, s, gamma, e, a`` from ``raw`` (B, H (M + S + 3) + 2 W M), contiguous, in raw's dtype;
    see ``fastntm.reference.head_parameters``. Differentiable in ``raw``.

    Example::

        k, beta, g, s, gamma, e, a = head_parameters(raw, 1, 1, 20, 3)
    """
    H, W, M, S = num_reads + num_writes, num_writes, memory_width, shift_width
    if torch.is_grad_enabled() and raw.requires_grad:
        return HeadParameters.apply(raw, H, W, M, S)
    return _op(head_parameters_fwd, _forward)(_rows(raw), H, W, M, S)
