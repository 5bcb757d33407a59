"""Run the benchmarks: check, warm, time, print a table, write JSON and a plot.

    python -m benchmarks.run --quick                     # CPU, under two minutes
    python -m benchmarks.run --device cuda --out runs/bench
    python -m benchmarks.run --filter 'train_step'       # cases whose name matches
    python -m benchmarks.run --providers reference,triton-graph --filter train_step
    python -m benchmarks.run --filter long_sequence      # the long-sequence benchmark

Every case (``op/shape/provider``, see ``benchmarks.cases``) is first built,
warmed (compiled, for ``reference-compile``, ``reference-compile-graph`` and ``compiled``) and
checked against the float64 literal reference; only then is it timed: the uncompiled cases all
warmed before any is timed, then each compiled case timed as soon as it is warm (every
``reference-compile-graph`` row before any ``reference-compile`` row: a budget that runs out
skips the less fair rival), and ``results.json``
written after every timing (a compile cut short by an outer timeout loses only the
compiled rows not yet timed). A case that fails to build or
compile is a ``skipped`` row with its error; one whose relative error exceeds
the tolerance is a ``MISMATCH`` row and gets no speed figure.

Columns: p50 (p20-p80) ms per call; ms/seq, a training step divided by its batch;
peak MiB beyond what was allocated before the call (``benchmarks.common``);
GB/s, the byte model's least traffic over p50, and its fraction of the
device-to-device copy bandwidth measured at the start of the same run.

Writes ``results.json`` (machine, versions, commit, every figure) and
``bench.png`` (time and bandwidth against N) into ``--out``. The long-sequence
benchmark (``benchmarks.long_sequence``) takes minutes, so it runs only when
``--filter`` names it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import torch

from . import common
from .cases import (COMPILE_GRAPH, COMPILE_PROVIDERS, OPS, TRAIN_ONLY_PROVIDERS, WHOLE_MODEL_COMPILES, Case,
                    Unavailable, providers_for, train_only_providers_for)
from .shapes import OP_SHAPES, QUICK_SKIP, TINY_OP_SHAPES, TINY_TRAIN_SHAPES, TRAIN_SHAPES, in_sweep

# torch.compile takes tens of seconds a graph on a CPU; these shapes keep a run bounded (the compiled providers'
# training steps, ``compiled`` and ``reference-compile``, run in full mode: ``benchmarks.versus_baseline --compiled``
# times ``compiled`` against the baseline).
COMPILE_SHAPES = {
    ("cpu", "quick"): {"paper-b32"},
    ("cpu", "full"): {"paper-b1", "paper-b32", "medium", "copy-b1", "copy-b32"},
    ("cuda", "quick"): {"paper-b32", "copy-b32"},
    ("cuda", "full"): {"paper-b1", "paper-b32", "medium", "large", "copy-b1", "copy-b32"},
}
COMPILE_OPS_QUICK_CPU = {"memory_step.fwd_bwd"}
# (seconds of timing a case, least calls timed); do_bench on CUDA adds its own warm-up.
TIMING = {("cpu", "tiny"): (0.05, 3), ("cpu", "quick"): (0.4, 5), ("cpu", "full"): (2.0, 10),
          ("cuda", "tiny"): (0.05, 3), ("cuda", "quick"): (0.2, 5), ("cuda", "full"): (1.0, 10)}
# A compile starts only with this much of the budget left: about one graph of the memory step, forward and
# backward; for a training step of ``reference-compile`` or ``reference-compile-graph``, the whole model's
# (copy-b32: 277 s on the 2-core CPU at stop 37, 90 - 100 s on the H200 at stop 38; tiny-copy 58 s on the CPU).
COMPILE_RESERVE_S = {"cpu": 40, "cuda": 30}
MODEL_COMPILE_RESERVE_S = {"cpu": 300, "cuda": 120}
LONG_SEQUENCE = "long_sequence"


def build_cases(device: torch.device, mode: str, providers, pattern: str | None) -> list[Case]:
    """Every case of this run: the training steps first (the figures a short budget must not lose),
    compiled ones last (so a budget cuts them first)."""
    if mode == "tiny":
        op_shapes, train_shapes = TINY_OP_SHAPES, TINY_TRAIN_SHAPES
    else:
        skip = QUICK_SKIP[device.type] if mode == "quick" else set()
        op_shapes = {k: v for k, v in OP_SHAPES.items() if k not in skip}
        train_shapes = TRAIN_SHAPES
    compile_shapes = COMPILE_SHAPES.get((device.type, mode), set(op_shapes) | set(train_shapes))
    cases = []  # shape by shape, so that providers share one float64 reference
    groups = [("train_step", shape) for shape in train_shapes.values()]
    groups += [(op, shape) for shape in op_shapes.values() for op in OPS if op != "train_step"]
    for op, shape in groups:
        for provider in providers:
            if provider in TRAIN_ONLY_PROVIDERS and op != "train_step":
                continue
            if provider in COMPILE_PROVIDERS:
                if shape.name not in compile_shapes:
                    continue
                if (device.type, mode) == ("cpu", "quick") and op not in COMPILE_OPS_QUICK_CPU:
                    continue
            cases.append(Case(op, shape, provider, device))
    if pattern:
        cases = [c for c in cases if re.search(pattern, c.name)]
    # A budget cuts from the end: the sweep's extra points, then the compiled rows; of these the compiled model in
    # a CUDA graph, triton-graph's fairest rival, goes first.
    return sorted(cases, key=lambda c: (c.provider in COMPILE_PROVIDERS, c.provider != COMPILE_GRAPH,
                                        c.shape.name.startswith("sweep-")))


def row_of(case: Case) -> dict:
    return {"name": case.name, "op": case.op, "shape": case.shape.name, "shape_params": case.shape.as_dict(),
            "provider": case.provider, "batch": case.batch, "bytes_model": case.bytes_moved(), "status": "pending"}


def run_cases(cases: list[Case], device: torch.device, copy: dict, *, time_per_case_s: float, min_reps: int,
              budget_s: float, on_row=lambda rows: None, log=print) -> list[dict]:
    """Warm, check and time every case: first the uncompiled cases, all warmed before any is timed; then the
    compiled ones, each timed as soon as it is warm (a whole model's compile takes minutes on a CPU and about
    100 s on an H200). ``on_row`` saves the rows after every timing, so a compile that outlasts the caller's
    patience (an outer ``timeout``) costs only the compiled rows not yet timed; their rows say ``pending``."""
    start = time.perf_counter()
    rows = {c.name: row_of(c) for c in cases}
    ready = []
    for case in (c for c in cases if c.provider not in COMPILE_PROVIDERS):
        waiting_s = sum(_timing_s(c, time_per_case_s, min_reps) for c in ready)
        if _warm(case, rows[case.name], device, start, budget_s, waiting_s, time_per_case_s, log):
            ready.append(case)
    on_row(list(rows.values()))
    for case in ready:
        _time(case, rows[case.name], device, copy, time_per_case_s, min_reps, log)
        on_row(list(rows.values()))
    for case in (c for c in cases if c.provider in COMPILE_PROVIDERS):
        if _warm(case, rows[case.name], device, start, budget_s, 0.0, time_per_case_s, log):
            _time(case, rows[case.name], device, copy, time_per_case_s, min_reps, log)
        on_row(list(rows.values()))
    return list(rows.values())


def _timing_s(case: Case, time_per_case_s: float, min_reps: int) -> float:
    """Seconds that timing a warm ``case`` will take: ``time_call``'s budget or its least calls, whichever is
    longer, then one call under the profiler for the peak memory (counted twice: the profiler's own cost)."""
    return max(time_per_case_s, min_reps * case.call_s) + 2 * case.call_s + 0.3


def _compile_reserve_s(case: Case) -> float:
    """Seconds of budget a case must find left to start its warm-up: its compile's, if it compiles."""
    if case.provider not in COMPILE_PROVIDERS:
        return 0.0
    whole_model = case.op == "train_step" and case.provider in WHOLE_MODEL_COMPILES
    return (MODEL_COMPILE_RESERVE_S if whole_model else COMPILE_RESERVE_S)[case.device.type]


def _warm(case, row, device, start, budget_s, waiting_s, time_per_case_s, log) -> bool:
    """Build, warm and check ``case`` (its row says how it went); whether it is ready to time. The cases warmed
    before it wait to be timed, which takes ``waiting_s`` (``_timing_s``) of the budget too. (A count of them
    at ``time_per_case_s`` each let slow cases, whose least calls take seconds, run the budget over.)"""
    left = budget_s - (time.perf_counter() - start)
    reserve = _compile_reserve_s(case)
    if left < reserve + waiting_s + time_per_case_s + 0.3:
        why = f", under its compile's {reserve:.0f} s" if reserve else ""
        row.update(status="skipped", error=f"time budget spent before warm-up ({left:.0f} s left{why})")
        if reserve:
            log(f"  skipped {case.name}: {row['error']}")
        return False
    t0 = time.perf_counter()
    try:
        case.prepare()
    except Exception as exc:
        # Skipped: a provider this machine cannot run, a shape its memory cannot hold, or a compiler's failure
        # (Inductor without a C++ compiler, say). Any other failure is fastntm's or the benchmark's: an error row,
        # and the run fails.
        skipped = isinstance(exc, (Unavailable, torch.cuda.OutOfMemoryError)) or case.provider in COMPILE_PROVIDERS
        _fail(case, row, "skipped" if skipped else "error", exc, device, log)
        return False
    case.warmup_s = time.perf_counter() - t0
    tolerance = common.TOLERANCE[torch.float32]
    row.update(rel_err=case.rel_err, tolerance=tolerance, warmup_s=case.warmup_s)
    if not case.rel_err <= tolerance:  # NaN included
        row.update(status="MISMATCH")
        case.fn = None
        log(f"  MISMATCH {case.name}: relative error {case.rel_err:.2e} > {tolerance:.0e}")
        return False
    try:
        case.call_s = _one_call_s(case, device)
    except Exception as exc:  # it ran in the check: a call that fails now is an error
        _fail(case, row, "error", exc, device, log)
        return False
    log(f"  warm {case.name} ({case.warmup_s:.1f} s, err {case.rel_err:.1e})")
    return True


def _fail(case, row, status, exc, device, log) -> None:
    row.update(status=status, error=f"{type(exc).__name__}: {exc}"[:500])
    log(f"  {status} {case.name}: {row['error'].splitlines()[0][:160]}")
    case.fn = None
    _release(device)


def _time(case, row, device, copy, time_per_case_s, min_reps, log) -> None:
    """Time and measure a warmed case into its row."""
    try:
        timing = common.time_call(case.fn, device, budget_s=time_per_case_s, min_reps=min_reps)
        memory = common.peak_memory(case.fn, device)
    except Exception as exc:
        row.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500])
        return
    finally:
        case.fn = None
        _release(device)
    row.update(status="ok", **timing, **memory, ms_per_sequence=timing["p50_ms"] / case.batch)
    if row["bytes_model"]:
        row["GBps"] = row["bytes_model"] / (timing["p50_ms"] * 1e-3) / 1e9
        row["frac_copy"] = row["GBps"] / copy["copy_GBps"]
    log(f"  timed {case.name}: p50 {timing['p50_ms']:.3f} ms")


