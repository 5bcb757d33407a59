"""Long sequences: peak memory and time of a training step over T = 1000 steps.

    python -m benchmarks.long_sequence                  # CPU: B 4, N 2048, M 32, T 1000
    python -m benchmarks.long_sequence --device cuda --gpu-large --out runs/bench
    python -m benchmarks.run --filter long_sequence      # the same, from the runner

Each configuration runs in a fresh process, so that one's peak does not hide
another's: a training step (forward, BCE on every step, backward, Adam) of
``FastNTM`` on random bits, with ``checkpoint_every="auto"`` (about sqrt(T) steps
a segment here) and with ``checkpoint_every=0`` (store every step), memory in
float32 and in bfloat16 (``memory_dtype``).

Peak memory: on a CPU the process's peak RSS (``ru_maxrss``) after the first step
less its RSS just before it; on CUDA ``torch.cuda.max_memory_allocated`` over
the step less what was allocated before it. Time: the median of the following
steps. Targets: checkpointed peak <= 10% of store-everything, time <= 1.5x.

``--gpu-large`` (CUDA only) adds B 16, N 65536, M 64, 4 + 1 heads, T 1000, with
the kernels: checkpointed only, since storing every step would take T copies of
a 256 MiB memory (the row records that figure instead).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from . import common

CPU_CONFIG = dict(B=4, N=2048, M=32, R=1, W=1, T=1000)
GPU_LARGE_CONFIG = dict(B=16, N=65536, M=64, R=4, W=1, T=1000)
TINY_CONFIG = dict(B=2, N=64, M=8, R=1, W=1, T=40)
CHILD_TIMEOUT_S = {"cpu": 900, "cuda": 120}
RESULT_PREFIX = "LONG_SEQUENCE_RESULT "


def configurations(device: torch.device, mode: str, gpu_large: bool) -> list[dict]:
    shape = TINY_CONFIG if mode == "tiny" else CPU_CONFIG
    configs = [dict(shape, checkpoint_every=every, memory_dtype=dtype, device=device.type, steps_timed=steps)
               for dtype in ("float32", "bfloat16")
               for every, steps in (("auto", 2), (0, 2))]
    if mode == "tiny":
        for c in configs:
            c["steps_timed"] = 1
    if device.type == "cuda" and gpu_large:  # the large step first: it is what a GPU run is for
        large = [dict(GPU_LARGE_CONFIG, checkpoint_every="auto", memory_dtype=dtype, device="cuda", steps_timed=2)
                 for dtype in ("float32", "bfloat16")]
        configs = large + [c for c in configs if c["memory_dtype"] == "float32"]
    return configs


def label(config: dict) -> str:
    c = config
    every = "ckpt-auto" if c["checkpoint_every"] == "auto" else "store-all" if c["checkpoint_every"] == 0 \
        else f"ckpt-{c['checkpoint_every']}"
    return f"B{c['B']}-N{c['N']}-M{c['M']}-T{c['T']}/{every}/{c['memory_dtype']}/{c['device']}"


# ---------------------------------------------------------------- the child process


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(config: dict) -> dict:
    """Build the model and data, measure the first step's peak, time the next ones."""
    from fastntm import FastNTM
    from fastntm.model import default_checkpoint_every

    from .cases import allow_many_compiles  # noqa: F401  (imports torch._dynamo before the baseline)

    c = config
    device = torch.device(c["device"])
    torch.manual_seed(0)
    dtype = getattr(torch, c["memory_dtype"])
    model = FastNTM(9, 8, memory_slots=c["N"], memory_width=c["M"], num_reads=c["R"], num_writes=c["W"],
                    checkpoint_every=c["checkpoint_every"], memory_dtype=dtype).to(device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, 2, (c["T"], c["B"], 9), generator=gen).float().to(device)
    target = torch.randint(0, 2, (c["T"], c["B"], 8), generator=gen).float().to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    every = c["checkpoint_every"]
    resolved = default_checkpoint_every(c["T"], model.initial_state(c["B"], device)) if every == "auto" else every

    def step():
        optimiser.zero_grad(set_to_none=True)
        y, _ = model(x)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(y, target)
        loss.backward()
        optimiser.step()
        return loss

    out = dict(config=c, label=label(c), checkpoint_every_resolved=resolved,
               memory_bytes=c["B"] * c["N"] * c["M"] * dtype.itemsize)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        out.update(first_step_s=time.perf_counter() - t0, peak_bytes=torch.cuda.max_memory_allocated() - base,
                   peak_method="torch.cuda.max_memory_allocated")
    else:
        rss_before, maxrss_before = _rss_bytes(), _maxrss_bytes()
        t0 = time.perf_counter()
        step()
        maxrss_after = _maxrss_bytes()
        out.update(first_step_s=time.perf_counter() - t0, peak_bytes=maxrss_after - rss_before,
                   peak_method="ru_maxrss after the step - RSS before it",
                   rss_before=rss_before, maxrss_before=maxrss_before, maxrss_after=maxrss_after,
                   peak_reached=maxrss_after > maxrss_before)
    times = []
    for _ in range(c["steps_timed"]):
        common.synchronize(device)
        t0 = time.perf_counter()
        step()
        common.synchronize(device)
        times.append(time.perf_counter() - t0)
    out.update(step_s=statistics.median(times), step_times_s=times)
    return out


