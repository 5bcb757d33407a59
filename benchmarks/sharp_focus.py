"""Precision of the kernels' memory step at sharp focus, against the fp32 reference's, over many draws.

    TRITON_INTERPRET=1 python -m benchmarks.sharp_focus [--shape B,N,M,R,W,S] [--beta 500] [--g G]
                                                        [--seeds 20] [--jitter SEED] [--json F]

At sharp focus (a large ``beta``) the step is ill-conditioned for fp32: the cosine logits carry about an
ulp of rounding each, ``beta`` multiplies it into the softmax's exponents, and where two slots compete
the weighting and every gradient move by that much. One draw then says little about an implementation:
the fp32 reference's own miss swings by 10x from draw to draw, and from one 1-ulp move of a draw's inputs
to the next (``--jitter``). This compares the kernels (each regime the shape allows: on-chip where memory
fits one program, and the large-memory regime, forced by blocks of 16 rows) with the fp32 literal
reference, draw by draw, both against float64: per output and gradient, the median over draws of the
ratio of the kernels' relative error to the reference's, and the ratio of their errors summed over the
draws (weighted by each draw's size, so that draws whose true gradient is about 0 do not swing it). Near
1, the kernels round as well as the reference; a systematic loss (a cancellation taken in the wrong
order) shows as ratios, and relative errors, well above it.

The kernels run on the GPU where there is one (``--device``), else through the Triton interpreter
(``TRITON_INTERPRET=1``, set before fastntm is imported: a few seconds a draw at the default shape).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics

import torch

from benchmarks import common
from benchmarks.shapes import OpShape

NAMES = ("w", "r", "new_mem", "mem", "k", "beta", "g", "s", "gamma", "w_prev", "e", "a")


def _shape(text: str) -> OpShape:
    try:
        B, N, M, R, W, S = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected six integers B,N,M,R,W,S, got {text!r}") from None
    if min(B, N, M, S) < 1 or min(R, W) < 0 or R + W < 1 or S % 2 == 0:
        raise argparse.ArgumentTypeError(f"expected B, N, M >= 1, R, W >= 0, R + W >= 1, S odd, got {text!r}")
    from fastntm.kernels import _config

    if not _config.supported(M):  # wider slots run the reference path: the study would compare it with itself
        raise argparse.ArgumentTypeError(f"the kernels take M up to {_config.MAX_BM}, got {M}")
    return OpShape("sharp-focus", B, N, M, R, W, S)


def _ulp_moves(t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` (fp32) with each value moved up or down by one ulp, or left, at random."""
    step = torch.randint(-1, 2, t.shape, generator=torch.Generator().manual_seed(seed))
    up, down = torch.nextafter(t, torch.full_like(t, torch.inf)), torch.nextafter(t, torch.full_like(t, -torch.inf))
    return torch.where(step > 0, up, torch.where(step < 0, down, t))


def _errors(shape: OpShape, beta: float, g: float | None, seed: int, regimes: dict, jitter: int | None = None,
            device: torch.device = torch.device("cpu")) -> dict[str, dict[str, float]]:
    """Norms of the errors against float64 of every output and input gradient, for the fp32 reference and
    for each regime, and of the float64 values: ``{provider or "float64": {name: norm}}``. Draw ``seed``, or
    with ``jitter``, draw ``jitter`` with its memory and keys moved by an ulp at random (``seed`` > 0)."""
    from fastntm import kernels, reference

    draw = seed if jitter is None else jitter
    x = common.op_inputs(shape, torch.device("cpu"), torch.float32, seed=draw)
    if jitter is not None and seed > 0:
        x[0], x[1] = _ulp_moves(x[0], 2 * seed), _ulp_moves(x[1], 2 * seed + 1)
    # Drawn in fp32 and given to float64 as they are: every provider takes the same inputs, and the truth is
    # that of the fp32 inputs, not of values fp32 cannot hold (whose rounding alone moves an ill-conditioned step).
    x = [t.to(device, torch.float64) for t in x]
    x[2] = torch.full_like(x[2], beta)
    if g is not None:
        x[3] = torch.full_like(x[3], g)

    def outputs_and_grads(fn, dtype):
        xs = [t.to(dtype).requires_grad_() for t in x]
        out = fn(*xs, shape.R)
        cot = [c.float().to(dtype) for c in common.cotangents(out, seed=draw + 1)]  # drawn on the CPU
        return [o.detach() for o in out] + list(torch.autograd.grad(out, xs, cot, allow_unused=True))

    truth = outputs_and_grads(reference.memory_step, torch.float64)
    results = {"fp32 reference": outputs_and_grads(reference.memory_step, torch.float32)}
    for regime, force in regimes.items():
        with force():
            results[regime] = outputs_and_grads(kernels.memory_step, torch.float32)
    kept = [i for i, t in enumerate(truth) if t is not None and t.numel() > 0]
    norms = {"float64": {NAMES[i]: truth[i].norm().item() for i in kept}}
    for provider, outs in results.items():
        norms[provider] = {NAMES[i]: (outs[i].double() - truth[i]).norm().item() for i in kept}
    return norms


