"""The numba kernels of the CPU memory step (``fastntm.numba_step``, ``backend="numba"``) against the literal spec."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("numba")  # a GPU machine may lack it

import fastntm.functional as F  # noqa: E402
from fastntm import FastNTM, backend, fused_reference, numba_step, reference  # noqa: E402

from helpers import NAMES, RELATIVE_TOLERANCE, assert_close, grads, relative_error, step_inputs  # noqa: E402
from test_functional import EDGE_CASES, SHAPES, edge_inputs, from_heads_inputs  # noqa: E402

MORE_SHAPES = SHAPES + [
    pytest.param(dict(B=3, N=37, M=13, R=2, W=3, S=5), id="B3-N37-M13-R2-W3-S5"),
    pytest.param(dict(B=1, N=130, M=20, R=1, W=1, S=3), id="B1-N130-M20-R1-W1-S3"),
    pytest.param(dict(B=2, N=3, M=2, R=1, W=1, S=9), id="B2-N3-M2-R1-W1-S9"),  # a shift wrapping twice
]
OUTPUTS = ("w", "r", "new_mem")
# Every shape with every output used, and three with each output left out in turn (the kernels' paths for a gradient
# that did not come): (shape, unused) pairs.
CASES = [pytest.param(shape.values[0], None, id=f"all-used-{shape.id}") for shape in MORE_SHAPES] + [
    pytest.param(shape.values[0], unused, id=f"no-d{unused.replace('new_mem', 'new')}-{shape.id}")
    for shape in (MORE_SHAPES[0], MORE_SHAPES[3], MORE_SHAPES[5]) for unused in ("w", "r", "new_mem")]


def numba_step_of(*x, R):
    return F.memory_step(*x, num_reads=R, backend="numba")


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the kernels write starts as NaN: an element they forget fails the comparison."""
    monkeypatch.setattr(numba_step, "_empty", lambda like, shape: torch.full(shape, float("nan"), dtype=like.dtype))


def assert_as_close_as_the_torch_path(truth, got, torch_path, name):
    """``got`` within float64's tolerance of the float64 ``truth``, or, in float32, within 4x float32's or twice
    the error of ``fused_reference`` (the same equations in torch ops) on the same inputs: sums over N slots with
    cancellation (dgamma, dbeta) miss by up to 3e-5 at N = 130 either way (20 draws: numba 2.8e-5, torch 2.3e-5)."""
    if got.dtype == torch.float64:
        assert_close(truth, got, name)
    else:
        allowed = max(4 * RELATIVE_TOLERANCE[torch.float32], 2 * relative_error(truth, torch_path))
        assert relative_error(truth, got) <= allowed, f"{name}: {relative_error(truth, got):.3g} > {allowed:.3g}"


@pytest.mark.parametrize("shape, unused", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_memory_step_matches_the_literal_spec(shape, dtype, unused, poisoned):
    t = step_inputs(**shape, dtype=dtype)
    t64 = {n: v.detach().double().requires_grad_() for n, v in t.items()}
    R = shape["R"]
    truth = reference.memory_step(*t64.values(), R)
    got = numba_step_of(*t.values(), R=R)
    torch_path = fused_reference.memory_step(*t.values(), R)
    used = [i for i, name in enumerate(OUTPUTS) if name != unused]
    gen = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(got[i].shape, generator=gen, dtype=dtype) for i in used]
    expected = grads([truth[i] for i in used], t64, [c.double() for c in cotangents])
    found = grads([got[i] for i in used], t, cotangents)
    torch_found = grads([torch_path[i] for i in used], t, cotangents)
    for name, e, g, p in [*zip(OUTPUTS, truth, got, torch_path),
                          *((f"d{n}", expected[n], found[n], torch_found[n]) for n in NAMES)]:
        assert g.dtype == dtype
        assert_as_close_as_the_torch_path(e, g, p, name)


