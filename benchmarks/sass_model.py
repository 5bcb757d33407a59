"""Warp-instructions the Triton kernels of a memory step issue, read from their SASS: a GPU-free model of
whether the step can stream memory at the copy bandwidth.

An SM issues at most one warp-instruction a clock on each of its 4 schedulers. A kernel that needs more
issue slots than the bytes take to stream is bound by issue, not by bandwidth, and no block size fixes
that: only fewer instructions per byte do. The model prints, per launch and per step, warp-instructions
and their ratio to the memory rows (B * N), and two floors: issuing everything at 4 a clock on every SM
(or, for a grid too small to fill them, one program's warps on its SM), and moving the byte model's
bytes (``common.op_bytes``) at a given copy bandwidth.

Calibration: for the kernels an H200 ran at stop 6 (commit 1b069e7, ``benchmarks/results/h200-2026-11-26``),
this model counts 358 M warp-instructions for the large forward (fp32). They ran in 640 us, 31% of copy
bandwidth: about 2.1 a clock on each of 132 SMs, where the byte model's bytes alone needed 206 us. So
the SMs were issuing, not waiting on memory. Both figures here are floors; a measured time is the
larger of them over the efficiency each reaches (about half, for issue, in that run).

How: the host code runs at the shape with its launches recorded (``benchmarks/launches.py``), once for
the forward and once for the backward with every gradient given. Each launch is compiled for the target
as Triton's launcher would (16-byte aligned pointers, integers equal to 1 made constants) and
disassembled with line numbers (``nvdisasm -g``). A backward branch closes a loop; its trip count is
that of the ``for`` statement in the kernel files whose lines hold most of the loop's instructions
(innermost loops first, see ``loop_trips``), evaluated with the launch's integer arguments and the
kernel's assignments to plain names (a helper's loop bound is read with the kernel's names: right where
the helper's parameter is named as the argument it is given, as everywhere here). An
instruction counts once for each trip of every loop around it; both sides of other branches count (what
is emitted, not what a warp executes). The torch ops between launches (block-partial sums) are not
counted. ptxas unrolls some loops with a small body and a runtime trip count (the on-chip kernels' loops
over the shift taps where K > 1, S >= 5): a copy of several trips (given none), trips peeled off as
straight code (counted once), and a remainder loop of one trip (given every trip). There the count
overstates (before the on-chip kernels took K, at the paper's S = 3: 6 taps of about 28 instructions
counted at each of the forward's two call sites, where 3 run). At K = 1 the loops unroll whole and are
counted as they run.

    python -m benchmarks.sass_model [--shape large] [--dtype fp32] [--arch 90] [--blocks num_warps=1] [--json F]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
from typing import NamedTuple

if __name__ == "__main__":  # compiling needs the interpreter off; imported, it leaves the process's choice alone
    os.environ.setdefault("TRITON_INTERPRET", "0")

import torch  # noqa: E402

from fastntm.kernels import _config  # noqa: E402

from . import launches  # noqa: E402
from .common import op_bytes  # noqa: E402
from .shapes import OP_SHAPES  # noqa: E402

SMS, CLOCK_GHZ, ISSUE_PER_CLOCK = 132, 1.98, 4
"""An H100 SXM or H200: SMs, boost clock, warp-instructions an SM issues a clock."""
COPY_GBS = 4107.0
"""Device-to-device copy bandwidth measured on the H200 (``benchmarks/results/h200-2026-11-26``)."""


class Instruction(NamedTuple):
    address: int
    text: str
    file: str | None
    line: int | None


class ForStatement(NamedTuple):
    file: str
    first: int
    last: int
    bound: str
    """The trip count as an expression of the kernel's arguments (``stop - start`` of the range, over its step
    rounded up)."""
    names: tuple
    """(name, expression) of the function's top-level assignments to plain names (``W = H - R``), in order."""


