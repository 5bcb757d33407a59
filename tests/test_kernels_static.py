"""Every kernel at every block configuration the dispatch can choose builds for sm_80 and sm_90
with fp32 and bf16 tensors, and none spills registers (no stack frame in the cubin). No GPU needed::

    TRITON_INTERPRET=0 pytest tests/test_kernels_static.py -s   # -s prints the register table

Set ``FASTNTM_STATIC_TABLE=path`` to also write the table to a file, and ``FASTNTM_STATIC_DTYPES``
(default ``fp32,bf16``) to check other tensor dtypes, e.g. ``fp32,bf16,fp16``. The compilation needs the
interpreter off (it replaces the compiler); ``tests/conftest.py`` turns it on by default without a
GPU, so under the interpreter (a plain ``pytest`` run) one test reruns this file in a fresh process
with ``TRITON_INTERPRET=0`` and passes when it passes; that process starts when collection ends and runs
beside the other tests.

Each configuration is compiled two ways, each for both targets (its sm_80 build from its sm_90 build's Triton IR,
``benchmarks.launches.compile_kernel_for``: the same cubin as a build from source). ``any``: no argument specialized, the code a launch gets when
sizes and strides are not multiples of 16 (M = 20: scalar loads); the on-chip kernels, which take N and
M as constants, at N = BN - 1 and M = BM - 1 (rows in chunks of 4) or M = BM (whole rows). ``as launched``: the host code runs
at the benchmark shapes (``LAUNCH_SHAPES``) with its launches recorded, not made, and each recorded
launch is compiled as Triton's launcher specializes it: pointers 16-byte aligned and integers that are
multiples of 16 marked so (vectorized loads and other layouts, so other register counts and spills),
integers equal to 1 made constants. The host code runs with every gradient given and with none, in
each of ``DTYPES``, and with fp32 parameters on memory of each other dtype (``/fp32 params``).
"""

import contextlib
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not part of the installed package

from benchmarks.launches import (  # noqa: E402
    KERNEL_MODULES,
    Specialized,
    compile_kernel_for,
    kernel_fn,
    kernel_names,
    own_constexprs,
    recording,
    run_tool,
    specialize,
)
from benchmarks.launches import heads as kheads  # noqa: E402
from benchmarks.launches import memory_step as ms  # noqa: E402
from fastntm.kernels import _config  # noqa: E402

kread = importlib.import_module("fastntm.kernels.read")
kwrite = importlib.import_module("fastntm.kernels.write")

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
aot = pytest.mark.skipif(INTERPRETING, reason="AOT compilation needs the interpreter off (run in a subprocess below)")

# Compile options the host code passes at launch, beyond num_warps.
LAUNCH_OPTIONS = {"_memory_step_onchip_kernel": dict(maxnreg=_config.MAXNREG),
                  "_onchip_heads_bwd_kernel": dict(maxnreg=_config.MAXNREG),
                  "_onchip_mem_bwd_kernel": dict(maxnreg=_config.MAXNREG),
                  "_read_write_bwd_kernel": dict(maxnreg=_config.MAXNREG)}
ARCHS = (80, 90)
DTYPES = tuple(os.environ.get("FASTNTM_STATIC_DTYPES", "fp32,bf16").split(","))
"""Dtypes of the tensors the kernels load and store. fp16 compiles to within a few registers of bf16 (and
spilled nowhere when last checked), so it is left out by default to keep the run short."""
# Pointers that are fp32 whatever the tensors' dtype: saved logits and sums, scratch, per-block partials.
FP32_POINTERS = {"p_K", "p_max", "p_sum", "p_P", "p_pmax", "p_psum", "p_pw", "p_pP", "p_rpart", "p_depart",
                 "p_dapart", "p_dkpart", "p_scr", "p_dot", "p_v", "p_dwc", "p_pdot", "p_psums",
                 "p_sums", "p_pdbeta", "p_part", "p_dkrows", "p_ck", "p_cn", "p_x"}