def run_child(config: dict, timeout_s: float) -> dict:
    """``measure(config)`` in a fresh interpreter; an error or a timeout becomes the row's ``error``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "benchmarks.long_sequence", "--child", json.dumps(config)]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return dict(config=config, label=label(config), error=f"timed out after {timeout_s:.0f} s")
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(config=config, label=label(config), error=f"exit {proc.returncode}: {' | '.join(tail)}"[:500])


# ---------------------------------------------------------------- the parent


def run(device: torch.device, out_dir: str, *, mode: str = "full", gpu_large: bool = False,
        budget_s: float | None = None, log=print) -> dict:
    """Every configuration in its own process; ratios; ``long_sequence.json`` in ``out_dir``.
    Past ``budget_s`` seconds the remaining configurations are rows with an error."""
    deadline = time.perf_counter() + (budget_s if budget_s is not None else float("inf"))
    rows = []
    result = dict(environment=common.environment(device), rows=rows, ratios={})
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "long_sequence.json")
    for config in configurations(device, mode, gpu_large):
        left = deadline - time.perf_counter()
        if left < 10:
            rows.append(dict(config=config, label=label(config), error="time budget spent"))
            continue
        log(f"  long_sequence {label(config)} ...")
        rows.append(run_child(config, min(CHILD_TIMEOUT_S[device.type], left)))
        common.write_json(path, result)
    result["ratios"] = ratios(rows)
    result["stored_every_step_large_bytes"] = GPU_LARGE_CONFIG["T"] * GPU_LARGE_CONFIG["B"] * \
        GPU_LARGE_CONFIG["N"] * GPU_LARGE_CONFIG["M"] * 4
    common.write_json(path, result)
    log(format_table(result))
    return result


def ratios(rows: list[dict]) -> dict:
    """checkpointed / store-everything (peak, time) per dtype; bfloat16 / float32 per setting."""
    ok = {r["label"]: r for r in rows if "error" not in r}
    out = {}
    for r in ok.values():
        c = r["config"]
        if c["checkpoint_every"] == "auto":
            stored = ok.get(label(dict(c, checkpoint_every=0)))
            if stored:
                out[f"{r['label']} vs store-all"] = dict(peak=r["peak_bytes"] / stored["peak_bytes"],
                                                         time=r["step_s"] / stored["step_s"])
        if c["memory_dtype"] == "bfloat16":
            fp32 = ok.get(label(dict(c, memory_dtype="float32")))
            if fp32:
                out[f"{r['label']} vs float32"] = dict(peak=r["peak_bytes"] / fp32["peak_bytes"],
                                                       time=r["step_s"] / fp32["step_s"])
    return out


def format_table(result: dict) -> str:
    lines = [f"long sequences on {result['environment']['device']}",
             f"{'configuration':52} {'C':>4} {'peak MiB':>10} {'step s':>8} {'first s':>8}"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"{r['label']:52} error: {r['error'][:100]}")
            continue
        lines.append(f"{r['label']:52} {r['checkpoint_every_resolved']:>4} {r['peak_bytes'] / 2**20:10.1f} "
                     f"{r['step_s']:8.2f} {r['first_step_s']:8.2f}")
    for name, v in result["ratios"].items():
        lines.append(f"  {name}: peak x{v['peak']:.3f}, time x{v['time']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.long_sequence", description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--gpu-large", action="store_true", help="also B 16, N 65536, M 64, T 1000 (CUDA only)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes, for the smoke test")
    ap.add_argument("--out", default=os.environ.get("OUT") or "runs/bench")
    ap.add_argument("--budget", type=float, default=None, help="seconds; configurations past it are not run")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(RESULT_PREFIX + json.dumps(measure(json.loads(args.child))), flush=True)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("long_sequence: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    result = run(device, args.out, mode="tiny" if args.tiny else "full", gpu_large=args.gpu_large,
                 budget_s=args.budget)
    return 1 if any("error" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
