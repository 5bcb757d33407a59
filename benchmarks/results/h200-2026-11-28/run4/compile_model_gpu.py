import time, torch
from fastntm import FastNTM
torch.manual_seed(0)
dev = "cuda"
for ce in (0, 4):
    for be in ("triton", "reference"):
        torch._dynamo.reset()
        model = FastNTM(9, 8, memory_slots=128, memory_width=20, backend=be, checkpoint_every=ce).to(dev)
        x = torch.rand(12, 32, 9, device=dev)
        y_e, _ = model(x); y_e.square().sum().backward()
        ge = [p.grad.clone() for p in model.parameters()]; model.zero_grad()
        cm = torch.compile(model)
        t = time.time(); y_c, _ = cm(x); y_c.square().sum().backward(); torch.cuda.synchronize(); tc = time.time() - t
        gc = [p.grad.clone() for p in model.parameters()]; model.zero_grad()
        err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(gc, ge))
        ts = []
        for f in (model, cm):
            for _ in range(3): f(x)[0].square().sum().backward()
            torch.cuda.synchronize(); t = time.time()
            for _ in range(10): f(x)[0].square().sum().backward()
            torch.cuda.synchronize(); ts.append((time.time() - t) / 10 * 1e3)
        print(f"checkpoint_every={ce} backend={be}: compile+first {tc:.1f} s, out err {(y_c - y_e).abs().max().item():.1e}, "
              f"grad rel err {err:.1e}, graph breaks {dict(torch._dynamo.utils.counters['graph_break'])}, "
              f"eager {ts[0]:.2f} ms, compiled {ts[1]:.2f} ms")
