"""Where the reference path's single node (fused_reference.MemoryStepFromHeads) loses its gradients on a GPU:
op level, eager and compiled several ways, every input's gradient against the float64 literal spec; then the
whole model, compiled with the node forced (the workaround off). Run from the repository root:
    python benchmarks/results/h200-2026-11-28-b/node_check.py [cuda|cpu]
"""
import sys
import time

import torch

from fastntm import FastNTM, fused_reference, reference

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
B, N, M, R, W, S = 32, 128, 20, 1, 1, 3
gen = torch.Generator().manual_seed(3)
x = [torch.randn(B, N, M, generator=gen), 2 * torch.randn(B, (R + W) * (M + S + 3) + 2 * W * M, generator=gen),
     torch.softmax(3 * torch.randn(B, R + W, N, generator=gen), -1)]
cot = [torch.randn(B, R + W, N, generator=gen), torch.randn(B, R, M, generator=gen), torch.randn(B, N, M, generator=gen)]


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def run(fn, dtype=torch.float32, which=(0, 1, 2)):
    xs = [t.to(dev, dtype).requires_grad_() for t in x]
    out = fn(*xs)
    used = [(o, c.to(dev, dtype)) for i, (o, c) in enumerate(zip(out, cot)) if i in which]
    grads = torch.autograd.grad([o for o, _ in used], xs, [c for _, c in used], allow_unused=True)
    return [o.detach() for o in out], grads


def node(mem, raw, wp):
    return fused_reference.MemoryStepFromHeads.apply(mem, raw, wp, R, W, S)


def literal(mem, raw, wp):
    return reference.memory_step_from_heads(mem, raw, wp, R, W, S)


names = ["mem", "raw", "w_prev"]
for which in ((0, 1, 2), (2,))[: 2 if dev == "cuda" else 1]:
    print(f"--- cotangents of outputs {which} (0 w, 1 r, 2 new_mem)")
    truth = run(literal, torch.float64, which)
    cases = [("literal eager", literal, None), ("node eager", node, None),
             ("node aot_eager", node, "aot_eager"), ("node aot_eager_decomp_partition", node, "aot_eager_decomp_partition"),
             ("node inductor", node, "inductor"), ("literal inductor", literal, "inductor")]
    for label, fn, be in cases:
        torch._dynamo.reset()
        f = fn if be is None else torch.compile(fn, backend=be, fullgraph=True)
        try:
            t0 = time.time()
            out, grads = run(f, torch.float32, which)
            errs = [rel(o, t) for o, t in zip(out, truth[0])] + [
                float("nan") if g is None else rel(g, t) for g, t in zip(grads, truth[1])]
            print(f"{label:34s} outputs {' '.join(f'{e:.1e}' for e in errs[:3])} | grads "
                  + " ".join(f"{n} {e:.1e}" for n, e in zip(names, errs[3:])) + f" ({time.time() - t0:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - a diagnostic: say what failed and go on
            print(f"{label:34s} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)

# The whole model, compiled with the node forced on the GPU (the workaround, _literal_serves, off).
print("--- FastNTM, backend reference, compiled (inductor), the node forced")
original = fused_reference._literal_serves
fused_reference._literal_serves = lambda tensors: fused_reference.backend.transformed(tensors)
try:
    # Eager first: the node (the patched _literal_serves) against the literal composition (forced).
    for ce in (0, 4):
        answers = []
        for literal_always in (False, True):
            fused_reference._literal_serves = (lambda tensors: True) if literal_always else (
                lambda tensors: fused_reference.backend.transformed(tensors))
            torch.manual_seed(0)
            model = FastNTM(9, 8, memory_slots=128, memory_width=20, backend="reference", checkpoint_every=ce).to(dev)
            xin = torch.rand(12, 32, 9, device=dev)
            y, _ = model(xin)
            answers.append((y.detach(), torch.autograd.grad(y.square().sum(), list(model.parameters()))))
        (yn, gn), (yl, gl) = answers
        worst = max(((rel(a, b), n) for (n, _), a, b in zip(model.named_parameters(), gn, gl)))
        print(f"eager, checkpoint_every={ce}, node against literal: out {rel(yn, yl):.1e}, worst grad {worst[0]:.1e} "
              f"({worst[1]})", flush=True)
    fused_reference._literal_serves = lambda tensors: fused_reference.backend.transformed(tensors)
    for ce, be in ((0, "inductor"), (4, "inductor"), (4, "aot_eager")):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = FastNTM(9, 8, memory_slots=128, memory_width=20, backend="reference", checkpoint_every=ce).to(dev)
        xin = torch.rand(12, 32, 9, device=dev)
        answers = []
        for f in (model, torch.compile(model, backend=be)):
            y, _ = f(xin)
            answers.append((y.detach(), torch.autograd.grad(y.square().sum(), list(model.parameters()))))
        (ye, ge), (yc, gc) = answers
        worst = max(((rel(c, e), n) for (n, _), e, c in zip(model.named_parameters(), ge, gc)))
        print(f"checkpoint_every={ce} {be}: out {rel(yc, ye):.1e}, worst grad {worst[0]:.1e} ({worst[1]})", flush=True)
finally:
    fused_reference._literal_serves = original
