"""The Triton kernels against the reference, on CPU through the Triton interpreter.

Run as its own pytest invocation with the interpreter switched on before anything
imports fastntm (Triton reads it when kernels are defined)::

    TRITON_INTERPRET=1 pytest tests/test_kernels.py

Without it (or when fastntm.kernels was already imported without it in this
process) every test here is skipped with the reason.
"""

import contextlib
import importlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import fastntm.functional as F
from fastntm import kernels, reference, validation
from fastntm.kernels import _config
import interpreter_patch
from helpers import kernel_inputs, outputs_and_gradients, relative_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not part of the installed package
from benchmarks.tf32_error import tf32  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton._C.libtriton import ir  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from fastntm.kernels.memory_step import _tf32_split  # noqa: E402

pytestmark = [
    pytest.mark.skipif(
        not getattr(kernels, "INTERPRETING", False),
        reason="needs TRITON_INTERPRET=1 set before fastntm.kernels is imported: "
        "run `TRITON_INTERPRET=1 pytest tests/test_kernels.py` as its own invocation",
    ),
    # The interpreter's own use of numpy, not ours.
    pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter"),
]

# ||ref - out|| / ||ref||, per dtype of the head parameters (interpreter: exact fp32 arithmetic order aside).
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}

_interpreted_dot = interpreter.InterpreterBuilder.create_dot
_TF32 = ir.INPUT_PRECISION.TF32


def _tf32_operand(x):
    """An fp32 operand as a tensor core reads it in a tf32 product (``benchmarks.tf32_error.tf32``: its top 19
    bits); other dtypes as they are."""
    if x.data.dtype != np.float32:
        return x
    return interpreter.TensorHandle(tf32(np.ascontiguousarray(x.data)), x.dtype)


def _tensor_core_dot(self, a, b, acc, input_precision, max_num_imprecise_acc):
    if input_precision == _TF32:
        a, b = _tf32_operand(a), _tf32_operand(b)
    return _interpreted_dot(self, a, b, acc, input_precision, max_num_imprecise_acc)


@pytest.fixture(autouse=True)
def tensor_core_operands(monkeypatch):
    """Every ``tl.dot`` in these tests reads its tf32 operands as a GPU's tensor cores do. The interpreter
    multiplies them whole, so there a product left in plain tf32 matched the reference as closely as the
    kernels' tf32 three times over (test_a_plain_tf32_product_fails_against_the_reference)."""
    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", _tensor_core_dot)


def assert_close(out, ref, tol, what):
    assert out.dtype == ref.dtype, f"{what}: dtype {out.dtype}, reference {ref.dtype}"
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)}, reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: not finite"
    err = relative_error(ref, out)
    abs_err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    assert err <= tol or abs_err <= 1e-5, f"{what}: relative error {err:.2e} > {tol:.0e}"




def check_op(op, ref_op, inputs: dict, extra=(), tol=None, used=None):
    """Outputs and every input gradient of ``op`` vs ``ref_op`` under NaN-poisoned buffers.

    ``used``: indices of the outputs the loss depends on (the others get no gradient).
    """
    tol = tol or TOL[inputs.get("k", inputs.get("w")).dtype]
    xk = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    xr = {n: t.clone().requires_grad_() for n, t in inputs.items()}
    with _config.poison():
        out = op(*xk.values(), *extra)
    ref = ref_op(*xr.values(), *extra)
    out = out if isinstance(out, tuple) else (out,)
    ref = ref if isinstance(ref, tuple) else (ref,)
    for i, (o, r) in enumerate(zip(out, ref)):
        assert_close(o, r, tol, f"output {i}")
    used = range(len(ref)) if used is None else used
    gen = torch.Generator().manual_seed(1)
    pairs = [(out[i], ref[i], torch.randn(ref[i].shape, generator=gen).to(ref[i].dtype)) for i in used]
    pairs = [p for p in pairs if p[1].numel()]
    with _config.poison():
        gk = torch.autograd.grad([p[0] for p in pairs], list(xk.values()), [p[2] for p in pairs], allow_unused=True)
    gr = torch.autograd.grad([p[1] for p in pairs], list(xr.values()), [p[2] for p in pairs], allow_unused=True)
    for name, a, b in zip(xk, gk, gr):
        if b is None:
            assert a is None or not a.any(), f"grad {name}: reference has none"
            continue
        assert a is not None, f"grad {name}: missing"
        assert_close(a, b, tol, f"grad {name}")


def step_id(c):
    B, N, M, H, R, S, BN = c
    return f"B{B}-N{N}-M{M}-H{H}-R{R}-S{S}-" + (f"BN{BN}" if BN else "auto")


# (B, N, M, H, R, S, forced BN or None for the dispatch's own choice)
STEP_CASES = [
    (3, 37, 13, 3, 2, 3, None),  # on-chip
    (3, 37, 13, 3, 2, 3, 16),  # 3 blocks, halo
    (1, 37, 20, 1, 0, 5, None),  # write only (R = 0)
    (1, 37, 20, 5, 5, 5, 16),  # read only (W = 0)
    (3, 130, 20, 5, 4, 5, None),  # large memory by shape (BN = 128, 2 blocks)
    (1, 130, 13, 3, 1, 3, 32),  # 5 blocks, last one ragged; two write heads
    (3, 130, 13, 1, 1, 3, None),  # one read head, W = 0
    (2, 37, 13, 4, 1, 3, None),  # on-chip, three write heads
    (2, 64, 32, 3, 1, 3, None),  # on-chip, N = BN and M = BM: no masked rows or columns
    (1, 37, 13, 18, 17, 3, 16),  # 18 heads: the similarity pass's products of 8 heads, three times
]


