"""The Triton kernels against the reference on a CUDA GPU, at realistic shapes (skipped without one)::

    pytest -m gpu tests/test_kernels_gpu.py
"""

import pytest
import torch

from helpers import kernel_inputs, outputs_and_gradients, relative_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# ||truth - out|| / ||truth|| on the GPU (TF32 off), the truth being the reference in float64: a kernel may
# miss it by this much, or by twice what the reference path misses it by in the tensors' own dtype (at most
# 50 times this). The second bound is for ill-conditioned sums: dL/dg sums a million terms of both signs at
# N = 2^20, and the two paths' fp32 sums, ordered differently, each miss the float64 one by about 1e-3.
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def check_against_float64(name, out, ref, truth, tol):
    """``out`` (kernels) finite, of ``ref``'s (reference path's) dtype and shape, and within ``tol`` of ``truth``
    (float64), or within twice ``ref``'s own miss, capped at 50 ``tol``."""
    assert out.dtype == ref.dtype and out.shape == ref.shape and torch.isfinite(out).all(), name
    if truth.numel():
        err, ref_err = relative_error(truth, out), relative_error(truth, ref)
        bound = max(tol, min(2 * ref_err, 50 * tol))  # capped: a reference far off excuses nothing
        assert err <= bound, f"{name}: {err:.2e} from float64, reference {ref_err:.2e}"


CASES = [
    # (B, N, M, H, R, S, dtype, mem dtype)
    (32, 128, 20, 2, 1, 3, torch.float32, torch.float32),  # the paper's size, on-chip
    (3, 37, 13, 5, 2, 5, torch.float32, torch.float32),
    (8, 1000, 20, 3, 2, 3, torch.float32, torch.float32),  # large-memory regime
    (16, 65536, 64, 5, 4, 3, torch.float32, torch.float32),  # 4 read + 1 write heads
    (16, 65536, 64, 5, 4, 3, torch.bfloat16, torch.bfloat16),
    (4, 4096, 64, 2, 1, 3, torch.float32, torch.bfloat16),
    (1, 1 << 20, 64, 2, 1, 5, torch.float32, torch.float32),  # the largest N, 2^20 slots
]


def case_id(c):
    B, N, M, H, R, S, dt, mdt = c
    return f"B{B}-N{N}-M{M}-H{H}-R{R}-S{S}-{str(dt)[6:]}-mem{str(mdt)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_memory_step_matches_reference_on_gpu(case):
    from fastntm import kernels, reference

    B, N, M, H, R, S, dtype, mem_dtype = case
    torch.backends.cuda.matmul.allow_tf32 = False
    x = kernel_inputs(B, N, M, H, R, S, dtype, mem_dtype, device="cuda")
    xk = [t.clone().requires_grad_() for t in x.values()]
    xr = [t.clone().requires_grad_() for t in x.values()]
    x64 = [t.double().requires_grad_() for t in x.values()]
    out, ref, truth = kernels.memory_step(*xk, R), reference.memory_step(*xr, R), reference.memory_step(*x64, R)
    tol = max(TOL[dtype], TOL[mem_dtype])
    for i, (o, r, t) in enumerate(zip(out, ref, truth)):
        check_against_float64(f"output {i}", o, r, t, tol)
    cot = [torch.randn_like(r) for r in ref]
    gk = torch.autograd.grad(out, xk, cot)
    gr = torch.autograd.grad(ref, xr, cot)
    g64 = torch.autograd.grad(truth, x64, [c.double() for c in cot])
    for name, a, b, t in zip(x, gk, gr, g64):
        check_against_float64(f"grad {name}", a, b, t, tol)


