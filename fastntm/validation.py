"""Input checks for the functional ops: every rule raises before any work is done.

Shapes, dtypes and devices are always checked. Value ranges (``beta >= 0``,
``g`` and ``e`` in [0, 1], ``gamma >= 1``, ``w_prev`` in [0, 1], ``s`` in
[0, 1] with each row summing to at most 1 (those two up to ``ROUNDING_SLACK``
above 1), the weightings of ``read`` and ``write`` >= 0, ``k``, ``a`` and
``raw`` finite; not ``mem``, whose check would cost a pass over memory) need the
values, which on a GPU costs a device synchronisation, so they are checked for
CPU tensors always and for CUDA tensors only when ``FASTNTM_CHECK_VALUES=1``.
Under a ``torch.func`` transform the values behind its wrappers are checked
(all of a ``vmap``'s elements at once). Nothing is value-checked while
``torch.compile`` (or any tracer of fake tensors) traces.
"""

from __future__ import annotations

import math
import os

import torch
import torch.autograd.forward_ad as forward_ad


ROUNDING_SLACK = 2**-8
"""How far above 1 a weighting (``w_prev``) or a row sum of ``s`` may lie: bf16 rounds each entry by up to 2^-9
of itself, and the GPU's fp32 division a weighting by an ulp or two. Then every shifted weighting ``ws`` is at
most (1 + 2^-8)^2, and the sharpening's ``ws^gamma`` stays finite up to gamma 11,000 in fp32; without a bound
it overflows, to inf / inf = NaN. Rows summing to less than 1 are allowed (a zero ``w_prev``, say)."""


FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
"""The dtypes that tensors of the ops and the model may have (float8's are floating too, but no op computes
in them, and torch's reductions that the checks take refuse them)."""
FLOAT_NAMES = ", ".join(str(dtype).removeprefix("torch.") for dtype in FLOAT_DTYPES)  # as errors name them


