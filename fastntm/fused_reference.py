"""``memory_step`` in plain PyTorch with a hand-derived backward.

On a CPU the literal reference (``fastntm.reference``) spends most of its time in
autograd's per-op bookkeeping: about 50 small ops forward and as many backward
for every step. This computes the same function as one ``autograd.Function``
whose backward is written out below, in a few vectorised ops. Tests hold it to
the literal reference (values and every gradient) and to ``gradcheck``.

Where the hand-derived backward cannot serve, the literal composition answers,
slower but the same function: under a ``torch.func`` transform or with
forward-mode AD tangents it runs in place of the node; a backward taken with
``create_graph=True`` (gradient penalties, Hessian-vector products) or under
vmap (``jacobian(vectorize=True)``) recomputes it from the saved inputs and
differentiates it (``differentiate_literal``). The Triton kernels' nodes do the same.

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

# The module, not the function: backend.py imports this module while it is itself being imported.
from . import backend
from . import reference
from .reference import COSINE_EPS, SHARPEN_EPS, SHARPEN_FLOOR, compute_dtype


@functools.lru_cache(maxsize=64)
def _wrap_indices(N: int, K: int, device: torch.device) -> torch.Tensor:
    """``(i - K) mod N`` for i in [0, N + 2K): pads a length-N circle by K on each side."""
    return (torch.arange(N + 2 * K, device=device) - K) % N


def _circular_windows(x: torch.Tensor, S: int) -> torch.Tensor:
    """A view (..., S, N) of ``x`` (..., N): ``out[..., i, n] = x[(n + i - K) mod N]``, S = 2K + 1."""
    N, K = x.shape[-1], (S - 1) // 2
    if K <= N:
        # [x, x, x][N - K : 2N + K]: a cat of whole tensors is several times cheaper than one of slices.
        padded = torch.cat([x, x, x], dim=-1)[..., N - K : 2 * N + K]
    else:  # shifts wider than the circle wrap more than once
        padded = x[..., _wrap_indices(N, K, x.device)]
    return padded.unfold(-1, N, 1)


def _taps(s: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The S taps ``s[..., i]`` of shift weightings (..., S), each (..., 1): a factor for a row of N."""
    return s.unsqueeze(-1).unbind(-2)


def _weighted_windows(taps: tuple[torch.Tensor, ...], windows: torch.Tensor) -> torch.Tensor:
    """``sum_i taps[i] windows[..., i, :]``, one tap at a time: S is small, and on a CPU this
    beats a batched (1 x S) @ (S x N) matmul several times over."""
    rows = windows.unbind(-2)
    out = taps[0] * rows[0]
    for tap, row in zip(taps[1:], rows[1:]):
        out.addcmul_(tap, row)
    return out


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatcher call (a few microseconds) where ``t`` is ``dtype`` already."""
    return t if t.dtype == dtype else t.to(dtype)


def _row_norms(mem: torch.Tensor) -> torch.Tensor:
    """``|mem[b, n]|`` as (B, 1, N), computed as ``sqrt((mem * mem) @ 1)``: on a CPU a matrix-vector
    product sums rows of a few dozen faster than ``vector_norm``'s reduction (about 50 vs 80 us at
    B 32, N 128, M 20). Both sum the squares unscaled (the same overflow to inf, and underflow to 0
    far below the 1e-8 floor), so they agree to float32 rounding."""
    B, N, M = mem.shape
    # The ones made at each call, not cached: a first call inside a CUDA graph's capture would cache a
    # tensor of the graph's pool, filled only when the graph replays.
    return torch.mv(mem.square().reshape(B * N, M), mem.new_ones(M)).sqrt_().view(B, 1, N)


def _inverse_square(norm: torch.Tensor) -> torch.Tensor:
    """``1 / norm^2`` where ``norm >= COSINE_EPS``, else 0: the norm's gradient through its floor."""
    return norm.pow(-2).masked_fill_(norm < COSINE_EPS, 0)


def _exclusive_products(factors: torch.Tensor) -> torch.Tensor:
    """``out[:, h] = prod_{h' != h} factors[:, h']`` along dim 1, by prefix and suffix products
    (no division: a factor may be exactly zero)."""
    ones = torch.ones_like(factors[:, :1])
    before = torch.cat([ones, factors[:, :-1]], dim=1).cumprod(dim=1)
    after = torch.cat([factors[:, 1:], ones], dim=1).flip(1).cumprod(dim=1).flip(1)
    return before * after