def test_bit_identical_run_to_run_on_gpu():
    from fastntm import kernels

    x = kernel_inputs(4, 65536, 64, 5, 4, 3, torch.float32, torch.float32, device="cuda")
    runs = []
    for _ in range(2):
        xs = [t.clone().requires_grad_() for t in x.values()]
        out = kernels.memory_step(*xs, 4)
        grads = torch.autograd.grad(out, xs, [torch.ones_like(o) for o in out])
        runs.append([t.detach() for t in (*out, *grads)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_batch_past_the_second_grid_dimension_on_gpu():
    # The large-memory kernels run NB blocks times B (or B * H) programs, flattened into the grid's first
    # dimension: B * H here passes 65,535, the second dimension's limit. Batch items are independent, so
    # the reference runs on a few of them.
    from fastntm import kernels, reference

    B, N, M, H, R, S = 66000, 272, 16, 2, 1, 3  # next_pow2(N) * M > 4096: the large-memory regime
    x = kernel_inputs(B, N, M, H, R, S, device="cuda")
    xk = [t.clone().requires_grad_() for t in x.values()]
    out = kernels.memory_step(*xk, R)
    cot = [torch.randn_like(o) for o in out]
    gk = torch.autograd.grad(out, xk, cot)
    for rows in (slice(0, 4), slice(B - 4, B)):
        xr = [t[rows].clone().requires_grad_() for t in x.values()]
        ref = reference.memory_step(*xr, R)
        gr = torch.autograd.grad(ref, xr, [c[rows] for c in cot])
        for i, (o, r) in enumerate(zip(out, ref)):
            assert relative_error(r, o[rows]) <= TOL[torch.float32], f"output {i} at {rows}"
        for name, a, b in zip(x, gk, gr):
            assert relative_error(b, a[rows]) <= TOL[torch.float32], f"grad {name} at {rows}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_parameters_match_reference_on_gpu(dtype):
    from fastntm import kernels, reference

    B, R, W, M, S = 70000, 4, 1, 64, 3  # B (H + W) programs: past 2^16 and 2^18
    raw = (torch.randn(B, (R + W) * (M + S + 3) + 2 * W * M, device="cuda") * 4).to(dtype)
    xk, xr = raw.clone().requires_grad_(), raw.clone().requires_grad_()
    out, ref = kernels.head_parameters(xk, R, W, M, S), reference.head_parameters(xr, R, W, M, S)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == r.dtype and o.shape == r.shape
        assert relative_error(r, o) <= TOL[dtype], f"output {i}: {relative_error(r, o):.2e}"
    cot = [torch.randn_like(r) for r in ref]
    (gk,), (gr,) = torch.autograd.grad(out, xk, cot), torch.autograd.grad(ref, xr, cot)
    assert relative_error(gr, gk) <= TOL[dtype]


@pytest.mark.parametrize("N, M", [(128, 20), (8192, 64)], ids=["on-chip", "large"])
def test_torch_compile_of_the_kernels_on_gpu(N, M):
    # The ops as torch.compile calls them (custom ops, fake implementations), forward and backward, against
    # the same kernels called eagerly: bit for bit, as the same launches run.
    from fastntm import kernels
    from fastntm.kernels import _config

    assert _config.choose(N, M).onchip == (N == 128)  # each case in the regime it names
    x = kernel_inputs(2, N, M, 3, 2, 3, device="cuda")
    fn = torch.compile(lambda *a: kernels.memory_step(*a, 2), fullgraph=True, backend="aot_eager")
    runs = [outputs_and_gradients(step, x.values()) for step in (fn, lambda *a: kernels.memory_step(*a, 2))]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_a_backward_of_the_backward_matches_the_literal_spec_on_gpu():
    """create_graph=True through the kernels' node (at the paper's size and in the large regime) recomputes the
    literal composition: second derivatives as the reference's, where the kernels' own gradients have none."""
    import fastntm.functional as F
    from fastntm import reference

    torch.backends.cuda.matmul.allow_tf32 = False
    for B, N, M, H, R, S in ((32, 128, 20, 2, 1, 3), (2, 4096, 64, 5, 4, 3)):
        x = list(kernel_inputs(B, N, M, H, R, S, device="cuda").values())

        def second_order(fn):
            xs = [t.clone().requires_grad_() for t in x]
            outs = fn(*xs)
            first = torch.autograd.grad(outs, xs, [torch.ones_like(o) for o in outs], create_graph=True)
            return torch.autograd.grad(sum(g.square().sum() for g in first), xs)

        got = second_order(lambda *t: F.memory_step(*t, num_reads=R, backend="triton"))
        expected = second_order(lambda *t: reference.memory_step(*t, R))
        for i, (g, e) in enumerate(zip(got, expected)):
            assert torch.isfinite(g).all() and relative_error(e, g) <= 1e-4, f"N {N}, input {i}"


@pytest.mark.parametrize("B, N, M, R, W, S", [(32, 128, 20, 1, 1, 3), (16, 65536, 64, 4, 1, 3)],
                         ids=["paper", "large"])
def test_memory_step_from_heads_matches_reference_on_gpu(B, N, M, R, W, S):
    """The op FastNTM steps through (the head kernel, then the step's), raw head-layer output in, against the
    reference path's single node and the float64 spec: outputs and the gradients of mem, raw and w_prev."""
    from fastntm import kernels, reference

    torch.backends.cuda.matmul.allow_tf32 = False
    gen = torch.Generator().manual_seed(3)
    x = [torch.randn(B, N, M, generator=gen), 2 * torch.randn(B, (R + W) * (M + S + 3) + 2 * W * M, generator=gen),
         torch.softmax(3 * torch.randn(B, R + W, N, generator=gen), -1)]
    xk = [t.cuda().requires_grad_() for t in x]
    xr = [t.cuda().requires_grad_() for t in x]
    x64 = [t.cuda().double().requires_grad_() for t in x]
    out = kernels.memory_step_from_heads(*xk, R, W, S)
    ref = reference.memory_step_from_heads(*xr, R, W, S)
    truth = reference.memory_step_from_heads(*x64, R, W, S)
    cot = [torch.randn_like(r) for r in ref]
    grads = [torch.autograd.grad(o, i, cot) for o, i in ((out, xk), (ref, xr))]
    grads.append(torch.autograd.grad(truth, x64, [c.double() for c in cot]))
    names = [f"output {i}" for i in range(len(out))] + ["grad mem", "grad raw", "grad w_prev"]
    for name, o, r, t in zip(names, (*out, *grads[0]), (*ref, *grads[1]), (*truth, *grads[2])):
        check_against_float64(name, o, r, t, TOL[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_a_compiled_model_has_the_eager_models_gradients_on_gpu(backend):
    """torch.compile (Inductor) of a whole FastNTM, checkpointed, at the paper's size: outputs and every
    parameter's gradient as the eager model's. On the H200 (torch 2.11) the reference path's single node, so
    compiled, missed by 35% while its forward returned a tensor made in place (pytorch/pytorch#180642)."""
    from fastntm import FastNTM

    torch.manual_seed(0)
    # Four steps in two checkpointed segments: each step is unrolled into the graph, and a fresh machine compiles
    # it from an empty cache (with twelve steps, the first backend alone took over 90 s on a fresh H200 machine).
    model = FastNTM(9, 8, memory_slots=128, memory_width=20, backend=backend, checkpoint_every=2).cuda()
    x = torch.rand(4, 32, 9, device="cuda")
    answers = []
    for run in (model, torch.compile(model)):
        y, _ = run(x)
        grads = torch.autograd.grad(y.square().sum(), list(model.parameters()))
        answers.append((y.detach(), grads))
    (y_eager, g_eager), (y_compiled, g_compiled) = answers
    assert relative_error(y_eager, y_compiled) <= 1e-5
    for (name, _), e, c in zip(model.named_parameters(), g_eager, g_compiled):
        assert relative_error(e, c) <= 1e-4, f"{name}: {relative_error(e, c):.2e}"