# A tensor-core instruction taking tf32 operands: mma.sync (sm_80 on) or wgmma (sm_90).
TF32_MMA = re.compile(r"\b(?:mma\.sync|wgmma\.mma_async)\S*\.tf32\b")
# The large-memory passes over (B, H, N) vectors and block partials, launched like ``_shift_sharpen_kernel``.
VECTOR_KERNELS = ("_shift_sharpen_kernel", "_softmax_merge_kernel", "_sharpen_bwd_kernel", "_interp_bwd_kernel")
SHIFT_KERNELS = ("_shift_sharpen_kernel", "_sharpen_bwd_kernel")
"""Those that take the shift's half-width K as a constant (``memory_step._shift``)."""

# Triton launches of one forward / backward step, by regime (plus torch's sums of one-number block partials:
# large-memory forward 1, the sharpening's; backward 1, the shift pass's partials of sum dwc wc, for the
# softmax's backward). ``_sum_blocks_kernel`` sums the reads' partials, dL/de's and dL/da's (one launch), the
# sharpening backward's and dL/dk's.
LAUNCHES = {True: "fwd 1, bwd 2", False: "fwd 5, bwd 9"}

# (N, M, R, W, S) of benchmarks/shapes.py's paper, medium and large shapes, and a width that is not a multiple
# of 16 (Triton specializes the pointers, not M and the row strides). The batch is a grid dimension, never a
# kernel argument, so B = 1 here.
LAUNCH_SHAPES = {"paper": (128, 20, 1, 1, 3), "medium": (4096, 64, 2, 1, 3), "large": (65536, 64, 4, 1, 3),
                 "M40": (4096, 40, 2, 1, 3)}
BLOCK_MS = tuple(2**i for i in range(4, _config.MAX_BM.bit_length()))
"""Every slot width the kernels take: 16 up to ``_config.MAX_BM``."""
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dispatch_blocks():
    """Every ``Blocks`` the dispatch returns, over all slot widths it takes (a multiple of 16 and not:
    the warps may differ) and N up to 2^20."""
    seen = set()
    for BM in BLOCK_MS:
        for log_n in range(0, 21):
            seen.update(_config.choose(2**log_n, M) for M in (BM, BM - 8))
    return sorted(seen, key=lambda b: (not b.onchip, b.BM, b.BN))