@pytest.mark.parametrize("case", STEP_CASES, ids=step_id)
def test_memory_step_matches_reference(case):
    B, N, M, H, R, S, BN = case
    with _config.force_block_n(BN):
        check_op(kernels.memory_step, reference.memory_step, kernel_inputs(B, N, M, H, R, S), extra=(R,))


ONCHIP_KERNELS = ("_memory_step_onchip_kernel", "_onchip_heads_bwd_kernel", "_onchip_mem_bwd_kernel")

# (settings forced, (kernel, BN, num_warps, maxnreg) launches expected among those of a forward + backward)
FORCED_CASES = [
    (dict(block_n=16, num_warps=2, vector_block=32),
     {("_similarity_kernel", 16, 2, None), ("_shift_sharpen_kernel", 32, 4, None), ("_read_write_kernel", 16, 2, None),
      ("_read_write_bwd_kernel", 16, 2, 255), ("_sharpen_bwd_kernel", 32, 4, None),
      ("_interp_bwd_kernel", 32, 4, None), ("_softmax_bwd_kernel", 32, 4, None),
      ("_mem_bwd_kernel", 16, 2, None), ("_softmax_merge_kernel", 32, 4, None),
      ("_head_grads_kernel", 64, 4, None)}),
    # The backward's passes over memory on blocks and warps of their own.
    (dict(block_n=32, num_warps=1, bwd_block_n=16, bwd_warps=8, vector_block=32),
     {("_similarity_kernel", 32, 1, None), ("_shift_sharpen_kernel", 32, 4, None), ("_read_write_kernel", 32, 1, None),
      ("_read_write_bwd_kernel", 16, 8, 255), ("_sharpen_bwd_kernel", 32, 4, None),
      ("_interp_bwd_kernel", 32, 4, None), ("_softmax_bwd_kernel", 32, 4, None),
      ("_mem_bwd_kernel", 16, 8, None), ("_softmax_merge_kernel", 32, 4, None),
      ("_head_grads_kernel", 64, 4, None)}),
    # The similarity pass on blocks and warps of its own: 3 blocks of 16 rows, where the others take 2 of 32.
    (dict(block_n=32, sim_block_n=16, sim_warps=2, vector_block=32),
     {("_similarity_kernel", 16, 2, None), ("_shift_sharpen_kernel", 32, 4, None), ("_read_write_kernel", 32, 4, None),
      ("_read_write_bwd_kernel", 32, 4, 255), ("_sharpen_bwd_kernel", 32, 4, None),
      ("_interp_bwd_kernel", 32, 4, None), ("_softmax_bwd_kernel", 32, 4, None),
      ("_mem_bwd_kernel", 32, 4, None), ("_softmax_merge_kernel", 32, 4, None),
      ("_head_grads_kernel", 64, 4, None)}),
    (dict(onchip_warps=2, onchip_bwd_warps=16),
     {("_memory_step_onchip_kernel", 64, 2, 255), ("_onchip_heads_bwd_kernel", 64, 16, 128),
      ("_onchip_mem_bwd_kernel", 64, 16, 128)}),
]


@pytest.mark.parametrize("settings, expected", FORCED_CASES,
                         ids=["large-warps2-BV32", "large-bwd-BN16-warps8", "large-sim-BN16-warps2",
                              "onchip-warps2-bwd16"])
def test_memory_step_with_forced_warps_and_vector_block(settings, expected):
    # The interpreter ignores warps: this holds the host's plumbing of each setting to the launches it makes.
    from benchmarks.sweep_blocks import recording_launches

    with _config.force(**settings), recording_launches() as launches:
        check_op(kernels.memory_step, reference.memory_step, kernel_inputs(3, 37, 13, 3, 2, 3), extra=(2,))
    # The sums of block partials take settings of their own (test_block_sums_take_their_forced_loads).
    assert {(k["kernel"], k["consts"]["BN"], k["num_warps"], k["maxnreg"]) for k in launches
            if k["kernel"] != "_sum_blocks_kernel"} == expected


def test_reductions_of_block_partials_loop_more_than_once():
    # 19 memory blocks of 16 rows and 19 vector blocks of 16: the softmax merge takes the 19 partials in
    # 2 chunks of 16 (its chunk is the vector block; the running max rescaling the first chunk's lanes),
    # _sum_blocks_kernel the reads' in 2 loads of 16 rows, _head_grads_kernel the vector passes' 19 in 2 loads
    # of 16 (sum_rows) and, at S = 7, its 10 columns in 2 chunks of 8; elsewhere one chunk holds them all.
    # The interpreter's time goes with the programs: N = 1,100 in vector blocks of 64 (69 memory blocks, 18
    # vector blocks a head) took 10.4 s alone here, this 8.2 s.
    with _config.force(block_n=16, vector_block=16, sum_rows=16):
        check_op(kernels.memory_step, reference.memory_step, kernel_inputs(1, 300, 13, 2, 1, 7), extra=(1,))


