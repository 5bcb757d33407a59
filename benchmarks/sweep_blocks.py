"""Block-size sweep of the fused memory step on one CUDA GPU: which configuration is fastest.

    python -m benchmarks.sweep_blocks --quick --out runs/sweep      # paper-b32 and large, about 2 minutes
    python -m benchmarks.sweep_blocks --out runs/sweep              # also medium, and vector-pass blocks
    python -m benchmarks.sweep_blocks --quick --budget 100          # stops cleanly after 100 s

Each configuration is forced with ``fastntm.kernels._config.force`` (nothing is edited), for the
shapes of ``benchmarks.shapes``:

* large memory (``large``, ``medium``): the forward's similarity pass, its read-write pass and the
  backward's passes over memory apart, each with the others at their defaults, then the best of
  each together. The similarity pass: ``sim_block_n`` in {16, 32, 64} x ``sim_warps`` in {1, 2}.
  The read-write pass: ``BN`` in {16, 32, 64, 128} x ``num_warps`` in {1, 2, 4, 8}; one warp makes
  every reduction over a block's rows a warp shuffle, with no barrier across warps (the similarity
  pass makes two such reductions a head and a block, the read-write pass one a read head). The
  backward: ``bwd_block_n`` in the same x ``bwd_warps`` in {2, 4, 8}. They alternate (see the run
  time below). ``--quick`` keeps, for the similarity pass, those of at most 64 fp32 elements a
  thread (one tile: 5 of 6 at BM = 64), for the read-write pass, of at most 64 (it holds two tiles: 13 of 16),
  and for the backward, of at most 32 (9 of 12: compiled ahead of time for sm_90 at BM = 64, fp32,
  three of those spilled when last checked, 8 to 480 bytes: BN 32 at 2 warps, BN 64 at 4, BN 128 at
  8, and all three left out do, up to 2.9 KB). The vector pass stays at its default; without
  ``--quick``, vector-pass blocks in ``VECTOR_BLOCKS`` at the default BN and warps.
* on-chip (``paper-b32``): the forward's warps {2, 4, 8, 16} with the backward's at default, the
  backward's {4, 8, 16} with the forward's at default (the two kernels are timed apart, as the
  forward alone and in forward + backward), then the best of each together.

Before anything is timed, the default configuration's outputs and gradients are checked against
``fastntm.reference`` (relative error), then every configuration runs forward + backward once under
NaN-poisoned buffers and is compared with the default's (``allclose``). A configuration that fails
(validation, compilation, launch) or mismatches is a row with a note and no time. That first run
records each kernel it launched with Triton's ``n_regs`` and ``n_spills`` (filled in when a compiled
kernel is first loaded on the device; ``n_spills`` is its local memory in 4-byte words, so spill
bytes are 4 x that). Then ``triton.testing.do_bench`` times the forward and forward + backward, and
``do_bench_cudagraph`` does too (the primary timing, by which rows are ranked and combined). Plain
calls of the large shape's forward + backward leave the GPU waiting on the host between the backward's
launches, and the wait moves: the H100 runs ``results/h100-2026-11-26-b``, ``-c`` and ``-d`` timed
shapes over 64 MiB by plain calls only, and forward + backward less the forward, in rows whose backward
was the same configuration, ranged over 886 to 1,148 us in run b, 952 to 1,227 in c, 889 to 1,037 in d:
a backward setting could win by that alone.

Prints per shape a table sorted by time and the best configuration per timing with its speedup over
the default and its bandwidth: the byte model of ``benchmarks.common.op_bytes`` over p50, and its
fraction of the device-to-device copy bandwidth measured in the same run. Writes
``sweep_blocks.json`` into ``--out`` after every configuration, so a run stopped by a time limit
keeps what it measured.

Run time with ``--quick``: on the H100 at 7077bea (``benchmarks/results/h100-2026-11-26-d/``, budget
30 s) the paper shape's 6 configurations and 16 of the large shape's 21 took 33 s in all, 0.3 to 4.5 s
each, most of it compiling; the similarity axis adds 4 large-shape configurations of one new kernel each,
and the large shape's CUDA-graph timings (added since) two captures and 50 ms replays a configuration,
not yet run on a GPU.
``--budget`` bounds it: no configuration starts that would not end in time at the pace of the one
before. The similarity pass's, the read-write pass's and the backward's candidates take turns, so
that a budget cut leaves every axis timed, and their combination: the forward passes' fewest warps
first (one warp is what the forward sweep is for), the backward's fewest elements per thread first
(the likeliest to spill last).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import math
import os
import sys
import time
from typing import Callable

import torch

from fastntm import kernels, reference
from fastntm.kernels import _config

from . import common
from .shapes import OP_SHAPES

LARGE_BLOCK_N = (16, 32, 64, 128)
LARGE_FWD_WARPS = (1, 2, 4, 8)
LARGE_BWD_WARPS = (2, 4, 8)
SIM_BLOCK_N = (16, 32, 64)
SIM_WARPS = (1, 2)
QUICK_MAX_PER_THREAD = {"fwd": 64, "bwd": 32, "sim": 64}
"""--quick: the most fp32 elements of a BN x BM tile per thread a large-memory forward (two tiles live),
backward (up to five) and similarity-pass (one) configuration may hold."""
VECTOR_BLOCKS = (256, 512, 2048, 4096)
ONCHIP_FWD_WARPS = (2, 4, 8, 16)
"""At 7077bea an H100 ran the paper-size forward in 17.3, 7.5 and 5.8 us at 2, 4 and 8 warps (CUDA graph,
``results/h100-2026-11-26-d``), and at one warp it spilled (40.8 us): 16 is the next point of that trend
(no spill, sm_90)."""
ONCHIP_BWD_WARPS = (2, 8, 16)
"""Around the default 4 (``fastntm.kernels._config.ONCHIP_BWD_WARPS``)."""
QUICK_SHAPES = ("paper-b32", "large")
FULL_SHAPES = ("paper-b32", "large", "medium")
CHECK_RTOL = 1e-3
CHECK_ATOL = 1e-4
"""Of the largest magnitude of the default's tensor: a block size changes the order of the fp32 sums."""
LAUNCH_OPTIONS = ("num_warps", "num_stages", "maxnreg")
TIMINGS = ("fwd", "fwd_bwd", "fwd_graph", "fwd_bwd_graph")