@pytest.mark.parametrize("shape, unused", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_memory_step_from_heads_matches_the_literal_spec(shape, dtype, unused, poisoned):
    R, W, S = shape["R"], shape["W"], shape["S"]
    x = from_heads_inputs(**shape, dtype=dtype)
    M = shape["M"]
    with torch.no_grad():  # head 0: beta's raw over softplus's threshold (20), g at sigmoid's saturation, gamma's
        x[1][:, M : M + 2] = torch.tensor([25.0, -30.0], dtype=dtype)  # raw just under the threshold
        x[1][:, M + S + 2] = 19.5
    x64 = [t.detach().double().requires_grad_() for t in x]
    truth = reference.memory_step_from_heads(*x64, R, W, S)
    got = F.memory_step_from_heads(*x, num_reads=R, num_writes=W, shift_width=S, backend="numba")
    torch_path = fused_reference.memory_step_from_heads(*x, R, W, S)
    used = [i for i, name in enumerate(OUTPUTS) if name != unused]
    gen = torch.Generator().manual_seed(1)
    cot = [torch.randn(got[i].shape, generator=gen, dtype=dtype) for i in used]
    expected = torch.autograd.grad([truth[i] for i in used], x64, [c.double() for c in cot], allow_unused=True)
    found = torch.autograd.grad([got[i] for i in used], x, cot, allow_unused=True)
    torch_found = torch.autograd.grad([torch_path[i] for i in used], x, cot, allow_unused=True)
    for name, e, g, p in zip(OUTPUTS, truth, got, torch_path):
        assert_as_close_as_the_torch_path(e, g, p, name)
    for name, e, g, p in zip(("mem", "raw", "w_prev"), expected, found, torch_found):
        if e is None:
            assert g is None or not g.any(), name
        else:
            assert_as_close_as_the_torch_path(e, g, p, f"d{name}")


@pytest.mark.parametrize("shape, unused", CASES)
def test_a_batch_split_over_threads_is_the_one_thread_step(shape, unused, poisoned, monkeypatch):
    """Every item written (the buffers start as NaN), with more parts than items too; the same bits for any number
    of parts (one compiled loop nest runs every part), and within float32's rounding of one thread's (another
    compile of the same loops). Both ops, forward and backward."""
    R, W, S = shape["R"], shape["W"], shape["S"]
    t = step_inputs(**shape, dtype=torch.float32)
    x = from_heads_inputs(**shape, dtype=torch.float32)
    used = [i for i, name in enumerate(OUTPUTS) if name != unused]

    def step_and_grads():
        out = numba_step_of(*t.values(), R=R)
        from_heads = F.memory_step_from_heads(*x, num_reads=R, num_writes=W, shift_width=S, backend="numba")
        ones = [torch.ones_like(out[i]) for i in used]
        return [*out, *grads([out[i] for i in used], t, ones).values(), *from_heads,
                *grads([from_heads[i] for i in used], dict(enumerate(x)), ones).values()]

    runs = {}
    for threads in (1, 2, 3, 5):
        monkeypatch.setattr(numba_step, "threads_for", lambda B, N, M: threads)
        runs[threads] = step_and_grads()
    for i, (one, split) in enumerate(zip(runs[1], runs[2])):
        assert_close(one, split, f"output or gradient {i}, 2 threads")
    for threads in (3, 5):
        for i, (two, split) in enumerate(zip(runs[2], runs[threads])):
            assert torch.equal(two, split), f"output or gradient {i}, {threads} threads"


def test_threads_for_a_batch(monkeypatch):
    """As many threads as torch may use, one per item and per ``THREAD_WORK``; one where numba's threading layer
    is not thread-safe."""
    N, M = 128, 20  # THREAD_WORK is four items of this size
    monkeypatch.setitem(numba_step._threading, "safe", True)  # as under OpenMP or TBB, whatever this machine has
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(numba_step.numba.config, "NUMBA_NUM_THREADS", 8)
    assert [numba_step.threads_for(B, N, M) for B in (1, 4, 7, 8, 11, 12, 16, 64)] == [1, 1, 1, 2, 2, 3, 4, 4]
    assert numba_step.threads_for(2, 65536, 64) == 2  # two large items
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # torch.set_num_threads(1): one thread
    assert numba_step.threads_for(64, N, M) == 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(numba_step.numba.config, "NUMBA_NUM_THREADS", 3)  # numba's pool is the smaller
    assert numba_step.threads_for(64, N, M) == 3
    monkeypatch.setitem(numba_step._threading, "safe", False)
    assert numba_step.threads_for(64, N, M) == 1


def test_a_split_wakes_as_many_of_numbas_threads_as_it_has_parts(monkeypatch):
    """A parallel loop wakes every thread of numba's pool: fewer parts than it has take that many of them for the
    call, forward and backward, and the calling thread's setting comes back after (an 8-thread pool, faked)."""
    numba = numba_step.numba
    pool = {"threads": 8}
    monkeypatch.setattr(numba, "get_num_threads", lambda: pool["threads"])
    monkeypatch.setattr(numba, "set_num_threads", lambda n: pool.update(threads=n))
    seen = []
    monkeypatch.setattr(numba_step, "threads_for", lambda B, N, M: parts)
    for name in ("_forward_threaded", "_backward_threaded"):
        real = getattr(numba_step, name)

        def split(threads, *arrays, name=name, real=real):
            seen.append((name, threads, pool["threads"]))
            real(threads, *arrays)

        monkeypatch.setattr(numba_step, name, split)
    t = step_inputs(B=8, N=16, M=4, R=1, W=1, S=3, dtype=torch.float32)
    for parts in (3, 8, 12):
        out = numba_step.memory_step(*t.values(), 1)
        torch.autograd.backward(out, [torch.ones_like(o) for o in out])
    assert [(parts, threads) for _, parts, threads in seen] == [(3, 3), (3, 3), (8, 8), (8, 8), (12, 8), (12, 8)]
    assert [name for name, _, _ in seen[:2]] == ["_forward_threaded", "_backward_threaded"]
    assert pool["threads"] == 8


@pytest.mark.skipif(numba_step.numba.config.NUMBA_NUM_THREADS < 2,
                    reason="numba has one thread here (NUMBA_NUM_THREADS=1): there is no lower setting to take and "
                           "give back")
def test_numbas_own_setting_comes_back_after_a_split():
    numba = numba_step.numba
    before = numba.get_num_threads()
    with numba_step._pool_threads(1):
        assert numba.get_num_threads() == 1
    assert numba.get_num_threads() == before


FORK_THEN_STEP = """
import os, sys, torch
from fastntm import numba_step
sys.path.insert(0, {tests!r})
from helpers import step_inputs
torch.set_num_threads(2)
t = step_inputs(B=8, N=128, M=20, R=1, W=1, S=3, dtype=torch.float32)
if numba_step.threads_for(8, 128, 20) < 2:
    print("no split here:", numba_step.numba.config.NUMBA_NUM_THREADS, "numba threads, a thread-safe layer:",
          numba_step._threading["safe"])
    sys.exit(0)
def step():
    out = numba_step.memory_step(*t.values(), 1)
    torch.autograd.backward(out, [torch.ones_like(o) for o in out])
step()  # the batch split over numba's threads, which start here
pid = os.fork()
if pid == 0:
    step()
    os._exit(0 if numba_step.threads_for(8, 128, 20) == 1 else 3)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"),
                    reason="this platform has no os.fork (Windows), so there is no forked child to guard")
def test_a_child_forked_after_a_split_steps_on_one_thread():
    """GNU OpenMP's threads do not survive a fork, and numba terminates a forked child that starts a parallel loop
    once its parent has started numba's threads: the child runs its batches on one thread."""
    tests = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", FORK_THEN_STEP.format(tests=tests)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "no split here" in proc.stdout:  # one core, NUMBA_NUM_THREADS=1, or numba's workqueue layer
        pytest.skip("this machine never splits a batch, so a forked child has nothing to fall back from: "
                    + proc.stdout.strip())
    assert "child 0" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_gradcheck_in_float64(shape):
    R, W, S = shape["R"], shape["W"], shape["S"]
    t = step_inputs(**shape)
    assert torch.autograd.gradcheck(lambda *x: numba_step_of(*x, R=R), tuple(t.values()))
    assert torch.autograd.gradcheck(
        lambda *x: F.memory_step_from_heads(*x, num_reads=R, num_writes=W, shift_width=S, backend="numba"),
        from_heads_inputs(**shape))


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_are_finite_and_match_the_literal_spec(case, poisoned):
    for dtype in (torch.float32, torch.float64):
        t = edge_inputs(case, dtype)
        literal, got = reference.memory_step(*t.values(), 1), numba_step_of(*t.values(), R=1)
        cotangents = [torch.randn_like(o) for o in literal]
        expected, found = grads(literal, t, cotangents), grads(got, t, cotangents)
        for name, ref, out in [*zip(OUTPUTS, literal, got), *((f"d{n}", expected[n], found[n]) for n in NAMES)]:
            assert torch.isfinite(out).all(), f"{name}, {dtype}"
            if dtype == torch.float64:
                torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9, msg=name)


