"""The one place that decides whether an op runs the Triton kernels, the numba kernels or the reference.

``backend="auto"`` takes the Triton kernels for CUDA tensors when Triton imports, the
numba kernels (``fastntm.numba_step``) for CPU tensors when numba imports, and the
reference otherwise.
``FASTNTM_BACKEND`` (auto | reference | triton | numba | compiled) overrides ``"auto"``; an
explicit ``backend=`` argument overrides both. ``"triton"`` on CPU tensors runs the
kernels through the Triton interpreter, so only under ``TRITON_INTERPRET=1``.
``"numba"`` runs the memory step (the op that dominates a step) as one compiled loop nest
each way on CPU tensors, the other ops as the reference does; inside ``torch.compile`` both
``"numba"`` and ``"auto"`` on a CPU run the reference, which dynamo can trace.
``"compiled"`` runs the reference path through ``torch.compile``: on a CPU, Inductor's
C++ loops fuse the step's small ops, after a compile of seconds per shape and dtype.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from types import ModuleType, SimpleNamespace
from typing import Callable

import torch
from torch.autograd import forward_ad

from . import fused_reference, reference

BACKENDS = ("auto", "reference", "triton", "numba", "compiled")
OPS = ("head_parameters", "address", "read", "write", "memory_step", "memory_step_from_heads")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _kernels() -> ModuleType | None:
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels if kernels.AVAILABLE else None


@functools.lru_cache(maxsize=None)
def _numba_step() -> ModuleType | None:
    try:
        from . import numba_step
    except ImportError:
        return None
    return numba_step


REFERENCE = SimpleNamespace(
    head_parameters=reference.head_parameters, address=reference.address, read=reference.read,
    write=reference.write, memory_step=fused_reference.memory_step,
    memory_step_from_heads=fused_reference.memory_step_from_heads,
)
"""The plain PyTorch path: the literal spec, but ``memory_step`` (and ``memory_step_from_heads``, with the
head parameters' squashing) as one autograd node with a hand-derived backward (``fused_reference``), equal to
the literal composition and several times cheaper per step on a CPU.
Built at import, not on first use: ``torch.compile`` cannot trace the namespace's construction."""


def transformed(tensors) -> bool:
    """Whether a ``torch.func`` transform (grad, vmap, jacrev...) is active, or a tensor of ``tensors`` carries a
    forward-mode AD tangent: calls that an ``autograd.Function`` with a hand-derived backward cannot serve
    (``fused_reference`` hands them to the literal composition). Asked as ``_are_functorch_transforms_active``:
    dynamo reads ``peek_interpreter_stack() is not None`` as true in every trace, which sent compiled calls of the
    kernels to the reference."""
    if torch._C._are_functorch_transforms_active():
        return True
    return forward_ad._current_level >= 0 and any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _eager_only(args) -> bool:
    """Calls that run uncompiled under ``backend="compiled"``: inside a trace or another compile (which take
    the ops into their own graph), under a ``torch.func`` transform, under autocast (the model's step; the
    memory ops inside it switch autocast off and run compiled), on meta tensors (shapes only), and with
    forward-mode AD tangents (the reference's answer to those, not a compile's)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if any(t.is_meta for t in tensors):
        return True
    # A graph traced under autocast would hand the memory step's own backward the low dtype it switches off.
    # The tensors share a device (the ops check it), so the first one's is the call's.
    if tensors and autocasting(tensors[0].device.type):
        return True
    return transformed(tensors)  # dynamo refuses torch.func transforms; tangents want the reference's answer


def _one_graph_args(args) -> tuple:
    """``args`` as the compiled graph of most calls takes them: tensors contiguous, and, where one needs a
    gradient (a module's parameters count), each floating one made to need one. A model's first step (its
    constant initial memory is expanded over the batch, its initial weightings need no gradient), or its
    first after ``state.detach()``, then runs the graph of its other steps instead of compiling one of its
    own; the gradients nothing reads cost a few fused stores."""
    grads = torch.is_grad_enabled() and (
        any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
        or any(isinstance(a, torch.nn.Module) and any(p.requires_grad for p in a.parameters()) for a in args)
    )
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.contiguous()
            if grads and a.is_floating_point() and not a.requires_grad:
                a = a.detach().requires_grad_()
        out.append(a)
    return tuple(out)


@functools.cache
def _warn_recompile_limit(name: str) -> None:
    warnings.warn(
        f"backend='compiled': {name} has compiled as many graphs as torch._dynamo.config.recompile_limit allows "
        f"({torch._dynamo.config.recompile_limit}); calls needing another (a new dtype, shape or grad mode) run "
        "uncompiled. Raise the limit to compile them too",
        stacklevel=4,
    )


def compile_lazily(eager: Callable, name: str, compiler: str | Callable = "inductor") -> Callable:
    """``eager`` through ``torch.compile(backend=compiler)`` (whole graph, backward included), compiled at its
    first call (and again for each new dtype or grad mode, and once more, with dynamic sizes, for a second
    shape); ``eager`` itself where a compile does not apply (``_eager_only``). Past dynamo's limit of graphs a
    function (``torch._dynamo.config.recompile_limit``, 8, counted over every model or op of the process that
    shares ``eager``) a call of yet another kind runs ``eager``, with one warning, and the graphs already
    compiled keep running."""
    compiled = None
    full = False  # past the limit: no more compiles, nor dynamo's message at each call that would need one

    def call(*args):
        nonlocal compiled, full
        if _eager_only(args):
            return eager(*args)
        if compiled is None:
            compiled = torch.compile(eager, backend=compiler, fullgraph=True)
        graph_args = _one_graph_args(args)
        if full:
            with torch.compiler.set_stance("eager_on_recompile"):
                return compiled(*graph_args)
        try:
            return compiled(*graph_args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            _warn_recompile_limit(name)
            full = True
            return eager(*args)
        except torch._dynamo.exc.BackendCompilerFailed as error:
            raise RuntimeError(
                f"backend='compiled' could not compile {name} ({type(error.inner_exception).__name__}: "
                f"{error.inner_exception}); on a CPU torch.compile needs a C++ compiler (g++ or clang++). "
                "Use backend='reference' to run the same path uncompiled"
            ) from error

    call.__name__ = call.__qualname__ = name
    return call


def _compiled(op: str, compiler: str | Callable = "inductor") -> Callable:
    """``REFERENCE``'s ``op``, compiled lazily."""
    return compile_lazily(getattr(REFERENCE, op), op, compiler)


COMPILED = SimpleNamespace(**{op: _compiled(op) for op in OPS})
"""The reference path (``REFERENCE``) through ``torch.compile``, op by op. On a CPU its memory step runs as a
few fused C++ loops in place of ~100 dispatched ops (the copy task's training step with its memory step compiled
alone took 0.70 - 0.77 of the eager step's time; ``FastNTM`` compiles its whole step, 0.6)."""


def resolve(backend: str, device: torch.device | str) -> str:
    """Name the backend that an op with tensors on ``device`` runs: "reference", "triton", "numba" or "compiled"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device) if isinstance(device, str) else device
    from_env = backend == "auto"
    if from_env:
        backend = os.environ.get("FASTNTM_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"FASTNTM_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda" and _kernels() is not None:
            return "triton"
        backend = "numba" if device.type == "cpu" and _numba_step() is not None else "reference"
    if backend == "reference":
        return backend
    chosen = f"FASTNTM_BACKEND={backend} (under backend='auto')" if from_env else f"backend={backend!r}"
    if backend == "numba":
        if device.type != "cpu":
            raise RuntimeError(f"{chosen} runs on CPU tensors, got tensors on {device}; use backend='auto'")
        if torch.compiler.is_compiling():  # the reference, whose ops dynamo traces (the numba loops it could not)
            return "reference"
        if _numba_step() is None:
            raise RuntimeError(f"{chosen} needs numba, which could not be imported (pip install numba); "
                               "use backend='reference' or 'auto'")
    if backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"{chosen} runs on CUDA tensors, got tensors on {device}; "
                "set TRITON_INTERPRET=1 before importing fastntm to run the kernels on the CPU"
            )
        if _kernels() is None:
            raise RuntimeError(
                f"{chosen} needs the fastntm Triton kernels, which could not be loaded "
                "(is triton installed?); use backend='reference' or 'auto'"
            )
    # Inside a compile it is supported, and dynamo may not trace its own check.
    if backend == "compiled" and not torch.compiler.is_compiling() and not torch._dynamo.is_dynamo_supported():
        raise RuntimeError(
            f"{chosen} runs the reference path through torch.compile, which this Python or platform "
            "does not support; use backend='reference'"
        )
    return backend


# torch.amp.is_autocast_available takes ~8 us; this runs every op. Filled at import for the common devices: a
# torch.compile trace that filled it would guard on its contents before, and compile again at the next call.
_AUTOCAST_AVAILABLE: dict[str, bool] = {kind: torch.amp.is_autocast_available(kind) for kind in ("cpu", "cuda")}


def autocasting(kind: str) -> bool:
    """Whether autocast is on for device type ``kind``."""
    available = _AUTOCAST_AVAILABLE.get(kind)
    if available is None:
        available = _AUTOCAST_AVAILABLE[kind] = torch.amp.is_autocast_available(kind)
    return available and torch.is_autocast_enabled(kind)


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``device`` where it is on: every op computes in fp32 (SPEC.md),
    and under autocast the reference path's bmm and einsum would compute in the low dtype."""
    if autocasting(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def implementation(backend: str, device: torch.device) -> ModuleType | SimpleNamespace:
    """The module or namespace holding the ops (``OPS``) for this call."""
    chosen = resolve(backend, device)
    if chosen == "triton":
        return _kernels()
    if chosen == "numba":
        return _numba_ops()
    return COMPILED if chosen == "compiled" else REFERENCE


@functools.lru_cache(maxsize=None)
def _numba_ops() -> SimpleNamespace:
    """``REFERENCE`` with the memory step (and its form from the head layer's output) on the numba kernels."""
    step = _numba_step()
    return SimpleNamespace(**{**vars(REFERENCE), "memory_step": step.memory_step,
                              "memory_step_from_heads": step.memory_step_from_heads})
