"""The one registry of benchmark shapes.

``OP_SHAPES``: the memory step alone. ``paper-*`` is the paper's machine (N 128,
M 20, one read and one write head); ``medium`` and ``large`` are the sizes the
kernels are for; ``sweep-n*`` hold B, M and heads at ``medium``'s and vary N, for
the plot of time and bandwidth against N (``medium`` is its N = 4096 point).

``TRAIN_SHAPES``: a full training step of ``FastNTM`` on the copy task at
sequence length 10 (21 steps: 10 in, the delimiter, 10 out), batch 1 and 32, the
paper's model (LSTM controller of 100, N 128, M 20, 1 + 1 heads).

``TINY_*``: a few seconds in all, for the smoke test (``--tiny``).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class OpShape:
    """One ``memory_step`` call: batch B, N slots of width M, R read and W write heads, S shifts."""

    name: str
    B: int
    N: int
    M: int
    R: int
    W: int
    S: int = 3

    @property
    def H(self) -> int:
        return self.R + self.W

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TrainShape:
    """One training step (forward, backward, Adam) of the copy task: batch B, sequences of
    ``length`` vectors (``2 * length + 1`` steps), the paper's model sizes by default."""

    name: str
    B: int
    length: int = 10
    N: int = 128
    M: int = 20
    R: int = 1
    W: int = 1
    controller_size: int = 100

    @property
    def steps(self) -> int:
        return 2 * self.length + 1

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "T": self.steps}


SWEEP_N = (128, 512, 2048, 8192, 32768, 65536)

OP_SHAPES = {
    s.name: s
    for s in (
        OpShape("paper-b1", B=1, N=128, M=20, R=1, W=1),
        OpShape("paper-b32", B=32, N=128, M=20, R=1, W=1),
        OpShape("medium", B=16, N=4096, M=64, R=2, W=1),
        OpShape("large", B=16, N=65536, M=64, R=4, W=1),
        *(OpShape(f"sweep-n{n}", B=16, N=n, M=64, R=2, W=1) for n in SWEEP_N),
    )
}

TRAIN_SHAPES = {s.name: s for s in (TrainShape("copy-b1", B=1), TrainShape("copy-b32", B=32))}

TINY_OP_SHAPES = {
    s.name: s
    for s in (
        OpShape("tiny-n16", B=2, N=16, M=4, R=1, W=1),
        OpShape("sweep-n32", B=2, N=32, M=4, R=1, W=1),
        OpShape("sweep-n64", B=2, N=64, M=4, R=1, W=1),
    )
}

TINY_TRAIN_SHAPES = {s.name: s for s in (TrainShape("tiny-copy", B=2, length=2, N=16, M=4, controller_size=8),)}

# What --quick leaves out on each device: on a CPU the shapes whose step takes seconds.
QUICK_SKIP = {"cpu": {"large", "sweep-n32768", "sweep-n65536"}, "cuda": set()}


def in_sweep(name: str) -> bool:
    """Whether an op shape belongs on the plot against N (the sweep, and ``medium``, its N = 4096)."""
    return name.startswith("sweep-n") or name == "medium"
