"""Where the memory step's time goes: device time of each kernel it launches, from torch.profiler.

    python -m benchmarks.kernel_profile --device cuda --out runs/bench    # writes kernel_profile.json
    python -m benchmarks.kernel_profile --device cpu --shapes tiny-n16 --iters 3

``benchmarks.run`` and ``benchmarks.bench_kernels`` time a whole ``memory_step``; at the
large shape its forward ran at 31% of the copy bandwidth and nothing said which launch was
slow. This profiles the same calls and splits their time by kernel.

For each shape (names from ``benchmarks.shapes``; default ``paper-b32`` and ``large``):
build the inputs (``benchmarks.common.op_inputs``), warm up the forward and the
forward + backward (Triton compiles on the first call), then run ``--iters`` iterations
of the forward alone (no autograd) and, separately, of the forward + backward (the
gradients of every input) under ``torch.profiler``. Nothing is checked for correctness
here: ``bench_kernels`` and ``benchmarks.run`` do that.

On CUDA the calls take the Triton path (``backend="triton"``) and the events aggregated
are the device's: each kernel (Triton's and torch's), memcpy and memset, by name, with
its duration on the device. On a CPU there are no device events and no Triton path, so
the same calls take the reference path (``backend="reference"``) and the CPU ops' self
time is aggregated instead: that exercises the code, it does not profile the kernels.

Columns: share of the iteration's summed event time, time per iteration (us), calls per
iteration, mean time per call (us), the torch op that launched the kernel (CUDA; none
for Triton's own launches) and the event's name. On CUDA, each large-memory Triton kernel
also gets the bytes a simple model says it must move (``KERNEL_TRAFFIC``), the GB/s that
gives at its mean time and the fraction of the copy bandwidth measured in the same run.

The "span" is the time from the first event's start to the last one's end, per
iteration: where it is much longer than the summed event time, the device waits on the
host (launches), and the profiler's own overhead widens those gaps.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import sys

import torch

from . import common
from .shapes import OP_SHAPES, TINY_OP_SHAPES, OpShape

DEFAULT_SHAPES = ("paper-b32", "large")
OPS = ("fwd", "fwd_bwd")

# Least traffic of each large-memory Triton kernel, as (passes over a (B, N, M) tensor in mem's dtype,
# (B, H, N) fp32 vectors); the (B, H) values, (B, H, M) vectors and block partials are left out.
# Read from the kernels in fastntm/kernels/memory_step.py; the counts of vectors are approximate.
KERNEL_TRAFFIC = {
    "_similarity_kernel": (1, 1),  # reads mem; writes the logits K
    "_shift_sharpen_kernel": (0, 3),  # reads K and w_prev; writes ws^gamma
    "_read_write_kernel": (2, 2),  # reads mem, writes new_mem; reads ws^gamma, writes w
    "_read_write_bwd_kernel": (2, 2),  # reads mem and dL/dnew_mem; reads the given dL/dw, writes the total
    # (and reads w of the write heads)
    "_mem_bwd_kernel": (3, 2),  # reads mem and dL/dnew_mem, writes dL/dmem; reads w and dL/dK / |k|
    "_sharpen_bwd_kernel": (0, 4),  # reads dL/dw (the total), K, w_prev; writes p / c
    "_interp_bwd_kernel": (0, 6),  # reads those two, K, w_prev; writes dL/dw_prev and dL/dwc
    "_softmax_bwd_kernel": (0, 3),  # reads K and dL/dwc; writes dL/dK / |k| (and a (B, N) row sum)
}

# What each kind of profile aggregates: a short label for the tables, and what it means.
EVENT_KINDS = {
    "cuda": ("CUDA kernels", "CUDA device events (kernels, memcpy, memset), device time of each, Triton path"),
    "cpu": ("CPU ops", "CPU ops, self CPU time of each, reference path (a CPU has no device events, no Triton)"),
}


# ---------------------------------------------------------------- the calls profiled


def make_calls(shape: OpShape, device: torch.device):
    """``{"fwd": fn, "fwd_bwd": fn}`` for ``memory_step`` at ``shape`` (one set of inputs for both) and the
    backend they use: Triton on CUDA, the reference path elsewhere."""
    from fastntm import functional

    backend = "triton" if device.type == "cuda" else "reference"
    step = functools.partial(functional.memory_step, num_reads=shape.R, backend=backend)
    x = [t.requires_grad_() for t in common.op_inputs(shape, device)]
    with torch.no_grad():
        cot = common.cotangents(step(*x))

    def fwd():
        with torch.no_grad():
            return step(*x)

    def fwd_bwd():
        return torch.autograd.grad(step(*x), x, cot)

    return {"fwd": fwd, "fwd_bwd": fwd_bwd}, backend


def profile_call(fn, device: torch.device, iters: int):
    """The profiler's events of ``iters`` calls of ``fn`` (already warm)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    common.synchronize(device)
    # Kineto's start and stop lines would break up a CPU table; on CUDA, CUPTI's warnings (no permission
    # to profile, say) are what explains an empty table, so they stay.
    quiet = common._quiet_stderr() if device.type == "cpu" else contextlib.nullcontext()
    with quiet, profile(activities=activities) as prof:
        for _ in range(iters):
            fn()
        # Every kernel must end inside the profiled window, or its event is lost.
        common.synchronize(device)
    return prof.events()


