"""Fused Triton kernels for the NTM memory step.

Only ``fastntm.backend`` imports this package. It exposes ``head_parameters``,
``address``, ``read``, ``write``, ``memory_step`` and ``memory_step_from_heads`` with the signatures of
``fastntm.reference``, and
``AVAILABLE``, true when the kernels can run here (Triton imports, and CUDA is
available or ``TRITON_INTERPRET=1`` was set before this import).

Inputs the kernels do not take (float64, or slots wider than
``_config.MAX_BM``, or zero heads for ``read``/``write``, or for ``head_parameters``
shift widths over ``_config.MAX_BM``), and calls under a ``torch.func`` transform or
with forward-mode AD tangents (the kernels have backward formulas only), run the
reference path:
for ``memory_step`` the fused one (``fastntm.fused_reference``), as
``backend="reference"`` does, whose backward reads nothing on the host (the
literal spec's erase product does, and a CUDA graph cannot capture that).
"""

import os

import torch

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - triton is a Linux dependency
    AVAILABLE = False
else:
    INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
    AVAILABLE = INTERPRETING or torch.cuda.is_available()

if AVAILABLE:
    from .. import fused_reference as _fused_reference
    from .. import reference as _reference
    from ..backend import transformed as _transformed
    from . import _config
    from .address import address as _address
    from .heads import head_parameters as _head_parameters
    from .heads import supported as _heads_supported
    from .memory_step import memory_step as _memory_step
    from .read import read as _read
    from .write import write as _write

__all__ = ["AVAILABLE", "head_parameters", "address", "read", "write", "memory_step", "memory_step_from_heads"]


def _kernel_ok(mem, *tensors) -> bool:
    """Whether the kernels take a call on ``mem`` and ``tensors``. Not a dual tensor's (forward-mode AD), whose
    tangent a kernel would drop without a word, its ``requires_grad`` being False."""
    tensors = (mem, *tensors)
    return (_config.supported(mem.shape[-1]) and all(t.dtype != torch.float64 for t in tensors)
            and not _transformed(tensors))


def head_parameters(raw, num_reads, num_writes, memory_width, shift_width):
    """``k, beta, g, s, gamma, e, a``; see ``fastntm.reference.head_parameters``."""
    if raw.dtype == torch.float64 or not _heads_supported(memory_width, shift_width) or _transformed((raw,)):
        return _reference.head_parameters(raw, num_reads, num_writes, memory_width, shift_width)
    return _head_parameters(raw, num_reads, num_writes, memory_width, shift_width)


def address(mem, k, beta, g, s, gamma, w_prev):
    """Weightings (B, H, N) of all heads; see ``fastntm.reference.address``."""
    if not _kernel_ok(mem, k, beta, g, s, gamma, w_prev):
        return _reference.address(mem, k, beta, g, s, gamma, w_prev)
    return _address(mem, k, beta, g, s, gamma, w_prev)


def read(mem, w):
    """Reads (B, R, M); see ``fastntm.reference.read``."""
    if not _kernel_ok(mem, w) or w.shape[1] == 0:
        return _reference.read(mem, w)
    return _read(mem, w)


def write(mem, w, e, a):
    """New memory (B, N, M); see ``fastntm.reference.write``."""
    if not _kernel_ok(mem, w, e, a) or w.shape[1] == 0:
        return _reference.write(mem, w, e, a)
    return _write(mem, w, e, a)


def memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads):
    """``(w, r, new_mem)`` of one fused step; see ``fastntm.reference.memory_step``."""
    if not _kernel_ok(mem, k, beta, g, s, gamma, w_prev, e, a):
        return _fused_reference.memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)
    return _memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)


def memory_step_from_heads(mem, raw, w_prev, num_reads, num_writes, shift_width):
    """``head_parameters`` then ``memory_step``, each its own kernels; see
    ``fastntm.reference.memory_step_from_heads``."""
    k, beta, g, s, gamma, e, a = head_parameters(raw, num_reads, num_writes, mem.shape[-1], shift_width)
    return memory_step(mem, k, beta, g, s, gamma, w_prev, e, a, num_reads)