@pytest.mark.parametrize("shape, dtype", [((3, 37, 2, 13), torch.float32), ((1, 69, 40), torch.bfloat16),
                                          ((2, 33, 3), torch.float32), ((2, 32, 32), torch.float32),
                                          ((2, 1, 5, 3), torch.float32), ((2, 4, 0, 7), torch.float32)],
                         ids=["B3-NB37-2x13", "B1-NB69-40-bf16", "NB33", "NB32-X32", "one-block", "empty"])
def test_block_partial_sums_match_float64(shape, dtype):
    # Loads of 16 rows: 37 and 69 blocks loop 3 and 5 times, the last load part masked; 33 leave one row to
    # the last load; 32 rows of 32 columns, no mask at all. 26, 40, 3 and 15 columns end in a part-masked
    # strip of 16.
    ms = importlib.import_module("fastntm.kernels.memory_step")  # the module, not the function of its name
    parts = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 1e3
    with _config.poison():
        out = ms._sum_blocks(parts, dtype, _config.allocator(), 16, _config.SUM_WARPS)
    assert out.shape == (shape[0], *shape[2:]) and out.dtype == dtype
    # fp32 sums to within rounding; bf16 output rounds once more than the reference.
    assert_close(out, parts.double().sum(1).to(dtype), 1e-6 if dtype == torch.float32 else TOL[dtype], "sum")


def test_block_sums_take_their_forced_loads():
    from benchmarks.sweep_blocks import recording_launches

    with _config.force(block_n=16, sum_rows=16, sum_warps=2), recording_launches() as launches:
        check_op(kernels.memory_step, reference.memory_step, kernel_inputs(1, 37, 13, 2, 1, 3), extra=(1,))
    sums = [(k["consts"]["BR"], k["num_warps"]) for k in launches if k["kernel"] == "_sum_blocks_kernel"]
    assert sums and set(sums) == {(16, 2)}


@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
@pytest.mark.parametrize("used", [(0,), (1,), (2,), (1, 2), (0, 2), (0, 1)],
                         ids=["w", "r", "new_mem", "r+new_mem", "w+new_mem", "w+r"])
def test_memory_step_partial_gradients(used, BN):
    with _config.force_block_n(BN):
        check_op(kernels.memory_step, reference.memory_step, kernel_inputs(2, 37, 13, 3, 1, 3), extra=(1,), used=used)


@pytest.mark.parametrize("M, offset, chunk", [(20, 0, 4), (32, 0, 32), (32, 1, 4)],
                         ids=["M20", "M32", "M32-unaligned-pointer"])
def test_onchip_tiles_chunk_rows_that_load_element_by_element(M, offset, chunk):
    # Rows that load 16 bytes a thread (M and the pointer 16-aligned) are whole in a tile; others are held
    # in chunks of 4 columns (see _memory_step_onchip_kernel).
    from benchmarks.sweep_blocks import recording_launches

    x = kernel_inputs(2, 37, M, 2, 1, 3)
    # The memory at `offset` elements past a 16-byte boundary, contiguous (so the kernels take it as it is).
    mem = torch.cat([torch.zeros(offset), x.pop("mem").flatten()])[offset:].view(2, 37, M).requires_grad_()
    assert mem.is_contiguous() and mem.data_ptr() % 16 == 4 * offset
    rest = [t.requires_grad_() for t in x.values()]
    with recording_launches() as launches:
        out = kernels.memory_step(mem, *rest, 1)
        grads = torch.autograd.grad(out, [mem, *rest], [torch.ones_like(o) for o in out])
    ref = reference.memory_step(mem, *rest, 1)
    ref_grads = torch.autograd.grad(ref, [mem, *rest], [torch.ones_like(o) for o in ref])
    for i, (o, r) in enumerate(zip(out + grads, ref + ref_grads)):
        assert_close(o, r, TOL[torch.float32], f"output or gradient {i}")
    onchip = [k for k in launches if k["kernel"] in ONCHIP_KERNELS]
    assert {k["kernel"] for k in onchip} == set(ONCHIP_KERNELS)
    assert {k["consts"]["BC"] for k in onchip} == {chunk}


def test_onchip_backward_stays_in_its_two_kernels(monkeypatch):
    ms = importlib.import_module("fastntm.kernels.memory_step")

    def fail(*args, **kwargs):
        raise AssertionError("the on-chip backward took a large-memory pass")

    for name in ("_address_bwd", "_read_write_bwd", "_mem_bwd", "_head_grads"):
        monkeypatch.setattr(ms, name, fail)
    check_op(kernels.memory_step, reference.memory_step, kernel_inputs(2, 37, 13, 3, 2, 3), extra=(2,))


@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
@pytest.mark.parametrize("shape", [(3, 37, 13, 3, 5), (1, 130, 20, 1, 3)], ids=["B3-N37-M13-H3-S5", "B1-N130-M20-H1-S3"])
def test_address_matches_reference(shape, BN):
    B, N, M, H, S = shape
    x = kernel_inputs(B, N, M, H, H, S)
    del x["e"], x["a"]
    with _config.force_block_n(BN):
        check_op(kernels.address, reference.address, x)