def _erase_factors(w_write: torch.Tensor, e: torch.Tensor) -> torch.Tensor | None:
    """``1 - w_h[n] e_h[m]`` of every write head (B, W, N, M), saved for the backward; None for one head,
    whose gradient needs no erase factor of size (B, N, M)."""
    return None if w_write.shape[1] == 1 else 1 - w_write.unsqueeze(-1) * e.unsqueeze(-2)


def _write(mem, w_write, e, a, erase_factors):
    """``M P + sum_h w_h a_h``, rounded in the spec's order: the erase, then the add. (One head as
    ``M + w (a - e M)`` took a pass fewer, but a full erase of a large ``M`` rounded ``a`` away: ``a - M``
    keeps no digit of an ``a`` below ulp(M).)"""
    w_t = w_write.transpose(1, 2)
    if erase_factors is None:
        # Broadcast products, not a matmul of inner size 1 (baddbmm: 1.3 - 1.8x the time at B 16, N 4,096,
        # M 64), and the erase in place on a buffer of its own. Not in place on the result: see
        # test_the_hand_derived_nodes_return_no_tensor_an_in_place_op_made.
        keep = torch.addcmul(torch.ones((), dtype=w_t.dtype, device=w_t.device), w_t, e, value=-1)
        return torch.addcmul(keep.mul_(mem), w_t, a)
    return torch.baddbmm(mem * erase_factors.prod(dim=1), w_t, a)


SAVED = 20  # tensors MemoryStep._forward saves for its own backward


def hand_derived_serves(grads) -> bool:
    """Whether a hand-derived backward (this module's, or the Triton kernels') can take these incoming
    gradients: not in a backward taken with ``create_graph=True`` (it computes from values saved without their
    history, so its result could not be differentiated), nor under vmap (``autograd.grad(is_grads_batched=True)``,
    ``jacobian(vectorize=True)``), which its in-place ops refuse. In a ``torch.compile`` trace it serves: dynamo
    traces a backward with grad mode off and no vmap's gradients, and cannot trace ``is_legacy_batchedtensor``.
    A backward of that backward then raises (AOTAutograd's "does not support double backward", or, compiled
    without it, "does not require grad"); it is not computed wrong."""
    if torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return True
    functorch = torch._C._functorch
    return not any(g is not None and (functorch.is_batchedtensor(g) or functorch.is_legacy_batchedtensor(g))
                   for g in grads)


def differentiate_literal(ctx, literal, inputs, constants, grads) -> tuple:
    """The inputs' gradients through ``literal`` (the spec's composition of ops), recomputed with autograd
    recording, where the hand-derived backward does not serve (``hand_derived_serves``); differentiable
    in turn under ``create_graph=True``. ``inputs`` are the op's tensor inputs as saved (with their
    history), ``constants`` its other arguments; the result has a slot for each of both."""
    create_graph = torch.is_grad_enabled()
    wanted = [i for i, needed in enumerate(ctx.needs_input_grad[: len(inputs)]) if needed]
    found = [None] * len(wanted)
    with torch.enable_grad(), backend.autocast_off(inputs[0].device):
        # Each wanted input differentiated through an alias of its own: where one input is made from another
        # (k from mem, say) or one tensor is passed twice, a gradient taken at the tensors themselves would
        # count the other input's path too.
        inputs = [t.view_as(t) if i in wanted else t for i, t in enumerate(inputs)]
        outputs = literal(*inputs, *constants)
        outputs = (outputs,) if isinstance(outputs, torch.Tensor) else outputs
        used = [(out, grad) for out, grad in zip(outputs, grads) if grad is not None]
        if wanted and used:
            # Retained: under vmap the call may run once a batch element (vmap's fallback), on this one graph.
            found = torch.autograd.grad([out for out, _ in used], [inputs[i] for i in wanted],
                                        [grad for _, grad in used], create_graph=create_graph, retain_graph=True,
                                        allow_unused=True)
    result = [None] * (len(inputs) + len(constants))
    for i, grad in zip(wanted, found):
        result[i] = grad
    return tuple(result)


class MemoryStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
        # The inputs as given, after what the backward needs: a backward of the backward recomputes from them.
        return MemoryStep._forward(ctx, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads,
                                   k, beta, g, s, gamma, w_prev, e, a)

    @staticmethod
    def _forward(ctx, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads, *also_saved):
        """The step; saves what ``_backward`` needs, then ``also_saved`` (``ctx.saved_tensors[SAVED:]``)."""
        # An output no loss reaches gets None, not zeros: its part of the backward is skipped, not run on zeros.
        ctx.set_materialize_grads(False)
        dtype = compute_dtype(mem, k)
        ctx.dtypes = (mem.dtype, k.dtype)
        stored_mem = mem  # saved as given: bf16 memory stays bf16 between forward and backward
        if mem.dtype != dtype or k.dtype != dtype:
            mem, k, beta, g, s, gamma, w_prev, e, a = (t.to(dtype) for t in (mem, k, beta, g, s, gamma, w_prev, e, a))
        S = s.shape[-1]
        beta, g, gamma = beta.unsqueeze(-1), g.unsqueeze(-1), gamma.unsqueeze(-1)

        k_norm = torch.linalg.vector_norm(k, dim=-1, keepdim=True)
        mem_norm = _row_norms(mem)
        denominator = k_norm.clamp_min(COSINE_EPS) * mem_norm.clamp_min(COSINE_EPS)
        similarity = torch.bmm(k, mem.transpose(1, 2)).div_(denominator)
        wc = torch.softmax(beta * similarity, dim=-1)
        wg = torch.lerp(w_prev, wc, g)
        # ws[n] = sum_j s[j + K] wg[n - j] = sum_i s[2K - i] windows[i][n], windows[i][n] = wg[n + i - K]
        ws = _weighted_windows(_taps(s)[::-1], _circular_windows(wg, S))
        c = ws.clamp_min(SHARPEN_FLOOR)
        log_c = c.log()
        p = (gamma * log_c).exp_()
        # Out of place: compiled on torch 2.11, a node whose forward returned a tensor an in-place op had made lost
        # that output's incoming gradient (pytorch/pytorch#180642; torch 2.13 compiles either).
        w = p / p.sum(dim=-1, keepdim=True).add_(SHARPEN_EPS)

        w_read, w_write = w[:, :num_reads], w[:, num_reads:]
        r = torch.bmm(w_read, mem)
        erase_factors = _erase_factors(w_write, e)
        new_mem = _write(mem, w_write, e, a, erase_factors)

        ctx.num_reads, ctx.device = num_reads, mem.device
        # With one write head nothing of size (B, N, M) is saved but the input memory.
        ctx.save_for_backward(
            stored_mem, k, beta, g, s, gamma, w_prev, e, a, k_norm, mem_norm, denominator, similarity, wc, wg,
            ws, c, log_c, w, erase_factors, *also_saved,
        )
        if ctx.dtypes == (dtype, dtype):  # .to is a dispatcher call even where it returns its input
            return w, r, new_mem
        return w.to(ctx.dtypes[1]), r.to(ctx.dtypes[1]), new_mem.to(ctx.dtypes[0])

    @staticmethod
    def backward(ctx, dw, dr, dnew):
        saved = ctx.saved_tensors
        if not hand_derived_serves((dw, dr, dnew)):
            return differentiate_literal(ctx, reference.memory_step, (saved[0], *saved[SAVED:]), (ctx.num_reads,),
                                          (dw, dr, dnew))
        # Backward runs from the autograd engine, outside ``functional``'s autocast guard.
        with backend.autocast_off(ctx.device):
            return MemoryStep._backward(ctx, dw, dr, dnew, saved)

    @staticmethod
    def _backward(ctx, dw, dr, dnew, saved):
        """The gradients of ``forward``'s inputs, from ``saved = ctx.saved_tensors`` (read once by the caller:
        each read of that property unpacks every tensor again)."""
        (mem, k, beta, g, s, gamma, w_prev, e, a, k_norm, mem_norm, denominator, similarity, wc, wg,
         ws, c, log_c, w, erase_factors) = saved[:SAVED]
        R, dtype = ctx.num_reads, k.dtype
        mem = _to(mem, dtype)
        S, W = s.shape[-1], e.shape[1]
        w_read, w_write = w.split_with_sizes((R, W), dim=1)  # one call; Tensor.split is a Python wrapper
        # An input's gradient of None is zero to autograd: no zeros allocated for unused outputs.
        dmem = de = da = dw_read = dw_write = None

        if dr is not None and R > 0:
            dr = _to(dr, dtype)
            dw_read = torch.bmm(dr, mem.transpose(1, 2))
        if dnew is not None and W == 0:
            dmem = _to(dnew, dtype)  # dnew's own storage: the final baddbmm is out of place
        elif dnew is not None:
            dnew = _to(dnew, dtype)
            d_keep = dnew * mem
            if W == 1:  # dnew (1 - w e), the outer product built first: broadcast passes cost more than plain ones
                dmem = torch.mul(w_write.transpose(1, 2), -e).add_(1).mul_(dnew)
                dw_write = torch.bmm(a, dnew.transpose(1, 2)).baddbmm_(e, d_keep.transpose(1, 2), alpha=-1)
                de = torch.bmm(w_write, d_keep).neg_()
            else:
                dmem = dnew * erase_factors.prod(dim=1)
                d_erase = d_keep.unsqueeze(1) * _exclusive_products(erase_factors)
                dw_write = torch.bmm(a, dnew.transpose(1, 2)) - torch.matmul(d_erase, e.unsqueeze(-1)).squeeze(-1)
                de = -torch.matmul(w_write.unsqueeze(-2), d_erase).squeeze(-2)
            da = torch.bmm(w_write, dnew)

        # dw of the read heads through what they read and of the write heads through what they wrote.
        if dw_read is not None or dw_write is not None:
            through_memory = torch.cat([
                torch.zeros_like(w_read) if dw_read is None else dw_read,
                torch.zeros_like(w_write) if dw_write is None else dw_write,
            ], dim=1)
            dw = through_memory if dw is None else _to(dw, dtype) + through_memory
        else:
            dw = torch.zeros_like(w) if dw is None else _to(dw, dtype)

        # dp p = (dw - sum(dw w)) p / Z = (dw - sum(dw w)) w
        dp_p = (dw - torch.linalg.vecdot(dw, w).unsqueeze(-1)).mul_(w)
        dgamma = torch.linalg.vecdot(dp_p, log_c)
        dws = (dp_p * gamma).div_(c).masked_fill_(ws < SHARPEN_FLOOR, 0)

        # ds[j + K] = sum_n dws[n] wg[n - j] = sum_n windows[j + K][n] wg[n], windows[i][n] = dws[n + i - K];
        # dwg[n] = sum_j s[j + K] dws[n + j] = sum_i s[i] windows[i][n].
        dws_windows = _circular_windows(dws, S)
        ds = torch.matmul(dws_windows, wg.unsqueeze(-1)).squeeze(-1)
        dwg = _weighted_windows(_taps(s), dws_windows)

        dwc = g * dwg
        dg = torch.linalg.vecdot(dwg, wc - w_prev)
        dw_prev = (1 - g) * dwg  # not dwg - dwc: near g = 1 that keeps only an ulp of dwg

        dz = (dwc - torch.linalg.vecdot(dwc, wc).unsqueeze(-1)).mul_(wc)
        dbeta = torch.linalg.vecdot(dz, similarity)
        dsim = beta * dz
        ddot = dsim / denominator
        dsim_sim = dsim * similarity  # dK K: summed over n for dk's norm term, over heads for dmem's
        k_scale = dsim_sim.sum(dim=-1, keepdim=True).mul_(_inverse_square(k_norm))
        dk = torch.bmm(ddot, mem).addcmul_(k_scale, k, value=-1)
        mem_scale = dsim_sim.sum(dim=1).unsqueeze(-1).mul_(_inverse_square(mem_norm).transpose(1, 2))  # (B, N, 1)
        # The reads' and the similarity's terms of dmem in one pass: [w_R; ddot]^T [dr; k].
        if dr is not None and R > 0:
            lhs, rhs = torch.cat([w_read, ddot], dim=1), torch.cat([dr, k], dim=1)
        else:
            lhs, rhs = ddot, k
        if dmem is None:
            dmem = torch.bmm(lhs.transpose(1, 2), rhs)
        elif W == 0:  # dmem is dnew itself
            dmem = torch.baddbmm(dmem, lhs.transpose(1, 2), rhs)
        else:
            dmem.baddbmm_(lhs.transpose(1, 2), rhs)
        dmem.addcmul_(mem, mem_scale, value=-1)

        mem_dtype, out_dtype = ctx.dtypes
        grads = (dk, dbeta, dg, ds, dgamma, dw_prev, de, da)
        if mem_dtype != dtype or out_dtype != dtype:  # as in forward: skip nine no-op .to calls
            dmem = dmem.to(mem_dtype)
            grads = tuple(None if t is None else t.to(out_dtype) for t in grads)
        return (dmem, *grads, None)


