"""Shared test inputs and comparisons."""

from __future__ import annotations

import types

import pytest
import torch

NAMES = ("mem", "k", "beta", "g", "s", "gamma", "w_prev", "e", "a")


def numba_imports() -> bool:
    """Whether ``backend="numba"`` can run here (a GPU machine may lack numba: ``auto`` then takes the reference)."""
    from fastntm import backend

    return backend._numba_step() is not None


requires_numba = pytest.mark.skipif(not numba_imports(), reason="numba is not installed")
NUMBA = pytest.param("numba", marks=requires_numba)

# ||ref - out|| / ||ref|| allowed, by dtype of the compared tensors.
RELATIVE_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def step_inputs(B=3, N=37, M=13, R=1, W=2, S=5, dtype=torch.float64, seed=0, requires_grad=True) -> dict[str, torch.Tensor]:
    """Random valid inputs of ``memory_step``, keyed by SPEC.md's names."""
    gen = torch.Generator().manual_seed(seed)
    H = R + W

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=dtype)

    inputs = {
        "mem": randn(B, N, M),
        "k": randn(B, H, M),
        "beta": rand(B, H) * 5,
        "g": rand(B, H),
        "s": torch.softmax(randn(B, H, S), dim=-1),
        "gamma": 1 + 3 * rand(B, H),
        "w_prev": torch.softmax(randn(B, H, N), dim=-1),
        "e": rand(B, W, M),
        "a": randn(B, W, M),
    }
    return {n: t.requires_grad_(requires_grad) for n, t in inputs.items()}


def kernel_inputs(B, N, M, H, R, S, dtype=torch.float32, mem_dtype=None, seed=0, device="cpu") -> dict[str, torch.Tensor]:
    """Random valid inputs of ``memory_step`` in ``dtype`` (memory in ``mem_dtype``), drawn in
    float32 on the CPU so that every dtype and device sees the same values."""
    gen = torch.Generator().manual_seed(seed)
    W = H - R

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    x = dict(
        mem=randn(B, N, M),
        k=randn(B, H, M),
        beta=rand(B, H) * 5,
        g=rand(B, H),
        s=torch.softmax(randn(B, H, S) * 2, -1),
        gamma=1 + rand(B, H) * 3,
        w_prev=torch.softmax(randn(B, H, N) * 3, -1),
        e=rand(B, W, M),
        a=randn(B, W, M),
    )
    out = {n: t.to(device, dtype) for n, t in x.items()}
    out["mem"] = x["mem"].to(device, mem_dtype or dtype)
    return out


def relative_error(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.detach().double(), out.detach().double()
    return float((ref - out).norm() / ref.norm().clamp_min(1e-30))


def assert_close(ref: torch.Tensor, out: torch.Tensor, name: str, dtype: torch.dtype | None = None) -> None:
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: not finite"
    tol = RELATIVE_TOLERANCE[dtype or out.dtype]
    err = relative_error(ref, out)
    assert err <= tol, f"{name}: relative error {err:.3g} > {tol:g}"


def grads(outputs, inputs: dict[str, torch.Tensor], cotangents) -> dict[str, torch.Tensor]:
    got = torch.autograd.grad(outputs, list(inputs.values()), cotangents, allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(inputs.items(), got)}


def outputs_and_gradients(step, inputs) -> list[torch.Tensor]:
    """``step(*inputs)``'s outputs, then every input's gradient for cotangents of ones, detached: what two ways
    of running one op are compared by, bit for bit."""
    xs = [t.clone().requires_grad_() for t in inputs]
    out = step(*xs)
    grads = torch.autograd.grad(out, xs, [torch.ones_like(o) for o in out])
    return [t.detach() for t in (*out, *grads)]


def compile_model_steps_cheaply(monkeypatch) -> list:
    """Models with ``backend="compiled"`` compile their step with dynamo's ``aot_eager`` (its trace and
    AOTAutograd's forward and backward graphs, run eagerly: no Inductor, no seconds of C++) for tests of what
    is wired to them, not of Inductor (``tests/test_compiled.py``). Returns the list the compiler appends each
    graph to. The step is a function of its own here, so its graphs count apart from the real one's."""
    from fastntm import backend, model

    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def compiler(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    code = model._flat_step.__code__
    step = types.FunctionType(code.replace(), model._flat_step.__globals__, "flat_step")
    monkeypatch.setattr(model, "_compiled_flat_step", backend.compile_lazily(step, "the model's step", compiler))
    return graphs
