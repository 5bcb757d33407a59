"""Error of the similarity pass's tensor-core dot products, modelled on the CPU: a GPU-free measure of how close
tf32 three times over comes to fp32 multiply-adds for the cosine logits.

    python -m benchmarks.tf32_error [--rows 20000] [--width 64] [--json F]

``_similarity_kernel`` takes ``mem k`` as ``mem_hi k_hi + mem_hi k_lo + mem_lo k_hi`` (``memory_step._tf32_split``:
``x_hi`` is x with tf32's 10 mantissa bits, ``x_lo = x - x_hi``; ``mem_hi`` cut to them, ``k_hi`` rounded), each
product on the tensor cores, which read a tf32 operand's top 19 bits (so ``x_lo``'s low bits are dropped),
multiply exactly and add in fp32. Here each of those steps is done in numpy: the operands cut as the hardware
reads them, the products in float64 (exact for tf32 values), the sums rounded to fp32 term by term. Against
it: fp32 multiply-adds in order (the pass on CUDA cores), both operands cut (the kernels before stop 26), both
rounded (which cost the similarity pass 245 registers where it takes 136), and the fourth product
``mem_lo k_lo``. Errors are ``|dot - exact| / (|mem[n]| |k|)``, the error of the cosine, over rows near the
key (cosine about 1, where a large ``beta`` makes the logits' errors count) and random rows. The tensor cores'
own order of additions within an mma is not modelled. ``tests/test_kernels.py`` runs the kernels under the
interpreter with every tf32 ``tl.dot`` operand cut by ``tf32`` here, as the hardware reads it.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

LOW_BITS = np.uint32(0xFFFFE000)


def tf32(x: np.ndarray) -> np.ndarray:
    """``x`` as a tensor core reads an fp32 register given as tf32: its 13 low bits dropped."""
    return (x.view(np.uint32) & LOW_BITS).view(np.float32)


def round_tf32(x: np.ndarray) -> np.ndarray:
    """``x`` rounded to tf32, to the nearest (ties away from zero), as ``memory_step._tf32_split`` does."""
    return ((x.view(np.uint32) + np.uint32(0x1000)) & LOW_BITS).view(np.float32)


def split(x: np.ndarray, rounded: bool) -> tuple[np.ndarray, np.ndarray]:
    """``(hi, lo)``, ``hi + lo == x``: ``hi`` rounded to tf32, or cut."""
    hi = round_tf32(x) if rounded else tf32(x)
    return hi, x - hi


def fp32_sum_of_products(pairs, rows: int) -> np.ndarray:
    """sum over the pairs and the last axis of x * y, each product exact, each sum rounded to fp32."""
    acc = np.zeros(rows, np.float32)
    for x, y in pairs:
        prod = x.astype(np.float64) * y.astype(np.float64)
        for i in range(prod.shape[-1]):
            acc = (acc.astype(np.float64) + prod[:, i]).astype(np.float32)
    return acc


def fp32_fma(mem: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Multiply-adds in order, each rounded once: the pass on CUDA cores."""
    return fp32_sum_of_products([(mem, k[None, :])], len(mem))


def tensor_core(mem: np.ndarray, k: np.ndarray, products: int = 3, mem_rounded: bool = False,
                k_rounded: bool = True) -> np.ndarray:
    """The kernel's product by default: ``mem`` cut, ``k`` rounded, three products."""
    (m_hi, m_lo), (k_hi, k_lo) = split(mem, mem_rounded), split(k, k_rounded)
    pairs = [(m_hi, tf32(k_lo)), (tf32(m_lo), k_hi), (m_hi, k_hi)]
    if products == 4:
        pairs.insert(0, (tf32(m_lo), tf32(k_lo)))
    return fp32_sum_of_products([(x, np.broadcast_to(y, x.shape)) for x, y in pairs], len(mem))


def errors(rows: int, width: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    k = rng.standard_normal(width).astype(np.float32)
    cases = {"near the key": (k[None, :] + 1e-3 * rng.standard_normal((rows, width))).astype(np.float32),
             "random": rng.standard_normal((rows, width)).astype(np.float32)}
    out = {}
    for name, mem in cases.items():
        exact = mem.astype(np.float64) @ k.astype(np.float64)
        scale = np.linalg.norm(mem.astype(np.float64), axis=1) * np.linalg.norm(k.astype(np.float64))
        out[name] = {}
        for label, dot in (("fp32 multiply-add", fp32_fma(mem, k)), ("tf32 x3 (the kernel)", tensor_core(mem, k)),
                           ("tf32 x3, both cut", tensor_core(mem, k, k_rounded=False)),
                           ("tf32 x3, both rounded", tensor_core(mem, k, mem_rounded=True)),
                           ("tf32 x4", tensor_core(mem, k, 4))):
            err = np.abs(dot.astype(np.float64) - exact) / scale
            out[name][label] = {"mean": float(err.mean()), "max": float(err.max())}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--width", type=int, default=64, help="M, the slot width")
    p.add_argument("--json", help="write the errors here")
    args = p.parse_args(argv)
    result = errors(args.rows, args.width)
    print(f"cosine error |dot - exact| / (|mem[n]| |k|), {args.rows} rows of M = {args.width}")
    for case, rows in result.items():
        for label, e in rows.items():
            print(f"  {case:14s} {label:22s} mean {e['mean']:.2e}  max {e['max']:.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": args.rows, "width": args.width, "errors": result}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