@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
@pytest.mark.parametrize("R", [1, 3], ids=["R1", "R3"])
def test_read_matches_reference(R, BN):
    x = kernel_inputs(3, 37, 13, R, R, 3)
    with _config.force_block_n(BN):
        check_op(kernels.read, reference.read, {"mem": x["mem"], "w": x["w_prev"]})


@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
@pytest.mark.parametrize("W", [1, 3], ids=["W1", "W3"])
def test_write_matches_reference(W, BN):
    x = kernel_inputs(3, 37, 13, W, 0, 3)
    with _config.force_block_n(BN):
        check_op(kernels.write, reference.write, {"mem": x["mem"], "w": x["w_prev"], "e": x["e"], "a": x["a"]})


@pytest.mark.parametrize("BN, S", [(None, 7), (16, 7), (16, 23)], ids=["auto", "BN16", "BN16-S23"])
def test_shift_wider_than_memory_wraps(BN, S):
    # S > N = 5: shifts wrap more than once around the memory; at S = 23 (K = 11 > 2N) a tap's halo rows too.
    with _config.force_block_n(BN):
        check_op(kernels.memory_step, reference.memory_step, kernel_inputs(2, 5, 13, 2, 1, S), extra=(1,))


def test_shift_wider_than_a_block():
    # K = 18 > BN = 16: the shift's halo (forward and backward) reaches past the neighbouring block; the last
    # block of N = 40 is ragged.
    with _config.force_block_n(16):
        # B = 1 and 3 blocks: the interpreter checks every int32 operation for overflow, and the shift passes'
        # halo unrolls K (K + 1) / 2 rows a side (60 s at N = 130 under the interpreter, 9 blocks).
        check_op(kernels.memory_step, reference.memory_step, kernel_inputs(1, 40, 13, 2, 1, 37), extra=(1,))


@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
def test_shift_moves_focus_forward(BN):
    # One-hot w_prev, g = 0 (ignore content), s puts all weight on shift +1: focus n -> n + 1 (mod N).
    B, N, H = 2, 37, 2
    x = kernel_inputs(B, N, 13, H, 1, 3)
    x["g"] = torch.zeros(B, H)
    x["s"] = torch.tensor([0.0, 0.0, 1.0]).expand(B, H, 3).clone()
    x["w_prev"] = torch.zeros(B, H, N)
    x["w_prev"][:, 0, N - 1] = 1
    x["w_prev"][:, 1, 20] = 1
    with _config.force_block_n(BN):
        check_op(kernels.memory_step, reference.memory_step, x, extra=(1,))
        w = kernels.memory_step(*x.values(), 1)[0]
    assert w[:, 0].argmax(-1).tolist() == [0, 0] and w[:, 1].argmax(-1).tolist() == [21, 21]


@pytest.mark.parametrize("M, seed, bound", [(40, 1051, None), (20, 7, 10)], ids=["M40", "M20-ill-conditioned"])
def test_sharp_focus_gradients_as_precise_as_the_reference(M, seed, bound):
    # A content head focused on one slot (beta 100, g 1: the softmax's largest weight 0.9986): dL/dbeta and
    # dL/dk come from sums over rows that nearly cancel. The large-memory backward once took the sharpening's
    # and the shift's backward as x - dot1 v with x = dw v (d81ba13, reverted): the products rounded before
    # the subtraction, and dL/dbeta missed by 2.3e-3 here at M 40, by 5.3 (all of it) at M 20, where the
    # fp32 reference misses by 6.2e-6 and 2.7e-4. Bound: 1e-4, or `bound` times the fp32 reference's miss.
    x = kernel_inputs(1, 97, M, 1, 0, 7, seed=seed)
    x["beta"][:] = 100.0
    x["g"][:] = 1.0
    cot = torch.randn(1, 1, 97, generator=torch.Generator().manual_seed(3))
    names = ["beta", "k"]

    def grads(fn, dtype):
        xs = {n: t.to(dtype).requires_grad_() for n, t in x.items()}
        return torch.autograd.grad(fn(*xs.values(), 0)[0], [xs[n] for n in names], cot.to(dtype))

    truth, ref = grads(reference.memory_step, torch.float64), grads(reference.memory_step, torch.float32)
    with _config.force(block_n=32):
        assert not _config.choose(97, M).onchip
        out = grads(kernels.memory_step, torch.float32)
    for name, t, r, o in zip(names, truth, ref, out):
        err = relative_error(t, o)
        limit = max(1e-4, (bound or 0) * relative_error(t, r))
        assert err <= limit, f"dL/d{name}: {err:.1e} from float64, limit {limit:.1e}"


@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
def test_edge_cases_finite_and_match(BN):
    # Zero memory rows (cosine eps), zero key, huge beta, gamma 50: values and gradients finite.
    B, N, M, H = 2, 37, 13, 3
    x = kernel_inputs(B, N, M, H, 2, 3)
    x["mem"][:, ::5] = 0
    x["k"][1, 2] = 0
    x["beta"][0] = 1e4
    x["gamma"][:, 1] = 50
    with _config.force_block_n(BN):
        check_op(kernels.memory_step, reference.memory_step, x, extra=(2,), tol=1e-4)


