"""A whole training step captured in a CUDA graph and replayed: ``CapturedStep``.

On a GPU, a training step of a paper-size NTM is bound by the host: each
timestep is about 60 small ops forward and as many backward, each launched from
Python, while the GPU work of each takes microseconds. Capturing the whole step
(forward, loss, backward, gradient clipping, optimiser step) once and replaying
it leaves the host one launch a step. This is the "whole-network capture" of
PyTorch's CUDA-graph notes (https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs):
warm-up on a side stream, an optimiser built with ``capturable=True``, gradients
set to None before capture, static input tensors copied into before each replay.

Outside the core: it knows nothing of the model but its parameters, buffers and
the ``loss_fn`` it is given.

Example::

    model = FastNTM(9, 8).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, capturable=True)

    def loss_fn(model, inputs, targets, mask):
        logits, _ = model(inputs)
        return masked_bce(logits, Batch(inputs, targets, mask)), logits

    step = CapturedStep(model, optimizer, loss_fn, clip=10.0)
    for batch in batches:                      # CUDA tensors, any number of shapes
        loss, logits = step(*batch)            # overwritten by the next call

What a call does, by the shapes and dtypes of its tensors and the model's
train/eval mode:

* The first call, if the optimiser holds no state yet, runs the step eagerly.
  Optimisers create their state lazily, in their first step, and state created
  inside a capture would be re-created by every replay.
* For a new shape it runs ``warmup`` eager steps on a side stream (Triton
  compiles, cuBLAS and allocator set-up happen there, not during capture), puts
  the parameters, buffers and optimiser state back as they were before the
  warm-up, captures one step on the same stream and replays it. The warm-up
  leaves no trace: a sequence of calls updates the parameters as the same
  steps run eagerly would, to rounding (random ops such as dropout draw other
  numbers than an eager run, as under any CUDA graph).
* For a shape seen before it copies the tensors into that graph's inputs and
  replays it.

Limits:

* Nothing in the step may wait for the GPU: no ``.item()``, no printing of
  tensors, no shapes or Python branches that depend on tensor values. Such a
  step fails at capture, with an error naming these causes. fastntm's value
  checks read CUDA tensors on the host, so ``FASTNTM_CHECK_VALUES=1`` is refused.
* The graph sees only the tensors: Python values that ``loss_fn`` or the
  optimiser read (a float learning rate, a flag) are frozen at capture, and so
  is whatever fastntm decides in Python when a shape is captured: the backend
  (``FASTNTM_BACKEND``), block sizes (``FASTNTM_BLOCKS``), ``FASTNTM_POISON``
  and grad mode. Change them before the first call, or build a new
  ``CapturedStep``. CUDA autocast (on or off, and its dtype) is part of a
  graph's key; warm-up and capture run with autocast's cache of casts off, so
  the graph casts the weights it is given at each replay.
* One graph, with its own memory, per distinct input shape: the copy task's
  20 lengths make up to 20 graphs, repeat copy's lengths and repeats up to 100.
* The returned tensors are overwritten by the next call: clone what must be
  kept. Each graph holds its own gradients, so after a call the parameters'
  ``.grad`` may be another shape's.
* The graphs update the optimiser state tensors that existed at capture.
  ``model.load_state_dict`` copies in place and is fine; after
  ``optimizer.load_state_dict`` (new tensors) build a new ``CapturedStep``.
* One process: ``DistributedDataParallel`` is refused (capturing its all-reduce
  needs set-up this does not do).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import warnings
from typing import Callable, Union

import torch
from torch import nn

__all__ = ["CapturedStep"]

StepOutput = Union[torch.Tensor, tuple[torch.Tensor, ...]]


@dataclasses.dataclass
class _Graph:
    """One captured step: the graph, the tensors it reads its inputs from, the ones it writes its outputs to."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    outputs: StepOutput

    def replay(self, tensors) -> StepOutput:
        for static, tensor in zip(self.inputs, tensors):
            static.copy_(tensor)
        with torch.cuda.device(self.inputs[0].device):
            self.graph.replay()
        return self.outputs


