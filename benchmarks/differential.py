"""Every backend's ops against the literal spec in float64, at random shapes and edge values.

    python -m benchmarks.differential [--backends reference,numba] [--ops all] [--dtype fp64|fp32|bf16|fp16]
                                      [--seconds 60] [--draws N] [--seed 0] [--replay K] [--device cpu|cuda]
                                      [--json F]

Each draw takes a shape (B up to 3, N from 1 to 130, M from 1 to 100, R from 0 to 3, W from 0 to 2, S
from 1 to 9: widths past N, N below S, heads of one kind only), some of the spec's edges at random (zero
memory rows or memory, one-hot ``w_prev``, beta 100 or 1e4, gamma 50, g 0, 1 or 1 - 2^-20, one-hot
shifts, erase 0 or 1, a zero key, a key equal to a row, memory scaled by 1e3; the head layer's raw output
scaled by 1, 5 or 30, which saturates its sigmoids), and leaves out some of the outputs' gradients. Each
draw runs one of ``--ops`` in turn (``memory_step``, ``memory_step_from_heads``, ``address``, ``read``, ``write``,
``head_parameters``; ``all``, the default, cycles through them). Every backend named computes the outputs
and every input's gradient; each is compared with the literal spec (``fastntm.reference``) in float64, as
is the literal spec in float32, which sets the yardstick: the error that fp32 rounding alone gives on that
draw. A result is flagged where it is not finite and the yardstick's is, or where its error
(``|x - truth| / |truth|``, norms over the tensor; about 0, below) exceeds

* in float64 (``--dtype fp64``): 1e-7, or 1e-5 times the fp32 literal's error where that is larger
  (fp64 rounds 5e8 times finer: a miss that size is a wrong equation, not rounding). Not judged where
  the fp32 literal missed by a tenth or more: its error then no longer says how ill-conditioned the draw
  is (at beta 1e4 and gamma 50, memory and keys moved by 1e-15 moved the float64 spec's dL/dk by 1.6e-4);
* in float32: 1e-4, or 20 times the fp32 literal's error where that is larger. At sharp focus (beta
  100, gamma 50) one draw's rounding can differ by that much between two right answers (``sharp_focus``
  has the statistics), so fp32 flags are draws to look at, not verdicts;
* in bf16 or fp16 (every input and output in that dtype): 3e-2 (bf16) or 4e-3 (fp16), or 20 times the
  error of the literal spec given the same 16-bit inputs (which computes in float32 and rounds its
  results to the dtype), where that is larger. Flags as in float32.

A true value below a millionth of the op's largest (or of 1) is about 0 (a cancellation, or a gradient no
path reaches, as dL/dw_prev at g = 1): its error is taken beside that largest value, not beside itself. Where the float64 spec itself is not finite, the draw is
flagged as backend ``literal``. The command exits with 1 where a float64 result is flagged, or any result
is not finite where the yardstick's is. The Triton kernels take fp32, bf16 and fp16, numba float64 and
float32 (in another dtype the torch path serves ``backend="numba"``, as it does every op but the memory
step); ``triton-large`` forces the large-memory regime with 16-row blocks. On a CPU the kernels run under
``TRITON_INTERPRET=1`` only (seconds a draw). ``--replay K`` runs draw K alone and prints its description:
the same draw and op as in a run of the same ``--seed`` and ``--ops``.

Found at stop 36: the numba step lost ``wc`` below an ulp of ``w_prev`` at ``g = 1`` (LLVM's reassociation,
``tests/test_functional.py``'s closed-gate case; float64 dL/dg missed by 0.7%), and the torch path took
dL/dw_prev as ``dwg - g dwg`` (2.7% off at ``g = 1 - 2^-20`` in float32; flagged 65 - 68 times in 40 s of
``--dtype fp32 --ops memory_step,address --backends reference`` once that gate was drawn).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import Callable

import torch

OUTPUTS = ("w", "r", "new_mem")
HEAD_PARAMETERS = ("k", "beta", "g", "s", "gamma", "e", "a")
INPUTS = ("mem", "k", "beta", "g", "s", "gamma", "w_prev", "e", "a")
EDGES = ("zero-rows", "zero-memory", "one-hot-w_prev", "beta-100", "beta-1e4", "gamma-50", "g-0", "g-1",
         "one-hot-shift", "erase-0-or-1", "zero-key", "key-is-a-row", "memory-1e3")
OPS = ("memory_step", "memory_step_from_heads", "address", "read", "write", "head_parameters")
BACKENDS = ("reference", "numba", "compiled", "triton", "triton-large")
DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOW_PRECISION_FLOOR = {torch.bfloat16: 3e-2, torch.float16: 4e-3}  # a few of the dtype's ulps


def draw(rng: random.Random) -> tuple[dict, dict[str, torch.Tensor]]:
    """A random case: its description and the inputs of every op (float32 values; ``raw``, the head layer's
    output)."""
    B, N = rng.choice([1, 1, 2, 3]), rng.choice([1, 2, 3, 5, 7, 16, 17, 31, 37, 64, 65, 97, 130])
    M, S = rng.choice([1, 2, 3, 8, 13, 20, 33, 64, 100]), rng.choice([1, 3, 3, 5, 7, 9])
    R, W = rng.choice([0, 1, 1, 2, 3]), rng.choice([0, 1, 1, 2])
    R = R if R + W else 1
    H, seed = R + W, rng.randrange(2**31)
    edges = [edge for edge in EDGES if rng.random() < 0.15]
    gen = torch.Generator().manual_seed(seed)
    rand, randn = (lambda *s: torch.rand(*s, generator=gen)), (lambda *s: torch.randn(*s, generator=gen))
    x = dict(mem=randn(B, N, M), k=randn(B, H, M), beta=rand(B, H) * 5, g=rand(B, H),
             s=torch.softmax(randn(B, H, S) * 2, -1), gamma=1 + rand(B, H) * 3,
             w_prev=torch.softmax(randn(B, H, N) * 3, -1), e=rand(B, W, M), a=randn(B, W, M))

    def one_hot(size, classes):
        return torch.nn.functional.one_hot(torch.randint(0, classes, size, generator=gen), classes).float()

    row = rng.randrange(N)
    changes: dict[str, Callable[[], None]] = {
        "zero-rows": lambda: x["mem"][:, row::3].zero_(),
        "zero-memory": lambda: x["mem"].zero_(),
        "one-hot-w_prev": lambda: x.update(w_prev=one_hot((B, H), N)),
        "beta-100": lambda: x["beta"].fill_(100.0),
        "beta-1e4": lambda: x["beta"].fill_(1e4),
        "gamma-50": lambda: x["gamma"].fill_(50.0),
        "g-0": lambda: x["g"].zero_(),
        "g-1": lambda: x["g"].fill_(1.0),
        "one-hot-shift": lambda: x.update(s=one_hot((B, H), S)),
        "erase-0-or-1": lambda: x.update(e=(x["e"] > 0.5).float()),
        "zero-key": lambda: x["k"][:, 0].zero_(),
        "key-is-a-row": lambda: x["k"][:, 0].copy_(x["mem"][:, row]),
        "memory-1e3": lambda: x["mem"].mul_(1e3),
    }
    for edge in edges:
        changes[edge]()
    scale = rng.choice([1, 5, 30])
    x["raw"] = randn(B, H * (M + S + 3) + 2 * W * M) * scale
    if rand(1).item() < 0.15:  # drawn last, from the case's generator: the draws before it are unchanged
        edges.append("g-1-minus-2^-20")
        x["g"].fill_(1 - 2**-20)
    left_out = [i for i in range(7) if rng.random() < 0.25]  # outputs by position, up to head_parameters' 7
    case = dict(B=B, N=N, M=M, R=R, W=W, S=S, seed=seed, edges=edges, raw_scale=scale, left_out=left_out)
    return case, x


def inputs(op: str, x: dict, case: dict) -> dict[str, torch.Tensor]:
    """The draw's inputs of ``op``: ``read`` takes ``w_prev``'s first R heads as its weightings, ``write`` the
    other W."""
    R, W = case["R"], case["W"]
    names = {"memory_step": INPUTS, "memory_step_from_heads": ("mem", "raw", "w_prev"),
             "address": INPUTS[:7], "read": ("mem", "w"), "write": ("mem", "w", "e", "a"), "head_parameters": ("raw",)}
    x = {**x, "w": x["w_prev"][:, :R] if op == "read" else x["w_prev"][:, R:]}
    return {n: x[n] for n in names[op]}


def call(op: str, backend: str | None, xs: dict, case: dict) -> tuple[torch.Tensor, ...]:
    """``op`` on ``xs`` through ``fastntm.functional`` with ``backend`` (``triton-large``: the Triton kernels
    with 16-row blocks), or the literal spec (``fastntm.reference``) where ``backend`` is None."""
    from fastntm import functional as F
    from fastntm import reference

    R, W, S, M = case["R"], case["W"], case["S"], case["M"]
    layout = dict(num_reads=R, num_writes=W, shift_width=S)
    if backend is None:
        fns = {"memory_step": lambda *t: reference.memory_step(*t, R),
               "memory_step_from_heads": lambda *t: reference.memory_step_from_heads(*t, R, W, S),
               "head_parameters": lambda raw: reference.head_parameters(raw, R, W, M, S)}
        out = fns.get(op, getattr(reference, op))(*xs.values())
    else:
        name = "triton" if backend == "triton-large" else backend
        fns = {"memory_step": lambda *t: F.memory_step(*t, num_reads=R, backend=name),
               "memory_step_from_heads": lambda *t: F.memory_step_from_heads(*t, **layout, backend=name),
               "head_parameters": lambda raw: F.head_parameters(raw, **layout, memory_width=M, backend=name)}
        step = fns.get(op, lambda *t: getattr(F, op)(*t, backend=name))
        if backend == "triton-large":
            from fastntm.kernels import _config  # imports Triton: only here

            with _config.force(block_n=16):
                out = step(*xs.values())
        else:
            out = step(*xs.values())
    return out if isinstance(out, tuple) else (out,)


def evaluate(op: str, backend: str | Callable | None, x: dict, case: dict, dtype: torch.dtype, device) -> dict:
    """Outputs and every input's gradient (zeros where none flows) of ``op`` in ``dtype``, as float64. The
    cotangents are drawn from the case's seed, and left out at the case's ``left_out`` positions."""
    xs = {n: t.to(device, dtype).requires_grad_() for n, t in inputs(op, x, case).items()}
    outs = backend(op, xs, case) if callable(backend) else call(op, backend, xs, case)
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    used = [(o, c.to(device, dtype)) for i, (o, c) in enumerate(zip(outs, cotangents))
            if i not in case["left_out"] or len(outs) == 1]
    grads = torch.autograd.grad([o for o, _ in used], list(xs.values()), [c for _, c in used], allow_unused=True)
    names = OUTPUTS if op.startswith("memory_step") else HEAD_PARAMETERS if op == "head_parameters" else (op,)
    values = dict(zip(names, outs))
    values.update({f"d{n}": torch.zeros_like(t) if g is None else g for (n, t), g in zip(xs.items(), grads)})
    return {n: v.detach().double().cpu() for n, v in values.items()}


def errors(values: dict, truth: dict) -> dict[str, float | None]:
    """Each value's error (norms over the tensor): ``|x - truth| / |truth|``, or ``|x - truth| / scale`` where
    the truth is below a millionth of ``scale``, the largest of the op's true values (or 1): a value that
    should be about 0 (a cancellation, or a gradient no path reaches: dL/dw_prev at g = 1) is judged beside
    the op's size, not its own. inf where ``x`` is not finite, None where the tensor is empty."""
    scale = max([1.0] + [t.norm().item() for t in truth.values() if t.numel()])
    found = {}
    for name, t in truth.items():
        v = values[name]
        if not t.numel():
            found[name] = None
        elif not torch.isfinite(v).all():
            found[name] = math.inf
        else:
            size = t.norm().item()
            found[name] = (v - t).norm().item() / (size if size >= 1e-6 * scale else scale)
    return found


