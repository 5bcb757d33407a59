"""``backend="compiled"``: the reference path through ``torch.compile``.

Inductor's compile takes tens of seconds a graph on two cores, so one graph compiles for real:
``memory_step_from_heads`` at the shape of ``benchmarks.shapes``' ``tiny-copy`` model (B 2, N 16, M 4,
one read and one write head, S 3), which the model's tests share. Every op's dispatch and trace (whole
graph, backward included), and the model's whole step, are checked with dynamo's ``aot_eager`` backend,
which traces as Inductor's does but compiles nothing.
"""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

import fastntm.functional as F
from fastntm import FastNTM, backend, reference

from helpers import assert_close, compile_model_steps_cheaply, step_inputs

B, N, M, R, W, S = 2, 16, 4, 1, 1, 3  # tiny-copy's memory step
WIDTH = (R + W) * (M + S + 3) + 2 * W * M


def ran_compiled(fn) -> bool:
    """Whether ``fn()`` ran a compiled graph (the profiler marks each such call)."""
    with torch.profiler.profile() as prof:
        fn()
    return any(e.name.startswith("Torch-Compiled Region") for e in prof.events())


def never_compile(graph, example_inputs):
    raise AssertionError("compiled where the reference itself should have run")


def ops_that_must_not_compile() -> SimpleNamespace:
    """A stand-in for ``backend.COMPILED`` whose ops fail the test if they compile anything."""
    return SimpleNamespace(**{op: backend._compiled(op, compiler=never_compile) for op in backend.OPS})


def from_heads_inputs(case: str, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mem = torch.randn(B, N, M, generator=gen)
    raw = 2 * torch.randn(B, WIDTH, generator=gen)
    w_prev = torch.softmax(torch.randn(B, R + W, N, generator=gen), -1)
    if case == "zero-memory-rows":
        mem[:, ::2] = 0
    elif case == "one-hot-focus":
        w_prev.zero_()[..., 5] = 1
    elif case == "extreme-raw":  # beta and gamma's softplus of 1e4 and 50, sigmoids saturated, s one-hot
        raw = raw.sign() * torch.tensor([1e4, 50.0, 0.0]).repeat(WIDTH)[:WIDTH]
    return [t.requires_grad_() for t in (mem, raw, w_prev)]


@pytest.mark.parametrize("used", ["all", "r-only"])
def test_compiled_memory_step_from_heads_matches_the_reference_at_the_edges(used):
    """Values and every gradient, on random inputs and SPEC.md's edges; with only the read used (a model's last
    step), the gradients of the outputs nothing reads are missing."""
    for case in ("random", "zero-memory-rows", "one-hot-focus", "extreme-raw"):
        x = from_heads_inputs(case)
        outs = {}
        for name in ("reference", "compiled"):
            out = F.memory_step_from_heads(*x, num_reads=R, num_writes=W, shift_width=S, backend=name)
            kept = out if used == "all" else out[1:2]
            cot = [torch.ones_like(o) for o in kept]
            outs[name] = [o.detach() for o in out] + list(torch.autograd.grad(kept, x, cot))
        for name, expected, got in zip(("w", "r", "new_mem", "dmem", "draw", "dw_prev"), *outs.values()):
            assert torch.isfinite(got).all(), f"{case}: {name}"
            assert_close(expected, got, f"{case}: {name}")
    assert ran_compiled(lambda: F.memory_step_from_heads(*x, num_reads=R, num_writes=W, shift_width=S,
                                                         backend="compiled"))


def test_model_with_the_compiled_backend_matches_the_reference_model(monkeypatch):
    """The whole step as one graph, every step of a sequence in the same one. Its graphs are ``aot_eager``'s
    here (dynamo's trace and guards as Inductor gets them; the suite's time allows one Inductor compile of the
    step's math, the test above): every benchmark run checks the Inductor-compiled step against float64 before
    timing it."""
    graphs = compile_model_steps_cheaply(monkeypatch)
    torch.manual_seed(0)
    model = FastNTM(9, 8, memory_slots=N, memory_width=M, controller_size=8, num_reads=R, num_writes=W,
                    backend="compiled")
    eager = copy.deepcopy(model)
    eager.cell.backend = "reference"
    x = torch.rand(5, B, 9)
    with monkeypatch.context() as patch:  # no compiled memory op to be found: the graph is the whole step's
        patch.setattr(backend, "COMPILED", ops_that_must_not_compile())
        assert ran_compiled(lambda: model(x))
    assert len(graphs) == 1  # the first step's constant memory and weightings included
    for checkpoint_every in (0, 2):  # checkpointed segments rerun the compiled step in backward
        model.checkpoint_every = eager.checkpoint_every = checkpoint_every
        y, state = model(x)
        y_ref, state_ref = eager(x)
        assert_close(y_ref, y, "logits")
        assert_close(state_ref.memory, state.memory, "memory")
        y.square().sum().backward()
        y_ref.square().sum().backward()
        for (name, p), p_ref in zip(model.named_parameters(), eager.parameters()):
            assert_close(p_ref.grad, p.grad, f"d{name}")
            p.grad = p_ref.grad = None
    # Under autocast the step runs uncompiled around its memory step, which switches autocast off and runs compiled.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = model(x)
        y_ref, _ = eager(x)
    assert_close(y_ref.float(), y.float(), "logits under autocast", torch.bfloat16)
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), eager.parameters()):
        assert_close(p_ref.grad, p.grad, f"d{name} under autocast", torch.bfloat16)


