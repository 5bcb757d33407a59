"""The key figures of a results folder, for the end of ``gpu_check.sh``.

    python -m benchmarks.summary gpu_results/

Reads whatever of ``results.json`` (``benchmarks.run``), ``long_sequence.json``
and ``bench_kernels.json`` is there; a missing or partial file is named, not fatal.
``sweep_blocks.json`` (``benchmarks.sweep_blocks``, run only on request) adds the
best configuration per shape where it is there, and nothing where it is not.
``sass_model.json`` (``benchmarks.sass_model`` at the large shape) with bench_kernels' large-shape times
gives the warp-instructions an SM issued a clock: near 4, the kernels are bound by issue.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

KEY_SHAPES = ("paper-b1", "paper-b32", "medium", "large", "copy-b1", "copy-b32")
FAST_PROVIDERS = ("triton", "triton-graph", "reference-graph", "reference-compile", "reference-compile-graph",
                  "numba")
# Each side by its fairest rival: launched alike (eagerly, or replayed from one CUDA graph).
RIVAL = {"triton": "reference-compile", "triton-graph": "reference-compile-graph"}


def _load(folder: str, name: str):
    path = os.path.join(folder, name)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        print(f"{name}: not read ({type(exc).__name__})")
        return None


def summarise(folder: str) -> list[str]:
    lines = []
    results = _load(folder, "results.json")
    if results:
        env, copy = results["environment"], results["copy"]
        lines.append(f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
        lines.append(f"copy bandwidth: {copy['copy_GBps']:.0f} GB/s")
        rows = results["rows"]
        for r in rows:
            if r["shape"] not in KEY_SHAPES:
                continue
            if r.get("status") != "ok":
                lines.append(f"  {r['name']:44} {r.get('status')}: {r.get('error', '')[:80]}")
                continue
            bw = f", {r['GBps']:.0f} GB/s = {100 * r['frac_copy']:.0f}% of copy" if "GBps" in r else ""
            per_seq = f", {r['ms_per_sequence']:.3f} ms/seq" if r["op"] == "train_step" else ""
            lines.append(f"  {r['name']:44} p50 {r['p50_ms']:.3f} ms ({r['p20_ms']:.3f}-{r['p80_ms']:.3f})"
                         f"{per_seq}{bw}, peak {r['peak_bytes'] / 2**20:.1f} MiB")
        by_name = {r["name"]: r for r in rows if r.get("status") == "ok"}
        for r in rows:
            if r.get("provider") in FAST_PROVIDERS and r["name"] in by_name and r["shape"] in KEY_SHAPES:
                ref = by_name.get(r["name"].rsplit("/", 1)[0] + "/reference")
                if ref:
                    lines.append(f"  speedup {r['provider']} vs reference (eager) {r['op']}/{r['shape']}: "
                                 f"{ref['p50_ms'] / r['p50_ms']:.1f}x")
        for r in (r for r in by_name.values() if r["shape"] in KEY_SHAPES and r["provider"] in RIVAL):
            rival = RIVAL[r["provider"]]
            theirs = by_name.get(r["name"].rsplit("/", 1)[0] + "/" + rival)
            if theirs:
                lines.append(f"  speedup {r['provider']} vs {rival} {r['op']}/{r['shape']}: "
                             f"{theirs['p50_ms'] / r['p50_ms']:.2f}x")
        bad = [r["name"] for r in rows if r.get("status") in ("MISMATCH", "error")]
        lines.append(f"rows: {len(rows)}, ok {sum(r.get('status') == 'ok' for r in rows)}, "
                     f"skipped {sum(r.get('status') == 'skipped' for r in rows)}, not ok: {bad or 'none'}")
    long = _load(folder, "long_sequence.json")
    if long:
        for r in long["rows"]:
            if "error" in r:
                lines.append(f"  long {r['label']}: error {r['error'][:100]}")
            else:
                lines.append(f"  long {r['label']}: peak {r['peak_bytes'] / 2**20:.0f} MiB, step {r['step_s']:.2f} s")
        for name, v in long.get("ratios", {}).items():
            lines.append(f"  long {name}: peak x{v['peak']:.3f}, time x{v['time']:.2f}")
    kernels = _load(folder, "bench_kernels.json")
    if kernels and "shapes" in kernels:
        for name, row in kernels["shapes"].items():
            lines.append(f"  bench_kernels {name}: correct {row.get('correct')}")
            fracs = [(key, row[f"triton_{key}_frac_copy"]) for key in ("fwd", "fwd_bwd", "fwd_graph", "fwd_bwd_graph")
                     if f"triton_{key}_frac_copy" in row]
            if fracs:
                lines.append(f"  bench_kernels {name}: triton, byte model over copy bandwidth: "
                             + ", ".join(f"{key} {100 * frac:.0f}%" for key, frac in fracs))
            for prov, ratios in row.get("speedups", {}).items():
                speed = ", ".join(f"{key} {ratio:.1f}x" for key, ratio in ratios.items())
                lines.append(f"  bench_kernels {name}: triton over {prov}: {speed}")
    if os.path.exists(os.path.join(folder, "sweep_blocks.json")):
        lines += sweep_lines(_load(folder, "sweep_blocks.json"))
    if os.path.exists(os.path.join(folder, "sass_model.json")):
        lines += issue_lines(_load(folder, "sass_model.json"), kernels)
    return lines


def issue_lines(model, kernels) -> list[str]:
    """Warp-instructions the SASS model counts at the large shape, and, with bench_kernels' times of the
    same shape, how many an SM issued a clock (``sass_model``'s SMs and clock)."""
    from .sass_model import CLOCK_GHZ, SMS

    if not model:
        return []
    totals = {"fwd": sum(c["total"] for c in model["fwd"])}
    totals["fwd_bwd"] = totals["fwd"] + sum(c["total"] for c in model["bwd"])
    timed = (kernels or {}).get("shapes", {}).get(model["shape"]["name"], {}).get("triton", {})
    lines = []
    for key, total in totals.items():
        rate = ""
        if "p50_us" in timed.get(key, {}):
            per_clock = total / (timed[key]["p50_us"] * 1e-6 * SMS * CLOCK_GHZ * 1e9)
            rate = f", in {timed[key]['p50_us']:.0f} us: {per_clock:.2f} a clock an SM (of 4)"
        lines.append(f"  sass_model {model['shape']['name']} {key}: {total / 1e6:.0f} M warp-instructions{rate}")
    return lines


def sweep_lines(sweep) -> list[str]:
    """The best configuration per shape and timing, against the default, and the rows that did not run."""
    lines = []
    for name, out in (sweep or {}).get("shapes", {}).items():
        for key, b in out.get("best", {}).items():
            speed = f", {b['speedup']:.2f}x the default's {b['default_p50_us']:.1f} us" if "speedup" in b else ""
            frac = f", {100 * b['frac_copy']:.0f}% of copy" if "frac_copy" in b else ""
            lines.append(f"  sweep {name} {key}: best {b['label']}: {b['p50_us']:.1f} us{speed}{frac}")
        rows = out.get("rows", [])
        spilling = [f"{r['label']} ({r['spill_bytes']} B)" for r in rows if r.get("spill_bytes")]
        bad = [f"{r.get('label', r.get('settings'))} ({r['status']})" for r in rows
               if r.get("status") in ("failed", "MISMATCH")]
        lines.append(f"  sweep {name}: {sum(r.get('status') == 'ok' for r in rows)} of {len(rows)} configurations "
                     f"timed, {sum(r.get('status') == 'skipped' for r in rows)} left for time; spilling: "
                     f"{', '.join(spilling) or 'none'}; failed or mismatched: {', '.join(bad) or 'none'}")
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.summary", description=__doc__.splitlines()[0])
    ap.add_argument("folder", nargs="?", default=os.environ.get("OUT") or "gpu_results",
                    help="the results folder (default: $OUT, else gpu_results)")
    args = ap.parse_args(argv)
    if not os.path.isdir(args.folder):
        ap.error(f"{args.folder} is not a folder")
    print("\n".join(summarise(args.folder)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
