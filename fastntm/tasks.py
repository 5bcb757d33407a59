"""The five tasks of Graves, Wayne & Danihelka (2014), "Neural Turing Machines", section 4.

Every task is a seeded generator of :class:`Batch` ``(inputs, targets, mask)``:
float32 CPU tensors in time-major layout, ``inputs`` of shape ``(T, B, input_size)``,
``targets`` of shape ``(T, B, output_size)`` and ``mask`` of shape ``(T, B)``. ``mask``
is 1.0 at the steps where the output is scored and 0.0 elsewhere; ``targets`` are zero
wherever ``mask`` is zero. Outputs are trained as logits with a (masked) binary
cross-entropy (``Task.loss == "bce"`` for all five tasks).

Lengths: the sequence length (copy, repeat copy), repeat count (repeat copy) and item
count (associative recall) are drawn **once per batch**, so every sequence of a batch
has the same layout and there is no padding; ``mask`` is then the same for every
sequence of a batch. Draws use ``generator`` (a CPU ``torch.Generator``) or, when it is
``None``, torch's global generator: the same seed gives the same batches.

Each ``batch()`` takes keyword overrides for generalisation tests, e.g.
``CopyTask().batch(32, length=80)`` or ``CopyTask().batch(32, min_len=30, max_len=50)``.
Bad values raise ``ValueError`` naming the argument and the allowed range.

:meth:`Task.cost` is a cost per sequence: for the binary tasks the number of bit errors
per sequence after thresholding ``sigmoid(logits)`` at 0.5 over the scored steps; for
dynamic N-grams the cross-entropy in bits per sequence. Both are averaged over the
batch. The paper reports "bits-per-sequence" without saying which of the two its
binary tasks' curves count.

Registry: ``TASKS`` maps ``"copy"``, ``"repeat_copy"``, ``"associative_recall"``,
``"ngrams"``, ``"priority_sort"`` to the task classes; ``make_task(name, **kwargs)``
builds one.
"""

from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "Batch",
    "Task",
    "CopyTask",
    "RepeatCopyTask",
    "AssociativeRecallTask",
    "NGramsTask",
    "PrioritySortTask",
    "TASKS",
    "make_task",
]


class Batch(NamedTuple):
    """``inputs`` (T, B, input_size), ``targets`` (T, B, output_size), ``mask`` (T, B)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with all three tensors moved to ``device``."""
        return Batch(*(t.to(device) for t in self))


