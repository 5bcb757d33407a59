"""Benchmark cases: one op at one shape under one provider, ready to check and time.

Ops: ``memory_step.fwd`` (no autograd), ``memory_step.fwd_bwd`` (forward, then
the gradients of every input), ``train_step`` (``FastNTM`` on the copy task:
forward, masked binary cross-entropy, backward, Adam).

Providers: ``reference`` (the plain PyTorch path, eager, ``backend="reference"``),
``reference-compile`` (the same under ``torch.compile``: for ``train_step`` the whole model; compile time is
spent in the warm-up, not timed), ``triton`` (``backend="triton"``, CUDA only) and ``numba``
(``backend="numba"``, CPU only: what ``auto`` runs on a CPU where numba imports). For
``train_step`` alone, on CUDA alone: ``triton-graph`` and ``reference-graph``, the
same step through ``fastntm.graphs.CapturedStep`` (captured once in a CUDA
graph, replayed at every call; Adam with ``capturable=True``), and
``reference-compile-graph``, the model under ``torch.compile`` (Inductor's default mode) run by the
same ``CapturedStep``: torch.compile's kernels with no launch overhead, forward, backward and Adam in
one graph, the fairest rival of ``triton-graph`` (``mode="reduce-overhead"`` graphs the compiled
forward and backward but launches the loss and Adam eagerly). Their peak memory
is near zero: the graph's memory is allocated at capture, in the warm-up. For
``train_step`` alone, on a CPU: ``compiled``, the model with ``backend="compiled"``
(its memory step through ``torch.compile``, the rest eager; for the memory step
alone that is ``reference-compile``), and ``baseline``, a model of the NTM code in
common use (``benchmarks.baseline_ntm``: its own step, loss and optimiser on the
same batch), the side of the issue's CPU targets; it is checked against its own
float64 copy.

``Case.prepare()`` builds the inputs and the timed callable, runs it once (the
warm-up; for ``reference-compile`` and ``reference-compile-graph`` the compile) and measures its relative error
against the literal reference (``fastntm.reference``, or the reference-backed
model) run in float64 on the same inputs: outputs for ``fwd``; outputs and every
input's gradient for ``fwd_bwd``; the logits and every parameter's gradient for
``train_step``. A graph provider is checked on a replay: after one eager step
(which creates Adam's state) it captures the step and replays it, and the
replay's logits and gradients are compared with the float64 model's at the
parameters the replay started from.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable

import torch
import torch.nn.functional as F

from . import common
from .shapes import OpShape, TrainShape

OPS = ("memory_step.fwd", "memory_step.fwd_bwd", "train_step")
PROVIDERS = ("reference", "reference-compile", "triton", "numba")
DEVICE_PROVIDER = {"cuda": "triton", "cpu": "numba"}  # the kernels of each device, which the other lacks
COMPILE_GRAPH = "reference-compile-graph"
GRAPH_PROVIDERS = ("triton-graph", "reference-graph", COMPILE_GRAPH)
BASELINE = "baseline"
COMPILED = "compiled"
TRAIN_ONLY_PROVIDERS = (*GRAPH_PROVIDERS, COMPILED, BASELINE)
COMPILE_PROVIDERS = ("reference-compile", COMPILE_GRAPH, COMPILED)  # their warm-up compiles
WHOLE_MODEL_COMPILES = ("reference-compile", COMPILE_GRAPH)  # of train_step: the whole model, minutes on a CPU


class Unavailable(RuntimeError):
    """The provider cannot run on this machine (a device it lacks, a library that does not import): a ``skipped``
    row. Any other failure to build a case is an ``error`` row, which fails the run."""


def providers_for(device: torch.device) -> tuple[str, ...]:
    """The providers of every op on ``device``."""
    others = {p for kind, p in DEVICE_PROVIDER.items() if kind != device.type}
    return tuple(p for p in PROVIDERS if p not in others)


def train_only_providers_for(device: torch.device) -> tuple[str, ...]:
    """The providers of ``train_step`` alone on ``device``: on CUDA the whole step replayed from a CUDA
    graph; on a CPU the compiled memory step and the baseline."""
    return GRAPH_PROVIDERS if device.type == "cuda" else (COMPILED, BASELINE)


def allow_many_compiles() -> None:
    """Every shape and grad mode is its own compiled graph; past dynamo's recompile limit
    (8) it would fall back to eager without a word, and the row would time eager."""
    import warnings

    import torch._dynamo

    # fused_reference caches its shift indices with lru_cache; dynamo traces through it and says so.
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*")
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 256)


@dataclasses.dataclass
class Case:
    op: str
    shape: OpShape | TrainShape
    provider: str
    device: torch.device
    fn: Callable[[], object] | None = None
    rel_err: float | None = None
    warmup_s: float | None = None
    call_s: float = 0.0  # one call once warm (``benchmarks.run``'s budget judges a case's timing by it)

    @property
    def name(self) -> str:
        return f"{self.op}/{self.shape.name}/{self.provider}"

    @property
    def batch(self) -> int:
        return self.shape.B

    def bytes_moved(self) -> int | None:
        if self.op == "train_step":
            return None
        return common.op_bytes(self.shape)[self.op.split(".")[1]]

    def prepare(self) -> None:
        """Build, warm (compile) and check; sets ``fn`` and ``rel_err``. May raise."""
        if self.provider == "triton" and self.device.type != "cuda":
            raise Unavailable("the Triton kernels run on CUDA only")
        if self.provider == "numba" and self.device.type != "cpu":
            raise Unavailable("the numba kernels run on a CPU only")
        if self.provider in TRAIN_ONLY_PROVIDERS and self.op != "train_step":
            raise ValueError(f"{self.provider} times train_step only, not {self.op}")
        if self.provider in GRAPH_PROVIDERS and self.device.type != "cuda":
            raise Unavailable("CUDA graphs need a CUDA device")
        if self.provider == "numba" and not _imports("numba"):
            raise Unavailable("numba does not import here")
        if self.provider.startswith("triton") and not _imports("triton"):
            raise Unavailable("the Triton kernels do not import here")
        if self.op == "train_step":
            self.fn, self.rel_err = _train_case(self.shape, self.provider, self.device)
        else:
            self.fn, self.rel_err = _op_case(self.op, self.shape, self.provider, self.device)
        common.synchronize(self.device)


def _imports(kernels: str) -> bool:
    """Whether fastntm's ``"numba"`` or ``"triton"`` kernels import here."""
    from fastntm import backend

    return (backend._numba_step() if kernels == "numba" else backend._kernels()) is not None