Timer = Callable[[Callable[[], object]], dict]


@dataclasses.dataclass(frozen=True)
class Candidate:
    axis: str
    """What the configuration varies: default, fwd, bwd (the forward's or backward's blocks and warps),
    combined (the best of the two), or vector."""
    settings: dict


def candidates(shape, quick: bool) -> list[Candidate]:
    """The configurations to try at ``shape``, the default first (see the module docstring)."""
    default = _config.choose(shape.N, shape.M)
    out = [Candidate("default", {})]
    if default.onchip:
        out += [Candidate("fwd", dict(onchip_warps=w)) for w in ONCHIP_FWD_WARPS]
        out += [Candidate("bwd", dict(onchip_bwd_warps=w)) for w in ONCHIP_BWD_WARPS]
        return out
    # The backward and the vector pass at their defaults in the forward's rows: a forced BN alone would
    # force them too.
    held = dict(vector_block=default.BV, bwd_block_n=default.bwd_BN, bwd_warps=default.bwd_warps,
                sim_block_n=default.sim_BN, sim_warps=default.sim_warps)
    axes = {}
    for axis, block_ns, warps in (("sim", SIM_BLOCK_N, SIM_WARPS), ("fwd", LARGE_BLOCK_N, LARGE_FWD_WARPS),
                                  ("bwd", LARGE_BLOCK_N, LARGE_BWD_WARPS)):
        grid = [(bn, w) for bn in block_ns for w in warps
                if not quick or bn * default.BM / (32 * w) <= QUICK_MAX_PER_THREAD[axis]]
        if axis == "sim":
            axes[axis] = [Candidate(axis, dict(sim_block_n=bn, sim_warps=w))
                          for bn, w in sorted(grid, key=lambda c: (c[1], c[0]))]
        elif axis == "fwd":
            axes[axis] = [Candidate(axis, dict(block_n=bn, num_warps=w, **held))
                          for bn, w in sorted(grid, key=lambda c: (c[1], c[0]))]
        else:
            axes[axis] = [Candidate(axis, dict(bwd_block_n=bn, bwd_warps=w))
                          for bn, w in sorted(grid, key=lambda c: (c[0] * default.BM / (32 * c[1]), -c[1]))]
    out += [c for group in itertools.zip_longest(axes["sim"], axes["fwd"], axes["bwd"]) for c in group
            if c is not None]
    if not quick:
        out += [Candidate("vector", dict(vector_block=v)) for v in VECTOR_BLOCKS]
    return out


