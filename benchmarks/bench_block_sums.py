"""The sums of block partials in the large-memory step: ``_sum_blocks_kernel`` against torch's sum.

    python -m benchmarks.bench_block_sums --out results/      # writes results/block_sums.json

The large-memory passes over memory leave per-block partials (B, NB, X): the reads' in the forward,
dL/de's and dL/da's (one buffer) and dL/dk's in the backward, at the NB that the dispatch's blocks give at
each shape. For each, ``torch.sum(parts, 1)`` (what the step took before ``_sum_blocks_kernel``) and the
kernel at its default loads and at others (rows, columns, warps) are first checked against a float64 sum,
then timed, p50 of ``triton.testing.do_bench_cudagraph`` (CUDA) or of plain calls (CPU, under the Triton
interpreter: a smoke test, not a speed). A device-to-device copy measured in the same run gives the
bandwidth the bytes moved (the partials read, the sums written) are held against.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

from . import common
from .shapes import OP_SHAPES

DEFAULT_SHAPES = ("large", "medium")
# (rows, columns, warps) of a load; the first is the dispatch's default.
CONFIGS = ((256, 16, 8), (128, 16, 4), (256, 32, 8), (128, 32, 4), (64, 64, 4), (512, 16, 8))


def partials(shape) -> dict[str, tuple[int, ...]]:
    """The (B, NB, X) of each sum of block partials in one memory step at ``shape``."""
    from fastntm.kernels import _config

    blk = _config.choose(shape.N, shape.M)
    if blk.onchip:
        return {}
    nb, nb_bwd = _config.n_blocks(shape.N, blk.BN), _config.n_blocks(shape.N, blk.memory_bwd[0])
    return {"reads": (shape.B, nb, shape.R * shape.M), "de+da": (2 * shape.B, nb_bwd, shape.W * shape.M),
            "dk": (shape.B, nb_bwd, shape.H * shape.M)}


def time_us(fn, device: torch.device) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench_cudagraph

        return do_bench_cudagraph(fn, rep=50) * 1e3
    fn()
    return common.time_call(fn, device, budget_s=0.2, min_reps=2)["p50_ms"] * 1e3


def measure(dims: tuple[int, ...], device: torch.device, configs, copy_gbps: float | None) -> list[dict]:
    ms = importlib.import_module("fastntm.kernels.memory_step")  # the module, not the function of its name
    parts = torch.randn(dims, generator=torch.Generator().manual_seed(0)).to(device)
    ref = parts.double().sum(1)
    nbytes = (parts.numel() + ref.numel()) * 4
    providers = {"torch": lambda: parts.sum(1)}
    for rows, cols, warps in configs:
        providers[f"kernel r{rows} c{cols} w{warps}"] = (
            lambda rows=rows, cols=cols, warps=warps: ms._sum_blocks(parts, torch.float32, rows, cols, warps))
    out = []
    for name, fn in providers.items():
        err = common.rel_err(fn(), ref)
        row = {"provider": name, "rel_err": err}
        if err <= 1e-6:
            row["p50_us"] = time_us(fn, device)
            row["GBps"] = nbytes / (row["p50_us"] * 1e-6) / 1e9
            if copy_gbps:
                row["frac_copy"] = row["GBps"] / copy_gbps
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"), help="folder for block_sums.json")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shapes", default=",".join(DEFAULT_SHAPES), help="comma-separated names from OP_SHAPES")
    ap.add_argument("--configs", type=int, default=len(CONFIGS), help="time the first this many of CONFIGS")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_block_sums: the kernel needs CUDA, or TRITON_INTERPRET=1 on the CPU", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    copy = common.copy_bandwidth(device)["copy_GBps"]
    result = {"environment": common.environment(device), "copy_GBps": copy, "configs": CONFIGS, "shapes": {}}
    print(f"block partial sums on {result['environment']['device']}; copy {copy:,.0f} GB/s")
    print(f"{'shape':8} {'sum':6} {'(B, NB, X)':20} {'provider':22} {'p50 us':>9} {'GB/s':>7} {'of copy':>7} "
          f"{'rel err':>8}")
    for name in args.shapes.split(","):
        for what, dims in partials(OP_SHAPES[name]).items():
            rows = measure(dims, device, CONFIGS[:args.configs], copy)
            result["shapes"].setdefault(name, {})[what] = {"dims": dims, "rows": rows}
            for r in rows:
                timing = (f"{r['p50_us']:9.1f} {r['GBps']:7.0f} {r.get('frac_copy', 0):7.0%}" if "p50_us" in r
                          else f"{'MISMATCH: not timed':>25}")
                print(f"{name:8} {what:6} {str(dims):20} {r['provider']:22} {timing} {r['rel_err']:8.1e}")
            common.write_json(os.path.join(args.out, "block_sums.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