def kernel_configs():
    """(kernel name, constexprs, num_warps) for every distinct launch the host code can make."""
    out = []
    for blk in dispatch_blocks():
        nw, bm = blk.num_warps, dict(BN=blk.BN, BM=blk.BM)
        if blk.onchip:
            # Rows chunked by 4 columns (they load element by element) or whole (16 bytes a thread). N and M
            # are constants of these kernels: a masked row and, where chunked, masked columns.
            for bc in sorted({4, blk.BM}):
                nm = dict(N=blk.BN - 1, M=blk.BM - 1 if bc == 4 else blk.BM)
                for rw in (True, False):
                    out.append(("_memory_step_onchip_kernel", dict(RW=rw, BC=bc, **bm, **nm), nw))
                out += [(name, dict(BC=bc, **bm, **nm), blk.bwd_warps)
                        for name in ("_onchip_heads_bwd_kernel", "_onchip_mem_bwd_kernel")]
        else:
            # The heads' products once or twice over (H up to 8, and up to 16).
            out += [("_similarity_kernel", dict(BN=blk.sim_BN, BM=blk.BM, BH=_config.PRODUCT_HEADS, HG=hg),
                     blk.sim_warps) for hg in (1, 2)]
            out.append(("_read_write_kernel", dict(NORMALIZE=True, WRITE=True, **bm), nw))
        # Standalone read and write use the read/write kernel in both regimes.
        for write in (True, False):
            out.append(("_read_write_kernel", dict(NORMALIZE=False, WRITE=write, **bm), nw))
        # The two-pass backward: large memory (with the cosine's dL/dk), and standalone read and write in
        # both regimes (without).
        bwd_bn, bwd_nw = blk.memory_bwd
        # The reads' dL/dw in 0 (a write alone), 1 or 2 products of 8 heads.
        out += [("_read_write_bwd_kernel", dict(RG=rg, BH=_config.PRODUCT_HEADS, BN=bwd_bn, BM=blk.BM), bwd_nw)
                for rg in (0, 1, 2)]
        for has_dk in (False,) if blk.onchip else (True, False):
            out.append(("_mem_bwd_kernel", dict(HAS_DK=has_dk, BN=bwd_bn, BM=blk.BM), bwd_nw))
    for log_n in range(4, 21):
        BV = _config.vector_block(2**log_n)
        out += [(name, dict(BN=BV), 4) for name in VECTOR_KERNELS if name not in SHIFT_KERNELS]
        # A build for each S: the paper's (K = 1) at every block, and K = 2 at the largest.
        out += [(name, dict(K=K, BN=BV), 4) for name in SHIFT_KERNELS
                for K in ((1, 2) if BV == _config.vector_block(2**20) else (1,))]
        out += [("_softmax_bwd_kernel", dict(BN=BV, BM=BM), 4) for BM in BLOCK_MS]
    out += [("_head_grads_kernel", dict(BN=64, BP=8, BM=BM), 4) for BM in BLOCK_MS]
    out += [("_sum_blocks_kernel", dict(BR=2**i, BX=16), _config.SUM_WARPS)
            for i in range(4, _config.SUM_ROWS.bit_length())]
    out += [(name, dict(BL=BL), 1) for BL in BLOCK_MS for name in kernel_names(kheads)]
    # Regimes share configurations (on-chip BN=64 BM=32 is also the large-memory block at BM=32).
    distinct = []
    for c in out:
        if c not in distinct:
            distinct.append(c)
    return distinct


def _run_host_code(N, M, R, W, S, dtype, mem_dtype):
    """Every host path at one shape: the step forward and backward (every gradient given, and without
    dL/dw, dL/dr or dL/dnew_mem: other pointers stand in for them), addressing, read and write alone."""
    H = R + W

    def t(*shape, dtype=dtype):
        return torch.zeros(shape, dtype=dtype)

    mem, k, beta, g, s, gamma, w_prev, e, a = t(1, N, M, dtype=mem_dtype), t(1, H, M), t(1, H), t(1, H), \
        t(1, H, S), t(1, H), t(1, H, N), t(1, W, M), t(1, W, M)
    w, r, new, K, mx, se = ms._forward(mem, k, beta, g, s, gamma, w_prev, e, a, R, True)
    ms._backward(mem, k, beta, g, s, gamma, w_prev, e, a, w, K, mx, se, w, r, new, R)
    ms._backward(mem, k, beta, g, s, gamma, w_prev, e, a, w, K, mx, se, None, None, None, R)
    none = t(1, 0, M)
    w, _, _, K, mx, se = ms._forward(mem, k, beta, g, s, gamma, w_prev, none, none, H, False)
    ms._backward(mem, k, beta, g, s, gamma, w_prev, none, none, w, K, mx, se, w, None, None, H)
    w_read, w_write = w[:, :R].contiguous(), w[:, R:].contiguous()
    kread._read_bwd(mem, w_read, kread._read_fwd(mem, w_read))
    kwrite._write_bwd(mem, w_write, e, a, kwrite._write_fwd(mem, w_write, e, a))
    raw = t(1, H * (M + S + 3) + 2 * W * M)
    kheads._backward(raw, *kheads._forward(raw, H, W, M, S), H, W, M, S)


