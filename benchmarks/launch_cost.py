"""Host time of the large-memory memory step's launches on a CUDA GPU: what each Triton launch costs the CPU.

    python -m benchmarks.launch_cost --out runs/launch       # medium shape, about 10 s

``benchmarks.host_overhead`` measures the host work of a call on a CPU with every launch stubbed, so it leaves
out the Triton launcher itself (binding the arguments, the specialisation key, the cache lookup, the driver
call). This measures that part, on the GPU machine: the kernels' host functions (``_forward``, ``_backward``, as
``MemoryStep`` calls them) run ``--calls`` times in a loop at a shape whose GPU time is below its host time
(``medium``: B 16, N 4,096, M 64, 2 + 1 heads, which runs the large-memory kernels), the launches enqueue and
never wait, and the loop's wall time over the calls is the host's time a call (the GPU is synchronised after
the loop; more calls than a launch queue holds would wait on the GPU, so ``--calls`` stays in the hundreds).
Inside the loop each Triton kernel's ``run`` (what ``kernel[grid](...)`` calls) is timed by
``time.perf_counter`` around it, so each launch's host time is known by kernel; the rest of a call is the
allocations, the torch ops and the Python between launches. For scale, the same loop times a launch of an
empty Triton kernel of one argument and of 32, and a ``torch.sum`` of a small tensor.

Prints a table (host us a launch, by kernel; us a call) and writes ``launch_cost.json``.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import time

import torch

from . import common
from .shapes import OP_SHAPES


def _timed_runs(kernels_module):
    """Wrap the ``run`` of every Triton kernel in ``kernels_module``; returns (their timings, undo)."""
    from triton.runtime.jit import KernelInterface  # a JITFunction, or under TRITON_INTERPRET=1 its stand-in

    spent = collections.defaultdict(list)
    wrapped = []
    for name, fn in vars(kernels_module).items():
        if isinstance(fn, KernelInterface) and name.endswith("_kernel"):
            def run(*args, _run=fn.run, _name=name, **kwargs):
                t0 = time.perf_counter()
                out = _run(*args, **kwargs)
                spent[_name].append(time.perf_counter() - t0)
                return out
            fn.run = run
            wrapped.append(fn)

    def undo():
        for fn in wrapped:
            del fn.run

    return spent, undo


def _host_loop(fn, calls: int) -> float:
    """Seconds of host time a call of ``fn`` over ``calls`` calls, the GPU synchronised before and after."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls
    torch.cuda.synchronize()
    return t


def _reference_launches(calls: int) -> dict:
    import triton
    import triton.language as tl

    @triton.jit
    def one_arg(p):
        tl.store(p, 1.0)

    @triton.jit
    def many_args(p, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19,
                  a20, a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31):
        tl.store(p, 1.0)

    x = torch.zeros(16, device="cuda")
    ints = list(range(1, 32))
    one, many = (lambda: one_arg[(1,)](x)), (lambda: many_args[(1,)](x, *ints))
    small = torch.ones(64, device="cuda")
    out = {}
    for name, fn in (("empty Triton kernel, 1 argument", one), ("empty Triton kernel, 32 arguments", many),
                     ("torch.sum of 64 floats", lambda: small.sum())):
        fn()
        out[name] = _host_loop(fn, calls) * 1e6
    return out


def measure(shape, calls: int) -> dict:
    step = importlib.import_module("fastntm.kernels.memory_step")
    x = common.op_inputs(shape, torch.device("cuda"))
    R = shape.R
    w, r, new, K, mx, se = step._forward(*x, R, True)
    cot = common.cotangents((w, r, new))
    forward = lambda: step._forward(*x, R, True)  # noqa: E731
    backward = lambda: step._backward(*x, w, K, mx, se, *cot, R)  # noqa: E731
    result = {}
    for name, fn in (("forward", forward), ("backward", backward)):
        fn()  # compiled and cached before timing
        plain = _host_loop(fn, calls)
        spent, undo = _timed_runs(step)
        try:
            timed = _host_loop(fn, calls)
        finally:
            undo()
        launches = {k: dict(launches_a_call=len(v) / calls, us_a_launch=1e6 * sum(v) / len(v))
                    for k, v in sorted(spent.items())}
        in_launches = sum(1e6 * sum(v) / calls for v in spent.values())
        result[name] = dict(us_a_call=plain * 1e6, us_a_call_timed=timed * 1e6, us_in_launches=in_launches,
                            launches=launches)
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="medium", choices=sorted(OP_SHAPES))
    ap.add_argument("--calls", type=int, default=200, help="calls timed in a loop (default 200)")
    ap.add_argument("--out", default="runs/launch", help="folder for launch_cost.json")
    args = ap.parse_args(argv)
    if args.calls < 1:
        ap.error(f"--calls: expected a positive integer, got {args.calls}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "launch_cost.json")
    if not torch.cuda.is_available():
        print("launch_cost: no CUDA device; nothing measured")
        common.write_json(path, dict(skipped="no CUDA device"))
        return 0
    device = torch.device("cuda")
    shape = OP_SHAPES[args.shape]
    result = dict(environment=common.environment(device), shape=shape.as_dict(), calls=args.calls,
                  step=measure(shape, args.calls), reference_launches=_reference_launches(args.calls))
    common.write_json(path, result)
    print(f"launch_cost on {result['environment']['device']}, shape {shape.name}, {args.calls} calls a loop")
    for name, row in result["step"].items():
        print(f"{name}: {row['us_a_call']:.1f} us of host a call ({row['us_a_call_timed']:.1f} with the launches "
              f"timed, {row['us_in_launches']:.1f} of it in Triton launches)")
        for kernel, k in row["launches"].items():
            print(f"    {kernel:28} {k['launches_a_call']:4.1f} a call, {k['us_a_launch']:6.1f} us a launch")
    for name, us in result["reference_launches"].items():
        print(f"{name}: {us:.1f} us of host a launch")
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