def yardstick_dtype(dtype: torch.dtype) -> torch.dtype:
    """The literal spec's dtype whose error a backend's in ``dtype`` is measured against: float32, or the
    16-bit dtype itself (its inputs' and outputs' rounding is the spec's too)."""
    return dtype if dtype in LOW_PRECISION_FLOOR else torch.float32


def flagged(error: float | None, yardstick: float | None, dtype: torch.dtype) -> bool:
    if error is None:
        return False
    if math.isinf(error):
        return not math.isinf(yardstick)
    yard = 0.0 if math.isinf(yardstick) else yardstick
    if dtype == torch.float64:  # where fp32 lost a tenth or more, its error no longer bounds the conditioning
        return yard < 0.1 and error > max(1e-7, 1e-5 * yard)
    return error > max(LOW_PRECISION_FLOOR.get(dtype, 1e-4), 20 * yard)


def run(backends: list[str], ops: list[str], dtype: torch.dtype, seconds: float | None, draws: int | None,
        seed: int, device: torch.device, replay: int | None = None, planted: dict | None = None, echo=print) -> dict:
    """Draw cases until ``seconds`` or ``draws`` run out (or only draw ``replay``), draw ``n`` running
    ``ops[n % len(ops)]``; returns the counts and the flags, each with its draw's number, op, case, value,
    error and the yardstick's (the float64 spec's own non-finite values are flagged as backend ``literal``).
    ``planted``: more backends, each ``fn(op, inputs, case) -> outputs``."""
    planted = planted or {}
    unknown = [b for b in backends if b not in BACKENDS and b not in planted]
    if unknown:
        raise ValueError(f"backends: each of {', '.join(BACKENDS)}, got {unknown}")
    if not ops or not set(ops) <= set(OPS):
        raise ValueError(f"ops: all, or each of {', '.join(OPS)}, got {ops}")
    rng, flags, start, n = random.Random(seed), [], time.perf_counter(), 0
    while True:
        if replay is None and ((draws is not None and n >= draws) or
                               (seconds is not None and time.perf_counter() - start >= seconds)):
            break
        case, x = draw(rng)
        n += 1
        if replay is not None and n < replay:
            continue
        op = ops[n % len(ops)]
        truth = evaluate(op, None, x, case, torch.float64, device)
        found = {"literal": {value: math.inf for value, t in truth.items() if not torch.isfinite(t).all()}}
        if not found["literal"]:  # else the spec itself is not finite here: reported as the literal's flag
            yardstick = errors(evaluate(op, None, x, case, yardstick_dtype(dtype), device), truth)
            found = {name: {value: error for value, error in
                            errors(evaluate(op, planted.get(name, name), x, case, dtype, device), truth).items()
                            if flagged(error, yardstick[value], dtype)} for name in backends}
        for name, values in found.items():
            for value, error in values.items():
                yard = yardstick[value] if name != "literal" else None
                flags.append(dict(draw=n, op=op, backend=name, value=value, error=error, yardstick=yard, case=case))
                echo(f"draw {n}, {op}: {name} {value} error {error:.3g} (yardstick {yard}) {case}")
        if replay is not None:
            echo(f"draw {n}, {op}: {case}")
            break
    return dict(draws=n, seconds=time.perf_counter() - start, backends=backends, ops=ops, dtype=str(dtype),
                seed=seed, flags=flags)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backends", default="reference,numba")
    parser.add_argument("--ops", default="all", help=f"all, or some of {', '.join(OPS)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp64")
    parser.add_argument("--seconds", type=float, default=None, help="time budget (default 60 s without --draws)")
    parser.add_argument("--draws", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay", type=int, default=None,
                        help="run draw K alone (of the same --seed and --ops)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    backends, device = args.backends.split(","), torch.device(args.device)
    ops = list(OPS) if args.ops == "all" else args.ops.split(",")
    for flag, value in (("--seconds", args.seconds), ("--draws", args.draws), ("--replay", args.replay)):
        if value is not None and not value > 0:
            parser.error(f"{flag} must be > 0, got {value}")
    seconds = args.seconds if args.seconds is not None or args.draws is not None else 60.0
    try:
        result = run(backends, ops, DTYPES[args.dtype], seconds, args.draws, args.seed, device, args.replay)
    except ValueError as error:
        parser.error(f"--{error}")
    print(f"{result['draws']} draws in {result['seconds']:.0f} s, {len(result['flags'])} flagged "
          f"({', '.join(result['backends'])}, {args.dtype}, seed {args.seed})")
    if args.json:
        from benchmarks import common

        common.write_json(args.json, {**result, "environment": common.environment(device)})
    # In fp32 a flag is a draw to look at, unless its result is not finite (see above).
    failed = [f for f in result["flags"] if args.dtype == "fp64" or math.isinf(f["error"])]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
