"""Fused Triton kernels for the NTM memory step.

Only ``fastntm.backend`` imports this package. It exposes ``address``, ``read``,
``write`` and ``memory_step`` with the signatures of ``fastntm.reference``, and
``AVAILABLE``, true when the kernels can run here.
"""

AVAILABLE = False