class CapturedStep:
    """One training step on a batch, run as a CUDA graph captured for each input shape.

    Args:
        model: the module trained; its parameters and buffers on one CUDA device.
        optimizer: a ``torch.optim`` optimiser over the model's parameters, built
            with ``capturable=True`` if it has that option (``Adam``, ``AdamW``,
            ``RMSprop``; ``SGD`` has none and needs none).
        loss_fn: ``loss_fn(model, *tensors)`` -> the loss, or a tuple of tensors
            whose first is the loss (the rest, such as logits, are returned too).
        clip: clip the gradient norm of ``model.parameters()`` to this
            (``clip_grad_norm_``); None or 0 for no clipping.
        warmup: eager steps before each capture (undone afterwards).

    ``step(*tensors)`` runs forward, ``loss.backward()``, clipping and
    ``optimizer.step()``, and returns what ``loss_fn`` returned. See the module
    docstring for what a call does and what cannot be captured.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[..., StepOutput],
        *,
        clip: float | None = None,
        warmup: int = 3,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("CapturedStep runs in one process: capturing DistributedDataParallel's all-reduce "
                             "needs set-up it does not do; pass the model itself and train on one GPU")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, *tensors), got {type(loss_fn).__name__}")
        if any(group.get("capturable") is False for group in optimizer.param_groups):
            name = type(optimizer).__name__
            raise ValueError(f"{name} was built with capturable=False, and its step then reads its step count on "
                             f"the host, which a CUDA graph cannot capture; build it as {name}(params, ..., "
                             f"capturable=True)")
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not math.isfinite(clip) or clip < 0):
            raise ValueError(f"clip must be a finite number >= 0 (0 or None: no clipping), got {clip!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive int, got {warmup!r}")
        _check_values_unchecked()
        named = [*model.named_parameters(), *model.named_buffers()]
        named += [(f"optimizer parameter {i}", p) for i, p in enumerate(_optimizer_params(optimizer))]
        if not named:
            raise ValueError("model has no parameters to train")
        device = named[0][1].device
        for name, tensor in named:
            if tensor.device.type != "cuda":
                raise ValueError(f"CapturedStep needs CUDA tensors, got {tensor.device.type} ({name} is on "
                                 f"{tensor.device}); move the model to the GPU before building the optimizer")
            if tensor.device != device:
                raise ValueError(f"CapturedStep needs every tensor on one device: {name} is on {tensor.device}, "
                                 f"{named[0][0]} on {device}")
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.clip, self.warmup, self.device = clip, warmup, device
        # Warm-up and capture share one stream, so that whatever a library sets up per stream
        # during the warm-up is there for the capture.
        self._stream = torch.cuda.Stream(device)
        self._graphs: dict[tuple, _Graph] = {}
        self._stepped_eagerly = False

    @property
    def num_graphs(self) -> int:
        """How many shapes have been captured so far."""
        return len(self._graphs)

    def __call__(self, *tensors: torch.Tensor) -> StepOutput:
        self._check_inputs(tensors)
        key = (self.model.training, _autocast_state(), tuple((tuple(t.shape), t.dtype) for t in tensors))
        graph = self._graphs.get(key)
        if graph is None:
            _check_values_unchecked()
            if not self.optimizer.state and not self._stepped_eagerly:
                out = self._eager(tensors)
                self._stepped_eagerly = True
                return out
            graph = self._graphs[key] = self._capture(tensors)
        return graph.replay(tensors)

    def _check_inputs(self, tensors) -> None:
        if not tensors:
            raise ValueError("CapturedStep needs at least one input tensor")
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"input {i} must be a torch.Tensor (only tensors can be copied into a graph's "
                                f"inputs), got {type(t).__name__}")
            if t.device.type != "cuda":
                raise ValueError(f"CapturedStep needs CUDA tensors, got {t.device.type} (input {i}); move the batch "
                                 f"with .to('{self.device}') first")
            if t.device != self.device:
                raise ValueError(f"input {i} is on {t.device} but the model is on {self.device}")

    def _step(self, tensors) -> StepOutput:
        out = self.loss_fn(self.model, *tensors)
        parts = out if isinstance(out, tuple) else (out,)
        if not parts or not all(isinstance(t, torch.Tensor) for t in parts):
            raise TypeError(f"loss_fn must return a tensor or a tuple of tensors, the loss first; got {out!r:.200}")
        parts[0].backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        self.optimizer.step()
        return out

    def _clear_grads(self) -> None:
        """Gradients None, the model's and any the optimiser holds beyond it, so that backward
        assigns them rather than adding to them (and, in a capture, allocates them from the
        graph's private pool)."""
        self.model.zero_grad(set_to_none=True)
        self.optimizer.zero_grad(set_to_none=True)

    def _eager(self, tensors) -> StepOutput:
        self._clear_grads()
        with _planned_uncaptured_steps():
            return _detached(self._step(tensors))

    def _capture(self, tensors) -> _Graph:
        # torch.cuda.stream() does not make its device current, and a capture on another
        # device than the current one fails.
        with torch.cuda.device(self.device):
            return self._capture_here(tensors)

    def _capture_here(self, tensors) -> _Graph:
        static = [t.detach().clone() for t in tensors]
        saved = _snapshot(self.model, self.optimizer)
        current = torch.cuda.current_stream(self.device)
        self._stream.wait_stream(current)
        try:
            with torch.cuda.stream(self._stream), _planned_uncaptured_steps(), _uncached_autocast():
                for _ in range(self.warmup):
                    self._clear_grads()
                    self._step(static)
        finally:
            current.wait_stream(self._stream)
            _restore(self.optimizer, saved)
        self._clear_grads()
        self._stream.wait_stream(current)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=self._stream), _uncached_autocast():
                outputs = self._step(static)
        except Exception as error:
            # Ending a failed capture raises its own error ("a previous error during capture"); the one
            # that names the offending operation is its context.
            root = error.__context__ or error
            raise RuntimeError(
                "capturing the training step in a CUDA graph failed: something in it waits for the GPU (.item(), "
                "printing a tensor, a shape or branch that depends on tensor values) or uses a CPU tensor; "
                f"{type(root).__name__}: {root}"
            ) from error
        return _Graph(graph, static, _detached(outputs))