def test_results_are_the_same_bits_run_to_run():
    t = step_inputs(B=3, N=37, M=13, R=1, W=2, S=5, dtype=torch.float32)
    runs = []
    for _ in range(2):
        out = numba_step_of(*t.values(), R=1)
        runs.append([*out, *grads(out, t, [torch.ones_like(o) for o in out]).values()])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_non_contiguous_and_expanded_inputs():
    t = step_inputs(B=3, N=9, M=5, R=1, W=1, S=3, dtype=torch.float32, requires_grad=False)
    t["mem"] = t["mem"][:1].expand(3, 9, 5)  # as a model's initial memory is
    t["w_prev"] = t["w_prev"].transpose(1, 2).contiguous().transpose(1, 2)
    t = {n: v.requires_grad_() if v.is_leaf else v for n, v in t.items()}
    leaves = {n: v for n, v in t.items() if v.requires_grad}
    literal, got = reference.memory_step(*t.values(), 1), numba_step_of(*t.values(), R=1)
    cot = [torch.randn_like(o) for o in literal]
    for name, ref, out in zip(OUTPUTS, literal, got):
        assert_close(ref, out, name)
    expected = torch.autograd.grad(literal, list(leaves.values()), cot)
    found = torch.autograd.grad(got, list(leaves.values()), cot)
    for name, e, g in zip(leaves, expected, found):
        assert_close(e, g, f"d{name}")


