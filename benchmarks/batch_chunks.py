"""The large-memory memory step on chunks of the batch in turn, against the whole batch in one call (CUDA).

    python -m benchmarks.batch_chunks --out runs/chunks              # large shape, fp32 and bf16
    python -m benchmarks.batch_chunks --chunks 16,2,1 --dtypes fp32

Why: a batch item's memory at the large shape (N 65,536, M 64) is 16 MiB in fp32, an H100's L2 cache 50 MB.
The forward reads memory twice (the similarity pass, then the read-write pass, the softmax's sums over all of N
between them) and the backward reads it and dL/dnew_mem twice (``_read_write_bwd_kernel``, then
``_mem_bwd_kernel``). Over the whole batch (256 MiB) every such pass streams from DRAM; over one or two items at
a time, the second pass may find the first's rows still in L2. Each chunk is its own ``kernels.memory_step``
call of the kernels' forward and backward on views of the batch's tensors, as a chunked dispatch would make.

For each dtype and chunk size c (items a call; ``--chunks``): the chunked outputs and gradients against the
whole batch's (they should be identical bit for bit: no kernel sums across items), then the forward and forward
+ backward timed replayed from a CUDA graph (``triton.testing.do_bench_cudagraph``) and by plain calls
(``do_bench``: more launches cost the host more). Prints p50 in us, the byte model's fraction of the copy
bandwidth (``benchmarks.common.op_bytes`` of the whole batch; a chunk that hits L2 moves fewer bytes than
the model counts, so this can pass 100%) and the speedup over one call; writes ``batch_chunks.json``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import time

import torch

from . import common
from .shapes import OP_SHAPES

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_CHUNKS = (16, 8, 4, 2, 1)


def chunked_step(x, R: int, chunk: int, cot):
    """(forward, forward + backward) of the kernels' memory step over chunks of ``chunk`` items of ``x``, given
    the whole batch's cotangents ``cot``; forward + backward with ``gather=True`` returns the outputs and the
    inputs' gradients of the whole batch (concatenated, for checks; the timed calls skip that).

    The host functions that ``MemoryStep`` calls (``_forward``, ``_backward``), not autograd: a CUDA graph's
    capture of ``torch.autograd.grad`` over the chunks' leaves failed on the H100 (torch 2.11: "operation would
    make the legacy stream depend on a capturing blocking stream"), and the kernels' work is the same."""
    step = importlib.import_module("fastntm.kernels.memory_step")
    B = x[0].shape[0]
    chunks = [[t[b:b + chunk] for t in x] for b in range(0, B, chunk)]
    cots = [[c[b:b + chunk] for c in cot] for b in range(0, B, chunk)]

    def forward():
        return [step._forward(*xs, R, True) for xs in chunks]

    def forward_backward(gather: bool = False):
        outs, grads = [], []
        for xs, (dw, dr, dnew) in zip(chunks, cots):
            w, r, new, K, mx, se, _ = step._forward(*xs, R, True)
            outs.append((w, r, new))
            grads.append(step._backward(*xs, w, K, mx, se, dw, dr, dnew, R))
        if not gather:
            return None
        return ([torch.cat([out[i] for out in outs]) for i in range(3)]
                + [torch.cat([g[i] for g in grads]) for i in range(len(x))])

    return forward, forward_backward


def measure(shape, dtype, chunks, device) -> list[dict]:
    from triton.testing import do_bench, do_bench_cudagraph

    from fastntm import kernels

    x = common.op_inputs(shape, device, dtype)
    cot = common.cotangents(kernels.memory_step(*x, shape.R))
    model = common.op_bytes(shape, dtype)
    rows, base = [], None
    for chunk in chunks:
        forward, forward_backward = chunked_step(x, shape.R, chunk, cot)
        results = forward_backward(gather=True)
        row = dict(dtype=str(dtype).removeprefix("torch."), chunk=chunk, calls=shape.B // chunk)
        if base is None:
            base = results
        else:
            row["identical"] = all(torch.equal(a, b) for a, b in zip(base, results))
            row["max_abs_diff"] = max((a.float() - b.float()).abs().max().item() for a, b in zip(base, results))
        del results
        for key, fn in (("fwd", forward), ("fwd_bwd", forward_backward)):
            torch.cuda.synchronize()
            row[f"{key}_us"] = do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e3
            row[f"{key}_graph_us"] = do_bench_cudagraph(fn, rep=50, return_mode="median") * 1e3
            row[f"{key}_bytes_model"] = model[key]
        rows.append(row)
        del forward, forward_backward
        torch.cuda.empty_cache()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="large", choices=sorted(OP_SHAPES))
    ap.add_argument("--chunks", default=",".join(map(str, DEFAULT_CHUNKS)),
                    help="items a call, comma-separated; the first is the reference for identity and speedup")
    ap.add_argument("--dtypes", default="fp32,bf16", help=f"comma-separated, from {', '.join(DTYPES)}")
    ap.add_argument("--out", default="runs/chunks", help="folder for batch_chunks.json")
    args = ap.parse_args(argv)
    shape = OP_SHAPES[args.shape]
    chunks = [int(c) for c in args.chunks.split(",")]
    bad = [c for c in chunks if c < 1 or shape.B % c]
    if bad:
        ap.error(f"--chunks: each must divide the shape's batch {shape.B}, got {bad}")
    dtypes = args.dtypes.split(",")
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        ap.error(f"--dtypes: expected names from {sorted(DTYPES)}, got {unknown}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "batch_chunks.json")
    if not torch.cuda.is_available():
        print("batch_chunks: no CUDA device; nothing measured")
        common.write_json(path, dict(skipped="no CUDA device"))
        return 0
    device = torch.device("cuda")
    copy = common.copy_bandwidth(device)
    result = dict(environment=common.environment(device), copy=copy, shape=shape.as_dict(), rows=[])
    start = time.perf_counter()
    print(f"batch_chunks on {result['environment']['device']}, shape {shape.name}, copy {copy['copy_GBps']:.0f} GB/s")
    print(f"{'dtype':5} {'chunk':>5} {'calls':>5} {'same':>5} | {'fwd graph':>9} {'frac':>5} {'x':>5} {'fwd':>7} | "
          f"{'f+b graph':>9} {'frac':>5} {'x':>5} {'f+b':>7}")
    for name in dtypes:
        rows = measure(shape, DTYPES[name], chunks, device)
        result["rows"] += rows
        common.write_json(path, result)
        for row in rows:
            cells = []
            for key in ("fwd", "fwd_bwd"):
                graph, first = row[f"{key}_graph_us"], rows[0][f"{key}_graph_us"]
                frac = row[f"{key}_bytes_model"] / (graph * 1e-6) / (copy["copy_GBps"] * 1e9)
                cells.append(f"{graph:9.1f} {frac:5.2f} {first / graph:5.2f} {row[f'{key}_us']:7.1f}")
            same = {True: "yes", False: "NO", None: "-"}[row.get("identical")]
            print(f"{name:5} {row['chunk']:5d} {row['calls']:5d} {same:>5} | {cells[0]} | {cells[1]}")
    result["wall_s"] = time.perf_counter() - start
    common.write_json(path, result)
    print(f"written {path} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