def disassemble(compiled) -> tuple[list[Instruction], dict[str, int]]:
    """The kernel's SASS, each instruction with the source file and line it came from; the branch labels'
    addresses."""
    code, labels, pending, file, line = [], {}, [], None, None
    for row in launches.run_tool("nvdisasm", compiled, "-g", "-c").splitlines():
        where = re.match(r'\s*//## File "(.+)", line (\d+)', row)
        label = re.match(r"(\.L\w+):", row)
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", row)
        if where:
            file, line = where.group(1), int(where.group(2))
        elif label:
            pending.append(label.group(1))
        elif m:
            address = int(m.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            if not m.group(2).startswith("NOP"):
                code.append(Instruction(address, m.group(2), file, line))
    return code, labels


def for_statements() -> list[ForStatement]:
    """Every ``for ... in range(...)`` in the kernel files."""
    found = []
    for module in launches.KERNEL_MODULES:
        # By file name: Triton's cache may hold the kernel compiled from a copy of the file elsewhere.
        path = module.__file__
        with open(path) as f:
            tree = ast.parse(f.read())
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            names = tuple((a.targets[0].id, ast.unparse(a.value)) for a in fn.body
                          if isinstance(a, ast.Assign) and len(a.targets) == 1 and isinstance(a.targets[0], ast.Name))
            for node in ast.walk(fn):
                if isinstance(node, ast.For) and isinstance(node.iter, ast.Call) and node.iter.args:
                    args = [ast.unparse(a) for a in node.iter.args]
                    bound = args[0] if len(args) == 1 else f"({args[1]}) - ({args[0]})"
                    if len(args) == 3:
                        bound = f"-(-({bound}) // ({args[2]}))"
                    found.append(ForStatement(os.path.basename(path), node.lineno, node.end_lineno, bound, names))
    return found


def trip_count(statement: ForStatement, ints: dict[str, int]) -> int | None:
    """The statement's trip count with the launch's integer arguments, or None if it names something else."""
    space = dict(ints)
    for name, expression in statement.names:
        try:
            space[name] = eval(expression, {}, space)
        except (NameError, TypeError, AttributeError, ValueError, ZeroDivisionError):
            continue  # a tensor (``tl.arange``), or names not known here: left out
    try:
        return max(0, int(eval(statement.bound, {}, space)))
    except NameError:
        return None


def loop_trips(code: list[Instruction], labels: dict[str, int], fors: list[ForStatement], ints: dict[str, int]):
    """[(first address, last address, trips or None)] of the code's loops, innermost first.

    A loop is given the innermost ``for`` statement that holds at least half as many of its instructions
    as the statement holding most (instructions of an inner loop left out): the compiler moves a few of a
    statement's instructions into the loop of the statement inside it. Two loops given one statement
    are, with the same loop around them (or none), an unrolled copy and its remainder: the smaller is
    counted for every trip and the other not at all. Around different loops they are one helper inlined
    at two places (the line numbers do not say which), and each is counted in full."""
    loops = []
    for ins in code:
        target = re.search(r"\bBRA\b.*\((\.L\w+)\)", ins.text)
        if target and labels[target.group(1)] < ins.address:
            loops.append((labels[target.group(1)], ins.address))
    loops.sort(key=lambda lo_hi: lo_hi[1] - lo_hi[0])

    def parent(lo, hi):
        return next(((a, b) for a, b in loops if a <= lo and hi <= b and (a, b) != (lo, hi)), None)

    out, owner = [], {}
    for lo, hi in loops:
        inner = [(a, b) for a, b, _ in out if lo <= a and b <= hi]
        body = [i for i in code if lo <= i.address <= hi and not any(a <= i.address <= b for a, b in inner)]
        counts = {}
        for f in fors:
            # A statement already an inner loop's is not this loop's.
            if f in owner and any(lo <= a and b <= hi for a, b in owner[f]):
                continue
            counts[f] = sum(1 for i in body if i.file and os.path.basename(i.file) == f.file
                            and f.first <= i.line <= f.last)
        most = max(counts.values(), default=0)
        best = min((f for f, n in counts.items() if most and 2 * n >= most), key=lambda f: f.last - f.first,
                   default=None)
        trips = None
        if best is not None:
            if any(parent(a, b) == parent(lo, hi) for a, b in owner.get(best, ())):
                trips = 0
            else:
                trips = trip_count(best, ints)
            owner.setdefault(best, []).append((lo, hi))
        out.append((lo, hi, trips))
    return out


class Count(NamedTuple):
    name: str
    consts: dict
    warps: int
    programs: int
    regs: int
    per_warp: int
    """Warp-instructions a warp of one program issues."""
    static: int
    """Instructions in the kernel's code."""
    loops: list
    """(instructions in the body, trips or None) of each loop, innermost first."""

    @property
    def total(self) -> int:
        return self.per_warp * self.warps * self.programs

    def issue_floor_us(self) -> float:
        """Issuing every instruction: on all SMs at once, or, where the grid is small, one program's warps on
        its SM's schedulers, whichever takes longer."""
        one_program = self.per_warp * -(-self.warps // ISSUE_PER_CLOCK) / (CLOCK_GHZ * 1e3)
        return max(self.total / (SMS * ISSUE_PER_CLOCK * CLOCK_GHZ * 1e3), one_program)


def count_launch(launch: launches.Launch, fors, arch: int) -> Count:
    spec = launches.specialize(launch)
    compiled = launches.compile_kernel(spec, arch)
    code, labels = disassemble(compiled)
    ints = {**launches.bound_ints(launch), **{k: v for k, v in spec.consts.items() if isinstance(v, int)}}
    loops = loop_trips(code, labels, fors, ints)
    per_warp = 0
    for ins in code:
        times = 1
        for lo, hi, trips in loops:
            if lo <= ins.address <= hi:
                times *= 1 if trips is None else trips
        per_warp += times
    usage = launches.run_tool("cuobjdump", compiled, "--dump-resource-usage")
    regs = int(re.search(r"\bREG:(\d+)", usage).group(1))
    sizes = [sum(1 for i in code if lo <= i.address <= hi) for lo, hi, _ in loops]
    return Count(launch.name, spec.own_consts(), spec.options["num_warps"], launch.programs, regs, per_warp,
                 len(code), [(size, trips) for size, (*_, trips) in zip(sizes, loops)])


def record_step(shape, dtype: torch.dtype):
    """(forward launches, backward launches) of one memory step at ``shape``, batch 1 (a grid scales with B)."""
    ms, R = launches.memory_step, shape.R
    args = launches.memory_step_args(shape, dtype)
    with launches.recording() as fwd:
        w, r, new, K, mx, se = ms._forward(*args, R, True)
    with launches.recording() as bwd:
        ms._backward(*args, w, K, mx, se, w, r, new, R)
    return fwd, bwd


def model(shape, dtype: torch.dtype, arch: int) -> dict[str, list[Count]]:
    fors = for_statements()
    fwd, bwd = record_step(shape, dtype)
    return {part: [count_launch(launch._replace(grid=(launch.programs * shape.B,)), fors, arch) for launch in ls]
            for part, ls in (("fwd", fwd), ("bwd", bwd))}


def report(shape, dtype: torch.dtype, counts: dict[str, list[Count]], copy_gbs: float) -> str:
    rows = shape.B * shape.N
    lines = [f"{'kernel':26} {'config':44} {'warps':>5} {'regs':>4} {'programs':>9} {'per warp':>8} "
             f"{'M warp-instr':>12} {'per row':>8}"]
    totals, floors = {}, {}
    for part, cs in counts.items():
        for c in cs:
            cfg = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in c.consts.items())
            unknown = sum(trips is None for _, trips in c.loops)
            flag = f"  ({unknown} loop(s) of unknown trip count taken once)" if unknown else ""
            lines.append(f"{c.name:26} {cfg:44} {c.warps:>5} {c.regs:>4} {c.programs:>9} {c.per_warp:>8} "
                         f"{c.total / 1e6:>12.1f} {c.total / rows:>8.1f}{flag}")
        totals[part] = sum(c.total for c in cs)
        floors[part] = sum(c.issue_floor_us() for c in cs)
    totals["fwd_bwd"] = totals["fwd"] + totals["bwd"]
    floors["fwd_bwd"] = floors["fwd"] + floors["bwd"]
    nbytes = op_bytes(shape, dtype)
    lines.append(f"\n{shape.name} (B {shape.B}, N {shape.N}, M {shape.M}, {shape.R} + {shape.W} heads), "
                 f"{str(dtype).replace('torch.', '')}: floors at {SMS} SMs x {ISSUE_PER_CLOCK} a clock x "
                 f"{CLOCK_GHZ} GHz, and the byte model at {copy_gbs:.0f} GB/s")
    for part in ("fwd", "fwd_bwd"):
        bytes_us = nbytes[part] / (copy_gbs * 1e9) * 1e6
        lines.append(f"  {part:8} {totals[part] / 1e6:8.1f} M warp-instructions, {totals[part] / rows:6.1f} a memory "
                     f"row: issue floor {floors[part]:7.1f} us, bytes floor {bytes_us:7.1f} us")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="large", choices=sorted(OP_SHAPES))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--blocks", default="", help="force block choices, as FASTNTM_BLOCKS (num_warps=1,...)")
    parser.add_argument("--copy-gbs", type=float, default=COPY_GBS)
    parser.add_argument("--json", help="also write every count to this file")
    args = parser.parse_args(argv)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    settings = {k: int(v) for k, v in (item.split("=") for item in args.blocks.split(",") if item)}
    shape = OP_SHAPES[args.shape]
    with _config.force(**settings):
        counts = model(shape, dtype, args.arch)
    print(report(shape, dtype, counts, args.copy_gbs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape.as_dict(), "dtype": args.dtype, "arch": args.arch, "blocks": settings,
                       **{part: [{**c._asdict(), "total": c.total} for c in cs] for part, cs in counts.items()}},
                      f, indent=1)


if __name__ == "__main__":
    main()