def test_auto_takes_the_numba_kernels_on_a_cpu(monkeypatch):
    monkeypatch.delenv("FASTNTM_BACKEND", raising=False)
    assert backend.resolve("auto", torch.device("cpu")) == "numba"
    assert backend.implementation("auto", torch.device("cpu")).memory_step is numba_step.memory_step
    monkeypatch.setenv("FASTNTM_BACKEND", "numba")
    assert backend.resolve("auto", "cpu") == "numba"


def test_numba_backend_refuses_cuda_tensors_and_a_missing_numba(monkeypatch):
    with pytest.raises(RuntimeError, match="backend='numba' runs on CPU tensors, got tensors on cuda"):
        backend.resolve("numba", "cuda")
    monkeypatch.setattr(backend, "_numba_step", lambda: None)  # as where numba does not import
    assert backend.resolve("auto", "cpu") == "reference"
    with pytest.raises(RuntimeError, match="backend='numba' needs numba"):
        backend.resolve("numba", "cpu")


def test_where_the_kernels_do_not_serve_fused_reference_does(monkeypatch):
    """bf16 memory, fp16, a trace or a dispatch mode (the kernels' loops would escape it) go to fused_reference."""
    calls = []
    monkeypatch.setattr(numba_step.MemoryStep, "apply", lambda *a: calls.append(a) or pytest.fail("numba ran"))
    t = step_inputs(B=2, N=7, M=4, R=1, W=1, S=3, dtype=torch.float32, requires_grad=False)
    bf16_memory = dict(t, mem=t["mem"].bfloat16())
    numba_step_of(*bf16_memory.values(), R=1)
    numba_step_of(*(v.half() for v in t.values()), R=1)
    from torch.fx.experimental.proxy_tensor import make_fx

    for mode in ("real", "fake"):
        graph = make_fx(lambda *x: numba_step_of(*x, R=1), tracing_mode=mode)(*t.values())
        assert "bmm" in str(graph.code), mode  # the step's ops are in the graph, not skipped
    assert not calls


def test_in_place_change_of_a_saved_input_is_caught_in_backward():
    t = step_inputs(B=2, N=7, M=4, R=1, W=1, S=3, dtype=torch.float32)
    mem = t["mem"].detach().clone().requires_grad_()
    memory = mem * 1.0
    w, r, new_mem = numba_step_of(memory, *list(t.values())[1:], R=1)
    with torch.no_grad():
        memory.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (w.sum() + r.sum() + new_mem.sum()).backward()


def test_model_trains_the_same_on_numba_as_on_the_reference():
    torch.manual_seed(0)
    kw = dict(memory_slots=11, memory_width=6, controller_size=16, num_reads=2, num_writes=1)
    on_numba = FastNTM(5, 4, backend="numba", **kw)
    on_reference = FastNTM(5, 4, backend="reference", **kw)
    on_reference.load_state_dict(on_numba.state_dict())
    x = torch.rand(7, 3, 5)
    for model in (on_numba, on_reference):
        y, state = model(x)
        (y.square().sum() + state.memory.square().sum()).backward()
    y_numba, y_reference = on_numba(x)[0], on_reference(x)[0]
    assert_close(y_reference, y_numba, "y")
    for (name, p), q in zip(on_numba.named_parameters(), on_reference.parameters()):
        assert_close(q.grad, p.grad, f"d{name}")


def test_fused_reference_and_numba_are_the_same_function():
    """Two hand-derived backwards, one in torch ops and one in loops, agree with each other in float64."""
    t = step_inputs(B=2, N=9, M=4, R=1, W=2, S=3)
    a, b = fused_reference.memory_step(*t.values(), 1), numba_step_of(*t.values(), R=1)
    cot = [torch.randn_like(o) for o in a]
    from_torch, from_loops = grads(a, t, cot), grads(b, t, cot)
    for name in NAMES:
        torch.testing.assert_close(from_loops[name], from_torch[name], rtol=1e-9, atol=1e-12, msg=f"d{name}")