def _backend(provider: str) -> str:
    if provider in (COMPILED, "numba"):
        return provider
    return "triton" if provider.startswith("triton") else "reference"


# ---------------------------------------------------------------- memory_step


@functools.lru_cache(maxsize=1)
def _op_truth(shape: OpShape, device_str: str):
    """Float64 literal reference at ``shape``: inputs, outputs, cotangents, input gradients."""
    from fastntm import reference

    device = torch.device(device_str)
    x = [t.requires_grad_() for t in common.op_inputs(shape, device, torch.float64)]
    out = reference.memory_step(*x, shape.R)
    cot = common.cotangents(out)
    grads = torch.autograd.grad(out, x, cot)
    return [o.detach() for o in out], [c.float() for c in cot], grads


def _op_case(op: str, shape: OpShape, provider: str, device: torch.device):
    from fastntm import functional

    step = functools.partial(functional.memory_step, num_reads=shape.R, backend=_backend(provider))
    if provider == "reference-compile":
        allow_many_compiles()
        step = torch.compile(step, dynamic=False)
    out_ref, cot, grads_ref = _op_truth(shape, str(device))
    x = common.op_inputs(shape, device)
    if op == "memory_step.fwd":

        def fn():
            with torch.no_grad():
                return step(*x)

        err = common.max_rel_err(fn(), out_ref)
        return fn, err

    xg = [t.requires_grad_() for t in x]

    def fn():
        return torch.autograd.grad(step(*xg), xg, cot)

    out = step(*xg)
    grads = torch.autograd.grad(out, xg, cot)
    return fn, max(common.max_rel_err(out, out_ref), common.max_rel_err(grads, grads_ref))


# ---------------------------------------------------------------- training step


def copy_batch(shape: TrainShape, device: torch.device, seed: int = 0):
    from fastntm.tasks import make_task

    task = make_task("copy")
    return task, task.batch(shape.B, torch.Generator().manual_seed(seed), length=shape.length).to(device)