def _calls(t, R_, W_, S_):
    mem, k, beta, g, s, gamma, w_prev, e, a = t.values()
    raw = torch.randn(mem.shape[0], (R_ + W_) * (mem.shape[-1] + S_ + 3) + 2 * W_ * mem.shape[-1], dtype=mem.dtype,
                      requires_grad=True)
    return {
        "head_parameters": (raw, R_, W_, mem.shape[-1], S_),
        "address": (mem, k, beta, g, s, gamma, w_prev),
        "read": (mem, w_prev[:, :R_]),
        "write": (mem, w_prev[:, R_:], e, a),
        "memory_step": (mem, k, beta, g, s, gamma, w_prev, e, a, R_),
        "memory_step_from_heads": (mem, raw, w_prev, R_, W_, S_),
    }


@pytest.mark.parametrize("op", backend.OPS)
def test_every_op_traces_whole_with_its_backward_and_matches_the_reference(op):
    """Dynamo's whole-graph trace of each op (``fullgraph=True``: a graph break is an error), run by
    ``aot_eager``: AOTAutograd's forward and backward graphs, as Inductor gets them, executed eagerly."""
    # A second shape of a function already compiled (by the tests above) would be traced again with dynamic
    # sizes, which takes several times longer; static sizes here.
    t = step_inputs(B=3, N=37, M=13, R=1, W=2, S=5)
    args = _calls(t, 1, 2, 5)[op]
    traced = backend._compiled(op, compiler="aot_eager")
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        expected, got = getattr(backend.REFERENCE, op)(*args), traced(*args)
    expected, got = (expected, got) if isinstance(expected, tuple) else ((expected,), (got,))
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    cot = [torch.randn_like(o) for o in expected]
    for i, (ref, out) in enumerate(zip(expected, got)):
        assert_close(ref, out, f"{op} output {i}")
    for i, (ref, out) in enumerate(zip(torch.autograd.grad(expected, inputs, cot, allow_unused=True),
                                       torch.autograd.grad(got, inputs, cot, allow_unused=True))):
        if ref is None:
            assert out is None or not out.any(), f"{op} d(input {i})"
        else:
            assert_close(ref, out, f"{op} d(input {i})")


def test_compiled_is_a_backend_and_the_environment_can_choose_it(monkeypatch):
    assert backend.resolve("compiled", torch.device("cpu")) == "compiled"
    assert backend.implementation("compiled", torch.device("cpu")) is backend.COMPILED
    monkeypatch.setenv("FASTNTM_BACKEND", "compiled")
    assert backend.resolve("auto", torch.device("cpu")) == "compiled"
    with pytest.raises(ValueError, match="backend must be one of .*'compiled'"):
        FastNTM(9, 8, backend="compile")


