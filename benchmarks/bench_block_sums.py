"""The sums of block partials in the large-memory step: ``_sum_blocks_kernel`` against torch's sum.

    python -m benchmarks.bench_block_sums --out results/      # writes results/block_sums.json

The large-memory passes leave per-block partials (B, NB, X): the reads' in the forward, dL/de's and dL/da's
(one buffer), the sharpening backward's four sums and dL/dk's in the backward, at the NB that the dispatch's
blocks give at each shape. For each, ``torch.sum(parts, 1)`` (what the step took before
``_sum_blocks_kernel``) and the kernel at its default loads and at others (rows, warps; a row is labelled with
the rows a load takes, at most NB's power of two) are first checked against a float64 sum, then timed two ways
(CUDA), medians: ``cold``, ``triton.testing.do_bench``, which clears the L2 cache before each call (in the
step, the pass over memory that wrote the partials streams hundreds of MB through L2 before they are summed);
and ``graph``, ``do_bench_cudagraph``, the partials in L2 from the last replay. Neither is the step's: its
profile (``benchmarks.kernel_profile``, and ``FASTNTM_BLOCKS=sum_rows=...``) decides the defaults. On the CPU,
under the Triton interpreter, plain calls: a smoke test, not a speed. A device-to-device copy measured in the
same run gives the bandwidth the bytes moved (the partials read, the sums written) are held against.
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
# (rows a load, warps); the first is the dispatch's default. On the H100 (h100-2026-11-26-h, run 1, L2 warm) strips
# of 32 and 64 columns were 1.8-8x slower than 16 at the large shape.
CONFIGS = ((256, 8), (128, 4), (512, 8), (1024, 8), (1024, 16), (2048, 16))
TIMINGS = ("cold", "graph")


def partials(shape) -> dict[str, tuple[int, ...]]:
    """The (B, NB, X) of each sum of block partials in one memory step at ``shape``."""
    from fastntm.kernels import _config

    blk = _config.choose(shape.N, shape.M)
    if blk.onchip:
        return {}
    nb, nb_bwd = _config.n_blocks(shape.N, blk.BN), _config.n_blocks(shape.N, blk.memory_bwd[0])
    return {"reads": (shape.B, nb, shape.R * shape.M), "de+da": (2 * shape.B, nb_bwd, shape.W * shape.M),
            "sharpen": (shape.B * shape.H, _config.n_blocks(shape.N, blk.BV), 4),
            "dk": (shape.B, nb_bwd, shape.H * shape.M)}


def time_us(fn, device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        return {"cold": do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3,
                "graph": do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3}
    fn()
    return {"cold": common.time_call(fn, device, budget_s=0.2, min_reps=2)["p50_ms"] * 1e3}


def measure(dims: tuple[int, ...], device: torch.device, configs, copy_gbps: float | None) -> list[dict]:
    from fastntm.kernels import _config

    ms = importlib.import_module("fastntm.kernels.memory_step")  # the module, not the function of its name
    parts = torch.randn(dims, generator=torch.Generator().manual_seed(0)).to(device)
    ref = parts.double().sum(1)
    nbytes = (parts.numel() + ref.numel()) * 4
    providers = {"torch": lambda: parts.sum(1)}
    for rows, warps in configs:
        providers.setdefault(f"kernel r{_config.sum_block_rows(dims[1], rows)} w{warps}",
                             lambda rows=rows, warps=warps: ms._sum_blocks(parts, torch.float32, _config.allocator(),
                                                                           rows, warps))
    out = []
    for name, fn in providers.items():
        err = common.rel_err(fn(), ref)
        row = {"provider": name, "rel_err": err}
        if err <= 1e-6:
            for timing, us in time_us(fn, device).items():
                row[timing] = {"p50_us": us, "GBps": nbytes / (us * 1e-6) / 1e9}
                if copy_gbps:
                    row[timing]["frac_copy"] = row[timing]["GBps"] / copy_gbps
        out.append(row)
    return out


def format_row(r: dict) -> str:
    cells = [f"{r[t]['p50_us']:9.1f} {r[t]['GBps']:7.0f} {r[t].get('frac_copy', 0):7.0%}" if t in r
             else f"{'':25}" for t in TIMINGS]
    if not any(t in r for t in TIMINGS):
        cells = [f"{'MISMATCH: not timed':>51}"]
    return f"{r['provider']:18} {' | '.join(cells)} {r['rel_err']:8.1e}"


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
    head = f"{'p50 us':>9} {'GB/s':>7} {'of copy':>7}"
    print(f"{'':36} {'':18} {'cold (L2 cleared), median':^25} | {'graph (L2 warm), median':^25}")
    print(f"{'shape':8} {'sum':6} {'(B, NB, X)':20} {'provider':18} {head} | {head} {'rel err':>8}")
    for name in args.shapes.split(","):
        for what, dims in partials(OP_SHAPES[name]).items():
            rows = measure(dims, device, CONFIGS[:args.configs], copy)
            result["shapes"].setdefault(name, {})[what] = {"dims": dims, "rows": rows}
            for r in rows:
                print(f"{name:8} {what:6} {dims!s:20} {format_row(r)}")
            common.write_json(os.path.join(args.out, "block_sums.json"), result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
