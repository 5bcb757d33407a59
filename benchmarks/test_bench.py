"""The benchmark cases under pytest-benchmark.

    pytest benchmarks/ --benchmark-only                          # CPU, or CUDA when present
    pytest benchmarks/ --benchmark-only -k 'paper and reference'
    FASTNTM_BENCH_FULL=1 pytest benchmarks/ --benchmark-only     # every shape, compile everywhere

The repository's ``testpaths`` is ``tests``, so a plain ``pytest`` never collects
these. Each test builds, warms and checks its case (the same ``Case`` that
``benchmarks.run`` times) before the benchmark starts: a relative error above
the tolerance fails the test and times nothing. Compile failures skip. The byte
model, achieved GB/s and peak memory go into ``extra_info``.
"""

from __future__ import annotations

import os
import time

import pytest
import torch

from benchmarks import common
from benchmarks.cases import COMPILE_PROVIDERS, OPS, TRAIN_ONLY_PROVIDERS, Case, providers_for, train_only_providers_for
from benchmarks.run import COMPILE_SHAPES
from benchmarks.shapes import OP_SHAPES, QUICK_SKIP, TRAIN_SHAPES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
MODE = "full" if os.environ.get("FASTNTM_BENCH_FULL") == "1" else "quick"
SKIP = QUICK_SKIP[DEVICE.type] if MODE == "quick" else set()


def _params():
    compile_shapes = COMPILE_SHAPES[(DEVICE.type, MODE)]
    # The train-only providers time the training step alone: on CUDA the graph replays; on a CPU the baseline, and
    # with FASTNTM_BENCH_FULL=1 the compiled memory step (COMPILE_SHAPES: the quick set compiles paper-b32 alone).
    for provider in providers_for(DEVICE) + train_only_providers_for(DEVICE):
        for op in OPS if provider not in TRAIN_ONLY_PROVIDERS else ("train_step",):
            shapes = TRAIN_SHAPES if op == "train_step" else OP_SHAPES
            for shape in shapes.values():
                if shape.name in SKIP or (provider in COMPILE_PROVIDERS and shape.name not in compile_shapes):
                    continue
                yield pytest.param(op, shape, provider, id=f"{op}-{shape.name}-{provider}")


@pytest.mark.parametrize("op, shape, provider", list(_params()))
def test_bench(benchmark, op, shape, provider):
    case = Case(op, shape, provider, DEVICE)
    try:
        case.prepare()
    except Exception as exc:
        if provider in COMPILE_PROVIDERS:
            pytest.skip(f"torch.compile failed here: {type(exc).__name__}: {exc}"[:300])
        raise
    tolerance = common.TOLERANCE[torch.float32]
    assert case.rel_err <= tolerance, f"{case.name}: relative error {case.rel_err:.2e} > {tolerance:.0e}"

    def call():
        case.fn()
        common.synchronize(DEVICE)

    benchmark.extra_info.update(device=common.device_name(DEVICE), rel_err=case.rel_err, batch=case.batch,
                                **common.peak_memory(case.fn, DEVICE))
    benchmark.pedantic(call, rounds=_rounds(case), iterations=1, warmup_rounds=1)
    if case.bytes_moved() and benchmark.stats:  # no stats under --benchmark-disable
        seconds = benchmark.stats.stats.median
        benchmark.extra_info.update(bytes_model=case.bytes_moved(), GBps=case.bytes_moved() / seconds / 1e9)


def _rounds(case: Case) -> int:
    """About a second a case at the size that case runs here."""
    common.synchronize(DEVICE)
    t0 = time.perf_counter()
    case.fn()
    common.synchronize(DEVICE)
    return int(min(200, max(5, 1.0 / max(time.perf_counter() - t0, 1e-6))))