# ---------------------------------------------------------------- aggregation


def samples(events, kind: str) -> list[tuple[str, float, float, float]]:
    """``(name, duration us, start us, end us)`` of each event of ``kind`` ("cuda" or "cpu").

    Device events: the length of their ``time_range``, which is what ``self_device_time_total`` returns for
    them (torch 2.13; ``self_cuda_time_total`` is its deprecated alias), read directly because ``time_range``
    has had the same name in every version. CPU ops: ``self_cpu_time_total``, so that an op's time is not
    counted again in the op that called it."""
    from torch.autograd import DeviceType

    out = []
    for e in events:
        if getattr(e, "is_user_annotation", False):  # record_function ranges, not work
            continue
        start, end = e.time_range.start, e.time_range.end
        if kind == "cuda":
            if e.device_type == DeviceType.CUDA:
                out.append((e.name, end - start, start, end))
        elif e.device_type == DeviceType.CPU and not e.is_async:
            out.append((e.name, e.self_cpu_time_total, start, end))
    return out


def launchers(events) -> dict[str, list[str]]:
    """The torch ops that launched each device kernel, from the CPU events' ``kernels`` (the profiler links
    a kernel to the op its launch ran in; Triton's launches are usually linked to none)."""
    ops = collections.defaultdict(collections.Counter)
    for e in events:
        for k in getattr(e, "kernels", None) or ():
            ops[getattr(k, "name", str(k))][e.name] += 1
    return {name: [op for op, _ in counts.most_common()] for name, counts in ops.items()}


def aggregate(sample_list, iters: int, launched_by: dict | None = None) -> tuple[list[dict], dict]:
    """Rows per event name, largest time first, and the iteration's totals."""
    total = collections.defaultdict(float)
    calls = collections.Counter()
    for name, us, _, _ in sample_list:
        total[name] += us
        calls[name] += 1
    summed = sum(total.values())
    rows = [
        {
            "name": name,
            "calls_per_iter": calls[name] / iters,
            "total_us_per_iter": us / iters,
            "mean_us": us / calls[name],
            "share": us / summed if summed > 0 else 0.0,
            "launched_by": (launched_by or {}).get(name, []),
        }
        for name, us in sorted(total.items(), key=lambda item: -item[1])
    ]
    span = (max(s[3] for s in sample_list) - min(s[2] for s in sample_list)) if sample_list else 0.0
    return rows, {"summed_us_per_iter": summed / iters, "span_us_per_iter": span / iters}


def kernel_bytes(name: str, shape: OpShape, itemsize: int = 4) -> int | None:
    """Bytes ``KERNEL_TRAFFIC`` says kernel ``name`` moves at ``shape`` (mem in ``itemsize`` bytes), or None."""
    # A prefix too, in case a Triton version appends a specialization to the kernel's name.
    key = next((k for k in KERNEL_TRAFFIC if name == k or name.startswith(k + "_")), None)
    if key is None:
        return None
    mem_passes, vectors = KERNEL_TRAFFIC[key]
    return mem_passes * shape.B * shape.N * shape.M * itemsize + vectors * shape.B * shape.H * shape.N * 4


def add_bandwidth(rows: list[dict], shape: OpShape, copy_GBps: float | None) -> None:
    """Model bytes, achieved GB/s and fraction of the copy bandwidth on the rows of modelled kernels."""
    for row in rows:
        nbytes = kernel_bytes(row["name"], shape)
        if nbytes is None or row["mean_us"] <= 0:
            continue
        row["model_bytes"] = nbytes
        row["GBps"] = nbytes / (row["mean_us"] * 1e-6) / 1e9
        if copy_GBps:
            row["frac_copy"] = row["GBps"] / copy_GBps


# ---------------------------------------------------------------- output


def short_name(name: str, width: int = 90) -> str:
    """A kernel's name without the namespaces that every torch kernel repeats, cut to ``width``."""
    for noise in ("void ", "at::native::", "(anonymous namespace)::"):
        name = name.replace(noise, "")
    return name if len(name) <= width else name[: width - 3] + "..."


