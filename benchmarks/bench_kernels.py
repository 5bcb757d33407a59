"""Benchmark of the fused memory-step kernels against the reference path, on one CUDA GPU.

    python -m benchmarks.bench_kernels --out results/        # writes results/bench_kernels.json

For each shape of ``SHAPES``: check each provider against the literal spec (outputs
and every gradient), then time ``memory_step`` forward and forward+backward with
``triton.testing.do_bench`` (p50, p20, p80 in microseconds), and replayed from a
CUDA graph (``do_bench_cudagraph``: no host launch overhead). Providers: ``triton`` (the kernels),
``reference`` (the reference path as ``backend="reference"`` runs it: the fused
PyTorch step of ``fastntm.fused_reference``, which a CUDA graph can capture) and
``reference-literal`` (``fastntm.reference``, the spec as written, whose erase
product's backward reads a value on the host and so cannot be captured). The
kernels' speedups are given over both. A device-to-device copy of the memory
measured in the same run gives the bandwidth the byte model is held against.

Byte model: ``benchmarks.common.op_bytes``, the one every benchmark here uses: the least traffic of a fused
step, 3 x |mem| forward (read mem for the similarity, read it again for the reads and the write, the softmax
and sharpening sums over all of N between; write new_mem) and 6 x |mem| forward + backward (plus read mem,
read dL/dnew_mem, write dL/dmem), each with the (B, H, N) and smaller vectors it must read and write once
(three times forward + backward). Until 2026-11-27 this benchmark counted the memory's passes alone, about 5%
fewer bytes at the large shape. The kernels' own traffic is higher in the backward (two passes over mem and
dL/dnew_mem: 5 x |mem|, so 8 x |mem| in all); the fraction reported is of the minimal model.
Finishes in well under 3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch

from . import common
from .shapes import OpShape

# Each op timed by plain calls and replayed from a CUDA graph; a timing's bytes are its op's (module docstring).
TIMINGS = ("fwd", "fwd_bwd", "fwd_graph", "fwd_bwd_graph")

SHAPES = {
    "paper": dict(B=32, N=128, M=20, R=1, W=1, S=3),
    "large": dict(B=16, N=65536, M=64, R=4, W=1, S=3),
}


def make_inputs(B, N, M, R, W, S, device, dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    H = R + W

    def rand(*shape):
        return torch.rand(*shape, generator=gen).to(device, dtype)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    return dict(
        mem=randn(B, N, M), k=randn(B, H, M), beta=rand(B, H) * 5, g=rand(B, H),
        s=torch.softmax(randn(B, H, S), -1), gamma=1 + rand(B, H) * 3,
        w_prev=torch.softmax(randn(B, H, N), -1), e=rand(B, W, M), a=randn(B, W, M),
    )


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def check(impl, ref, x, R):
    """Largest relative error over outputs and gradients."""
    xk = [t.clone().requires_grad_() for t in x.values()]
    xr = [t.clone().requires_grad_() for t in x.values()]
    ok, orf = impl(*xk, R), ref(*xr, R)
    gen = torch.Generator().manual_seed(2)
    cot = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in orf]
    gk = torch.autograd.grad(ok, xk, cot)
    gr = torch.autograd.grad(orf, xr, cot)
    errs = {f"out{i}": rel_err(a, b) for i, (a, b) in enumerate(zip(ok, orf))}
    errs.update({f"d{n}": rel_err(a, b) for n, a, b in zip(x, gk, gr)})
    return errs


def bench(fn):
    from triton.testing import do_bench

    p50, p20, p80 = do_bench(fn, quantiles=[0.5, 0.2, 0.8], warmup=25, rep=100)
    return dict(p50_us=p50 * 1e3, p20_us=p20 * 1e3, p80_us=p80 * 1e3)


def bench_graph(fn):
    """p50/p20/p80 with the calls replayed from a CUDA graph (host launch overhead removed), or None."""
    from triton.testing import do_bench_cudagraph

    try:
        torch.cuda.synchronize()
        p50, p20, p80 = do_bench_cudagraph(fn, rep=50, quantiles=[0.5, 0.2, 0.8])
    except Exception as exc:  # a provider that cannot be captured still gets its eager figure
        return dict(error=f"{type(exc).__name__}: {exc}"[:200])
    return dict(p50_us=p50 * 1e3, p20_us=p20 * 1e3, p80_us=p80 * 1e3)


def speedups(row):
    """p50 of each reference provider over the kernels', for each timing both have (eager and CUDA graph)."""
    out = {}
    for prov in ("reference", "reference-literal"):
        out[prov] = {key: row[prov][key]["p50_us"] / row["triton"][key]["p50_us"]
                     for key in TIMINGS
                     if "p50_us" in row[prov].get(key, {}) and "p50_us" in row["triton"].get(key, {})}
    return out


