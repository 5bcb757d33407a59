"""Every kernel at every block configuration the dispatch can choose builds for sm_80 and sm_90
with fp32 and bf16 tensors, and none spills registers (no stack frame in the cubin). No GPU needed::

    TRITON_INTERPRET=0 pytest tests/test_kernels_static.py -s   # -s prints the register table

Set ``FASTNTM_STATIC_TABLE=path`` to also write the table to a file, and ``FASTNTM_STATIC_DTYPES``
(default ``fp32,bf16``) to check other tensor dtypes, e.g. ``fp32,bf16,fp16``. The compilation needs the
interpreter off (it replaces the compiler); ``tests/conftest.py`` turns it on by default without a
GPU, so under the interpreter (a plain ``pytest`` run) one test reruns this file in a fresh process
with ``TRITON_INTERPRET=0`` and passes when it passes.
"""

import importlib
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastntm.kernels import _config  # noqa: E402

ms = importlib.import_module("fastntm.kernels.memory_step")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
aot = pytest.mark.skipif(INTERPRETING, reason="AOT compilation needs the interpreter off (run in a subprocess below)")

# Compile options the host code passes at launch, beyond num_warps.
LAUNCH_OPTIONS = {"_memory_step_onchip_kernel": dict(maxnreg=_config.ONCHIP_MAXNREG),
                  "_memory_step_onchip_bwd_kernel": dict(maxnreg=_config.ONCHIP_MAXNREG)}
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
ARCHS = (80, 90)
DTYPES = tuple(os.environ.get("FASTNTM_STATIC_DTYPES", "fp32,bf16").split(","))
"""Dtypes of the tensors the kernels load and store. fp16 compiles to within a few registers of bf16 (and
spilled nowhere when last checked), so it is left out by default to keep the run short."""
# Pointers that are fp32 whatever the tensors' dtype: saved logits and sums, scratch, per-block partials.
FP32_POINTERS = {"p_K", "p_max", "p_sum", "p_P", "p_pmax", "p_psum", "p_pw", "p_pP", "p_rpart", "p_depart",
                 "p_dapart", "p_dkpart", "p_scr", "p_dwrw", "p_dot", "p_dws", "p_dwc", "p_pdot", "p_pdgamma",
                 "p_pds", "p_pdg", "p_pdbeta"}
# The large-memory backward's passes over (B, H, N) vectors, launched like ``_shift_sharpen_kernel``.
VECTOR_BWD_KERNELS = ("_sharpen_dot_kernel", "_sharpen_bwd_kernel", "_interp_bwd_kernel")

# Triton launches of one forward / backward step, by regime (plus small torch ops on (B, H, *) vectors and
# block partials: large-memory forward 4 (max, sum-exp combine, sharpening sum, read partial sum); backward
# about 20, none over a (B, H, N) vector).
LAUNCHES = {True: "fwd 1, bwd 1", False: "fwd 3, bwd 5"}


def dispatch_blocks():
    """Every ``Blocks`` the dispatch returns, over all slot widths it takes and N up to 2^20."""
    seen = set()
    BM = 16
    while BM <= _config.MAX_BM:
        for log_n in range(0, 21):
            seen.add(_config.choose(2**log_n, BM))
        BM *= 2
    return sorted(seen, key=lambda b: (not b.onchip, b.BM, b.BN))