def is_float_dtype(dtype) -> bool:
    return dtype in FLOAT_DTYPES


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_tensor(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not is_float_dtype(t.dtype):
        raise TypeError(f"{name} must have a floating dtype ({FLOAT_NAMES}), got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {_shape(t)}")


def check_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if t.shape != expected:
        raise ValueError(f"{name} must have shape {meaning} = {expected}, got {_shape(t)}")


def check_same_device(named: dict[str, torch.Tensor]) -> torch.device:
    items = iter(named.items())
    first_name, first = next(items)
    device = first.device
    for name, t in items:
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {device}; all must share one device")
    return device


def check_same_dtype(named: dict[str, torch.Tensor]) -> None:
    items = iter(named.items())
    first_name, first = next(items)
    dtype = first.dtype
    for name, t in items:
        if t.dtype != dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {first_name} has {dtype}; head parameters must share one dtype")


def _values_checked(device: torch.device) -> bool:
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" or os.environ.get("FASTNTM_CHECK_VALUES", "0") == "1"


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The tensor behind ``torch.func``'s wrappers (``grad``'s and ``jvp``'s, ``vmap``'s batches), whose values
    can come to the host where a batched tensor's cannot. A batch dimension is moved first, so that the
    last dimension is still the one the caller sees (a distribution's rows), and every element's values are
    checked at once."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if torch._is_functional_tensor(t):  # functionalize's: its writes through views applied first
            torch._sync(t)
        if functorch.is_batchedtensor(t):
            t = functorch.get_unwrapped(t).movedim(functorch.maybe_get_bdim(t), 0)
        else:
            t = functorch.get_unwrapped(t)
    return t


WEIGHT = "weight"
"""``check_ranges``' upper bound for a weighting: 1, up to ``ROUNDING_SLACK``."""
DISTRIBUTION = "distribution"
"""``check_ranges``' upper bound for a distribution: ``WEIGHT``'s, and each row summing to at most 1 (as well)."""


def check_range(name: str, t: torch.Tensor, low: float | None, high: float | None) -> None:
    check_ranges([(name, t, low, high)])


def check_ranges(checks) -> None:
    """``check_range`` of each ``(name, tensor, low, high)`` in order, the tensors on one device, which
    decides once whether their values are checked. Every bound comes to the host in one transfer (on a
    CPU a fifth of the time of one ``float()`` a bound; on a GPU one synchronisation)."""
    checks = [check for check in checks if check[1].numel()]
    if not checks or not _values_checked(checks[0][1].device):
        return
    if torch._C._are_functorch_transforms_active():
        checks = [(name, _unwrapped(t), low, high) for name, t, low, high in checks]
    if forward_ad._current_level >= 0:
        # Forward-mode AD's dual tensors (which exist only inside a dual level) without their tangents: torch 2.11
        # has no forward-mode derivative of aminmax and raises, under no_grad too (2.13 has one).
        checks = [(name, t.detach(), low, high) for name, t, low, high in checks]
    # Traced with fake tensors (make_fx, aot_function), no values exist. is_fake costs microseconds a call
    # (this runs every step): a plain tensor is never fake.
    if any(type(t) is not torch.Tensor and torch._subclasses.fake_tensor.is_fake(t) for _, t, _, _ in checks):
        return
    distributions = [(name, t) for name, t, _, high in checks if high == DISTRIBUTION]
    with torch.no_grad():
        # stack promotes: bf16 and fp16 bounds are exact in fp32, fp64 ones stay fp64.
        bounds = torch.stack([bound for _, t, _, _ in checks for bound in torch.aminmax(t)]
                             + [t.sum(dim=-1, dtype=torch.float32).amax() for _, t in distributions]).tolist()
    for (name, _, low, high), lo, hi in zip(checks, bounds[::2], bounds[1::2]):
        _check_bounds(name, lo, hi, low, high)
    for (name, _), largest in zip(distributions, bounds[2 * len(checks):]):
        if largest > 1 + ROUNDING_SLACK:
            raise ValueError(f"{name} must be a distribution: each row (last dimension) summing to at most 1, "
                             f"got a row summing to {largest:g}")


def _check_bounds(name: str, lo: float, hi: float, low: float | None, high: float | str | None) -> None:
    if lo != lo or hi != hi:
        raise ValueError(f"{name} contains NaN")
    if math.isinf(lo) or math.isinf(hi):
        raise ValueError(f"{name} must be finite, got values in [{lo:.9g}, {hi:.9g}]")
    if high in (WEIGHT, DISTRIBUTION):
        high, limit = 1.0, 1 + ROUNDING_SLACK
    else:
        limit = high
    if (low is not None and lo < low) or (limit is not None and hi > limit):
        interval = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        # Nine digits: a float32 one ulp outside the interval (g = 1 + 2^-23) would read as inside it at six.
        raise ValueError(f"{name} must lie in {interval}, got values in [{lo:.9g}, {hi:.9g}]")


def check_mem(mem) -> tuple[int, int, int]:
    check_tensor("mem", mem, 3)
    return _shape(mem)


def _check_has_slots(mem) -> None:
    if mem.shape[1] < 1:
        raise ValueError(f"mem must have at least one slot to address: shape (B, N, M) with N >= 1, got {_shape(mem)}")


def _check_addressing_structure(mem, k, beta, g, s, gamma, w_prev) -> tuple[int, int, int, int]:
    B, N, M = check_mem(mem)
    for name, t, nd in (("k", k, 3), ("beta", beta, 2), ("g", g, 2), ("s", s, 3), ("gamma", gamma, 2), ("w_prev", w_prev, 3)):
        check_tensor(name, t, nd)
    _check_has_slots(mem)
    H = k.shape[1]
    if H < 1:
        raise ValueError(f"k must address at least one head: shape (B, H, M) with H >= 1, got {_shape(k)}")
    check_shape("k", k, (B, H, M), "(B, H, M)")
    check_shape("beta", beta, (B, H), "(B, H)")
    check_shape("g", g, (B, H), "(B, H)")
    check_shape("gamma", gamma, (B, H), "(B, H)")
    check_shape("w_prev", w_prev, (B, H, N), "(B, H, N)")
    S = s.shape[-1]
    if s.shape[:2] != (B, H) or S % 2 == 0:
        raise ValueError(f"s must have shape (B, H, S) = ({B}, {H}, S) with S = 2K+1 odd, got {_shape(s)}")
    named = {"mem": mem, "k": k, "beta": beta, "g": g, "s": s, "gamma": gamma, "w_prev": w_prev}
    check_same_device(named)
    check_same_dtype({n: t for n, t in named.items() if n != "mem"})
    return B, N, M, H


def _addressing_ranges(k, beta, g, s, gamma, w_prev) -> list:
    return [("k", k, None, None), ("beta", beta, 0.0, None), ("g", g, 0.0, 1.0), ("s", s, 0.0, DISTRIBUTION),
            ("gamma", gamma, 1.0, None), ("w_prev", w_prev, 0.0, WEIGHT)]


def check_addressing(mem, k, beta, g, s, gamma, w_prev) -> tuple[int, int, int, int]:
    """Check the addressing inputs; return (B, N, M, H)."""
    dims = _check_addressing_structure(mem, k, beta, g, s, gamma, w_prev)
    check_ranges(_addressing_ranges(k, beta, g, s, gamma, w_prev))
    return dims


def check_read(mem, w) -> None:
    B, N, M = check_mem(mem)
    check_tensor("w", w, 3)
    check_shape("w", w, (B, w.shape[1], N), "(B, R, N)")
    check_same_device({"mem": mem, "w": w})
    check_ranges([("w", w, 0.0, None)])


def check_write(mem, w, e, a) -> None:
    B, N, M = check_mem(mem)
    check_tensor("w", w, 3)
    W = w.shape[1]
    check_shape("w", w, (B, W, N), "(B, W, N)")
    check_tensor("e", e, 3)
    check_tensor("a", a, 3)
    check_shape("e", e, (B, W, M), "(B, W, M)")
    check_shape("a", a, (B, W, M), "(B, W, M)")
    check_same_device({"mem": mem, "w": w, "e": e, "a": a})
    check_same_dtype({"w": w, "e": e, "a": a})
    check_ranges([("w", w, 0.0, None), ("e", e, 0.0, 1.0), ("a", a, None, None)])


def check_num_reads(num_reads, H: int) -> None:
    if isinstance(num_reads, bool) or not isinstance(num_reads, int):
        raise TypeError(f"num_reads must be an int, got {type(num_reads).__name__}")
    if not 0 <= num_reads <= H:
        raise ValueError(f"num_reads must lie in [0, H] = [0, {H}], got {num_reads}")


def check_memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads) -> None:
    """Shapes, dtypes and devices of every input first, then the value ranges of all in one pass."""
    B, N, M, H = _check_addressing_structure(mem, k, beta, g, s, gamma, w_prev)
    check_num_reads(num_reads, H)
    W = H - num_reads
    check_tensor("e", e, 3)
    check_tensor("a", a, 3)
    check_shape("e", e, (B, W, M), f"(B, H - num_reads, M) with H = {H}, num_reads = {num_reads}")
    check_shape("a", a, (B, W, M), f"(B, H - num_reads, M) with H = {H}, num_reads = {num_reads}")
    check_same_device({"mem": mem, "e": e, "a": a})
    check_same_dtype({"k": k, "e": e, "a": a})
    check_ranges([*_addressing_ranges(k, beta, g, s, gamma, w_prev), ("e", e, 0.0, 1.0), ("a", a, None, None)])