def _int(name: str, value, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi] (hi None: no upper bound), else ValueError naming it."""
    try:
        if isinstance(value, bool):
            raise TypeError
        v = operator.index(value)
    except TypeError:
        v = None
    if v is None or v < lo or (hi is not None and v > hi):
        upper = "inf)" if hi is None else f"{hi}]"
        raise ValueError(f"{name} must be an integer in [{lo}, {upper}, got {value!r}")
    return v


def _draw(
    generator: torch.Generator | None,
    names: tuple[str, str, str],
    fixed,
    lo,
    hi,
    floor: int,
) -> int:
    """One integer for the whole batch: ``fixed`` if given, else uniform in [lo, hi].

    ``names`` are the (fixed, lo, hi) argument names used in error messages.
    """
    fixed_name, lo_name, hi_name = names
    if fixed is not None:
        return _int(fixed_name, fixed, floor)
    lo = _int(lo_name, lo, floor)
    hi = _int(hi_name, hi, lo)
    return int(torch.randint(lo, hi + 1, (1,), generator=generator))


def _pick_range(names: tuple[str, str, str], fixed, lo, hi, default_lo: int, default_hi: int):
    """Resolve per-call overrides: ``fixed`` excludes ``lo``/``hi``; missing bounds take the defaults."""
    if fixed is not None and (lo is not None or hi is not None):
        raise ValueError(f"give either {names[0]} or {names[1]}/{names[2]}, not both")
    return fixed, default_lo if lo is None else lo, default_hi if hi is None else hi


def _bits(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).float()


class Task(ABC):
    """Common interface of the five tasks."""

    name: ClassVar[str]
    loss: ClassVar[str] = "bce"

    @property
    @abstractmethod
    def input_size(self) -> int:
        """Number of input channels."""

    @property
    @abstractmethod
    def output_size(self) -> int:
        """Number of output (target) channels."""

    @abstractmethod
    def batch(self, batch_size: int, generator: torch.Generator | None = None, **overrides) -> Batch:
        """A batch of ``batch_size`` sequences; see the subclass for the encoding and overrides."""

    def _check_logits(self, logits: torch.Tensor, batch: Batch) -> None:
        if tuple(logits.shape) != tuple(batch.targets.shape):
            raise ValueError(
                f"logits must have the targets' shape {tuple(batch.targets.shape)} (T, B, output_size), "
                f"got {tuple(logits.shape)}"
            )

    def cost(self, logits: torch.Tensor, batch: Batch) -> float:
        """Bit errors per sequence: ``sigmoid(logits) > 0.5`` vs targets on the scored steps, batch mean."""
        self._check_logits(logits, batch)
        wrong = (logits.detach() > 0) != (batch.targets.to(logits.device) > 0.5)
        errors = (wrong.float() * batch.mask.to(logits.device).unsqueeze(-1)).sum()
        return float(errors) / batch.mask.shape[1]


@dataclass(frozen=True)
class CopyTask(Task):
    """Copy: read a sequence of random binary vectors, then write it back.

    Encoding, for a batch of length ``L`` (``T = 2L + 1`` steps):

    - inputs, ``bits + 1`` channels: steps ``0..L-1`` carry the vectors on channels
      ``0..bits-1``; step ``L`` is the delimiter, 1.0 on channel ``bits``; steps
      ``L+1..2L`` are all zero.
    - targets, ``bits`` channels: the vectors at steps ``L+1..2L``, zero before.
    - mask: 1.0 at steps ``L+1..2L``.

    Overrides of ``batch``: ``length`` (fixed L) or ``min_len``/``max_len``.
    """

    bits: int = 8
    min_len: int = 1
    max_len: int = 20
    name: ClassVar[str] = "copy"

    def __post_init__(self):
        _int("bits", self.bits, 1)
        _int("max_len", self.max_len, _int("min_len", self.min_len, 1))

    @property
    def input_size(self) -> int:
        return self.bits + 1

    @property
    def output_size(self) -> int:
        return self.bits

    def batch(self, batch_size, generator=None, *, length=None, min_len=None, max_len=None) -> Batch:
        b = _int("batch_size", batch_size, 1)
        names = ("length", "min_len", "max_len")
        L = _draw(generator, names, *_pick_range(names, length, min_len, max_len, self.min_len, self.max_len), 1)
        seq = _bits((L, b, self.bits), generator)
        T = 2 * L + 1
        inputs = torch.zeros(T, b, self.bits + 1)
        inputs[:L, :, : self.bits] = seq
        inputs[L, :, self.bits] = 1.0
        targets = torch.zeros(T, b, self.bits)
        targets[L + 1 :] = seq
        mask = torch.zeros(T, b)
        mask[L + 1 :] = 1.0
        return Batch(inputs, targets, mask)


@dataclass(frozen=True)
class RepeatCopyTask(Task):
    """Repeat copy: read a sequence and a repeat count ``R``, write the sequence R times, then an end marker.

    Encoding, for a batch of length ``L`` and count ``R`` (``T = L + 1 + L*R + 1`` steps):

    - inputs, ``bits + 1`` channels: steps ``0..L-1`` carry the vectors on channels
      ``0..bits-1``; step ``L`` carries ``R / max_repeats`` on channel ``bits`` (the
      count channel, which also marks the end of the sequence; ``max_repeats`` is the
      task's training maximum, so counts beyond it read above 1.0); later steps are zero.
      The paper normalises the count to mean 0 and variance 1 instead, which would leave
      some counts near 0 and so needs a delimiter channel of its own.
    - targets, ``bits + 1`` channels: steps ``L+1..L+L*R`` hold the sequence ``R`` times
      on channels ``0..bits-1``; the last step ``L+L*R+1`` is the end marker, 1.0 on
      channel ``bits`` (0.0 on that channel at the other scored steps).
    - mask: 1.0 at steps ``L+1..L+L*R+1`` (the copies and the end marker).

    Overrides of ``batch``: ``length`` or ``min_len``/``max_len``; ``repeats`` or
    ``min_repeats``/``max_repeats``.
    """

    bits: int = 8
    min_len: int = 1
    max_len: int = 10
    min_repeats: int = 1
    max_repeats: int = 10
    name: ClassVar[str] = "repeat_copy"

    def __post_init__(self):
        _int("bits", self.bits, 1)
        _int("max_len", self.max_len, _int("min_len", self.min_len, 1))
        _int("max_repeats", self.max_repeats, _int("min_repeats", self.min_repeats, 1))

    @property
    def input_size(self) -> int:
        return self.bits + 1

    @property
    def output_size(self) -> int:
        return self.bits + 1

    def batch(
        self,
        batch_size,
        generator=None,
        *,
        length=None,
        min_len=None,
        max_len=None,
        repeats=None,
        min_repeats=None,
        max_repeats=None,
    ) -> Batch:
        b = _int("batch_size", batch_size, 1)
        names = ("length", "min_len", "max_len")
        L = _draw(generator, names, *_pick_range(names, length, min_len, max_len, self.min_len, self.max_len), 1)
        names = ("repeats", "min_repeats", "max_repeats")
        R = _draw(
            generator,
            names,
            *_pick_range(names, repeats, min_repeats, max_repeats, self.min_repeats, self.max_repeats),
            1,
        )
        seq = _bits((L, b, self.bits), generator)
        T = L + 1 + L * R + 1
        inputs = torch.zeros(T, b, self.bits + 1)
        inputs[:L, :, : self.bits] = seq
        inputs[L, :, self.bits] = R / self.max_repeats
        targets = torch.zeros(T, b, self.bits + 1)
        targets[L + 1 : T - 1, :, : self.bits] = seq.repeat(R, 1, 1)
        targets[T - 1, :, self.bits] = 1.0
        mask = torch.zeros(T, b)
        mask[L + 1 :] = 1.0
        return Batch(inputs, targets, mask)


@dataclass(frozen=True)
class AssociativeRecallTask(Task):
    """Associative recall: read ``N`` items, then a query item; write the item that followed the query.

    An item is ``item_len`` binary vectors of ``bits`` bits (paper: 3 six-bit vectors).
    Encoding, with ``k = item_len`` and ``N`` items per batch
    (``T = N*(k+1) + 1 + k + 1 + k`` steps):

    - inputs, ``bits + 2`` channels: item ``i`` occupies steps ``i*(k+1)..i*(k+1)+k``:
      first an item delimiter (1.0 on channel ``bits``), then its ``k`` vectors on
      channels ``0..bits-1``. At ``Q = N*(k+1)`` a query delimiter (1.0 on channel
      ``bits+1``), the query item at ``Q+1..Q+k``, a second query delimiter at
      ``Q+k+1``; the last ``k`` steps are zero.
    - targets, ``bits`` channels: on the last ``k`` steps, the item that followed the
      query in the list. The query is item ``q``, uniform in ``0..N-2`` per sequence.
    - mask: 1.0 on the last ``k`` steps.

    Overrides of ``batch``: ``num_items`` or ``min_items``/``max_items`` (at least 2).
    """

    bits: int = 6
    item_len: int = 3
    min_items: int = 2
    max_items: int = 6
    name: ClassVar[str] = "associative_recall"

    def __post_init__(self):
        _int("bits", self.bits, 1)
        _int("item_len", self.item_len, 1)
        _int("max_items", self.max_items, _int("min_items", self.min_items, 2))

    @property
    def input_size(self) -> int:
        return self.bits + 2

    @property
    def output_size(self) -> int:
        return self.bits

    def batch(self, batch_size, generator=None, *, num_items=None, min_items=None, max_items=None) -> Batch:
        b = _int("batch_size", batch_size, 1)
        names = ("num_items", "min_items", "max_items")
        n = _draw(
            generator, names, *_pick_range(names, num_items, min_items, max_items, self.min_items, self.max_items), 2
        )
        k, bits = self.item_len, self.bits
        items = _bits((n, k, b, bits), generator)
        query = torch.randint(0, n - 1, (b,), generator=generator)
        cols = torch.arange(b)
        # Advanced indices around a slice: the result is (b, k, bits).
        query_item = items[query, :, cols].transpose(0, 1)
        answer = items[query + 1, :, cols].transpose(0, 1)

        Q = n * (k + 1)
        T = Q + 1 + k + 1 + k
        inputs = torch.zeros(T, b, bits + 2)
        listed = inputs[:Q].view(n, k + 1, b, bits + 2)
        listed[:, 0, :, bits] = 1.0
        listed[:, 1:, :, :bits] = items
        inputs[Q, :, bits + 1] = 1.0
        inputs[Q + 1 : Q + 1 + k, :, :bits] = query_item
        inputs[Q + 1 + k, :, bits + 1] = 1.0
        targets = torch.zeros(T, b, bits)
        targets[T - k :] = answer
        mask = torch.zeros(T, b)
        mask[T - k :] = 1.0
        return Batch(inputs, targets, mask)


@dataclass(frozen=True)
class NGramsTask(Task):
    """Dynamic N-grams: predict the next bit of a sequence drawn from a random ``context+1``-gram table.

    Per sequence, a table of ``2**context`` probabilities P(next bit = 1 | previous
    ``context`` bits) is drawn i.i.d. from Beta(1/2, 1/2) (paper: 6-grams, 32 entries).
    The first ``context`` bits are uniform; the remaining ``length - context`` bits are
    sampled from the table. Encoding, for ``length`` bits ``b_0..b_{length-1}``
    (``T = length - 1`` steps):

    - inputs, 1 channel: ``b_t`` at step ``t``.
    - targets, 1 channel: ``b_{t+1}`` at step ``t`` (zero where unscored).
    - mask: 1.0 at steps ``t >= context - 1``, i.e. the ``length - context`` bits drawn
      from the table are scored (a uniform guesser costs ``length - context`` bits). The
      optimal estimator's cost at length 200 is about 128 bits here, where the paper
      gives 133: 128 plus 1 bit for each of the first ``context`` bits, random and
      unscored here.

    :meth:`cost` is the cross-entropy in bits per sequence; :meth:`optimal_logits` and
    :meth:`optimal_cost` give the paper's optimal Bayesian estimator
    ``P(1 | N1, N0, c) = (N1 + 1/2) / (N1 + N0 + 1)``, where ``N1``/``N0`` count the
    ones/zeros that followed context ``c`` earlier in the sequence.

    Overrides of ``batch``: ``length`` (at least ``context + 1``).
    """

    length: int = 200
    context: int = 5
    name: ClassVar[str] = "ngrams"

    def __post_init__(self):
        _int("context", self.context, 1, 16)
        _int("length", self.length, self.context + 1)

    @property
    def input_size(self) -> int:
        return 1

    @property
    def output_size(self) -> int:
        return 1

    def batch(self, batch_size, generator=None, *, length=None) -> Batch:
        b = _int("batch_size", batch_size, 1)
        n = _int("length", self.length if length is None else length, self.context + 1)
        c = self.context
        # sin^2(pi U / 2) with U uniform is Beta(1/2, 1/2) (the arcsine law).
        table = torch.sin(torch.rand(b, 2**c, generator=generator) * (math.pi / 2)) ** 2
        u = torch.rand(b, n - c, generator=generator)
        bits = torch.empty(b, n, dtype=torch.long)
        bits[:, :c] = torch.randint(0, 2, (b, c), generator=generator)
        ctx = (bits[:, :c] << torch.arange(c - 1, -1, -1)).sum(1)
        rows = torch.arange(b)
        top = 2**c - 1
        for t in range(c, n):
            bit = (u[:, t - c] < table[rows, ctx]).long()
            bits[:, t] = bit
            ctx = ((ctx << 1) | bit) & top
        seq = bits.t().float().unsqueeze(-1)  # (n, b, 1)
        mask = torch.zeros(n - 1, b)
        mask[c - 1 :] = 1.0
        return Batch(seq[:-1].contiguous(), seq[1:] * mask.unsqueeze(-1), mask)

    def cost(self, logits: torch.Tensor, batch: Batch) -> float:
        """Cross-entropy of ``sigmoid(logits)`` against the next bits, in bits per sequence (batch mean)."""
        self._check_logits(logits, batch)
        mask = batch.mask.to(logits.device).unsqueeze(-1)
        nats = F.binary_cross_entropy_with_logits(
            logits.detach().double(), batch.targets.to(logits.device).double(), reduction="none"
        )
        return float((nats * mask).sum()) / math.log(2) / batch.mask.shape[1]

    def optimal_logits(self, batch: Batch) -> torch.Tensor:
        """Logits (T, B, 1) of the optimal Bayesian estimator on the scored steps, zero elsewhere."""
        c = self.context
        bits = torch.cat([batch.inputs[:, :, 0], batch.targets[-1:, :, 0]]).t().long()  # (B, n)
        weights = 2 ** torch.arange(c - 1, -1, -1)
        ctx = (bits.unfold(1, c, 1)[:, :-1] * weights).sum(-1)  # context of bits c..n-1
        onehot = F.one_hot(ctx, 2**c).double()  # (B, n-c, 2**c)
        nxt = bits[:, c:].double().unsqueeze(-1)
        # Counts strictly before each step, for that step's context.
        n1 = ((torch.cumsum(onehot * nxt, 1) - onehot * nxt) * onehot).sum(-1)
        n_all = ((torch.cumsum(onehot, 1) - onehot) * onehot).sum(-1)
        p1 = (n1 + 0.5) / (n_all + 1.0)
        logits = torch.zeros_like(batch.targets)
        logits[c - 1 :, :, 0] = (torch.log(p1) - torch.log1p(-p1)).t().to(logits.dtype)
        return logits

    def optimal_cost(self, batch: Batch) -> float:
        """The optimal Bayesian estimator's cross-entropy, bits per sequence (batch mean)."""
        return self.cost(self.optimal_logits(batch), batch)


@dataclass(frozen=True)
class PrioritySortTask(Task):
    """Priority sort: read vectors with scalar priorities, write the highest-priority ones in descending order.

    Encoding, with ``n = num_items`` inputs and ``m = num_outputs`` outputs
    (paper: 20 and 16; ``T = n + 1 + m`` steps):

    - inputs, ``bits + 2`` channels: steps ``0..n-1`` carry random binary vectors on
      channels ``0..bits-1`` and a priority uniform in [-1, 1] on channel ``bits``;
      step ``n`` is the delimiter, 1.0 on channel ``bits+1``; the last ``m`` steps are zero.
    - targets, ``bits`` channels: on the last ``m`` steps, the ``m`` highest-priority
      vectors, highest first.
    - mask: 1.0 on the last ``m`` steps.

    Overrides of ``batch``: ``num_items``, ``num_outputs`` (``1 <= num_outputs <= num_items``).
    """

    bits: int = 8
    num_items: int = 20
    num_outputs: int = 16
    name: ClassVar[str] = "priority_sort"

    def __post_init__(self):
        _int("bits", self.bits, 1)
        _int("num_outputs", self.num_outputs, 1, _int("num_items", self.num_items, 1))

    @property
    def input_size(self) -> int:
        return self.bits + 2

    @property
    def output_size(self) -> int:
        return self.bits

    def batch(self, batch_size, generator=None, *, num_items=None, num_outputs=None) -> Batch:
        b = _int("batch_size", batch_size, 1)
        n = _int("num_items", self.num_items if num_items is None else num_items, 1)
        # The task's own num_outputs named as such: the caller who passed num_items alone never gave it.
        m = _int("num_outputs" if num_outputs is not None else "the task's num_outputs (at most num_items)",
                 self.num_outputs if num_outputs is None else num_outputs, 1, n)
        bits = self.bits
        vectors = _bits((n, b, bits), generator)
        priority = torch.rand(n, b, generator=generator) * 2 - 1
        order = torch.argsort(priority, dim=0, descending=True)[:m]
        T = n + 1 + m
        inputs = torch.zeros(T, b, bits + 2)
        inputs[:n, :, :bits] = vectors
        inputs[:n, :, bits] = priority
        inputs[n, :, bits + 1] = 1.0
        targets = torch.zeros(T, b, bits)
        targets[n + 1 :] = torch.gather(vectors, 0, order.unsqueeze(-1).expand(m, b, bits))
        mask = torch.zeros(T, b)
        mask[n + 1 :] = 1.0
        return Batch(inputs, targets, mask)


TASKS: dict[str, type[Task]] = {
    cls.name: cls for cls in (CopyTask, RepeatCopyTask, AssociativeRecallTask, NGramsTask, PrioritySortTask)
}


def make_task(name: str, **kwargs) -> Task:
    """Build the task registered as ``name`` with its dataclass fields as ``kwargs``."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(sorted(TASKS))}")
    names = [field.name for field in fields(TASKS[name])]
    unknown = [key for key in kwargs if key not in names]
    if unknown:
        raise ValueError(f"task {name} takes no argument {', '.join(map(repr, unknown))}; its arguments: "
                         f"{', '.join(names)}")
    return TASKS[name](**kwargs)