def _ratio(kernel: float, reference: float) -> float:
    """Of two errors of one value (the ratio of their relative errors): 1 where both are exact."""
    if reference == 0:
        return 1.0 if kernel == 0 else math.inf
    return kernel / reference


def run(shape: OpShape, beta: float, g: float | None, seeds: int, jitter: int | None = None,
        device: torch.device = torch.device("cpu")) -> dict:
    """Per regime and name, over ``seeds`` draws: the median of each draw's ratio of the kernels' error to the
    fp32 reference's, the ratio of their errors summed over the draws (which a draw whose true value is
    about 0, so that any rounding is a large relative error, does not swing), and the median relative
    errors over the draws whose true value is not 0 (None where there are none: w_prev's gradient at g = 1)."""
    from fastntm.kernels import _config

    regimes = {"large": lambda: _config.force(block_n=16)}
    if _config.choose(shape.N, shape.M).onchip:
        regimes = {"on-chip": lambda: _config.force(), **regimes}
    draws = [_errors(shape, beta, g, seed, regimes, jitter, device) for seed in range(seeds)]
    summary = {}
    for regime in regimes:
        rows = {}
        for name in draws[0]["float64"]:
            kernel = [d[regime][name] for d in draws]
            ref = [d["fp32 reference"][name] for d in draws]
            sizes = [d["float64"][name] for d in draws]
            if not any(kernel) and not any(ref) and not any(sizes):  # a gradient that is 0 in every draw
                continue
            nonzero = [i for i, size in enumerate(sizes) if size > 0]
            rows[name] = {
                "median_ratio": statistics.median(_ratio(k, r) for k, r in zip(kernel, ref)),
                "summed_ratio": _ratio(sum(kernel), sum(ref)),
                "median_error": statistics.median(kernel[i] / sizes[i] for i in nonzero) if nonzero else None,
                "median_reference_error": statistics.median(ref[i] / sizes[i] for i in nonzero) if nonzero else None,
            }
        summary[regime] = rows
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sharp_focus", description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=_shape, default=_shape("2,7,8,0,3,3"),
                        help="B,N,M,R,W,S of the step (default 2,7,8,0,3,3)")
    parser.add_argument("--beta", type=float, default=500.0, help="every head's key strength (default 500)")
    parser.add_argument("--g", type=float, default=None, help="every head's interpolation gate (default: drawn)")
    parser.add_argument("--seeds", type=int, default=20, help="draws (default 20)")
    parser.add_argument("--jitter", type=int, metavar="SEED",
                        help="instead of fresh draws, draw SEED with its memory and keys moved by an ulp at random "
                             "(all but the first): how much one draw's errors owe to the luck of its rounding")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="where the kernels run (default: cuda where there is one, else the CPU's interpreter)")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args(argv)
    from fastntm import kernels

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not kernels.INTERPRETING:
        parser.error("on the CPU the kernels run through Triton's interpreter: set TRITON_INTERPRET=1")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no GPU here")
    if os.environ.get("FASTNTM_BLOCKS"):  # it would force blocks under the study's own choice of regime
        parser.error("FASTNTM_BLOCKS is set: unset it, the study picks each regime's blocks itself")
    if args.seeds < 1:
        parser.error(f"--seeds: expected at least 1, got {args.seeds}")
    if not args.beta > 0 or args.beta == float("inf"):
        parser.error(f"--beta: expected a finite value > 0, got {args.beta}")
    if args.g is not None and not 0 <= args.g <= 1:
        parser.error(f"--g: expected a value in [0, 1], got {args.g}")
    summary = run(args.shape, args.beta, args.g, args.seeds, args.jitter, device)
    s = args.shape
    print(f"sharp focus: B {s.B}, N {s.N}, M {s.M}, R {s.R}, W {s.W}, S {s.S}, beta {args.beta:g}, "
          f"g {'drawn' if args.g is None else f'{args.g:g}'}, {args.seeds} draws on {device.type}"
          f"{'' if args.jitter is None else f' (1-ulp moves of draw {args.jitter})'}; kernel error / fp32 reference "
          "error, median over draws (summed over draws), and the median relative errors")
    for regime, rows in summary.items():
        print(f"{regime}:")
        for name, r in rows.items():
            errors = "" if r["median_error"] is None else (f"   kernel {r['median_error']:.1e}   reference "
                                                           f"{r['median_reference_error']:.1e}")
            print(f"  {name:8s} {r['median_ratio']:6.2f} ({r['summed_ratio']:6.2f}){errors}")
    if args.json:
        common.write_json(args.json, {"shape": s.as_dict(), "beta": args.beta, "g": args.g, "seeds": args.seeds,
                                      "jitter": args.jitter, "device": device.type, "regimes": summary})


if __name__ == "__main__":
    main()