def copy_bandwidth(nbytes, device):
    """Device-to-device copy bandwidth (bytes read + written per second) for a buffer of ``nbytes``."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))["p50_us"] * 1e-6
    return 2 * src.numel() * 4 / t


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "runs/bench"), help="folder for bench_kernels.json")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names from SHAPES")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_kernels.json")
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device; nothing measured")
        with open(path, "w") as f:
            json.dump(dict(skipped="no CUDA device"), f)
        return 0

    import triton

    from fastntm import fused_reference, kernels, reference

    device = torch.device("cuda")
    providers = {"triton": kernels.memory_step, "reference": fused_reference.memory_step,
                 "reference-literal": reference.memory_step}
    result = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  python=platform.python_version(), commit=commit(), shapes={})
    t_start = time.time()
    for name in args.shapes.split(","):
        shp = SHAPES[name]
        R = shp["R"]
        x = make_inputs(**shp, device=device)
        mem_bytes = x["mem"].numel() * x["mem"].element_size()
        bytes_model = common.op_bytes(OpShape(name, **shp))
        row = dict(shape=shp, mem_bytes=mem_bytes, bytes_model=bytes_model,
                   errors={prov: check(fn, reference.memory_step, x, R) for prov, fn in providers.items()
                           if prov != "reference-literal"})
        row["correct"] = max(e for errs in row["errors"].values() for e in errs.values()) < 1e-3
        row["copy_GBps"] = copy_bandwidth(max(mem_bytes, 1 << 26), device) / 1e9
        xg = [t.clone().requires_grad_() for t in x.values()]
        gen = torch.Generator().manual_seed(1)
        cot = [torch.randn(o.shape, generator=gen).to(device, o.dtype) for o in reference.memory_step(*x.values(), R)]
        for prov, fn in providers.items():
            fwd = bench(lambda: fn(*x.values(), R))

            def fwd_bwd(fn=fn):
                torch.autograd.grad(fn(*xg, R), xg, cot)

            both = bench(fwd_bwd)
            # Also without the host's launch overhead: at paper size the host is all a plain call measures, and
            # at the large shape (on an H100) a plain forward + backward left the GPU idle for a fifth of it.
            row[prov] = dict(fwd=fwd, fwd_bwd=both, fwd_graph=bench_graph(lambda: fn(*x.values(), R)),
                             fwd_bwd_graph=bench_graph(fwd_bwd))
            for key in TIMINGS:
                if "p50_us" in row[prov][key]:
                    op = key.removesuffix("_graph")
                    row[prov][f"{key}_GBps"] = bytes_model[op] / (row[prov][key]["p50_us"] * 1e-6) / 1e9
        row["speedups"] = speedups(row)
        for key in TIMINGS:
            if f"{key}_GBps" in row["triton"]:
                row[f"triton_{key}_frac_copy"] = row["triton"][f"{key}_GBps"] / row["copy_GBps"]
        result["shapes"][name] = row
        torch.cuda.empty_cache()
    result["wall_s"] = time.time() - t_start
    with open(path, "w") as f:
        json.dump(result, f, indent=2)

    print(f"\nbench_kernels on {result['device']} (torch {result['torch']}, triton {result['triton']})")
    print(f"{'shape':6} {'ok':3} {'max err':>8} {'copy GB/s':>9} | {'prov':17} {'fwd p50 us':>10} {'(p20-p80)':>15} "
          f"{'fwd+bwd p50 us':>14} {'(p20-p80)':>15} {'fwd frac':>8} {'f+b frac':>8}")
    for name, row in result["shapes"].items():
        for prov in providers:
            r = row[prov]
            f, b = r["fwd"], r["fwd_bwd"]
            err = max(max(e.values()) for e in row["errors"].values())
            print(f"{name:6} {'yes' if row['correct'] else 'NO':3} {err:8.1e} "
                  f"{row['copy_GBps']:9.0f} | {prov:17} {f['p50_us']:10.1f} {f['p20_us']:7.1f}-{f['p80_us']:<7.1f} "
                  f"{b['p50_us']:14.1f} {b['p20_us']:7.1f}-{b['p80_us']:<7.1f} "
                  f"{r['fwd_GBps'] / row['copy_GBps']:8.2f} {r['fwd_bwd_GBps'] / row['copy_GBps']:8.2f}")
            for key in ("fwd_graph", "fwd_bwd_graph"):
                if "p50_us" in row[prov].get(key, {}):
                    print(f"{name:6} {prov:17} {key} (CUDA graph) p50 {row[prov][key]['p50_us']:.1f} us, "
                          f"{row[prov][key + '_GBps'] / row['copy_GBps']:.2f} of copy")
                elif key in row[prov]:
                    print(f"{name:6} {prov:17} {key} (CUDA graph) failed: {row[prov][key]['error']}")
        for prov, ratios in row["speedups"].items():
            print(f"{name:6} triton's speedup over {prov}: "
                  + ", ".join(f"{key} {ratio:.1f}x" for key, ratio in ratios.items()))
    print(f"written {path} ({result['wall_s']:.0f} s)")
    return 0 if all(r["correct"] for r in result["shapes"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
