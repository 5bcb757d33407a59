"""Device ops of a copy-task training step, per time step: what a CUDA graph of the step replays.

Under a CUDA graph (``CapturedStep``, the ``triton-graph`` provider) a training step at the paper's
size costs about its number of kernels times a few microseconds each, whatever the kernels do, so
that number is the figure a change to the step's op sequence moves. This counts it on a CPU: a
dispatch mode below autograd sees every op of the forward (model and loss) and of the backward,
and counts those that would run a device kernel. Views, allocations and the value checks that a CPU
call makes and a CUDA call skips are left out; a Triton custom op counts one. The launches
themselves are stubbed out (``host_overhead.stubbed_launches``): the count depends on the shapes
alone. Per time step is the slope between two sequence lengths; the rest is the fixed part (the
output layer, the loss, the stacking, less what the last step's backward skips: its new memory reaches
no loss), which can be negative.

On a CPU, PyTorch runs ``nn.LSTMCell`` as a dozen ops that CUDA runs as two matmuls and one fused
kernel, and the backward's weight-gradient sums differ too, so the totals here are higher than a
GPU's. The other ops map one to one, so differences between two trees are the same on a GPU.

With ``--memory-step SHAPE`` it counts instead the launches of one memory step alone at a shape of
``benchmarks/shapes.py`` (batch 1; the count does not depend on it), forward and backward with every
gradient given: Triton's launches (recorded, not made) and the torch ops between them (the sums of
block partials), which a plain call pays a few microseconds each for, on the GPU and on the host.

    python -m benchmarks.launch_count [--batch 32] [--json out.json]
    python -m benchmarks.launch_count --memory-step large
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os

if __name__ == "__main__":  # as in host_overhead: imported, it leaves the process's choice alone
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from fastntm import FastNTM, validation  # noqa: E402

from . import host_overhead, launches  # noqa: E402
from .cases import masked_bce  # noqa: E402
from .shapes import OP_SHAPES  # noqa: E402

# Ops that run no device kernel: allocations, metadata, and CPU-only value reads.
NO_KERNEL = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty", "aten.detach",
             "aten.promote_types", "aten.unsafe_split", "aten.split_with_sizes", "aten.unbind",
             "aten._local_scalar_dense", "aten.aminmax"}
BACKENDS = ("reference", "triton")


class DeviceOps(TorchDispatchMode):
    """Counts, by op name, the ops that reach a kernel."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if not func.is_view and name not in NO_KERNEL:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


def count_step(backend: str, batch: int, length: int) -> dict[str, collections.Counter]:
    """Device ops of the forward and of the backward of one training step on the copy task."""
    from fastntm.tasks import make_task

    task = make_task("copy")
    data = task.batch(batch, torch.Generator().manual_seed(0), length=length)
    torch.manual_seed(0)
    model = FastNTM(task.input_size, task.output_size, backend=backend)
    stub = host_overhead.stubbed_launches() if backend == "triton" else contextlib.nullcontext()
    with stub, host_overhead.patched([(validation, "_values_checked", lambda device: False)]):
        with DeviceOps() as forward:
            logits, _ = model(data.inputs)
            loss = masked_bce(logits, data)
        with DeviceOps() as backward:
            loss.backward()
    return {"forward": forward.counts, "backward": backward.counts, "steps": data.inputs.shape[0]}


def run(batch: int = 32, lengths: tuple[int, int] = (2, 4)) -> dict:
    """Per backend and pass: ops per time step (slope over ``lengths``), fixed ops, and the per-step ops by
    name."""
    result = {"batch": batch, "lengths": list(lengths), "backends": {}}
    for backend in BACKENDS:
        short, long = (count_step(backend, batch, n) for n in lengths)
        steps = long["steps"] - short["steps"]
        rows = {}
        for part in ("forward", "backward"):
            per_step = {op: (long[part][op] - short[part][op]) / steps for op in long[part]}
            per_step = {op: n for op, n in sorted(per_step.items(), key=lambda kv: -kv[1]) if n}
            total = sum(per_step.values())
            rows[part] = {"per_time_step": total, "fixed": sum(short[part].values()) - total * short["steps"],
                          "by_op": per_step}
        result["backends"][backend] = rows
    return result


def count_memory_step(shape_name: str) -> dict[str, dict]:
    """Triton launches (by kernel) and torch device ops (by op) of one memory step's forward and backward."""
    shape = OP_SHAPES[shape_name]
    ms, R = launches.memory_step, shape.R
    args = launches.memory_step_args(shape)
    with launches.recording() as fwd_launches, DeviceOps() as fwd_ops:
        w, r, new, K, mx, se = ms._forward(*args, R, True)
    with launches.recording() as bwd_launches, DeviceOps() as bwd_ops:
        ms._backward(*args, w, K, mx, se, w, r, new, R)
    return {part: {"triton": dict(collections.Counter(launch.name for launch in ls)), "torch": dict(ops.counts)}
            for part, ls, ops in (("forward", fwd_launches, fwd_ops), ("backward", bwd_launches, bwd_ops))}


def report_memory_step(shape_name: str, result: dict) -> str:
    lines = [f"launches of one memory step at the {shape_name} shape, counted on the CPU"]
    for part, row in result.items():
        triton_n, torch_n = sum(row["triton"].values()), sum(row["torch"].values())
        by_count = sorted(row["torch"].items(), key=lambda kv: -kv[1])
        ops = ", ".join(f"{op.removeprefix('aten.')} {n}" for op, n in by_count)
        lines.append(f"{part:9} Triton {triton_n:2} ({', '.join(row['triton'])})")
        lines.append(f"{'':9} torch  {torch_n:2} ({ops})")
    return "\n".join(lines)


def report(result: dict) -> str:
    lines = [f"device ops of a copy-task training step (B {result['batch']}), counted on the CPU",
             f"{'backend':10} {'pass':9} {'per time step':>13} {'fixed':>6}  largest per time step"]
    for backend, rows in result["backends"].items():
        for part, row in rows.items():
            top = ", ".join(f"{op.removeprefix('aten.')} {n:g}" for op, n in list(row["by_op"].items())[:6])
            lines.append(f"{backend:10} {part:9} {row['per_time_step']:13g} {row['fixed']:6g}  {top}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--memory-step", choices=sorted(OP_SHAPES), help="count one memory step at this shape instead")
    ap.add_argument("--json", help="also write the counts here")
    args = ap.parse_args(argv)
    if args.memory_step:
        result = count_memory_step(args.memory_step)
        print(report_memory_step(args.memory_step, result))
    else:
        result = run(args.batch)
        print(report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