def _autocast_state() -> tuple:
    """CUDA autocast now, (enabled, dtype): part of a graph's key, since a capture freezes it."""
    enabled = torch.is_autocast_enabled("cuda")
    return enabled, torch.get_autocast_dtype("cuda") if enabled else None


@contextlib.contextmanager
def _uncached_autocast():
    """CUDA autocast as it is, with its cache of casts off. With the cache on, the capture would use the
    warm-up's low-precision copies of the weights instead of recording the casts: stale after the first
    optimiser step, and freed when the autocast region ends (``torch.cuda.make_graphed_callables``
    refuses autocast with caching for this reason)."""
    if torch.is_autocast_enabled("cuda") and torch.is_autocast_cache_enabled():
        with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
            yield
    else:
        yield


def _snapshot(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Copies of what a step changes (parameters, buffers, optimiser state), to undo a warm-up."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers(), *_optimizer_params(optimizer))}
    kept = [(t, t.detach().clone()) for t in tensors.values()]
    state = {p: {k: v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in s.items()}
             for p, s in optimizer.state.items()}
    return kept, state


@torch.no_grad()
def _restore(optimizer: torch.optim.Optimizer, saved) -> None:
    """Put back what ``_snapshot`` copied, in place: a graph captured next must see the same tensors.

    State the warm-up created (a parameter's first gradient came in the warm-up) is zeroed
    in place, not deleted: zero is what a first step starts from (Adam, AdamW, RMSprop, and
    SGD without dampening), and deleted state would be created inside the capture and
    created afresh by every replay.
    """
    kept, state = saved
    for tensor, value in kept:
        tensor.copy_(value)
    for p, now in optimizer.state.items():
        before = state.get(p, {})
        for k, v in now.items():
            if k not in before:
                if isinstance(v, torch.Tensor):
                    v.zero_()
            elif isinstance(v, torch.Tensor) and isinstance(before[k], torch.Tensor):
                v.copy_(before[k])
            else:
                now[k] = before[k]


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _detached(out: StepOutput) -> StepOutput:
    return tuple(t.detach() for t in out) if isinstance(out, tuple) else out.detach()


def _check_values_unchecked() -> None:
    if os.environ.get("FASTNTM_CHECK_VALUES", "0") == "1":
        raise RuntimeError("FASTNTM_CHECK_VALUES=1 makes fastntm read CUDA tensors on the host to check their "
                           "ranges, which a CUDA graph cannot capture; unset it to use CapturedStep")


@contextlib.contextmanager
def _planned_uncaptured_steps():
    """Silence the warning that a capturable optimiser steps outside a graph: here that is
    the first step or the warm-up before a capture, as planned."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*capturable=True.*")
        yield
