"""Which gradients of the reference path's node (fused_reference.MemoryStep) a compile gets wrong on a GPU, by
cotangent, and the forward and backward graphs AOTAutograd traced (written to OUT/graphs-DEVICE-*.txt) to diff
against a CPU's. From the repository root: python benchmarks/results/h200-2026-11-28-b/node_graphs.py DEVICE OUT
"""
import os
import sys

import torch
from torch._dynamo.backends.common import aot_autograd

from fastntm import fused_reference, reference

dev, out_dir = sys.argv[1], sys.argv[2]
os.makedirs(out_dir, exist_ok=True)
torch.backends.cuda.matmul.allow_tf32 = False
B, N, M, H, R, S = 4, 16, 5, 2, 1, 3
W = H - R
gen = torch.Generator().manual_seed(3)
x = dict(mem=torch.randn(B, N, M, generator=gen), k=torch.randn(B, H, M, generator=gen),
         beta=torch.rand(B, H, generator=gen) * 5, g=torch.rand(B, H, generator=gen),
         s=torch.softmax(torch.randn(B, H, S, generator=gen), -1), gamma=1 + 3 * torch.rand(B, H, generator=gen),
         w_prev=torch.softmax(torch.randn(B, H, N, generator=gen), -1), e=torch.rand(B, W, M, generator=gen),
         a=torch.randn(B, W, M, generator=gen))
cot = [torch.randn(B, H, N, generator=gen), torch.randn(B, R, M, generator=gen), torch.randn(B, N, M, generator=gen)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def show(got, truth):
    """The relative error; where the spec's gradient is None (unused), got's largest magnitude."""
    if got is None or truth is None:
        return "-" if got is None else f"|{got.abs().max().item():.0e}|"
    return f"{rel(got, truth):.0e}"


def node(*t):
    return fused_reference.MemoryStep.apply(*t, R)


def grads(fn, which, dtype=torch.float32):
    xs = [t.to(dev, dtype).requires_grad_() for t in x.values()]
    outs = fn(*xs)
    used = [(o, c.to(dev, dtype)) for i, (o, c) in enumerate(zip(outs, cot)) if i in which]
    return torch.autograd.grad([o for o, _ in used], xs, [c for _, c in used], allow_unused=True)


def saving(tag):
    def compiler(kind):
        def compile_graph(gm, example_inputs):
            with open(f"{out_dir}/graphs-{dev}-{tag}-{kind}.txt", "w") as f:
                f.write(gm.print_readable(print_output=False))
            return gm.forward
        return compile_graph
    return aot_autograd(fw_compiler=compiler("fw"), bw_compiler=compiler("bw"))


for which in ((0,), (1,), (2,), (0, 1, 2)):
    truth = grads(lambda *t: reference.memory_step(*t, R), which, torch.float64)
    for label, backend in (("node eager", None), ("node dynamo eager", "eager"), ("node aot_eager", "aot_eager"),
                           ("node aot saved", saving("".join(map(str, which))))):
        torch._dynamo.reset()
        fn = node if backend is None else torch.compile(node, backend=backend, fullgraph=True)
        try:
            got = grads(fn, which)
            print(f"cot {which!s:10s} {label:18s} " + " ".join(
                f"{n} {show(g, t)}" for n, g, t in zip(x, got, truth)), flush=True)
        except Exception as exc:  # noqa: BLE001 - a diagnostic: say what failed and go on
            print(f"cot {which} {label}: FAILED {type(exc).__name__}: {str(exc)[:200]}", flush=True)