class MemoryStepFromHeads(torch.autograd.Function):
    """``head_parameters`` then ``memory_step`` as one node: the head layer's raw output in, its gradient out.

    The squashing's backward, from the step's gradients of the squashed parameters (``beta =
    softplus(x)``, ``g = sigmoid(x)``, ``s = softmax(x)``, ``gamma = 1 + softplus(x)``, ``e = sigmoid(x)``,
    ``k`` and ``a`` as they are): ``dx_beta = dbeta sigmoid(x_beta)``, ``dx_g = dg g (1 - g)``, ``dx_s = s
    (ds - sum(ds s))``, ``dx_gamma = dgamma sigmoid(x_gamma)``, ``dx_e = de e (1 - e)``. As one node it
    saves a CPU step the dozen autograd nodes of the squashing and their bookkeeping.
    """

    @staticmethod
    def forward(ctx, mem, raw, w_prev, num_reads, num_writes, shift_width):
        k, beta, g, s, gamma, e, a = reference.head_parameters(raw, num_reads, num_writes, mem.shape[-1], shift_width)
        ctx.layout = (num_reads + num_writes, num_writes, mem.shape[-1], shift_width)
        return MemoryStep._forward(ctx, mem, k, beta, g, s, gamma, w_prev, e, a, num_reads, raw, w_prev)

    @staticmethod
    def backward(ctx, dw, dr, dnew):
        saved = ctx.saved_tensors
        if not hand_derived_serves((dw, dr, dnew)):
            H, W, _, S = ctx.layout
            return differentiate_literal(ctx, reference.memory_step_from_heads, (saved[0], *saved[SAVED:]),
                                          (H - W, W, S), (dw, dr, dnew))
        with backend.autocast_off(ctx.device):
            dmem, dk, dbeta, dg, ds, dgamma, dw_prev, de, da, _ = MemoryStep._backward(ctx, dw, dr, dnew, saved)
            d_raw = MemoryStepFromHeads._raw_grad(ctx, saved, dk, dbeta, dg, ds, dgamma, de, da) \
                if ctx.needs_input_grad[1] else None
            return dmem, d_raw, dw_prev, None, None, None

    @staticmethod
    def _raw_grad(ctx, saved, dk, dbeta, dg, ds, dgamma, de, da):
        g, s, e, raw = saved[3], saved[4], saved[7], saved[SAVED]  # g (B, H, 1), in the step's compute dtype
        H, W, M, S = ctx.layout
        B, dtype = raw.shape[0], g.dtype
        x = _to(raw, dtype)
        heads = x[:, : H * (M + S + 3)].view(B, H, M + S + 3)
        if raw.dtype != dtype:
            # The step saw g, s and e rounded to raw's dtype (bf16's sigmoid(7) is 1): their derivatives come
            # from x, unrounded, as autograd's through the two ops would.
            g, s = torch.sigmoid(heads[..., M + 1 : M + 2]), torch.softmax(heads[..., M + 2 : M + 2 + S], dim=-1)
            e = torch.sigmoid(x[:, H * (M + S + 3) :].view(B, W, 2 * M)[..., :M])
        ds = _to(ds, dtype)
        d_heads = torch.cat([
            _to(dk, dtype),
            _to(dbeta, dtype).unsqueeze(-1) * torch.sigmoid(heads[..., M : M + 1]),
            _to(dg, dtype).unsqueeze(-1) * torch.addcmul(g, g, g, value=-1),
            (ds - torch.linalg.vecdot(ds, s).unsqueeze(-1)).mul_(s),
            _to(dgamma, dtype).unsqueeze(-1) * torch.sigmoid(heads[..., M + S + 2 :]),
        ], dim=-1).view(B, H * (M + S + 3))  # sizes named: a view of an empty batch cannot infer them
        if W == 0:
            return _to(d_heads, raw.dtype)
        # de and da are None where no gradient reached the new memory.
        d_erase = torch.zeros_like(e) if de is None else _to(de, dtype) * torch.addcmul(e, e, e, value=-1)
        d_add = torch.zeros_like(e) if da is None else _to(da, dtype)
        d_writes = torch.cat([d_erase, d_add], dim=-1).view(B, 2 * W * M)
        return _to(torch.cat([d_heads, d_writes], dim=1), raw.dtype)


def memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
    """``fastntm.reference.memory_step``, computed as one autograd node (see the module docstring); under a
    ``torch.func`` transform or with forward-mode AD tangents, the literal composition itself.
    ``fastntm.functional`` calls it with autocast off."""
    if backend.transformed((mem, k, beta, g, s, gamma, w_prev, e, a)):
        return reference.memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)
    return MemoryStep.apply(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)


def memory_step_from_heads(mem, raw, w_prev, num_reads, num_writes, shift_width):
    """``fastntm.reference.memory_step_from_heads`` as one autograd node (``MemoryStepFromHeads``), or the
    literal composition where ``memory_step`` takes it."""
    if backend.transformed((mem, raw, w_prev)):
        return reference.memory_step_from_heads(mem, raw, w_prev, num_reads, num_writes, shift_width)
    return MemoryStepFromHeads.apply(mem, raw, w_prev, num_reads, num_writes, shift_width)
