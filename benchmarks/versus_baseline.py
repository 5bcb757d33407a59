"""fastntm's copy-task training step against the baseline's, side by side: the issue's CPU targets.

    python -m benchmarks.versus_baseline                       # copy-b1 and copy-b32, 16 rounds of 5 steps
    python -m benchmarks.versus_baseline --shapes copy-b32 --rounds 30 --out runs/versus
    python -m benchmarks.versus_baseline --compiled          # fastntm with backend="compiled" too

The targets are ratios, fastntm at least 2x faster than the NTM code in common use at batch 1 and 8x at
batch 32, while this VM's pace moves by up to 2x between minutes. So every step is built in one process,
each checked first (``benchmarks.cases``: fastntm's against the float64 literal reference, the
baseline's, a model of that code in ``benchmarks.baseline_ntm``, against its own float64 copy), and timed
in short rounds that alternate between them (ABC CBA order): all see the same load to within seconds. A
round's figure is the p50 of a few steps; the speed-up is the median over rounds of the paired ratio
``baseline / fastntm``, with its range and how many rounds met the target. Same threads for both (torch's
default here); writes ``versus_baseline.json`` (machine, versions, commit, every round) to ``--out``.

``--pytorch-ntm PATH`` times a clone of that code too (``git clone
https://github.com/loudinthecloud/pytorch-ntm PATH``; its ``ntm`` package imported from there, nothing of it
kept here), in the same rounds, stepped as its ``train_batch`` steps it: the ratio ``pytorch-ntm /
baseline`` says how closely the model keeps to it, and ``pytorch-ntm / fastntm`` is the target's own ratio.

fastntm runs with its default backend (``auto``: the numba kernels on a CPU where numba imports), whose
ratios are at the top level of the JSON; the same model on the plain PyTorch path (``backend="reference"``)
runs in the same rounds, its ratios under ``reference``. ``--compiled`` adds fastntm with
``backend="compiled"`` (``fastntm.backend``: its step through ``torch.compile``, Inductor's C++ on a CPU) to
the same rounds; its ratios are under ``compiled``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

from fastntm.backend import resolve as resolve_backend

from . import cases, common
from .cases import BASELINE, COMPILED, Case
from .shapes import TINY_TRAIN_SHAPES, TRAIN_SHAPES

TARGETS = {"copy-b1": 2.0, "copy-b32": 8.0}  # the issue's: baseline / fastntm at least this
PYTORCH_NTM = "pytorch-ntm"


def p50_ms(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def pytorch_ntm_problem(path: str) -> str | None:
    """Why ``path`` is not a pytorch-ntm clone, or None."""
    if not os.path.isfile(os.path.join(path, "ntm", "aio.py")):
        return f"--pytorch-ntm {path}: no ntm/aio.py there; clone loudinthecloud/pytorch-ntm into it"
    return None


def pytorch_ntm_step(path: str, shape):
    """The copy-task training step of a pytorch-ntm clone at ``path``, as its ``train_batch`` runs one (less
    its cost count, as for the baseline): feed the sequence and the delimiter, then read ``length`` outputs
    with no input into a zeros tensor, ``BCELoss``, backward, gradients clamped to [-10, 10], RMSprop."""
    problem = pytorch_ntm_problem(path)
    if problem:
        raise RuntimeError(problem)
    sys.path.insert(0, os.path.abspath(path))
    try:
        from ntm.aio import EncapsulatedNTM
    finally:
        sys.path.pop(0)
    task, batch = cases.copy_batch(shape, torch.device("cpu"))
    inputs, targets = batch.inputs[: shape.length + 1], batch.targets[shape.length + 1 :]
    torch.manual_seed(0)
    # One "head" there is a read head and a write head.
    net = EncapsulatedNTM(task.input_size, task.output_size, shape.controller_size, 1, 1, shape.N, shape.M)
    criterion = nn.BCELoss()
    optimiser = torch.optim.RMSprop(net.parameters(), lr=1e-4, momentum=0.9, alpha=0.95)

    def step():
        optimiser.zero_grad()
        net.init_sequence(inputs.shape[1])
        for x in inputs:
            net(x)
        y = torch.zeros(targets.shape)
        for i in range(shape.length):
            y[i], _ = net()
        loss = criterion(y, targets)
        loss.backward()
        for p in net.parameters():
            if p.grad is not None:
                p.grad.clamp_(-10, 10)
        optimiser.step()
        return loss

    if not torch.isfinite(step()):
        raise RuntimeError(f"--pytorch-ntm {path} at {shape.name}: the loss is not finite; nothing timed")
    return step


def default_backend() -> str:
    """What ``auto`` runs on a CPU where ``FASTNTM_BACKEND`` is not set: the numba kernels where numba imports."""
    try:
        return resolve_backend("numba", "cpu")
    except RuntimeError:
        return "reference"


def _paired(numerators, denominators, target=None) -> dict:
    """The paired ratios ``numerators[i] / denominators[i]``: every one, median, range, rounds at ``target``."""
    ratios = [n / d for n, d in zip(numerators, denominators)]
    return dict(ratios=ratios, median=statistics.median(ratios), min=min(ratios), max=max(ratios),
                rounds_meeting_target=None if target is None else sum(r >= target for r in ratios))


def compare(shape, rounds: int, steps: int, pytorch_ntm: str | None = None, compiled: bool = False,
            log=print) -> dict:
    """Check every provider at ``shape`` (raising on a mismatch), then time them in alternating rounds
    (with fastntm's compiled memory step too if ``compiled``, and a pytorch-ntm clone's step, given its path)."""
    device = torch.device("cpu")
    steps_of = {}
    errors = {}
    default = default_backend()  # a provider's name is its backend's
    fastntm = tuple(dict.fromkeys((default, "reference", *((COMPILED,) if compiled else ()))))
    for provider in (*fastntm, BASELINE):
        case = Case("train_step", shape, provider, device)
        case.prepare()
        tolerance = common.TOLERANCE[torch.float32]
        if not case.rel_err <= tolerance:  # NaN included
            raise RuntimeError(f"{case.name}: relative error {case.rel_err:.2e} > {tolerance:.0e}; nothing timed")
        steps_of[provider], errors[provider] = case.fn, case.rel_err
    if pytorch_ntm:
        if shape.R != 1 or shape.W != 1:
            raise RuntimeError(f"--pytorch-ntm runs one read and one write head; {shape.name} has {shape.R} + {shape.W}")
        steps_of[PYTORCH_NTM] = pytorch_ntm_step(pytorch_ntm, shape)
    names = list(steps_of)
    p50s = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            p50s[name].append(p50_ms(steps_of[name], steps))
    target = TARGETS.get(shape.name)
    vs_baseline = _paired(p50s[BASELINE], p50s[default], target)
    result = dict(
        shape=shape.name, shape_params=shape.as_dict(), rounds=rounds, steps=steps, rel_err=errors, p50_ms=p50s,
        backend=default,
        fastntm_median_ms=statistics.median(p50s[default]), baseline_median_ms=statistics.median(p50s[BASELINE]),
        speedup_median=vs_baseline["median"], speedup_min=vs_baseline["min"], speedup_max=vs_baseline["max"],
        speedups=vs_baseline["ratios"], target=target, rounds_meeting_target=vs_baseline["rounds_meeting_target"],
    )
    met = "" if target is None else f"; target {target:g}x met in {result['rounds_meeting_target']} of {rounds} rounds"
    log(f"{shape.name}: fastntm ({default}) {result['fastntm_median_ms']:.1f} ms, baseline "
        f"{result['baseline_median_ms']:.1f} ms (medians of {rounds} rounds of {steps} steps); baseline / fastntm "
        f"paired: median {result['speedup_median']:.2f}x, range {result['speedup_min']:.2f} - "
        f"{result['speedup_max']:.2f}{met}")
    if default != "reference":
        over_reference = _paired(p50s[BASELINE], p50s["reference"], target)
        result["reference"] = dict(median_ms=statistics.median(p50s["reference"]), baseline_over_reference=over_reference,
                                   default_over_reference=_paired(p50s[default], p50s["reference"]))
        met = "" if target is None else f"; target {target:g}x met in {over_reference['rounds_meeting_target']} of {rounds}"
        log(f"{shape.name}: fastntm (reference) {result['reference']['median_ms']:.1f} ms; baseline / reference "
            f"paired: median {over_reference['median']:.2f}x, range {over_reference['min']:.2f} - "
            f"{over_reference['max']:.2f}{met}; {default} / reference "
            f"{result['reference']['default_over_reference']['median']:.3f}")
    if compiled:
        over_compiled = _paired(p50s[BASELINE], p50s[COMPILED], target)
        result["compiled"] = dict(
            median_ms=statistics.median(p50s[COMPILED]), baseline_over_compiled=over_compiled,
            compiled_over_default=_paired(p50s[COMPILED], p50s[default]),
        )
        met = "" if target is None else f"; target {target:g}x met in {over_compiled['rounds_meeting_target']} of {rounds}"
        log(f"{shape.name}: fastntm compiled {result['compiled']['median_ms']:.1f} ms; baseline / compiled paired: "
            f"median {over_compiled['median']:.2f}x, range {over_compiled['min']:.2f} - {over_compiled['max']:.2f}{met}; "
            f"compiled / {default} {result['compiled']['compiled_over_default']['median']:.3f}")
    if pytorch_ntm:
        real = p50s[PYTORCH_NTM]
        over_fastntm = _paired(real, p50s[default], target)
        over_baseline = _paired(real, p50s[BASELINE])
        result.update(pytorch_ntm=os.path.abspath(pytorch_ntm), pytorch_ntm_median_ms=statistics.median(real),
                      pytorch_ntm_speedup_median=over_fastntm["median"],
                      pytorch_ntm_speedup_min=over_fastntm["min"], pytorch_ntm_speedup_max=over_fastntm["max"],
                      pytorch_ntm_over_baseline_median=over_baseline["median"],
                      pytorch_ntm_over_baseline_min=over_baseline["min"],
                      pytorch_ntm_over_baseline_max=over_baseline["max"])
        log(f"{shape.name}: pytorch-ntm {result['pytorch_ntm_median_ms']:.1f} ms; pytorch-ntm / fastntm paired: median "
            f"{over_fastntm['median']:.2f}x ({over_fastntm['min']:.2f} - {over_fastntm['max']:.2f}); "
            f"pytorch-ntm / baseline: {over_baseline['median']:.3f} ({over_baseline['min']:.3f} - "
            f"{over_baseline['max']:.3f})")
        if compiled:
            real_over_compiled = _paired(real, p50s[COMPILED], target)
            result["compiled"]["pytorch_ntm_over_compiled"] = real_over_compiled
            log(f"{shape.name}: pytorch-ntm / fastntm compiled paired: median {real_over_compiled['median']:.2f}x "
                f"({real_over_compiled['min']:.2f} - {real_over_compiled['max']:.2f})")
    return result


def main(argv=None) -> int:
    known = {**TRAIN_SHAPES, **TINY_TRAIN_SHAPES}
    ap = argparse.ArgumentParser(prog="python -m benchmarks.versus_baseline", description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(TRAIN_SHAPES),
                    help=f"comma-separated names of benchmarks.shapes' training shapes ({', '.join(known)})")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="steps a round")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/versus", help="folder for versus_baseline.json")
    ap.add_argument("--pytorch-ntm", metavar="PATH", help="a clone of loudinthecloud/pytorch-ntm, timed too")
    ap.add_argument("--compiled", action="store_true",
                    help="time fastntm with backend='compiled' too (its memory step through torch.compile; the "
                         "compile, tens of seconds a shape, before the rounds)")
    args = ap.parse_args(argv)
    names = args.shapes.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        ap.error(f"--shapes: {', '.join(unknown)} not among {', '.join(known)}")
    if args.rounds < 1 or args.steps < 1:
        ap.error(f"--rounds and --steps must be positive, got {args.rounds} and {args.steps}")
    if args.pytorch_ntm and pytorch_ntm_problem(args.pytorch_ntm):
        ap.error(pytorch_ntm_problem(args.pytorch_ntm))
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        ap.error(f"--out {args.out} cannot be the results folder: {exc.strerror or exc}")
    env = common.environment(torch.device("cpu"))
    print(f"benchmarks.versus_baseline on {env['device']}, {torch.get_num_threads()} threads")
    result = {"environment": env, "args": vars(args), "shapes": []}
    for name in names:
        try:
            result["shapes"].append(compare(known[name], args.rounds, args.steps, args.pytorch_ntm, args.compiled))
        except RuntimeError as exc:
            print(f"versus_baseline: {exc}", file=sys.stderr)
            return 1
        common.write_json(os.path.join(args.out, "versus_baseline.json"), result)
    print(f"results: {os.path.join(args.out, 'versus_baseline.json')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