@pytest.mark.parametrize("dtype, beta", [(torch.float32, 1e12), (torch.float64, 1e30)], ids=["fp32", "fp64"])
def test_a_saturated_softmax_at_huge_beta_is_exact(dtype, beta):
    """The largest logit's exponent is exactly 0, as in the spec: a fused multiply-add once left beta K's
    rounding error there (beta times an ulp), and exp() of it overflowed to NaN weightings; its backward gave
    dk of order 1 where the exact one is 0."""
    t = step_inputs(B=4, N=16, M=5, R=1, W=1, S=3, dtype=dtype)
    with torch.no_grad():
        t["beta"].fill_(beta)
    literal, got = reference.memory_step(*t.values(), 1), numba_step_of(*t.values(), R=1)
    cotangents = [torch.randn_like(o) for o in literal]
    expected, found = grads(literal, t, cotangents), grads(got, t, cotangents)
    for name, ref, out in [*zip(OUTPUTS, literal, got), *((f"d{n}", expected[n], found[n]) for n in NAMES)]:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item(), msg=name)
    assert not found["k"].any() and not found["beta"].any()  # a one-hot softmax passes no gradient back


def test_torch_compile_and_export_trace_the_reference_under_auto():
    """Dynamo cannot trace numba's loops: inside a compile (or a strict export) ``auto`` and ``numba`` on a CPU
    run the reference path, with no graph break."""
    t = step_inputs(B=2, N=7, M=4, R=1, W=1, S=3, dtype=torch.float32, requires_grad=False)
    expected = reference.memory_step(*t.values(), 1)
    for name in ("auto", "numba"):
        torch._dynamo.reset()
        step = torch.compile(lambda *x: F.memory_step(*x, num_reads=1, backend=name), fullgraph=True,
                             backend="eager")
        for ref, out in zip(expected, step(*t.values())):
            assert_close(ref, out, f"compiled, backend={name}")

    class Step(torch.nn.Module):
        def forward(self, *x):
            return F.memory_step(*x, num_reads=1)

    exported = torch.export.export(Step(), tuple(t.values()), strict=True)
    for ref, out in zip(expected, exported.module()(*t.values())):
        assert_close(ref, out, "exported")


def test_outputs_stay_on_the_cpu_under_another_default_device():
    t = step_inputs(B=2, N=7, M=4, R=1, W=1, S=3, dtype=torch.float32, requires_grad=False)
    with torch.device("meta"):
        out = numba_step_of(*t.values(), R=1)
    for ref, got in zip(reference.memory_step(*t.values(), 1), out):
        assert_close(ref, got, "under torch.device('meta')")


@pytest.mark.parametrize("split", [1, 2], ids=["whole-batch", "batch-split"])
def test_two_threads_at_once_get_each_their_own_answer(split, monkeypatch):
    """The loops release the GIL; calls from two threads run at once and do not share buffers, each with its
    batch split over numba's threads too."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(numba_step, "threads_for", lambda B, N, M: split)

    inputs = [step_inputs(B=8, N=37, M=13, R=1, W=2, S=5, dtype=torch.float32, seed=seed) for seed in range(4)]

    def step_and_grads(t):
        out = numba_step_of(*t.values(), R=1)
        return [*out, *grads(out, t, [torch.ones_like(o) for o in out]).values()]

    alone = [step_and_grads(t) for t in inputs]
    with ThreadPoolExecutor(2) as pool:
        together = list(pool.map(step_and_grads, inputs * 3))
    for got, expected in zip(together, alone * 3):
        for g, e in zip(got, expected):
            assert torch.equal(g, e)


def test_buffers_come_from_torchs_allocator_where_memory_profiling_sees_them(monkeypatch):
    """The benchmarks' peak memory on a CPU is torch.profiler's count of torch's allocator: buffers allocated by
    numpy (as at 08cbc7f) went unseen, and the step's peak read 1.4 MiB at every shape."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
    from benchmarks.common import peak_memory

    x = from_heads_inputs(B=4, N=256, M=32, R=1, W=1, S=3, dtype=torch.float32)

    def step_and_backward():
        out = F.memory_step_from_heads(*x, num_reads=1, num_writes=1, shift_width=3, backend="numba")
        torch.autograd.grad(out, x, [torch.ones_like(o) for o in out])

    new_memory_bytes = 4 * 256 * 32 * 4
    assert peak_memory(step_and_backward, torch.device("cpu"))["peak_bytes"] >= 2 * new_memory_bytes