def test_compiled_backend_runs_the_reference_itself_where_a_compile_does_not_apply(monkeypatch):
    """Meta tensors, forward-mode AD, torch.func transforms and another compile around the op: the reference
    runs (a compile here would fail the test) and answers as it does under ``backend="reference"``."""
    monkeypatch.setattr(backend, "COMPILED", ops_that_must_not_compile())
    t = step_inputs(B=2, N=11, M=5, R=1, W=1, S=3, dtype=torch.float32, requires_grad=False)
    w, r, new_mem = F.memory_step(*(v.to("meta") for v in t.values()), num_reads=1, backend="compiled")
    assert (w.shape, r.shape, new_mem.shape) == ((2, 2, 11), (2, 1, 5), (2, 11, 5))

    import torch.autograd.forward_ad as fwAD

    mem, w_read = t["mem"], t["w_prev"][:, :1]
    tangent = torch.randn_like(mem)
    with fwAD.dual_level():
        jvps = [fwAD.unpack_dual(F.read(fwAD.make_dual(mem, tangent), w_read, backend=name)).tangent
                for name in ("reference", "compiled")]
    assert_close(*jvps, "read's tangent")

    grad_of = {name: torch.func.grad(lambda m, name=name: F.read(m, w_read, backend=name).square().sum())(mem)
               for name in ("reference", "compiled")}
    assert_close(grad_of["reference"], grad_of["compiled"], "torch.func.grad of read")
    batched = torch.func.vmap(lambda m, w: F.read(m[None], w[None], backend="compiled")[0])(mem, w_read)
    assert_close(reference.read(mem, w_read), batched, "torch.func.vmap of read")

    def step(*x):  # another compile around the op takes the reference's ops into its own graph
        return F.memory_step(*x, num_reads=1, backend="compiled")

    outer = torch.compile(step, backend="aot_eager", fullgraph=True)
    for name, ref, out in zip(("w", "r", "new_mem"), reference.memory_step(*t.values(), 1), outer(*t.values())):
        assert_close(ref, out, name)


def test_past_the_recompile_limit_calls_run_the_reference_with_one_warning(recwarn):
    """With room for one graph: the first kind of call compiles and keeps running compiled; the others run the
    reference, warned about once."""
    def read_with(compiler):  # a function of its own: dynamo counts graphs per code object
        def read(mem, w):
            return reference.read(mem, w)
        return backend.compile_lazily(read, "read", compiler)

    read = read_with("eager")
    backend._warn_recompile_limit.cache_clear()
    calls = [step_inputs(B=2, N=11, M=5, R=1, W=1, S=3, dtype=dtype, requires_grad=False)
             for dtype in (torch.float32, torch.float64, torch.float64, torch.float32)]
    with torch._dynamo.config.patch(recompile_limit=1, automatic_dynamic_shapes=False):
        outs = [read(t["mem"], t["w_prev"][:, :1]) for t in calls]
        assert ran_compiled(lambda: read(calls[0]["mem"], calls[0]["w_prev"][:, :1]))
        assert not ran_compiled(lambda: read(calls[1]["mem"], calls[1]["w_prev"][:, :1]))
    assert [str(w.message).split(":")[0] for w in recwarn] == ["backend='compiled'"]
    for t, out in zip(calls, outs):
        assert_close(reference.read(t["mem"], t["w_prev"][:, :1]), out, f"read in {out.dtype}")


def test_a_failed_compile_is_a_clear_error_naming_the_way_out():
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    read = backend._compiled("read", compiler=no_compiler)
    t = step_inputs(B=2, N=11, M=5, R=1, W=1, S=3, dtype=torch.float32, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"backend='compiled' could not compile read .*no C\+\+ compiler found.*"
                                           r"backend='reference'"):
        read(t["mem"], t["w_prev"][:, :1])