def launched_configs():
    """(kernel, signature, constexprs, attrs, options, label, dtype) of every distinct launch the host code
    makes at ``LAUNCH_SHAPES`` with each of ``DTYPES``, specialized as Triton's launcher does."""
    labels = []
    with recording() as launches:
        for shape_name, shape in LAUNCH_SHAPES.items():
            # Each dtype alone, and fp32 parameters with memory in each other dtype (a supported mix).
            for dtype, mem_dtype in [(d, d) for d in DTYPES] + [("fp32", d) for d in DTYPES if d != "fp32"]:
                before = len(launches)
                _run_host_code(*shape, TORCH_DTYPES[dtype], TORCH_DTYPES[mem_dtype])
                label = shape_name if dtype == mem_dtype else f"{shape_name}/fp32 params"
                labels += [(label, mem_dtype)] * (len(launches) - before)
    seen = {}
    for launch, (label, dtype) in zip(launches, labels):
        spec = specialize(launch)
        seen.setdefault((repr(spec), dtype), (spec, [], dtype))[1].append(label)
    return [(*spec, "as launched: " + ", ".join(dict.fromkeys(shape_labels)), dtype)
            for spec, shape_labels, dtype in seen.values()]


def pointer_type(kernel, arg, consts, dtype):
    # dL/dw: fp32 from the read-write backward on (given, the on-chip kernels take it in the parameters' dtype).
    total_dw = arg == "p_dw" and kernel in ("_read_write_bwd_kernel", "_sharpen_bwd_kernel", "_interp_bwd_kernel")
    fp32 = arg in FP32_POINTERS or total_dw or (
        (kernel, arg) == ("_read_write_kernel", "p_w") and consts.get("NORMALIZE"))
    return "*fp32" if fp32 else f"*{dtype}"


def generic_job(name, consts, num_warps, dtype):
    """A configuration compiled with no argument specialized (``any``)."""
    signature = {
        n: "constexpr" if n in consts else (pointer_type(name, n, consts, dtype) if n.startswith("p_") else "i32")
        for n in kernel_fn(name).arg_names
    }
    return name, signature, consts, {}, dict(num_warps=num_warps, **LAUNCH_OPTIONS.get(name, {})), "any", dtype


def compile_one(job):
    """The rows of one configuration, a row for each of ``ARCHS``."""
    name, signature, consts, attrs, options, label, dtype = job
    spec = Specialized(name, signature, consts, attrs, options)
    shown = {k: v for k, v in spec.own_consts().items() if signature.get(k) == "constexpr"}
    rows = []
    for arch, compiled in zip(ARCHS, compile_kernel_for(spec, ARCHS)):
        # The cubin is the one a launch loads, from Triton's own ptxas run: its stack frame holds any spill.
        usage = run_tool("cuobjdump", compiled, "--dump-resource-usage")
        regs, stack = (int(re.search(rf"\b{key}:(\d+)", usage).group(1)) for key in ("REG", "STACK"))
        rows.append(dict(kernel=name, consts=shown, num_warps=options["num_warps"], arch=arch, dtype=dtype,
                         label=label, regs=regs, stack=stack, shared=compiled.metadata.shared,
                         tf32_mma=bool(TF32_MMA.search(compiled.asm["ptx"]))))
    return rows


def all_jobs():
    return [generic_job(name, consts, nw, dtype) for name, consts, nw in kernel_configs() for dtype in DTYPES] + \
        launched_configs()


@pytest.fixture(scope="module")
def results():
    jobs = all_jobs()
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        rows = [row for rows in pool.map(compile_one, jobs) for row in rows]
    lines = [f"{'kernel':30} {'config':36} {'warps':>5} {'sm':>3} {'dtype':>5} {'regs':>4} {'stack B':>7} "
             f"{'smem B':>6}  launch"]
    for r in rows:
        cfg = " ".join(f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["consts"].items())
        lines.append(f"{r['kernel']:30} {cfg:36} {r['num_warps']:>5} {r['arch']:>3} {r['dtype']:>5} {r['regs']:>4} "
                     f"{r['stack']:>7} {r['shared']:>6}  {r['label']}")
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
    # Every kernel is launched by some host path, and every recorded launch is a configuration that the
    # unspecialized half also compiles (its own constexprs and warps).
    launched = launched_configs()
    assert {job[0] for job in launched} == {n for m in KERNEL_MODULES for n in kernel_names(m)}
    # The on-chip kernels' N and M are the shape's, not the configuration's: kernel_configs() takes one of each.
    def config(name, consts):
        return tuple(sorted((k, v) for k, v in consts.items() if k in own_constexprs(name) and k not in ("N", "M")))

    generic = {(name, config(name, consts), nw) for name, consts, nw in kernel_configs()}
    for name, _, consts, _, options, label, _ in launched:
        own = config(name, consts)
        assert (name, own, options["num_warps"]) in generic, f"{name} {own} ({label}) is not in kernel_configs()"


