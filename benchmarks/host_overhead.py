"""Host time per call of the Triton memory step, on a CPU: where an eager call's microseconds go.

On an H200 the paper-size step (B 32, N 128, M 20, one read and one write head, S 3) took 9 us
forward under a CUDA graph and 182 us as a plain eager call: the eager path is host-bound. This
measures that host work on a CPU, with every Triton kernel launch replaced by a no-op
(``kernel[grid](...)`` does nothing; the checks, the dispatch, the autograd node, the allocations
and the block choice all run). So it leaves out the Triton launcher's own cost (binding the
arguments, the specialisation key, the cache lookup, the driver call), which only a GPU shows.

Each call is split into layers by timing, inside the call, the functions where one layer hands
over to the next (the timing wrappers add about a microsecond each, mostly to ``dispatch``):

* validation: ``validation.check_memory_step``;
* dispatch: the rest of ``functional.memory_step`` (``backend.implementation``) and the kernels
  package's gate, down to ``fastntm.kernels.memory_step.memory_step``;
* autograd.Function: that function (``MemoryStep.apply``, or a direct call where nothing needs a
  gradient) less the op or host function it reaches, and ``MemoryStep.backward`` less the same;
* autograd engine: with backward, ``torch.autograd.grad`` of the 9 inputs less ``MemoryStep.backward``
  (mostly that call's own cost, which a training step pays once per backward pass, not per step:
  a ``grad`` through three trivial nodes costs about as much here);
* custom_op: the ``torch.library`` ops ``memory_step_fwd`` / ``memory_step_bwd`` less the host
  functions they wrap, where an eager call goes through them (0 where it does not);
* wrapper: ``_forward`` / ``_backward``: allocations, block choice, the (stubbed) launches.

The tensors are CPU tensors, whose values ``validation`` checks (one ``aminmax`` each); CUDA tensors
get the shape, dtype and device checks only. Those are timed on meta tensors as ``validation, as for
CUDA``, which replaces the measured validation in ``total, as for CUDA``.

Run (run as a script, it sets ``TRITON_INTERPRET=1`` itself so that the kernel path takes tensors off CUDA; with the
launches stubbed the interpreter never runs)::

    python -m benchmarks.host_overhead [--calls 3000] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import os
import statistics
import time

if __name__ == "__main__":  # imported (by a test), it leaves the process's choice alone
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

import fastntm.functional as F  # noqa: E402
from fastntm import kernels, validation  # noqa: E402

from . import common  # noqa: E402
from .shapes import OP_SHAPES  # noqa: E402

ms = importlib.import_module("fastntm.kernels.memory_step")
heads = importlib.import_module("fastntm.kernels.heads")

LAYERS = ("validation", "dispatch", "autograd.Function", "autograd engine", "custom_op", "wrapper")
# (module or class, name) of each function where one layer hands over to the next.
BOUNDARIES = ((validation, "check_memory_step"), (kernels, "_memory_step"), (ms, "memory_step_fwd"),
              (ms, "_forward"), (ms.MemoryStep, "backward"), (ms, "memory_step_bwd"), (ms, "_backward"))


def _no_launch(*args, **kwargs):
    return None


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` does nothing."""

    def __getitem__(self, grid):
        return _no_launch


@contextlib.contextmanager
def patched(pairs):
    """Within the block, ``setattr(module, name, value)`` for each ``(module, name, value)``."""
    saved = [(m, n, inspect.getattr_static(m, n)) for m, n, _ in pairs]
    for m, n, v in pairs:
        setattr(m, n, v)
    try:
        yield
    finally:
        for m, n, v in saved:
            setattr(m, n, v)


def stubbed_launches():
    """Every kernel of ``fastntm.kernels.memory_step`` and ``fastntm.kernels.heads`` launches nothing."""
    return patched([(m, n, _NoLaunch()) for m in (ms, heads) for n in vars(m) if n.endswith("_kernel")])


def timed_boundaries(spent: dict):
    """Each boundary function adds the nanoseconds of its calls to ``spent[name]``."""

    def timed(name, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter_ns()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] = spent.get(name, 0) + time.perf_counter_ns() - t0

        return call

    def wrapped(m, n):
        fn = timed(n, getattr(m, n))
        return staticmethod(fn) if isinstance(inspect.getattr_static(m, n), staticmethod) else fn

    return patched([(m, n, wrapped(m, n)) for m, n in BOUNDARIES])


def split(total_fwd: int, total_bwd: int | None, spent: dict) -> dict:
    """One call's layers in microseconds, from its totals and the time spent inside each boundary."""
    op_fwd = spent.get("memory_step_fwd", spent["_forward"])
    layers = {
        "validation": spent["check_memory_step"],
        "dispatch": total_fwd - spent["check_memory_step"] - spent["_memory_step"],
        "autograd.Function": spent["_memory_step"] - op_fwd,
        "autograd engine": 0,
        "custom_op": op_fwd - spent["_forward"],
        "wrapper": spent["_forward"],
    }
    if total_bwd is not None:
        op_bwd = spent.get("memory_step_bwd", spent["_backward"])
        layers["autograd engine"] = total_bwd - spent["backward"]
        layers["autograd.Function"] += spent["backward"] - op_bwd
        layers["custom_op"] += op_bwd - spent["_backward"]
        layers["wrapper"] += spent["_backward"]
    return {k: v / 1e3 for k, v in layers.items()}