def kernel_configs():
    """(kernel name, constexprs, num_warps) for every distinct launch the host code can make."""
    out = []
    for blk in dispatch_blocks():
        nw, bm = blk.num_warps, dict(BN=blk.BN, BM=blk.BM)
        if blk.onchip:
            for rw in (True, False):
                out.append(("_memory_step_onchip_kernel", dict(RW=rw, **bm), nw))
            out.append(("_memory_step_onchip_bwd_kernel", bm, blk.bwd_warps))
        else:
            out.append(("_similarity_kernel", bm, nw))
            out.append(("_read_write_kernel", dict(NORMALIZE=True, WRITE=True, **bm), nw))
        # Standalone read and write use the read/write kernel in both regimes.
        for write in (True, False):
            out.append(("_read_write_kernel", dict(NORMALIZE=False, WRITE=write, **bm), nw))
        # The two-pass backward: large memory, and standalone read and write in both regimes.
        out.append(("_read_write_bwd_kernel", bm, nw))
        for has_dk in (True, False):
            out.append(("_mem_bwd_kernel", dict(HAS_DK=has_dk, **bm), nw))
    for log_n in range(4, 21):
        for name in ("_shift_sharpen_kernel", *VECTOR_BWD_KERNELS):
            out.append((name, dict(BN=_config.vector_block(2**log_n)), 4))
    # Regimes share configurations (on-chip BN=64 BM=32 is also the large-memory block at BM=32).
    distinct = []
    for c in out:
        if c not in distinct:
            distinct.append(c)
    return distinct


def pointer_type(kernel, arg, consts, dtype):
    fp32 = arg in FP32_POINTERS or (kernel, arg) == ("_read_write_bwd_kernel", "p_dw") or (
        (kernel, arg) == ("_read_write_kernel", "p_w") and consts.get("NORMALIZE"))
    return "*fp32" if fp32 else f"*{dtype}"


def compile_one(job):
    name, consts, num_warps, arch, dtype = job
    fn = getattr(ms, name)
    signature = {
        n: "constexpr" if n in consts else (pointer_type(name, n, consts, dtype) if n.startswith("p_") else "i32")
        for n in fn.arg_names
    }
    compiled = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=consts),
        target=GPUTarget("cuda", arch, 32),
        options=dict(num_warps=num_warps, **LAUNCH_OPTIONS.get(name, {})),
    )
    # The cubin is the one a launch loads, from Triton's own ptxas run: its stack frame holds any spill.
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    regs, stack = (int(re.search(rf"\b{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
    return dict(kernel=name, consts=consts, num_warps=num_warps, arch=arch, dtype=dtype, regs=regs,
                stack=stack, shared=compiled.metadata.shared)


@pytest.fixture(scope="module")
def results():
    jobs = [(name, consts, nw, arch, dtype) for name, consts, nw in kernel_configs()
            for dtype in DTYPES for arch in ARCHS]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        rows = list(pool.map(compile_one, jobs))
    lines = [f"{'kernel':30} {'config':36} {'warps':>5} {'sm':>3} {'dtype':>5} {'regs':>4} {'stack B':>7} "
             f"{'smem B':>6}"]
    for r in rows:
        cfg = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["consts"].items())
        lines.append(f"{r['kernel']:30} {cfg:36} {r['num_warps']:>5} {r['arch']:>3} {r['dtype']:>5} {r['regs']:>4} "
                     f"{r['stack']:>7} {r['shared']:>6}")
    lines.append("Triton launches per step: on-chip " + LAUNCHES[True] + "; large memory " + LAUNCHES[False])
    table = "\n".join(lines)
    print("\n" + table)
    if os.environ.get("FASTNTM_STATIC_TABLE"):
        with open(os.environ["FASTNTM_STATIC_TABLE"], "w") as f:
            f.write(table + "\n")
    return rows


@aot
def test_every_config_compiles_for_sm80_and_sm90(results):
    assert {r["arch"] for r in results} == set(ARCHS)
    assert {r["dtype"] for r in results} == set(DTYPES)
    assert len(results) == len(ARCHS) * len(DTYPES) * len(kernel_configs())


@aot
def test_no_config_spills_registers(results):
    spilling = [r for r in results if r["stack"]]
    assert not spilling, "spills (stack frame): " + "; ".join(
        f"{r['kernel']} {r['consts']} warps={r['num_warps']} sm_{r['arch']} {r['dtype']}: {r['stack']} B"
        for r in spilling)


@pytest.mark.skipif(not INTERPRETING, reason="runs the checks above directly")
def test_static_checks_pass_with_the_interpreter_off():
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    print(proc.stdout[-20000:])
    assert proc.returncode == 0, f"static checks failed (rc {proc.returncode}):\n{proc.stdout[-20000:]}\n{proc.stderr[-5000:]}"
