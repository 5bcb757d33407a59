"""The one place that decides whether an op runs the Triton kernels or the reference.

``backend="auto"`` takes the kernels for CUDA tensors when Triton imports, and the
reference otherwise (CPU tensors included, even under ``TRITON_INTERPRET=1``).
``FASTNTM_BACKEND`` (auto | reference | triton) overrides ``"auto"``; an explicit
``backend=`` argument overrides both. ``"triton"`` on CPU tensors runs the
kernels through the Triton interpreter, so only under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from types import ModuleType, SimpleNamespace

import torch

from . import fused_reference, reference

BACKENDS = ("auto", "reference", "triton")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _kernels() -> ModuleType | None:
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels if kernels.AVAILABLE else None


REFERENCE = SimpleNamespace(
    head_parameters=reference.head_parameters, address=reference.address, read=reference.read,
    write=reference.write, memory_step=fused_reference.memory_step,
    memory_step_from_heads=fused_reference.memory_step_from_heads,
)
"""The plain PyTorch path: the literal spec, but ``memory_step`` (and ``memory_step_from_heads``, with the
head parameters' squashing) as one autograd node with a hand-derived backward (``fused_reference``), equal to
the literal composition and several times cheaper per step on a CPU.
Built at import, not on first use: ``torch.compile`` cannot trace the namespace's construction."""


def resolve(backend: str, device: torch.device) -> str:
    """Name the backend that an op with tensors on ``device`` runs: "reference" or "triton"."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("FASTNTM_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"FASTNTM_BACKEND must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _kernels() is not None else "reference"
    if backend == "triton":
        if device.type != "cuda" and not interpreting():
            raise RuntimeError(
                f"backend='triton' runs on CUDA tensors, got tensors on {device}; "
                "set TRITON_INTERPRET=1 before importing fastntm to run the kernels on the CPU"
            )
        if _kernels() is None:
            raise RuntimeError(
                "backend='triton' needs the fastntm Triton kernels, which could not be loaded "
                "(is triton installed?); use backend='reference' or 'auto'"
            )
    return backend


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast switched off for ``device`` where it is on: every op computes in fp32 (SPEC.md),
    and under autocast the reference path's bmm and einsum would compute in the low dtype."""
    kind = device.type
    if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def implementation(backend: str, device: torch.device) -> ModuleType | SimpleNamespace:
    """The module holding ``head_parameters``, ``address``, ``read``, ``write`` and ``memory_step`` for this
    call."""
    return _kernels() if resolve(backend, device) == "triton" else REFERENCE