@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
def test_gamma_11000_at_the_rounding_slack_keeps_gradients_finite(BN):
    # A head focused on one slot, w_prev and the shift's weight at the rounding slack the value checks allow
    # (validation.ROUNDING_SLACK): ws is (1 + 2^-8)^2 there and ws^gamma about 1.8e37 at gamma 11,000, up to
    # which validation.py says the sharpening stays finite. The sharpening backward's gamma ws^gamma / ws
    # overflowed fp32 (large regime), and every gradient went NaN.
    # Against the CPU path's hand-derived backward: the literal reference's autograd overflows the same way.
    x = kernel_inputs(1, 9, 5, 2, 1, 3)
    slack = 1 + validation.ROUNDING_SLACK
    x["w_prev"].zero_()
    x["w_prev"][..., 3] = slack
    x["g"].zero_()
    x["s"] = torch.tensor([0.0, slack, 0.0]).expand(1, 2, 3).clone()
    x["gamma"].fill_(11000.0)

    def cpu_path(*args):
        return F.memory_step(*args[:-1], num_reads=args[-1], backend="reference")

    with _config.force_block_n(BN):
        check_op(kernels.memory_step, cpu_path, x, extra=(1,), tol=1e-4)


@pytest.mark.parametrize("shift", [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], ids=["unshifted", "shifted"])
@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
def test_weightings_below_the_sharpening_floor_pass_no_gradient(BN, shift):
    # With g = 0 and s one-hot, ws is w_prev, shifted or not, and its zero rows lie below the floor (1e-30):
    # the floor's gradient is 0 there. At gamma = 1, ws^gamma / ws is 1 at them, so without that mask
    # dL/dw_prev would not be 0 there. Shifted, the shift's taps read those rows across block edges.
    B, N, M, H = 2, 37, 13, 3
    x = kernel_inputs(B, N, M, H, 2, 3)
    x["g"].zero_()
    x["s"] = torch.tensor(shift).expand(B, H, 3).clone()
    x["gamma"].fill_(1.0)
    x["w_prev"][..., ::3] = 0
    with _config.force_block_n(BN):
        check_op(kernels.memory_step, reference.memory_step, x, extra=(2,), tol=1e-4)


@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
def test_keys_opposite_every_row_with_a_large_beta(BN):
    # Every row's logit beta K is far below zero (K = -1, beta 100), so the softmax's max is -100. A row past
    # the end of a block's N (masked, its logit loaded as 0) must not give exp(0 - max) = inf: 0 * inf made
    # the backward's sums over a block NaN. N = 37 is not a multiple of the block.
    B, N, M, H = 2, 37, 13, 2
    x = kernel_inputs(B, N, M, H, 1, 3)
    v = torch.randn(M, generator=torch.Generator().manual_seed(5))
    x["mem"] = (torch.rand(B, N, 1, generator=torch.Generator().manual_seed(6)) + 0.5) * v
    x["k"] = -v.expand(B, H, M).clone()
    x["beta"] = torch.full((B, H), 100.0)
    with _config.force_block_n(BN):
        check_op(kernels.memory_step, reference.memory_step, x, extra=(1,), tol=1e-4)


@pytest.mark.parametrize(
    "dtype,mem_dtype",
    [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16), (torch.float32, torch.bfloat16)],
    ids=["bf16", "fp16", "fp32-params-bf16-mem"],
)
@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
def test_low_precision_dtypes(dtype, mem_dtype, BN):
    x = kernel_inputs(3, 37, 20, 3, 2, 3, dtype=dtype, mem_dtype=mem_dtype)
    tol = max(TOL[dtype], TOL[mem_dtype])
    with _config.force_block_n(BN):
        check_op(kernels.memory_step, reference.memory_step, x, extra=(2,), tol=tol)