@aot
def test_no_config_spills_registers(results):
    spilling = [r for r in results if r["stack"]]
    assert not spilling, "spills (stack frame): " + "; ".join(
        f"{r['kernel']} {r['consts']} warps={r['num_warps']} sm_{r['arch']} {r['dtype']}: {r['stack']} B"
        for r in spilling)


@aot
def test_the_products_run_on_the_tensor_cores(results):
    # The similarity pass's logits and the backward reads' dL/dw (RG product groups) are tl.dot products, tf32
    # three times over: they pay on tensor cores, where on CUDA cores three products would be three times the
    # multiply-adds they replaced. A dot Triton cannot give the tensor cores becomes multiply-adds without a
    # word; the PTX says which it got. No other kernel has a product.
    for r in results:
        products = r["kernel"] == "_similarity_kernel" or (
            r["kernel"] == "_read_write_bwd_kernel" and r["consts"].get("RG", 0) > 0)
        assert r["tf32_mma"] == products, (
            f"{r['kernel']} {r['consts']} warps={r['num_warps']} sm_{r['arch']} {r['dtype']} ({r['label']}): "
            f"{'no' if products else 'a'} tf32 tensor-core instruction")


_in_background = {}
BACKGROUND_NICENESS = 10
"""Niceness of the compiles run beside the tests: at 10 a process competing for a core gets about a tenth of it."""


def start_in_background():
    """Start this file's checks in a fresh process with the interpreter off, output to a temporary file.

    ``tests/conftest.py`` calls this once collection ends, where the test below is selected: the compiles take
    about half of the suite's time on two cores, and the interpreter tests, which use one, run beside them.
    """
    if not INTERPRETING or "run" in _in_background:
        return
    out = tempfile.TemporaryFile(mode="w+")
    # At a lower priority: the interpreter tests keep a core (both, in their own subprocesses) and the compiles
    # take what is left, so that neither waits on the other until the tests end and the compiles take both.
    # (Through nice(1), not preexec_fn: a Python function run between fork and exec can deadlock a threaded parent.)
    nice = shutil.which("nice")
    nice = [nice, "-n", str(BACKGROUND_NICENESS)] if nice else []
    proc = subprocess.Popen([*nice, sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", __file__],
                            env=dict(os.environ, TRITON_INTERPRET="0"), stdout=out, stderr=subprocess.STDOUT,
                            text=True, cwd=os.path.dirname(os.path.dirname(__file__)), start_new_session=True)
    _in_background["run"] = (proc, out)


def stop_in_background():
    """Kill the checks' processes if the session ends before the test below has waited for them (``-x``,
    Ctrl-C): the subprocess and its compile workers, one process group (killing the subprocess alone would
    leave its workers waiting for ever)."""
    proc, out = _in_background.pop("run", (None, None))
    if proc is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        out.close()


@pytest.mark.skipif(not INTERPRETING, reason="the interpreter is off, so the static checks above ran in this "
                    "process; this test only waits for them in a subprocess when the interpreter is on")
def test_static_checks_pass_with_the_interpreter_off():
    start_in_background()  # a no-op where conftest.py started them
    proc, out = _in_background.pop("run")
    with out:
        returncode = proc.wait()
        out.seek(0)
        tail = out.read()[-25000:]
    print(tail)
    assert returncode == 0, f"static checks failed (rc {returncode}):\n{tail}"