def format_table(result: dict, top: int | None = None) -> list[str]:
    """The printed table of one (shape, op) profile, its ``top`` rows (all where None)."""
    cuda = result["events"] == "cuda"
    head = (f"=== {result['shape']} / {result['op']}: {EVENT_KINDS[result['events']][0]}, {result['backend']} "
            f"backend, {result['iters']} iterations")
    total = f"    summed {result['summed_us_per_iter']:.1f} us/iter, span {result['span_us_per_iter']:.1f} us/iter"
    if result.get("step_GBps"):
        total += f"; step byte model over the summed time: {result['step_GBps']:.0f} GB/s"
        if result.get("step_frac_copy"):
            total += f" ({100 * result['step_frac_copy']:.0f}% of copy)"
    lines = [head, total]
    cuda_head = f" {'GB/s':>7} {'copy':>5}  {'launched by':22}" if cuda else ""
    lines.append(f"    {'share':>6} {'us/iter':>9} {'calls':>5} {'mean us':>9}{cuda_head}  name")
    rows = result["rows"] if top is None else result["rows"][:top]
    for row in rows:
        cols = ""
        if cuda:
            cols = f" {row['GBps']:7.0f}" if "GBps" in row else f" {'':7}"
            cols += f" {100 * row['frac_copy']:4.0f}%" if "frac_copy" in row else f" {'':5}"
            cols += f"  {(','.join(row['launched_by']) or '-')[:22]:22}"
        lines.append(f"    {100 * row['share']:5.1f}% {row['total_us_per_iter']:9.1f} {row['calls_per_iter']:5.3g} "
                     f"{row['mean_us']:9.2f}{cols}  {short_name(row['name'])}")
    if len(rows) < len(result["rows"]):
        lines.append(f"    ... {len(result['rows']) - len(rows)} more rows in the JSON")
    return lines


# ---------------------------------------------------------------- main


def profile_shape(shape: OpShape, device: torch.device, iters: int, warmup: int, copy_GBps: float | None):
    """The profile of the forward and of the forward + backward at ``shape``: one result dict each."""
    calls, backend = make_calls(shape, device)
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    common.synchronize(device)
    step_bytes = common.op_bytes(shape)
    results = []
    for op in OPS:
        events = profile_call(calls[op], device, iters)
        kind = device.type
        rows, totals = aggregate(samples(events, kind), iters, launchers(events) if kind == "cuda" else None)
        result = {"shape": shape.name, "dims": shape.as_dict(), "op": op, "backend": backend, "events": kind,
                  "iters": iters, **totals, "rows": rows}
        if kind == "cuda":
            add_bandwidth(rows, shape, copy_GBps)
            if totals["summed_us_per_iter"] > 0:
                result["step_GBps"] = step_bytes[op] / (totals["summed_us_per_iter"] * 1e-6) / 1e9
                if copy_GBps:
                    result["step_frac_copy"] = result["step_GBps"] / copy_GBps
        results.append(result)
    return results


def main(argv=None) -> int:
    shapes = {**OP_SHAPES, **TINY_OP_SHAPES}
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help=f"comma-separated, from {', '.join(shapes)}")
    ap.add_argument("--iters", type=int, default=20, help="profiled calls of each op (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="calls of each op before profiling (default 3)")
    ap.add_argument("--top", type=int, default=30, help="rows printed per table (default 30; the JSON has all)")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"), help="folder for kernel_profile.json")
    args = ap.parse_args(argv)
    if args.iters < 1 or args.warmup < 1:
        ap.error("--iters and --warmup must be at least 1")
    names = [n for n in args.shapes.split(",") if n]
    unknown = [n for n in names if n not in shapes]
    if unknown:
        ap.error(f"unknown shapes {unknown}; known: {', '.join(shapes)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    device = torch.device(args.device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "kernel_profile.json")

    copy = common.copy_bandwidth(device) if device.type == "cuda" else None
    copy_GBps = copy["copy_GBps"] if copy else None
    traffic = {name: {"mem_passes": m, "vectors": v} for name, (m, v) in KERNEL_TRAFFIC.items()}
    result = {"environment": common.environment(device), "events": EVENT_KINDS[device.type][1], "iters": args.iters,
              "copy_GBps": copy_GBps, "kernel_traffic": traffic, "profiles": []}
    env = result["environment"]
    print(f"kernel_profile on {env['device']} (torch {env['torch']}, triton {env['triton']})")
    print(f"events aggregated: {result['events']}")
    if copy_GBps:
        print(f"copy bandwidth: {copy_GBps:.0f} GB/s (bytes read + written)")
    status = 0
    for name in names:
        for profile in profile_shape(shapes[name], device, args.iters, args.warmup, copy_GBps):
            result["profiles"].append(profile)
            print("\n".join(format_table(profile, args.top)))
            if not profile["rows"]:
                print(f"    no {EVENT_KINDS[profile['events']][0]} recorded (CUPTI unavailable or not permitted?)")
                status = 1
            # Written after every profile: a run cut off by its time limit keeps what it measured.
            common.write_json(path, result)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    common.write_json(path, result)
    print(f"written {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