RAW = "raw (the head layer's output)"
"""``raw``'s name in its value checks: in a model that went NaN, the tensor a user never passed by that name."""


def check_head_parameters(raw, num_reads, num_writes, memory_width, shift_width) -> None:
    """``_check_head_layout``, then ``raw`` finite."""
    _check_head_layout(raw, num_reads, num_writes, memory_width, shift_width)
    check_ranges([(RAW, raw, None, None)])


def _check_head_layout(raw, num_reads, num_writes, memory_width, shift_width) -> None:
    """The sizes first (each an int in range), then raw's shape against them."""
    for name, value, low in (("num_reads", num_reads, 0), ("num_writes", num_writes, 0),
                             ("memory_width", memory_width, 1), ("shift_width", shift_width, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be at least {low}, got {value}")
    if num_reads + num_writes < 1:
        raise ValueError(f"num_reads + num_writes must be at least 1, got {num_reads} + {num_writes}")
    if shift_width % 2 == 0:
        raise ValueError(f"shift_width must be odd (S = 2K + 1), got {shift_width}")
    check_tensor("raw", raw, 2)
    H, W, M, S = num_reads + num_writes, num_writes, memory_width, shift_width
    width = H * (M + S + 3) + 2 * W * M
    if raw.shape[1] != width:
        raise ValueError(f"raw must have shape (B, H (M + S + 3) + 2 W M) = (B, {width}) with H = {H}, W = {W}, "
                         f"M = {M}, S = {S}, got {_shape(raw)}")


def check_memory_step_from_heads(mem, raw, w_prev, num_reads, num_writes, shift_width) -> None:
    """``mem``, then ``raw`` against it (``_check_head_layout`` with M = mem's width, the same batch), then
    ``w_prev``; values: ``raw`` finite and ``w_prev`` in [0, 1]. The squashed parameters are in range by
    construction, so ``raw`` needs no other bound."""
    B, N, M = check_mem(mem)
    _check_has_slots(mem)
    _check_head_layout(raw, num_reads, num_writes, M, shift_width)
    if raw.shape[0] != B:
        raise ValueError(f"raw must have mem's batch B = {B} in its first dimension, got shape {_shape(raw)}")
    H = num_reads + num_writes
    check_tensor("w_prev", w_prev, 3)
    check_shape("w_prev", w_prev, (B, H, N), f"(B, H, N) with H = num_reads + num_writes = {H}")
    check_same_device({"mem": mem, "raw": raw, "w_prev": w_prev})
    check_same_dtype({"raw": raw, "w_prev": w_prev})
    check_ranges([(RAW, raw, None, None), ("w_prev", w_prev, 0.0, WEIGHT)])
