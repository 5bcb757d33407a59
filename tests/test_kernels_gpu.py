"""The Triton kernels against the reference on a CUDA GPU, at realistic shapes (skipped without one)::

    pytest -m gpu tests/test_kernels_gpu.py
"""

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# ||ref - out|| / ||ref|| on the GPU (TF32 off; the reference's reductions are ordered differently).
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-3}


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def make_inputs(B, N, M, H, R, S, dtype, mem_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    W = H - R

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = dict(mem=randn(B, N, M), k=randn(B, H, M), beta=rand(B, H) * 5, g=rand(B, H),
             s=torch.softmax(randn(B, H, S), -1), gamma=1 + rand(B, H) * 3,
             w_prev=torch.softmax(randn(B, H, N) * 3, -1), e=rand(B, W, M), a=randn(B, W, M))
    out = {n: t.to("cuda", dtype) for n, t in x.items()}
    out["mem"] = x["mem"].to("cuda", mem_dtype)
    return out


CASES = [
    # (B, N, M, H, R, S, dtype, mem dtype)
    (32, 128, 20, 2, 1, 3, torch.float32, torch.float32),  # the paper's size, on-chip
    (3, 37, 13, 5, 2, 5, torch.float32, torch.float32),
    (8, 1000, 20, 3, 2, 3, torch.float32, torch.float32),  # large-memory regime
    (16, 65536, 64, 5, 4, 3, torch.float32, torch.float32),  # 4 read + 1 write heads
    (16, 65536, 64, 5, 4, 3, torch.bfloat16, torch.bfloat16),
    (4, 4096, 64, 2, 1, 3, torch.float32, torch.bfloat16),
]


def case_id(c):
    B, N, M, H, R, S, dt, mdt = c
    return f"B{B}-N{N}-M{M}-H{H}-R{R}-S{S}-{str(dt)[6:]}-mem{str(mdt)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_memory_step_matches_reference_on_gpu(case):
    from fastntm import kernels, reference

    B, N, M, H, R, S, dtype, mem_dtype = case
    torch.backends.cuda.matmul.allow_tf32 = False
    x = make_inputs(B, N, M, H, R, S, dtype, mem_dtype)
    xk = [t.clone().requires_grad_() for t in x.values()]
    xr = [t.clone().requires_grad_() for t in x.values()]
    out, ref = kernels.memory_step(*xk, R), reference.memory_step(*xr, R)
    tol = max(TOL[dtype], TOL[mem_dtype])
    for i, (o, r) in enumerate(zip(out, ref)):
        assert o.dtype == r.dtype and o.shape == r.shape
        if r.numel():
            assert rel_err(o, r) <= tol, f"output {i}: {rel_err(o, r):.2e}"
    cot = [torch.randn_like(r) for r in ref]
    gk = torch.autograd.grad(out, xk, cot)
    gr = torch.autograd.grad(ref, xr, cot)
    for name, a, b in zip(x, gk, gr):
        assert a.dtype == b.dtype and torch.isfinite(a).all(), name
        if b.numel():
            assert rel_err(a, b) <= tol, f"grad {name}: {rel_err(a, b):.2e}"


def test_bit_identical_run_to_run_on_gpu():
    from fastntm import kernels

    x = make_inputs(4, 65536, 64, 5, 4, 3, torch.float32, torch.float32)
    runs = []
    for _ in range(2):
        xs = [t.clone().requires_grad_() for t in x.values()]
        out = kernels.memory_step(*xs, 4)
        grads = torch.autograd.grad(out, xs, [torch.ones_like(o) for o in out])
        runs.append([t.detach() for t in (*out, *grads)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)
