"""Without a GPU, run the Triton kernels through the interpreter.

Triton reads ``TRITON_INTERPRET`` when a kernel is defined, so it is set here,
before any test imports fastntm. ``backend="auto"`` still takes the reference
path for CPU tensors; kernel tests ask for ``backend="triton"``.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
