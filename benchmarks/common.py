"""What every benchmark here shares: inputs, timing, peak memory, errors, the byte
model, the copy bandwidth and a description of the machine.

Timing: on CUDA ``triton.testing.do_bench`` (events around each call, the L2
flushed between calls), with enough repeats for quantiles; on a CPU
``time.perf_counter`` around each call. Both give p50, p20 and p80 in ms.

Peak memory of one call: on CUDA ``torch.cuda.max_memory_allocated`` over the
call, less what was allocated before it; on a CPU the peak of the bytes held by
torch's CPU allocator during the call, from ``torch.profiler`` with
``profile_memory`` (the process's RSS is too coarse for one step; the long
sequence benchmark, where it is not, reads peak RSS in a fresh process).

Byte model of ``memory_step`` (the least traffic of a fused step, in the
tensors' dtypes; ``|mem|`` = B N M elements, "vectors" = everything else):

* forward: ``3 |mem|``: read mem for the similarity pass, read it again for the
  read/write pass (the softmax and sharpening sums over all N lie between the
  two), write new_mem; plus the inputs ``k, beta, g, s, gamma, w_prev, e, a``
  read once and the outputs ``w, r`` written once.
* forward + backward: ``6 |mem|``: the forward's 3, then read mem and
  dL/dnew_mem and write dL/dmem; the vectors three times (forward; backward
  reads the inputs, the saved ``w`` and the outputs' gradients; writes the
  inputs' gradients). A backward that recomputes the addressing from mem in two
  passes (as the kernels do) moves ``8 |mem|``; the fraction reported is of the
  least, so it is a lower bound on how close to the copy bandwidth a step runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from typing import Callable

import torch

QUANTILES = (0.5, 0.2, 0.8)
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


# ---------------------------------------------------------------- inputs


def op_inputs(shape, device, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """``mem, k, beta, g, s, gamma, w_prev, e, a`` for ``memory_step`` at ``shape``, in the
    ranges the model's activations give (beta up to 5, gamma in [1, 4])."""
    gen = torch.Generator().manual_seed(seed)
    B, N, M, H, W, S = shape.B, shape.N, shape.M, shape.H, shape.W, shape.S

    def rand(*size):
        return torch.rand(*size, generator=gen, dtype=torch.float64)

    def randn(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64)

    values = [
        randn(B, N, M),
        randn(B, H, M),
        rand(B, H) * 5,
        rand(B, H),
        torch.softmax(randn(B, H, S), -1),
        1 + rand(B, H) * 3,
        torch.softmax(randn(B, H, N), -1),
        rand(B, W, M),
        randn(B, W, M),
    ]
    return [v.to(device, dtype) for v in values]


def cotangents(outputs, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype) for o in outputs]


# ---------------------------------------------------------------- byte model


def op_bytes(shape, dtype=torch.float32) -> dict[str, int]:
    """Least bytes a fused ``memory_step`` moves at ``shape``: ``{"fwd": ..., "fwd_bwd": ...}``."""
    size = torch.empty((), dtype=dtype).element_size()
    B, N, M, R, W, H, S = shape.B, shape.N, shape.M, shape.R, shape.W, shape.H, shape.S
    mem = B * N * M * size
    inputs = (B * H * M + 3 * B * H + B * H * S + B * H * N + 2 * B * W * M) * size
    outputs = (B * H * N + B * R * M) * size
    return {"fwd": 3 * mem + inputs + outputs, "fwd_bwd": 6 * mem + 3 * (inputs + outputs)}


# ---------------------------------------------------------------- errors


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||ref - out|| / ||ref||`` in float64 (0 when both are zero)."""
    out, ref = out.detach().double(), ref.detach().double().to(out.device)
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def max_rel_err(outs, refs) -> float:
    return max(rel_err(o, r) for o, r in zip(outs, refs, strict=True))  # an output missing is no pass


# ---------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, budget_s: float = 1.0, min_reps: int = 5,
              max_reps: int = 200) -> dict:
    """p50/p20/p80 (ms) of ``fn()`` and the number of timed calls; ``fn`` is already warm."""
    if device.type == "cuda":
        return _time_cuda(fn, device, budget_s, min_reps)
    times = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return {**_quantiles(times), "reps": len(times)}


def _quantiles(times_ms: list[float]) -> dict:
    qs = statistics.quantiles(times_ms, n=10, method="inclusive") if len(times_ms) > 1 else times_ms * 9
    return {"p50_ms": statistics.median(times_ms), "p20_ms": qs[1], "p80_ms": qs[7]}


def _time_cuda(fn, device, budget_s, min_reps) -> dict:
    from triton.testing import do_bench

    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    estimate_ms = (time.perf_counter() - t0) * 1e3
    # do_bench repeats for ``rep`` ms; ask for at least ``min_reps`` calls (a training step
    # takes tens of ms) and at most the budget.
    rep = max(min(budget_s * 1e3, 100.0), min_reps * estimate_ms)
    warmup = max(min(25.0, rep / 4), estimate_ms)
    p50, p20, p80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES))
    return {"p50_ms": p50, "p20_ms": p20, "p80_ms": p80, "reps": None}


# ---------------------------------------------------------------- peak memory


def peak_memory(fn: Callable[[], object], device: torch.device) -> dict:
    """Bytes allocated at the peak of one ``fn()`` beyond what was allocated before it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base,
                "peak_method": "torch.cuda.max_memory_allocated"}
    return {"peak_bytes": _cpu_peak_allocated(fn), "peak_method": "torch.profiler profile_memory (CPU allocator)"}


def _cpu_peak_allocated(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    # The peak of this call's own allocations less its frees, in the order they happened. Not the events' "Total
    # Allocated": that carries over from earlier profiled calls whatever they left alive (a training step's .grad),
    # so each row took the leftovers of the rows before it.
    changes = sorted(((e["ts"], e["args"].get("Bytes", 0)) for e in events
                      if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0), key=lambda c: c[0])
    peak = live = 0
    for _, change in changes:
        live += change
        peak = max(peak, live)
    return peak


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto prints two lines to fd 2 at every profiler start and stop; a table wants none."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# ---------------------------------------------------------------- copy bandwidth


def copy_bandwidth(device: torch.device, nbytes: int | None = None) -> dict:
    """Bytes read + written per second by ``dst.copy_(src)`` of a buffer larger than the caches:
    256 MiB on CUDA (the H100's L2 is 50 MB), 64 MiB on a CPU."""
    nbytes = nbytes or (256 if device.type == "cuda" else 64) * 2**20
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t = time_call(lambda: dst.copy_(src), device, budget_s=0.5, min_reps=10)
    return {"copy_bytes": nbytes, "copy_GBps": 2 * nbytes / (t["p50_ms"] * 1e-3) / 1e9, **t}


# ---------------------------------------------------------------- the machine


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """The commit of the working tree, ``+dirty`` when tracked files differ from it."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # Block settings forced on the dispatch for the whole run, if any: its figures are theirs, not the defaults'.
        "fastntm_blocks": os.environ.get("FASTNTM_BLOCKS", ""),
    }


def write_json(path: str, data) -> None:
    """Write ``data`` whole or not at all (a run cut off by a timeout leaves the last whole file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)
