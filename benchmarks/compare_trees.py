"""Two source trees' copy-task training step, timed in short alternating rounds: a paired A/B on a noisy machine.

On a shared VM the p50s of separate ``benchmarks.run`` processes move by a third as the neighbours' load comes
and goes, more than most changes do. Here one worker process per tree builds the model once and waits; the
rounds alternate between them (ABBA order), each round the p50 of a few steps, so both trees see the same load
to within seconds. The figure is the median over rounds of the paired ratio ``new / old``.

    git archive HEAD~1 | tar -x -C /tmp/old          # the tree to compare against
    python -m benchmarks.compare_trees /tmp/old . [--shape copy-b32] [--rounds 16] [--steps 5]

Each worker runs this file with ``PYTHONPATH`` set to its tree, so it imports that tree's ``fastntm`` and
``benchmarks`` (an older tree needs no copy of this file). CPU only, one thread per worker unless
``--threads`` says more (``torch.set_num_threads`` and ``OMP_NUM_THREADS``; the workers take turns, never
running at once). The step runs on the CPU's default backend (numba where it imports; ``--backend
reference`` for trees from before it: a run whose two trees would run different backends stops before timing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def worker(shape_name: str, backend: str, threads: int) -> None:
    """Build the step (the tree's own ``benchmarks.run`` training step: model, copy batch, Adam), then for
    each line ``n`` on stdin print the p50 in ms of ``n`` steps."""
    import torch

    from benchmarks.cases import _train_case
    from benchmarks.shapes import TINY_TRAIN_SHAPES, TRAIN_SHAPES

    torch.set_num_threads(threads)
    step, _ = _train_case({**TRAIN_SHAPES, **TINY_TRAIN_SHAPES}[shape_name], backend, torch.device("cpu"))
    for _ in range(3):
        step()
    import fastntm

    print("ready", os.path.dirname(os.path.dirname(os.path.abspath(fastntm.__file__))), _resolved_backend(backend),
          flush=True)
    for line in sys.stdin:
        times = []
        for _ in range(int(line)):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        print(f"{statistics.median(times) * 1e3:.4f}", flush=True)


def _resolved_backend(provider: str) -> str:
    """The backend this tree's model runs for ``provider``: the tree's own ``benchmarks.cases`` names it (a tree from
    before a backend existed names another: "numba" was "reference" before 171731a), its ``fastntm.backend``
    resolves that on a CPU. Every tree with a ``benchmarks/cases.py`` has ``_backend``."""
    from benchmarks import cases
    from fastntm.backend import resolve

    return resolve(cases._backend(provider), "cpu")


def _check_same_backend(runs: dict, backend: str) -> None:
    """Refuse two trees whose models would run different backends (``runs``: each tree's ``_resolved_backend``)."""
    if runs["old"] != runs["new"]:
        raise RuntimeError(f"--backend {backend}: the old tree's model runs {runs['old']!r}, the new tree's "
                           f"{runs['new']!r}; pass a --backend both trees have (reference for trees from before the "
                           "numba kernels)")


def compare(old: str, new: str, shape: str, rounds: int, steps: int, backend: str, threads: int = 1) -> dict:
    procs = {}
    for name, tree in (("old", old), ("new", new)):
        tree = os.path.abspath(tree)
        env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(threads))
        env.pop("TRITON_INTERPRET", None)
        procs[name] = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", shape, "--backend", backend, "--threads",
             str(threads)],
            cwd=tree, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        runs = {}
        for (name, proc), tree in zip(procs.items(), (old, new)):
            line = proc.stdout.readline().split()
            if line[:1] != ["ready"]:
                raise RuntimeError(f"the {name} tree's worker did not start (exit {proc.wait()})")
            if line[1:2] != [os.path.abspath(tree)]:
                raise RuntimeError(f"the {name} tree's worker imported fastntm from {line[1:2]}, not {tree}")
            runs[name] = line[2]
        _check_same_backend(runs, backend)
        p50s = {"old": [], "new": []}
        for r in range(rounds):
            for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
                procs[name].stdin.write(f"{steps}\n")
                procs[name].stdin.flush()
                p50s[name].append(float(procs[name].stdout.readline()))
    finally:
        for proc in procs.values():
            proc.stdin.close()
            proc.wait()
    ratios = [b / a for a, b in zip(p50s["old"], p50s["new"])]
    return dict(shape=shape, backend=backend, threads=threads, rounds=rounds, steps=steps, p50_ms=p50s,
                old_median_ms=statistics.median(p50s["old"]), new_median_ms=statistics.median(p50s["new"]),
                ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", nargs="?", help="the tree to compare against")
    ap.add_argument("new", nargs="?", help="the tree under test")
    ap.add_argument("--shape", default="copy-b32", help="a name of benchmarks.shapes.TRAIN_SHAPES (or TINY_TRAIN_SHAPES)")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--steps", type=int, default=5, help="steps a round")
    ap.add_argument("--threads", type=int, default=1, help="torch threads a worker (default 1)")
    ap.add_argument("--backend", choices=("numba", "reference", "reference-compile"),
                    help="the provider of benchmarks.run timed (CPU only; default: the CPU's default backend, numba "
                         "where it imports, which both trees must then have)")
    ap.add_argument("--worker", metavar="SHAPE", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.backend, args.threads)
        return 0
    if not (args.old and args.new):
        ap.error("give the old and the new tree")
    if args.backend is None:
        from benchmarks.versus_baseline import default_backend

        args.backend = default_backend()
    for tree in (args.old, args.new):  # a worker imports the tree's fastntm and benchmarks.cases
        needs = [os.path.join(tree, "fastntm", "__init__.py"), os.path.join(tree, "benchmarks", "cases.py")]
        if not all(os.path.isfile(f) for f in needs):
            ap.error(f"{tree} is not a fastntm source tree: it needs fastntm/__init__.py and benchmarks/cases.py")
    from benchmarks.shapes import TINY_TRAIN_SHAPES, TRAIN_SHAPES

    if args.shape not in {**TRAIN_SHAPES, **TINY_TRAIN_SHAPES}:
        ap.error(f"--shape {args.shape!r} is not one of {', '.join({**TRAIN_SHAPES, **TINY_TRAIN_SHAPES})}")
    if args.rounds < 1 or args.steps < 1 or args.threads < 1:
        ap.error(f"--rounds, --steps and --threads must be positive, got {args.rounds}, {args.steps} and "
                 f"{args.threads}")
    try:
        r = compare(args.old, args.new, args.shape, args.rounds, args.steps, args.backend, args.threads)
    except RuntimeError as exc:  # a worker that did not start has printed its own traceback above
        print(f"compare_trees: {exc}", file=sys.stderr)
        return 1
    threads = f"{r['threads']} thread{'s' if r['threads'] > 1 else ''}"
    print(f"{r['shape']} ({r['backend']}, {threads}): old {r['old_median_ms']:.1f} ms, new {r['new_median_ms']:.1f} ms "
          f"(medians of {r['rounds']} rounds of {r['steps']} steps); new / old paired: median {r['ratio_median']:.3f}, "
          f"range {r['ratio_min']:.3f} - {r['ratio_max']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