def label(blk) -> str:
    if blk.onchip:
        return f"on-chip BN {blk.BN} warps {blk.num_warps} bwd {blk.bwd_warps}"
    return (f"BN {blk.BN} warps {blk.num_warps} sim BN {blk.sim_BN} warps {blk.sim_warps} BV {blk.BV} "
            f"bwd BN {blk.bwd_BN} warps {blk.bwd_warps}")


# ---------------------------------------------------------------- kernels launched, registers and spills


class _Recording:
    """Stands in for a ``@triton.jit`` kernel: launches it and records the launch."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def call(*args, **kwargs):
            compiled = launch(*args, **kwargs)
            self.launches.append(dict(
                kernel=self.name,
                consts={k: v for k, v in kwargs.items() if k not in LAUNCH_OPTIONS},
                num_warps=kwargs.get("num_warps"), maxnreg=kwargs.get("maxnreg"),
                # A CompiledKernel on a GPU; the interpreter returns nothing.
                n_regs=getattr(compiled, "n_regs", None), n_spills=getattr(compiled, "n_spills", None)))
            return compiled

        return call


class recording_launches:
    """Within the block, every kernel launch of ``fastntm.kernels.memory_step`` is appended to ``launches``."""

    def __init__(self):
        self.module = importlib.import_module("fastntm.kernels.memory_step")
        self.launches: list[dict] = []
        self.saved = {n: k for n, k in vars(self.module).items() if n.endswith("_kernel")}

    def __enter__(self):
        for name, kernel in self.saved.items():
            setattr(self.module, name, _Recording(name, kernel, self.launches))
        return self.launches

    def __exit__(self, *exc):
        for name, kernel in self.saved.items():
            setattr(self.module, name, kernel)


def distinct_kernels(launches: list[dict]) -> list[dict]:
    out = {}
    for launch in launches:
        key = (launch["kernel"], tuple(sorted(launch["consts"].items())), launch["num_warps"])
        out.setdefault(key, launch)
    return list(out.values())


def spill_bytes(kernels: list[dict]) -> int | None:
    known = [k["n_spills"] for k in kernels if k["n_spills"] is not None]
    return 4 * max(known) if known else None


# ---------------------------------------------------------------- timers


def cuda_timer(fn) -> dict:
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return dict(p50_us=p50 * 1e3, p20_us=p20 * 1e3, p80_us=p80 * 1e3)


def cuda_graph_timer(fn) -> dict:
    from triton.testing import do_bench_cudagraph

    torch.cuda.synchronize()
    p50, p20, p80 = do_bench_cudagraph(fn, rep=50, quantiles=[0.5, 0.2, 0.8])
    return dict(p50_us=p50 * 1e3, p20_us=p20 * 1e3, p80_us=p80 * 1e3)


# ---------------------------------------------------------------- the sweep of one shape


def _run_step(step, x, R, cot) -> list[torch.Tensor]:
    """Outputs and every input gradient of one forward + backward."""
    xs = [t.detach().requires_grad_() for t in x]
    out = step(*xs, R)
    return [o.detach() for o in out] + list(torch.autograd.grad(out, xs, cot))


def _mismatch(outs, refs) -> str | None:
    names = ("w", "r", "new_mem", *(f"d{n}" for n in ("mem", "k", "beta", "g", "s", "gamma", "w_prev", "e", "a")))
    for name, o, r in zip(names, outs, refs):
        atol = CHECK_ATOL * r.abs().max().item() if r.numel() else 0.0
        if not torch.allclose(o, r, rtol=CHECK_RTOL, atol=atol):
            return f"{name} differs from the default's: relative error {common.rel_err(o, r):.1e}"
    return None


def _timed(timer, fn) -> dict:
    try:
        return timer(fn)
    except Exception as exc:  # a capture that fails still leaves the eager figures
        return dict(error=f"{type(exc).__name__}: {exc}"[:300])


def sweep_shape(shape, device, cands: list[Candidate], *, timer: Timer, graph_timer: Timer | None,
                copy_GBps: float, out: dict, deadline: float = math.inf, step=None,
                on_progress: Callable[[], None] = lambda: None, log=print) -> dict:
    """Check and time every candidate at ``shape`` (the default first), filling ``out`` (rows, best, ...) as
    it goes and calling ``on_progress`` after each row. ``step``: the memory step under test
    (``fastntm.kernels.memory_step`` by default)."""
    x = common.op_inputs(shape, device)
    graph = graph_timer is not None
    timings = TIMINGS if graph else TIMINGS[:2]
    out.update(shape=shape.as_dict(), bytes_model=common.op_bytes(shape), timings=list(timings),
               primary=timings[-1], rows=[], best={}, stopped=None)
    cot = common.cotangents(reference.memory_step(*x, shape.R))
    run = _Run(shape, x, cot, step or kernels.memory_step, timer, graph_timer if graph else None, copy_GBps, out, log)
    last_s = 0.0
    pending, combined = list(cands), False
    while pending:
        cand = pending.pop(0)
        if time.perf_counter() + last_s > deadline:
            blk = run.blocks(cand)
            if blk is None or blk not in run.seen:  # a repeat of a timed configuration is no loss
                out["rows"].append(dict(axis=cand.axis, settings=cand.settings, status="skipped",
                                        note="time budget spent", **({"label": label(blk)} if blk else {})))
            out["stopped"] = "budget"
            continue
        t0 = time.perf_counter()
        row = run.candidate(cand)
        if row is not None:
            _best(out)
            on_progress()
            if cand.axis == "default" and row["status"] != "ok":
                out["stopped"] = f"default {row['status']}"
                log(f"  nothing timed at {shape.name}: the default configuration is {row['status']}")
                return out
            last_s = time.perf_counter() - t0
        if not pending and not combined:
            pending, combined = _combined(out["rows"], graph), True
    return out


class _Run:
    """The inputs, the default's results and the timers of one shape's sweep."""

    def __init__(self, shape, x, cot, step, timer, graph_timer, copy_GBps, out, log):
        self.shape, self.x, self.cot, self.step = shape, x, cot, step
        self.xg = [t.detach().requires_grad_() for t in x]
        self.timer, self.graph_timer, self.copy_GBps, self.out, self.log = timer, graph_timer, copy_GBps, out, log
        self.expected = _run_step(reference.memory_step, x, shape.R, cot)
        self.default = None
        self.seen = set()

    def blocks(self, cand: Candidate):
        """The blocks ``cand`` forces at this shape, or None where its settings are refused."""
        try:
            with _config.force(**cand.settings):
                return _config.choose(self.shape.N, self.shape.M)
        except ValueError:
            return None

    def candidate(self, cand: Candidate) -> dict | None:
        """Check and time one configuration and append its row; None (no row) where an earlier one had the
        same effective blocks."""
        row = dict(axis=cand.axis, settings=cand.settings)
        t0 = time.perf_counter()
        try:
            with _config.force(**cand.settings):
                blk = _config.choose(self.shape.N, self.shape.M)
                if blk in self.seen:
                    return None
                self.seen.add(blk)
                row.update(label=label(blk), blocks=dataclasses.asdict(blk))
                with recording_launches() as launches, _config.poison():
                    outs = _run_step(self.step, self.x, self.shape.R, self.cot)
        except Exception as exc:  # a configuration that does not build or launch here is a row, not the end
            return self._add(row, "failed", f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        kernels = distinct_kernels(launches)
        row.update(kernels=kernels, spill_bytes=spill_bytes(kernels),
                   max_regs=max((k["n_regs"] for k in kernels if k["n_regs"] is not None), default=None))
        if self.default is None:
            err = row["rel_err_reference"] = common.max_rel_err(outs, self.expected)
            if not err <= common.TOLERANCE[torch.float32]:
                return self._add(row, "MISMATCH", f"differs from the reference: relative error {err:.1e}")
            self.default = outs
        else:
            bad = _mismatch(outs, self.default)
            if bad:
                return self._add(row, "MISMATCH", bad)
        row["check_s"] = time.perf_counter() - t0
        spilling = [k for k in kernels if k["n_spills"]]
        if spilling:
            self.log(f"  {row['label']}: SPILLS " + ", ".join(f"{k['kernel']} {4 * k['n_spills']} B" for k in spilling))
        step, x, xg, R, cot = self.step, self.x, self.xg, self.shape.R, self.cot
        timers = {"fwd": (self.timer, lambda: step(*x, R)),
                  "fwd_bwd": (self.timer, lambda: torch.autograd.grad(step(*xg, R), xg, cot))}
        if self.graph_timer:
            timers.update(fwd_graph=(self.graph_timer, timers["fwd"][1]),
                          fwd_bwd_graph=(self.graph_timer, timers["fwd_bwd"][1]))
        with _config.force(**cand.settings):
            for key, (timer, fn) in timers.items():
                row[key] = _timed(timer, fn)
                if "p50_us" in row[key]:
                    gbps = self.out["bytes_model"][key.removesuffix("_graph")] / (row[key]["p50_us"] * 1e-6) / 1e9
                    row[key].update(GBps=gbps, frac_copy=gbps / self.copy_GBps)
        row["seconds"] = time.perf_counter() - t0
        figures = ", ".join(f"{k} {row[k]['p50_us']:.1f} us" if "p50_us" in row[k] else f"{k} {row[k]['error']}"
                            for k in timers)
        return self._add(row, "ok", f"{figures} ({row['seconds']:.1f} s)")

    def _add(self, row: dict, status: str, note: str) -> dict:
        row.update(status=status, note=note)
        self.out["rows"].append(row)
        self.log(f"  {row.get('label', row['settings'])}: {'' if status == 'ok' else status + ': '}{note}")
        return row


def _combined(rows: list[dict], graph: bool) -> list[Candidate]:
    """The best settings of each axis swept apart (the forward's and the similarity pass's by the forward's
    time, the backward's by forward + backward), together. An axis not swept (on-chip: no similarity pass)
    is left out; with fewer than two swept, nothing to combine."""
    fwd_key, bwd_key = ("fwd_graph", "fwd_bwd_graph") if graph else ("fwd", "fwd_bwd")
    combined, swept = {}, 0
    for axis, key in (("fwd", fwd_key), ("sim", fwd_key), ("bwd", bwd_key)):
        timed = [r for r in rows if r["axis"] in (axis, "default") and "p50_us" in r.get(key, {})]
        if any(r["axis"] == axis for r in timed):
            swept += 1
            best = min(timed, key=lambda r: r[key]["p50_us"])["settings"]
            combined.update(best)  # after the forward's, which holds the others at their defaults
    return [Candidate("combined", combined)] if swept >= 2 else []


def _best(out: dict) -> None:
    """``out["best"]``: the fastest configuration per timing so far, with its speedup over the default."""
    rows = [r for r in out["rows"] if r.get("status") == "ok"]
    default = next((r for r in rows if r["axis"] == "default"), None)
    for key in out["timings"]:
        timed = [r for r in rows if "p50_us" in r.get(key, {})]
        if not timed:
            continue
        best = min(timed, key=lambda r: r[key]["p50_us"])
        entry = dict(label=best["label"], settings=best["settings"], **best[key])
        if default and "p50_us" in default.get(key, {}):
            entry.update(default_p50_us=default[key]["p50_us"], speedup=default[key]["p50_us"] / best[key]["p50_us"])
        out["best"][key] = entry


# ---------------------------------------------------------------- report


def table(name: str, out: dict) -> list[str]:
    timings, primary = out["timings"], out["primary"]
    head = f"{'configuration':46} {'status':8}" + "".join(f" {k + ' us':>16}" for k in timings)
    head += f" {'fwd frac':>8} {'f+b frac':>8} {'regs':>4} {'spill B':>7} {'check s':>7}"
    lines = [f"sweep {name} {out['shape']} (sorted by {primary} p50; frac: of the copy bandwidth)", head]

    def order(r):
        return r.get(primary, {}).get("p50_us", math.inf)

    for r in sorted(out["rows"], key=order):
        cells = "".join(f" {r[k]['p50_us']:16.1f}" if "p50_us" in r.get(k, {}) else f" {'-':>16}" for k in timings)
        fracs = "".join(f" {r[k]['frac_copy']:8.3f}" if "frac_copy" in r.get(k, {}) else f" {'-':>8}"
                        for k in ("fwd", "fwd_bwd"))
        regs = "-" if r.get("max_regs") is None else r["max_regs"]
        spill = "-" if r.get("spill_bytes") is None else r["spill_bytes"]
        check = f"{r['check_s']:7.1f}" if "check_s" in r else f"{'-':>7}"
        tag = (r.get("label") or str(r["settings"])) + (" *" if r["axis"] == "default" else "")
        lines.append(f"{tag[:46]:46} {r['status']:8}{cells}{fracs} {regs:>4} {spill:>7} {check}")
        if r["status"] != "ok":
            lines.append(f"{'':46}   {r['note']}")
    lines.append("  * the default configuration")
    lines += best_lines(name, out)
    return lines


def as_env(settings: dict) -> str:
    """The settings as ``FASTNTM_BLOCKS`` takes them, to rerun a configuration."""
    return f"{_config.ENV}=" + ",".join(f"{k}={v}" for k, v in settings.items()) if settings else "the default"


def best_lines(name: str, out: dict) -> list[str]:
    lines = []
    for key, b in out.get("best", {}).items():
        speed = f", {b['speedup']:.2f}x the default's {b['default_p50_us']:.1f} us" if "speedup" in b else ""
        frac = f", {b['GBps']:.0f} GB/s = {100 * b['frac_copy']:.0f}% of copy" if "frac_copy" in b else ""
        lines.append(f"  best {name} {key}: {b['label']} ({as_env(b['settings'])}): {b['p50_us']:.1f} us{speed}{frac}")
    if out.get("stopped"):
        lines.append(f"  {name}: stopped ({out['stopped']})")
    return lines


# ---------------------------------------------------------------- command line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"shapes {', '.join(QUICK_SHAPES)}; fewer configurations")
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/sweep"), help="folder for sweep_blocks.json")
    ap.add_argument("--budget", type=float, default=math.inf, help="seconds; no configuration starts after")
    ap.add_argument("--shapes", help=f"comma-separated names from benchmarks.shapes.OP_SHAPES (default: "
                                     f"{','.join(QUICK_SHAPES)} with --quick, else {','.join(FULL_SHAPES)})")
    args = ap.parse_args(argv)
    start = time.perf_counter()
    if not torch.cuda.is_available():
        print("sweep_blocks: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured",
              file=sys.stderr)
        return 2
    if os.environ.get(_config.ENV):
        print(f"sweep_blocks: unset {_config.ENV}: it would change the default configuration the sweep compares "
              "against", file=sys.stderr)
        return 2
    names = args.shapes.split(",") if args.shapes else list(QUICK_SHAPES if args.quick else FULL_SHAPES)
    unknown = [n for n in names if n not in OP_SHAPES]
    if unknown:
        print(f"sweep_blocks: unknown shapes {unknown}; choose from {list(OP_SHAPES)}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "sweep_blocks.json")
    device = torch.device("cuda")
    copy = common.copy_bandwidth(device)
    result = dict(environment=common.environment(device), copy=copy, quick=args.quick,
                  budget_s=None if math.isinf(args.budget) else args.budget, shapes={})
    print(f"sweep_blocks on {result['environment']['device']}: copy bandwidth {copy['copy_GBps']:.0f} GB/s")

    def save():
        result["wall_s"] = time.perf_counter() - start
        common.write_json(path, result)

    for name in names:
        shape = OP_SHAPES[name]
        out = result["shapes"][name] = {}
        if time.perf_counter() >= start + args.budget:
            out.update(shape=shape.as_dict(), rows=[], best={}, stopped="budget")
            continue
        cands = candidates(shape, args.quick)
        print(f"{name}: {len(cands)} configurations")
        sweep_shape(shape, device, cands, timer=cuda_timer, graph_timer=cuda_graph_timer,
                    copy_GBps=copy["copy_GBps"], out=out, deadline=start + args.budget, on_progress=save)
        print("\n".join(table(name, out)), flush=True)
        torch.cuda.empty_cache()
    save()
    print(f"\nsweep_blocks: best per shape ({result['wall_s']:.0f} s)")
    for name, out in result["shapes"].items():
        print("\n".join(best_lines(name, out)))
    print(f"written {path}")
    # Configurations that fail are findings; a default that fails or mismatches the reference is not.
    return 1 if any(str(out.get("stopped")).startswith("default") for out in result["shapes"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