def _one_call_s(case: Case, device: torch.device) -> float:
    """One call of a warm case, timed: what its timing will cost is judged from it."""
    common.synchronize(device)
    t0 = time.perf_counter()
    case.fn()
    common.synchronize(device)
    return time.perf_counter() - t0


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def format_table(rows: list[dict], copy: dict, env: dict) -> str:
    lines = [f"fastntm benchmarks on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
             f"commit {(env['commit'] or '?')[:12]}); copy bandwidth {copy['copy_GBps']:.1f} GB/s",
             f"{'case':44} {'status':8} {'rel err':>8} {'p50 ms':>9} {'p20-p80 ms':>19} {'ms/seq':>8} "
             f"{'peak MiB':>9} {'GB/s':>7} {'%copy':>6}"]
    for r in rows:
        err = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else "-"
        if r.get("status") != "ok":
            lines.append(f"{r['name']:44} {r.get('status', '?'):8} {err:>8}  {r.get('error', '')[:90]}")
            continue
        gbps = f"{r['GBps']:7.1f}" if "GBps" in r else f"{'-':>7}"
        frac = f"{100 * r['frac_copy']:5.1f}%" if "frac_copy" in r else f"{'-':>6}"
        lines.append(f"{r['name']:44} {'ok':8} {err:>8} {r['p50_ms']:9.3f} {r['p20_ms']:9.3f}-{r['p80_ms']:<9.3f} "
                     f"{r['ms_per_sequence']:8.3f} {r['peak_bytes'] / 2**20:9.2f} {gbps} {frac}")
    return "\n".join(lines)