def masked_bce(logits: torch.Tensor, batch) -> torch.Tensor:
    """Summed over bits and scored steps, averaged over sequences (the paper's cost per sequence)."""
    bce = F.binary_cross_entropy_with_logits(logits, batch.targets.to(logits.dtype), reduction="none").sum(-1)
    return (bce * batch.mask.to(logits.dtype)).sum() / batch.mask.shape[1]


def _float64_truth(model):
    """A float64 copy of ``model`` on the reference path."""
    truth = copy.deepcopy(model).double()
    truth.cell.backend = "reference"
    return truth


def _train_error(truth, batch, logits, grads) -> float:
    """Relative error of a step's ``logits`` and ``grads`` against ``truth``'s on the same batch."""
    y_ref, _ = truth(batch.inputs.double())
    grads_ref = torch.autograd.grad(masked_bce(y_ref, batch), list(truth.parameters()))
    return max(common.rel_err(logits, y_ref), common.max_rel_err(grads, grads_ref))


def _train_case(shape: TrainShape, provider: str, device: torch.device):
    if provider == BASELINE:
        from . import baseline_ntm

        return baseline_ntm.train_case(shape, device)
    from fastntm import FastNTM
    from fastntm.training import _make_optimizer

    task, batch = copy_batch(shape, device)
    torch.manual_seed(0)
    model = FastNTM(
        task.input_size, task.output_size, memory_slots=shape.N, memory_width=shape.M,
        controller_size=shape.controller_size, num_reads=shape.R, num_writes=shape.W, backend=_backend(provider),
    ).to(device)
    if provider in COMPILE_PROVIDERS:
        allow_many_compiles()
    if provider in GRAPH_PROVIDERS:
        return _graph_train_case(model, batch, compiled=provider == COMPILE_GRAPH)
    truth = _float64_truth(model)
    params = list(model.parameters())
    if provider == "reference-compile":
        run = torch.compile(model, dynamic=False)
        y, _ = _run_compiled(lambda: run(batch.inputs), provider)
    else:
        run = model
        y, _ = run(batch.inputs)
    grads = torch.autograd.grad(masked_bce(y, batch), params)
    err = _train_error(truth, batch, y, grads)
    del truth

    optimiser = _make_optimizer("adam", params, lr=1e-4)  # Adam as the trainer makes it

    def fn():
        optimiser.zero_grad(set_to_none=True)
        logits, _ = run(batch.inputs)
        loss = masked_bce(logits, batch)
        loss.backward()
        optimiser.step()
        return loss

    fn()
    return fn, err


def _run_compiled(call: Callable[[], object], provider: str):
    """``call()``, which runs the model under torch.compile; an error if no compiled graph ran.

    The model is compiled whole, since its steps call the cell's ``_step``, not its forward:
    ``model.cell.compile()`` compiled nothing, and the row timed eager."""
    with torch.profiler.profile() as prof:
        out = call()
    if not any(e.name.startswith("Torch-Compiled Region") for e in prof.events()):
        raise RuntimeError(f"{provider}: no compiled graph ran")
    return out


def _graph_train_case(model, batch, *, compiled: bool):
    """The training step through ``CapturedStep``; with ``compiled``, of the model under torch.compile (the
    first, eager step compiles it, forward and backward, before any capture: dynamo compiling inside a capture
    fails, as it reads the CUDA RNG's state, pytorch/pytorch#131782; the capture only evaluates its guards)."""
    from fastntm.graphs import CapturedStep
    from fastntm.tasks import Batch

    def loss_fn(run, inputs, targets, mask):
        logits, _ = run(inputs)
        return masked_bce(logits, Batch(inputs, targets, mask)), logits

    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)
    step = CapturedStep(torch.compile(model, dynamic=False) if compiled else model, optimiser, loss_fn)
    if compiled:
        _run_compiled(lambda: step(*batch), COMPILE_GRAPH)  # eager: creates Adam's state, compiles
    else:
        step(*batch)  # eager: creates Adam's state
    truth = _float64_truth(model)
    _, logits = step(*batch)  # captured, then replayed
    err = _train_error(truth, batch, logits, [p.grad for p in model.parameters()])

    def fn():
        return step(*batch)[0]

    return fn, err