HEAD_CASES = [(3, 1, 1, 20, 3), (1, 3, 0, 13, 5), (2, 0, 3, 13, 1), (2, 2, 2, 100, 7)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", HEAD_CASES, ids=lambda c: "B{}-R{}-W{}-M{}-S{}".format(*c))
def test_head_parameters_match_reference(case, dtype):
    B, R, W, M, S = case
    width = (R + W) * (M + S + 3) + 2 * W * M
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(B, width, generator=gen) * 4
    # The first row's every slice (beta, g, s, gamma, e...) past softplus's threshold, at it, deep in the
    # sigmoid's tails, and huge.
    extremes = torch.tensor([25.0, -30.0, 1e4, -1e4, 19.9, -100.0, 20.0, 88.0, -88.0])
    raw[0] = extremes[torch.arange(width) % len(extremes)]
    check_op(kernels.head_parameters, reference.head_parameters, {"raw": raw.to(dtype)}, extra=(R, W, M, S),
             tol=TOL[dtype])


def test_head_parameters_of_an_empty_batch():
    width = 2 * (13 + 3 + 3) + 2 * 13
    out = kernels.head_parameters(torch.zeros(0, width, requires_grad=True), 1, 1, 13, 3)
    assert [t.shape for t in out] == [t.shape for t in reference.head_parameters(torch.zeros(0, width), 1, 1, 13, 3)]


def test_head_parameters_grads_of_some_outputs_only():
    raw = torch.randn(2, 2 * (13 + 3 + 3) + 2 * 13)
    check_op(kernels.head_parameters, reference.head_parameters, {"raw": raw}, extra=(1, 1, 13, 3),
             tol=TOL[torch.float32], used=(1, 3, 5))


def test_head_parameters_take_rows_of_a_wider_tensor_in_place(monkeypatch):
    heads = importlib.import_module("fastntm.kernels.heads")
    monkeypatch.setattr(heads, "_rows", lambda raw: raw if raw.stride(1) == 1 else pytest.fail("raw was copied"))
    wide = torch.randn(3, 2 * (13 + 3 + 3) + 2 * 13 + 5)
    raw = wide[:, 5:]  # row stride larger than the width: read where it is, not copied
    check_op(kernels.head_parameters, reference.head_parameters, {"raw": raw}, extra=(1, 1, 13, 3),
             tol=TOL[torch.float32])


@pytest.mark.parametrize("BN", [None, 16], ids=["on-chip", "BN16"])
def test_memory_step_from_heads_runs_the_head_and_step_kernels_in_turn(BN):
    B, N, M, R, W, S = 3, 37, 13, 1, 2, 5
    gen = torch.Generator().manual_seed(2)
    x = {"mem": torch.randn(B, N, M, generator=gen),
         "raw": 2 * torch.randn(B, (R + W) * (M + S + 3) + 2 * W * M, generator=gen),
         "w_prev": torch.softmax(torch.randn(B, R + W, N, generator=gen), -1)}
    with _config.force_block_n(BN):
        check_op(kernels.memory_step_from_heads, reference.memory_step_from_heads, x, extra=(R, W, S),
                 tol=TOL[torch.float32])


def test_model_dispatches_the_head_parameters_to_the_kernels(monkeypatch):
    from fastntm import FastNTM

    calls = []
    monkeypatch.setattr(kernels, "_head_parameters", lambda *a: calls.append(1) or reference.head_parameters(*a))
    FastNTM(3, 2, memory_slots=8, memory_width=5, backend="triton")(torch.rand(2, 1, 3))
    assert calls == [1, 1]


@triton.jit
def _plain_tf32_dot(b_a_hi, b_a_lo, b_b, A_IS_TF32: tl.constexpr):
    return tl.dot(b_a_hi + b_a_lo, b_b, input_precision="tf32")


def test_a_plain_tf32_product_fails_against_the_reference(monkeypatch):
    # One tf32 product where the kernels take three, with the fixture's tensor-core operands: the similarity
    # pass's misses the reference's w by about 3e-4, and the backward reads' (swapped in after the forward) the
    # gradients by about 8e-4, where tf32 three times over keeps both near 1e-6. The interpreter's own tl.dot
    # put the plain products within 1e-6 too, so without the fixture no test here could tell them apart.
    ms = importlib.import_module("fastntm.kernels.memory_step")
    x = kernel_inputs(2, 70, 20, 5, 4, 3)
    xk = {n: t.clone().requires_grad_() for n, t in x.items()}
    xr = {n: t.double().requires_grad_() for n, t in x.items()}
    ref = reference.memory_step(*xr.values(), 4)
    cot = [torch.randn(r.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) for r in ref]
    dk_ref = torch.autograd.grad(ref, xr["k"], cot)[0]
    with _config.force_block_n(16):
        w = kernels.memory_step(*xk.values(), 4)
        monkeypatch.setattr(ms, "_tf32x3_dot", _plain_tf32_dot)
        dk_plain = torch.autograd.grad(w, xk["k"], [c.float() for c in cot])[0]
        w_plain = kernels.memory_step(*x.values(), 4)[0]
    assert relative_error(ref[0], w[0]) < 1e-5
    assert relative_error(ref[0], w_plain) > TOL[torch.float32]
    assert relative_error(dk_ref, dk_plain) > TOL[torch.float32]


@triton.jit
def _keys_cut_tf32x3_dot(b_a_hi, b_a_lo, b_b, A_IS_TF32: tl.constexpr):
    """``memory_step._tf32x3_dot`` with the keys' split cut, as at stops 23 to 25."""
    b_b_hi, b_b_lo = _tf32_split(b_b, ROUND=False)
    b_dot = tl.dot(b_a_hi, b_b_lo, input_precision="tf32")
    if not A_IS_TF32:
        b_dot = tl.dot(b_a_lo, b_b_hi, b_dot, input_precision="tf32")
    return tl.dot(b_a_hi, b_b_hi, b_dot, input_precision="tf32")


def test_rounded_key_split_halves_the_logits_error_near_the_key(monkeypatch):
    # Rows near the key (cosine about 1, where a large beta magnifies the logits' errors), the large regime's
    # logits with the fixture's tensor-core operands. With both operands' tf32 split cut, what the products
    # leave out leans one way in every term: ``python -m benchmarks.tf32_error`` puts the cosine's mean error
    # at M 64 at 2.9e-7 cut, 1.5e-7 with the keys rounded, 0.8e-7 for fp32 multiply-adds.
    ms = importlib.import_module("fastntm.kernels.memory_step")
    gen = torch.Generator().manual_seed(0)
    B, N, M = 1, 256, 64
    k = torch.randn(B, 1, M, generator=gen)
    x = kernel_inputs(B, N, M, 1, 1, 3)
    x["mem"] = k + 1e-3 * torch.randn(B, N, M, generator=gen)
    x["k"] = k
    truth = reference.content_similarity(x["mem"].double(), x["k"].double())

    def logits_error():
        with _config.force_block_n(32):
            K = ms._forward(*x.values(), 1, False)[3]
        return float((K.double() - truth).abs().mean())

    rounded = logits_error()
    monkeypatch.setattr(ms, "_tf32x3_dot", _keys_cut_tf32x3_dot)
    cut = logits_error()
    fp32 = float((reference.content_similarity(x["mem"], x["k"]).double() - truth).abs().mean())
    # Here (256 rows): 2.2e-7 rounded, 4.1e-7 cut, 0.9e-7 for the fp32 reference's logits.
    assert rounded < 0.7 * cut and rounded < 4 * fp32, (rounded, cut, fp32)


def test_bit_identical_run_to_run():
    # The interpreter runs programs one at a time, in one order, so here this checks that no result depends
    # on what its buffers held before (the second run's are NaN-filled); test_kernels_gpu.py checks the order.
    x = kernel_inputs(2, 70, 13, 3, 2, 3)
    runs = []
    for poisoned in (False, True):
        xs = [t.clone().requires_grad_() for t in x.values()]
        with _config.force_block_n(32), _config.poison(poisoned):
            out = kernels.memory_step(*xs, 2)
            grads = torch.autograd.grad(out, xs, [torch.ones_like(o) for o in out])
        runs.append([t.detach() for t in (*out, *grads)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("BN", [None, 16], ids=["on-chip", "BN16"])
def test_the_interpreter_patch_changes_no_bit(BN):
    """tests/interpreter_patch.py's faster interpreter (installed by conftest.py) gives Triton's own interpreter's
    bits: a step and its head parameters, forward and backward, in both regimes."""
    if not interpreter_patch.ORIGINALS:
        pytest.skip(f"nothing to compare: tests/interpreter_patch.py patches Triton 3.6 only, and this is Triton "
                    f"{triton.__version__}, whose interpreter runs as it is")
    B, H, W, M, S = 1, 3, 1, 13, 5
    x = kernel_inputs(B, 37, M, H, H - W, S)
    raw = torch.randn(B, H * (M + S + 3) + 2 * W * M, generator=torch.Generator().manual_seed(2))
    runs, skipped = [], []
    for patch in (contextlib.nullcontext, interpreter_patch.removed):
        xs = [t.clone().requires_grad_() for t in (*x.values(), raw)]
        before = interpreter_patch.SKIPPED[0]
        with _config.force_block_n(BN), patch():
            out = kernels.memory_step(*xs[:9], 2) + kernels.head_parameters(xs[9], 2, W, M, S)
            grads = torch.autograd.grad(out, xs, [torch.ones_like(o) for o in out])
        runs.append([t.detach() for t in (*out, *grads)])
        skipped.append(interpreter_patch.SKIPPED[0] - before)
    assert skipped[0] > 0 and skipped[1] == 0  # helper calls skipped the patching, then none did
    for i, (patched, unpatched) in enumerate(zip(*runs)):
        assert torch.equal(patched, unpatched), f"output or gradient {i}"


def test_functional_backend_triton_runs_kernels_on_cpu_under_interpreter(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels, "_memory_step", lambda *a: calls.append(1) or reference.memory_step(*a))
    x = kernel_inputs(1, 37, 13, 2, 1, 3)
    F.memory_step(*x.values(), num_reads=1, backend="triton")
    assert calls == [1]


def test_eager_calls_skip_the_custom_ops(monkeypatch):
    ms = importlib.import_module("fastntm.kernels.memory_step")

    def fail(*args, **kwargs):
        raise AssertionError("an eager call went through the custom op")

    for name in ("memory_step_fwd", "memory_step_bwd"):
        monkeypatch.setattr(ms, name, fail)
    check_op(kernels.memory_step, reference.memory_step, kernel_inputs(2, 37, 13, 3, 1, 3), extra=(1,))


@pytest.mark.parametrize("BN", [None, 16], ids=["auto", "BN16"])
def test_no_grad_forward_matches_reference_without_an_autograd_node(BN):
    x = kernel_inputs(3, 37, 13, 3, 2, 3)
    with _config.force_block_n(BN), _config.poison(), torch.no_grad():
        out = kernels.memory_step(*(t.requires_grad_() for t in x.values()), 2)
    for i, (o, r) in enumerate(zip(out, reference.memory_step(*x.values(), 2))):
        assert o.grad_fn is None and not o.requires_grad
        assert_close(o, r.detach(), TOL[torch.float32], f"output {i}")


def test_fake_tensors_go_through_the_custom_ops():
    # Under a dispatch mode the call cannot launch kernels: the custom ops' fake implementations answer.
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = kernel_inputs(2, 37, 13, 3, 1, 3)
    with FakeTensorMode() as mode:
        xs = [mode.from_tensor(t).requires_grad_() for t in x.values()]
        w, r, new = kernels.memory_step(*xs, 1)
        grads = torch.autograd.grad((w.sum() + r.sum() + new.sum()), xs)
    assert (w.shape, r.shape, new.shape) == ((2, 3, 37), (2, 1, 13), (2, 37, 13))
    assert [g.shape for g in grads] == [t.shape for t in x.values()]


def test_host_overhead_benchmark_runs():
    from benchmarks import host_overhead

    result = host_overhead.run(calls=20)
    for column in result["columns"].values():
        assert set(column["layers_us"]) == set(host_overhead.LAYERS)
        assert not column["eager_custom_op"]
    assert "autograd engine" in host_overhead.report(result)


@pytest.mark.parametrize("block_n", [None, 16], ids=["on-chip", "large"])
def test_the_custom_ops_pass_opcheck(block_n):
    """``torch.library.opcheck`` of the ops torch.compile sees: schema, fake implementations (shapes, dtypes,
    strides) against the kernels, and outputs that alias neither the inputs nor each other: torch refuses a
    call that breaks that wherever the op runs, as the large-memory backward under torch.compile did (its
    dL/de and dL/da shared a buffer). bf16 memory with fp32 parameters, every gradient given and some absent."""
    from fastntm.kernels.heads import head_parameters_bwd, head_parameters_fwd
    from fastntm.kernels.memory_step import memory_step_bwd, memory_step_fwd
    from fastntm.kernels.read import read_bwd, read_fwd
    from fastntm.kernels.write import write_bwd, write_fwd

    x = kernel_inputs(1, 37, 13, 3, 1, 3, mem_dtype=torch.bfloat16)
    args = tuple(x.values())
    mem, w_write = x["mem"], x["w_prev"][:, 1:]

    def opcheck(op, args):  # aot_dispatch_dynamic too: test_torch_compile_traces_without_graph_breaks
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))

    with _config.force(block_n=block_n):
        opcheck(memory_step_fwd, (*args, 1, True))
        w, r, new, *saved = memory_step_fwd(*args, 1, True)
        dw, dr, dnew = torch.randn_like(w), torch.randn_like(r), torch.randn_like(new)
        opcheck(memory_step_bwd, (*args, w, *saved, dw, dr, dnew, 1))
        opcheck(memory_step_bwd, (*args, w, *saved, None, dr, None, 1))
        none = x["k"].new_empty((1, 0, 13))  # addressing alone (``address.py``)
        opcheck(memory_step_fwd, (*args[:7], none, none, 3, False))
        opcheck(memory_step_bwd, (*args[:7], none, none, w, *saved, dw, None, None, 3))
        opcheck(read_fwd, (mem, w[:, :1]))
        opcheck(read_bwd, (mem, w[:, :1], dr))
        opcheck(write_fwd, (mem, w_write, x["e"], x["a"]))
        opcheck(write_bwd, (mem, w_write, x["e"], x["a"], dnew))
    raw = torch.randn(2, 3 * (13 + 3 + 3) + 2 * 2 * 13)
    k, beta, g, s, gamma, e, a = head_parameters_fwd(raw, 3, 2, 13, 3)
    opcheck(head_parameters_fwd, (raw, 3, 2, 13, 3))
    opcheck(head_parameters_bwd, (raw, *(torch.randn_like(t) for t in (k, beta, g, s, gamma, e, a)), 3, 2, 13, 3))


@pytest.mark.parametrize("block_n", [None, 16], ids=["on-chip", "large"])
def test_torch_compile_traces_the_kernels_without_graph_breaks(block_n):
    """The compiled graph runs the kernels themselves (outputs and gradients bit for bit those of the kernels
    called eagerly), not the reference: under dynamo a check for torch.func transforms once read true."""
    x = kernel_inputs(1, 37, 13, 2, 1, 3)
    fn = torch.compile(lambda *a: kernels.memory_step(*a, 1), fullgraph=True, backend="aot_eager")
    with _config.force(block_n=block_n):
        runs = [outputs_and_gradients(step, x.values()) for step in (fn, lambda *a: kernels.memory_step(*a, 1))]
    for o, r in zip(runs[0], reference.memory_step(*x.values(), 1)):
        assert_close(o, r, TOL[torch.float32], "compiled output")
    for i, (a, b) in enumerate(zip(*runs)):
        assert torch.equal(a, b), f"compiled and eager kernels differ in {'output' if i < 3 else 'gradient'} {i}"


def test_torch_compile_traces_the_head_parameters_without_graph_breaks():
    raw = torch.randn(2, 2 * (13 + 3 + 3) + 2 * 13, requires_grad=True)
    fn = torch.compile(lambda x: kernels.head_parameters(x, 1, 1, 13, 3), fullgraph=True, backend="aot_eager")
    out = fn(raw)
    for o, r in zip(out, reference.head_parameters(raw, 1, 1, 13, 3)):
        assert_close(o, r, TOL[torch.float32], "compiled output")
    sum(o.sum() for o in out).backward()
    assert raw.grad is not None and torch.isfinite(raw.grad).all()


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(pytest.main([__file__, *os.sys.argv[1:]]))