def measure(shape_name: str = "paper-b32", backward: bool = False, calls: int = 3000) -> dict:
    """p50 (and p20, p80 of the total) microseconds of each layer of ``functional.memory_step`` on CPU tensors."""
    shape = OP_SHAPES[shape_name]
    x = [t.requires_grad_() for t in common.op_inputs(shape, torch.device("cpu"))]
    grads = None
    spent: dict = {}
    rows, totals, through_op = [], [], False
    with stubbed_launches(), timed_boundaries(spent), (contextlib.nullcontext() if backward else torch.no_grad()):
        for i in range(calls + calls // 10):
            spent.clear()
            t0 = time.perf_counter_ns()
            out = F.memory_step(*x, num_reads=shape.R, backend="triton")
            t1 = time.perf_counter_ns()
            total_bwd = None
            if backward:
                grads = grads or [torch.ones_like(o) for o in out]
                # grad, not backward: accumulating into the leaves' .grad is not the step's own cost.
                torch.autograd.grad(out, x, grads)
                total_bwd = time.perf_counter_ns() - t1
            if i < calls // 10:  # warm-up
                continue
            through_op = through_op or "memory_step_fwd" in spent
            rows.append(split(t1 - t0, total_bwd, spent))
            totals.append((t1 - t0 + (total_bwd or 0)) / 1e3)
    q = statistics.quantiles(totals, n=10)
    return {
        "layers_us": {layer: statistics.median(r[layer] for r in rows) for layer in LAYERS},
        "total_us": {"p50": statistics.median(totals), "p20": q[1], "p80": q[7]},
        "eager_custom_op": through_op,
    }


def validation_as_for_cuda(shape_name: str = "paper-b32", calls: int = 3000) -> float:
    """p50 microseconds of ``validation.check_memory_step`` on meta tensors: no value checks, as for CUDA."""
    shape = OP_SHAPES[shape_name]
    x = [t.to("meta") for t in common.op_inputs(shape, torch.device("cpu"))]
    times = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        validation.check_memory_step(*x, shape.R)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return statistics.median(times)


def run(shape_name: str = "paper-b32", calls: int = 3000) -> dict:
    result = {"shape": OP_SHAPES[shape_name].as_dict(), "calls": calls, "columns": {}}
    for backward in (False, True):
        result["columns"]["fwd+bwd" if backward else "fwd"] = measure(shape_name, backward, calls)
    result["validation_as_for_cuda_us"] = validation_as_for_cuda(shape_name, calls)
    return result


def report(result: dict) -> str:
    cols = result["columns"]
    val_cuda = result["validation_as_for_cuda_us"]
    rows = [f"{'p50 us':24}" + "".join(f"{k:>10}" for k in cols)]
    for layer in LAYERS:
        rows.append(f"{layer:24}" + "".join(f"{c['layers_us'][layer]:10.1f}" for c in cols.values()))
    rows.append(f"{'total':24}" + "".join(f"{c['total_us']['p50']:10.1f}" for c in cols.values()))
    rows.append(f"{'total p20/p80':24}" + "".join(
        f"{c['total_us']['p20']:.0f}/{c['total_us']['p80']:.0f}".rjust(10) for c in cols.values()))
    rows.append(f"{'validation, as for CUDA':24}" + "".join(f"{val_cuda:10.1f}" for _ in cols))
    rows.append(f"{'total, as for CUDA':24}" + "".join(
        f"{c['total_us']['p50'] - c['layers_us']['validation'] + val_cuda:10.1f}" for c in cols.values()))
    s = result["shape"]
    through = "/".join("yes" if c["eager_custom_op"] else "no" for c in cols.values())
    head = (f"memory_step host time on the CPU, Triton path with its kernel launches stubbed (the Triton "
            f"launcher's own cost is not in it); B {s['B']} N {s['N']} M {s['M']} R {s['R']} W {s['W']} S {s['S']}; "
            f"{result['calls']} calls each; eager call through the custom ops (fwd/fwd+bwd): {through}")
    return "\n".join([head, *rows])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="paper-b32", choices=sorted(OP_SHAPES))
    parser.add_argument("--calls", type=int, default=3000, help="calls timed per column")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (host work is one thread)")
    parser.add_argument("--json", help="also write the figures, with the machine and commit, to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.shape, args.calls)
    print(report(result))
    if args.json:
        common.write_json(args.json, {"environment": common.environment(torch.device("cpu")), **result})


if __name__ == "__main__":
    main()