def plot(rows: list[dict], copy: dict, env: dict, path: str) -> bool:
    """Time and achieved bandwidth of ``memory_step`` against N, one line per provider; False if nothing to plot."""
    points = [r for r in rows if r.get("status") == "ok" and r["op"] != "train_step" and in_sweep(r["shape"])]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), sharex=True)
    for col, op in enumerate(("memory_step.fwd", "memory_step.fwd_bwd")):
        for provider in sorted({r["provider"] for r in points}):
            mine = sorted((r for r in points if r["op"] == op and r["provider"] == provider),
                          key=lambda r: r["shape_params"]["N"])
            if not mine:
                continue
            n = [r["shape_params"]["N"] for r in mine]
            axes[0, col].plot(n, [r["p50_ms"] for r in mine], marker="o", label=provider)
            axes[0, col].fill_between(n, [r["p20_ms"] for r in mine], [r["p80_ms"] for r in mine], alpha=0.2)
            axes[1, col].plot(n, [r["GBps"] for r in mine], marker="o", label=provider)
        axes[1, col].axhline(copy["copy_GBps"], color="k", linestyle="--", label="copy")
        shape = next((r["shape_params"] for r in points if r["op"] == op), None)
        heads = f", B {shape['B']}, M {shape['M']}, {shape['R']}+{shape['W']} heads" if shape else ""
        axes[0, col].set_title(f"{op}{heads}")
        axes[0, col].set_ylabel("p50 ms (p20-p80 shaded)")
        axes[1, col].set_ylabel("GB/s (byte model / p50)")
        axes[1, col].set_xlabel("N (memory slots)")
        for ax in axes[:, col]:
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.suptitle(f"fastntm memory_step on {env['device']} (torch {env['torch']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer shapes and repeats (CPU: under two minutes)")
    size.add_argument("--tiny", action="store_true", help="toy shapes, seconds in all (the smoke test)")
    ap.add_argument("--filter", type=_pattern, default=None, help="regex on case names (op/shape/provider); "
                    f"'{LONG_SEQUENCE}' runs the long-sequence benchmark")
    ap.add_argument("--providers", default=None, help="comma-separated subset of the device's providers")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/bench", help="folder for results.json, bench.png")
    ap.add_argument("--budget", type=_seconds, default=None, help="seconds for warm-ups and timing (cases past it "
                    "are skipped rows); default 90 quick, 60 tiny, 1800 full")
    ap.add_argument("--long-gpu-large", action="store_true",
                    help="with the long-sequence benchmark on CUDA: also B 16, N 65536, M 64, T 1000")
    return ap.parse_args(argv)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def _pattern(text: str) -> str:
    try:
        re.compile(text)
    except re.error as exc:
        raise argparse.ArgumentTypeError(f"not a regular expression: {exc}") from None
    return text


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks.run: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    budget = args.budget if args.budget is not None else {"tiny": 60, "quick": 90, "full": 1800}[mode]
    available = providers_for(device) + train_only_providers_for(device)
    providers = args.providers.split(",") if args.providers is not None else list(available)
    if "" in providers or len(set(providers)) < len(providers):
        print(f"benchmarks.run: --providers {args.providers!r} must name each provider once, comma-separated, from "
              f"{available}", file=sys.stderr)
        return 2
    unknown = [p for p in providers if p not in available]
    if unknown:
        print(f"benchmarks.run: providers {unknown} not available on {device.type}; choose from {available}",
              file=sys.stderr)
        return 2
    cases = build_cases(device, mode, providers, args.filter)
    if not cases and not (args.filter and re.search(args.filter, LONG_SEQUENCE)):
        names = [c.name for c in build_cases(device, mode, providers, None)]
        example = f", named op/shape/provider as {names[0]}" if names else ""
        print(f"benchmarks.run: --filter {args.filter!r} matches none of this run's {len(names)} cases ({mode}, "
              f"{device.type}, providers {', '.join(providers)}){example}", file=sys.stderr)
        return 2
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as exc:
        why = "a file of that name is there" if isinstance(exc, FileExistsError) else exc.strerror
        print(f"benchmarks.run: --out {args.out} cannot be the results folder: {why}", file=sys.stderr)
        return 2
    json_path = os.path.join(args.out, "results.json")

    env = common.environment(device)
    copy = common.copy_bandwidth(device)
    print(f"benchmarks.run on {env['device']}: {mode}, providers {', '.join(providers)}; "
          f"copy bandwidth {copy['copy_GBps']:.1f} GB/s")
    result = {"environment": env, "mode": mode, "args": vars(args), "copy": copy, "byte_model": _byte_model_doc(),
              "rows": []}

    def save(rows):
        result["rows"] = rows
        common.write_json(json_path, result)

    t0 = time.perf_counter()
    per_case, min_reps = TIMING[device.type, mode]
    rows = run_cases(cases, device, copy, time_per_case_s=per_case, min_reps=min_reps, budget_s=budget, on_row=save)
    result["wall_s"] = time.perf_counter() - t0

    if args.filter and re.search(args.filter, LONG_SEQUENCE):
        from . import long_sequence

        result["long_sequence"] = long_sequence.run(device, args.out, mode=mode, gpu_large=args.long_gpu_large)
    save(rows)
    if rows:
        print(format_table(rows, copy, env))
    if plot(rows, copy, env, os.path.join(args.out, "bench.png")):
        print(f"plot: {os.path.join(args.out, 'bench.png')}")
    print(f"results: {json_path} ({result['wall_s']:.0f} s)")
    bad = [r["name"] for r in rows if r.get("status") in ("MISMATCH", "error")]
    if bad:
        print(f"not ok: {', '.join(bad)}")
    return 1 if bad else 0


def _byte_model_doc() -> str:
    doc = common.__doc__
    return doc[doc.index("Byte model"):].strip()


if __name__ == "__main__":
    sys.exit(main())
