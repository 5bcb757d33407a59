"""Benchmarks of fastntm: the memory step and a full training step, per provider.

``python -m benchmarks.run`` (see ``benchmarks/run.py``), ``pytest benchmarks/
--benchmark-only``, ``python -m benchmarks.long_sequence`` and, on a GPU machine,
``benchmarks/gpu_check.sh``. Shapes live in ``benchmarks.shapes``.
"""
