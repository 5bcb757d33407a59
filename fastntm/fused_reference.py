"""``memory_step`` in plain PyTorch with a hand-derived backward.

On a CPU the literal reference (``fastntm.reference``) spends most of its time in
autograd's per-op bookkeeping: about 50 small ops forward and as many backward
for every step. This computes the same function as one ``autograd.Function``
whose backward is written out below, in a few vectorised ops. Tests hold it to
the literal reference (values and every gradient) and to ``gradcheck``.

Backward, with ``dw``, ``dr``, ``dM`` the incoming gradients (SPEC.md's names):

* write, ``M_t = M P + sum_h w_h a_h`` with ``P = prod_h E_h``, ``E_h = 1 - w_h e_h``:
  ``dM += dM_t P``; ``dE_h = dM_t M prod_{h' != h} E_h'``;
  ``dw_h += -dE_h e_h + dM_t a_h``; ``de_h = -w_h^T dE_h``; ``da_h = w_h^T dM_t``.
* read, ``r = w_R M``: ``dw_R += dr M^T``; ``dM += w_R^T dr``.
* sharpen, ``w = p / Z``, ``p = c^gamma``, ``c = max(ws, 1e-30)``:
  ``dp = (dw - sum(dw w)) / Z``; ``dgamma = sum(dp p log c)``; computed as
  ``p = exp(gamma log c)``;
  ``dws = dp gamma p / c [ws >= 1e-30]``.
* shift, ``ws[n] = sum_j s_j wg[n-j]``: ``ds_j = sum_n dws[n] wg[n-j]``;
  ``dwg[n] = sum_j s_j dws[n+j]``.
* interpolate: ``dwc = g dwg``; ``dg = sum(dwg (wc - w_prev))``; ``dw_prev = (1-g) dwg``.
* softmax of ``z = beta K``: ``dz = wc (dwc - sum(dwc wc))``; ``dbeta = sum(dz K)``; ``dK = beta dz``.
* cosine, ``K = dot / (|k| |M_n|)`` with both norms floored at 1e-8:
  ``ddot = dK / (|k| |M_n|)``; ``dk = ddot M - sum_n(dK K) k / |k|^2``;
  ``dM += ddot^T k - sum_h(dK K) M_n / |M_n|^2`` (norm terms only above the floor).
"""

from __future__ import annotations

import functools

import torch

from .reference import COSINE_EPS, SHARPEN_EPS, SHARPEN_FLOOR, compute_dtype


@functools.lru_cache(maxsize=64)
def _shift_indices(N: int, S: int, sign: int, device: torch.device) -> torch.Tensor:
    """``idx[j, n] = (n - sign * (j - K)) mod N``, (S, N): ``wg[..., idx][j, n] = wg[n - (j - K)]``."""
    half = (S - 1) // 2
    offsets = torch.arange(-half, half + 1, device=device)[:, None]
    return (torch.arange(N, device=device)[None, :] - sign * offsets) % N


def _exclusive_products(factors: torch.Tensor) -> torch.Tensor:
    """``out[:, h] = prod_{h' != h} factors[:, h']`` along dim 1, by prefix and suffix products
    (no division: a factor may be exactly zero)."""
    ones = torch.ones_like(factors[:, :1])
    before = torch.cat([ones, factors[:, :-1]], dim=1).cumprod(dim=1)
    after = torch.cat([factors[:, 1:], ones], dim=1).flip(1).cumprod(dim=1).flip(1)
    return before * after


def _erase_factors(w_write: torch.Tensor, e: torch.Tensor) -> torch.Tensor | None:
    """``1 - w_h[n] e_h[m]`` of every write head (B, W, N, M); None for one head, whose
    product ``keep`` is built directly."""
    return None if w_write.shape[1] == 1 else 1 - w_write.unsqueeze(-1) * e.unsqueeze(-2)


def _keep(w_write: torch.Tensor, e: torch.Tensor, erase_factors: torch.Tensor | None) -> torch.Tensor:
    """``prod_h (1 - w_h[n] e_h[m])``, (B, N, M)."""
    if erase_factors is None:
        return torch.addcmul(w_write.new_ones(1, 1, 1), w_write.transpose(1, 2), e, value=-1)
    return erase_factors.prod(dim=1)


class MemoryStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
        dtype = compute_dtype(mem, k)
        ctx.dtypes = (mem.dtype, k.dtype)
        stored_mem = mem  # saved as given: bf16 memory stays bf16 between forward and backward
        if mem.dtype != dtype or k.dtype != dtype:
            mem, k, beta, g, s, gamma, w_prev, e, a = (t.to(dtype) for t in (mem, k, beta, g, s, gamma, w_prev, e, a))
        N, S = mem.shape[1], s.shape[-1]
        beta, g, gamma = beta.unsqueeze(-1), g.unsqueeze(-1), gamma.unsqueeze(-1)

        k_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
        mem_norm = torch.linalg.vector_norm(mem, dim=-1).unsqueeze(1)
        denominator = k_norm.clamp_min(COSINE_EPS) * mem_norm.clamp_min(COSINE_EPS)
        similarity = torch.bmm(k, mem.transpose(1, 2)).div_(denominator)
        wc = torch.softmax(beta * similarity, dim=-1)
        wg = torch.lerp(w_prev, wc, g)
        shifted = wg[..., _shift_indices(N, S, 1, mem.device)]
        ws = torch.matmul(s.unsqueeze(-2), shifted).squeeze(-2)
        log_c = ws.clamp_min(SHARPEN_FLOOR).log_()
        p = torch.exp(gamma * log_c)
        Z = p.sum(dim=-1, keepdim=True).add_(SHARPEN_EPS)
        w = p / Z

        w_read, w_write = w[:, :num_reads], w[:, num_reads:]
        r = torch.bmm(w_read, mem)
        erase_factors = _erase_factors(w_write, e)
        keep = _keep(w_write, e, erase_factors)
        # Outer products by addcmul: on a CPU it beats baddbmm with an inner size of 1.
        if w_write.shape[1] == 1:
            new_mem = torch.addcmul(mem * keep, w_write.transpose(1, 2), a)
        else:
            new_mem = torch.baddbmm(mem * keep, w_write.transpose(1, 2), a)

        ctx.num_reads = num_reads
        # With one write head nothing of size (B, N, M) is saved but the input
        # memory: ``keep`` is recomputed in backward.
        ctx.save_for_backward(
            stored_mem, k, beta, g, s, gamma, w_prev, e, a, k_norm, mem_norm, denominator, similarity, wc, shifted, ws, log_c, p, Z,
            w, erase_factors,
        )
        return w.to(ctx.dtypes[1]), r.to(ctx.dtypes[1]), new_mem.to(ctx.dtypes[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dw, dr, dnew):
        (mem, k, beta, g, s, gamma, w_prev, e, a, k_norm, mem_norm, denominator, similarity, wc, shifted, ws, log_c, p, Z,
         w, erase_factors) = ctx.saved_tensors
        R, dtype = ctx.num_reads, k.dtype
        mem = mem.to(dtype)
        N, S, W = mem.shape[1], s.shape[-1], e.shape[1]
        dw = torch.zeros_like(w) if dw is None else dw.to(dtype, copy=True)
        de, da = torch.zeros_like(e), torch.zeros_like(a)

        if dnew is None:
            dmem = torch.zeros_like(mem)
        else:
            dnew = dnew.to(dtype)
            dmem = dnew * _keep(w[:, R:], e, erase_factors) if W > 0 else dnew.clone()
            if W > 0:
                w_write = w[:, R:]
                d_keep = dnew * mem
                if W == 1:
                    dw[:, R:] += torch.bmm(a, dnew.transpose(1, 2)) - torch.bmm(e, d_keep.transpose(1, 2))
                    de = -torch.bmm(w_write, d_keep)
                else:
                    d_erase = d_keep.unsqueeze(1) * _exclusive_products(erase_factors)
                    dw[:, R:] += torch.bmm(a, dnew.transpose(1, 2)) - torch.matmul(d_erase, e.unsqueeze(-1)).squeeze(-1)
                    de = -torch.matmul(w_write.unsqueeze(-2), d_erase).squeeze(-2)
                da = torch.bmm(w_write, dnew)

        if dr is not None and R > 0:
            dr = dr.to(dtype)
            dw[:, :R] += torch.bmm(dr, mem.transpose(1, 2))

        dp = (dw - (dw * w).sum(dim=-1, keepdim=True)).div_(Z)
        dp_p = dp * p
        dgamma = (dp_p * log_c).sum(dim=-1)
        dws = torch.where(ws >= SHARPEN_FLOOR, dp_p * gamma / ws.clamp_min(SHARPEN_FLOOR), 0)

        ds = torch.matmul(shifted, dws.unsqueeze(-1)).squeeze(-1)
        dwg = torch.matmul(s.unsqueeze(-2), dws[..., _shift_indices(N, S, -1, mem.device)]).squeeze(-2)

        dwc = g * dwg
        dg = (dwg * (wc - w_prev)).sum(dim=-1)
        dw_prev = dwg - dwc

        dz = wc * (dwc - (dwc * wc).sum(dim=-1, keepdim=True))
        dbeta = (dz * similarity).sum(dim=-1)
        dsim = beta * dz
        ddot = dsim / denominator
        dsim_sim = dsim * similarity
        k_scale = torch.where(k_norm >= COSINE_EPS, dsim_sim.sum(dim=-1, keepdim=True) / k_norm.clamp_min(COSINE_EPS).square(), 0)
        dk = torch.bmm(ddot, mem).sub_(k_scale * k)
        mem_scale = torch.where(
            mem_norm >= COSINE_EPS, dsim_sim.sum(dim=1, keepdim=True) / mem_norm.clamp_min(COSINE_EPS).square(), 0
        )
        # The reads' and the similarity's terms of dmem in one pass: [w_R; ddot]^T [dr; k].
        if dr is not None and R > 0:
            dmem.baddbmm_(torch.cat([w[:, :R], ddot], dim=1).transpose(1, 2), torch.cat([dr, k], dim=1))
        else:
            dmem.baddbmm_(ddot.transpose(1, 2), k)
        dmem.addcmul_(mem, mem_scale.transpose(1, 2), value=-1)

        mem_dtype, out_dtype = ctx.dtypes
        grads = (dk, dbeta, dg, ds, dgamma, dw_prev, de, da)
        return (dmem.to(mem_dtype), *(t.to(out_dtype) for t in grads), None)


def memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
    """``fastntm.reference.memory_step``, computed as one autograd node (see the module docstring)."""
    return MemoryStep.apply(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)
