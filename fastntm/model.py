"""The Neural Turing Machine as ``nn.Module``s: ``NTMState``, ``NTMCell`` and ``FastNTM``.

The model knows only the functional ops (``fastntm.functional``); which
implementation runs them is decided there.

One step (SPEC.md, read-then-write)::

    h_t    = controller([x_t, r_{t-1}], state)
    params = heads(h_t)                      # k, beta, g, s, gamma, e, a
    w_t, r_t, M_t = memory_step(M_{t-1}, params, w_{t-1})   # these two: memory_step_from_heads
    y_t    = output([h_t, r_t])
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
from typing import Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from . import functional, validation
from .backend import BACKENDS, autocasting, compile_lazily
from .backend import resolve as resolve_backend

MEMORY_INITS = ("constant", "learned", "random")
CONTROLLERS = ("lstm", "mlp")
CONSTANT_MEMORY_VALUE = 1e-6


@dataclasses.dataclass
class NTMState:
    """Everything one step hands to the next.

    ``memory`` (B, N, M); ``weights`` (B, H, N), read heads first; ``reads``
    (B, R, M); ``controller``: the controller's own state, ``(h, c)`` each
    (layers, B, controller_size) for the LSTM, empty for the MLP.
    """

    memory: torch.Tensor
    weights: torch.Tensor
    reads: torch.Tensor
    controller: tuple[torch.Tensor, ...] = ()

    def _map(self, fn) -> "NTMState":
        return NTMState(fn(self.memory), fn(self.weights), fn(self.reads), tuple(fn(t) for t in self.controller))

    def detach(self) -> "NTMState":
        """The same values cut from the graph, for truncated backprop through time."""
        return self._map(torch.Tensor.detach)

    def to(self, *args, **kwargs) -> "NTMState":
        """Move or cast every tensor, as ``torch.Tensor.to``."""
        return self._map(lambda t: t.to(*args, **kwargs))

    @property
    def batch_size(self) -> int:
        return self.memory.shape[0]


# A pytree node: torch.export (and torch.utils._pytree's users) take a state as its tensors, in or out of a model.
torch.export.register_dataclass(NTMState, serialized_type_name="fastntm.NTMState")
# torch.load's default (weights_only=True) unpickles only what is allowed: a saved state, or an exported program
# whose example inputs hold one.
torch.serialization.add_safe_globals([NTMState])


@dataclasses.dataclass
class Trace:
    """Weightings recorded by ``FastNTM.record()``: ``weights`` (T, B, H, N), read heads first."""

    num_reads: int
    steps: list[torch.Tensor] = dataclasses.field(default_factory=list)

    @property
    def weights(self) -> torch.Tensor:
        if not self.steps:
            raise ValueError("the trace holds no steps: run the model inside the 'with model.record()' block")
        shapes = {tuple(step.shape) for step in self.steps}
        if len(shapes) > 1:
            raise ValueError(f"the trace's steps have different shapes (B, H, N), {sorted(shapes)}: calls with "
                             "different batch sizes inside one 'with model.record()' block; record each in a block "
                             "of its own")
        return torch.stack(self.steps)

    @property
    def read_weights(self) -> torch.Tensor:
        return self.weights[:, :, : self.num_reads]

    @property
    def write_weights(self) -> torch.Tensor:
        return self.weights[:, :, self.num_reads :]


class LSTMController(nn.Module):
    """A stack of ``nn.LSTMCell``s; state ``(h, c)``, each (layers, B, hidden)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        sizes = [input_size] + [hidden_size] * (num_layers - 1)
        self.cells = nn.ModuleList(nn.LSTMCell(n, hidden_size) for n in sizes)

    def initial_state(self, batch_size: int, device, dtype) -> tuple[torch.Tensor, ...]:
        # Two tensors, not one twice: a compiled step (backend="compiled") guards on which inputs alias.
        return tuple(torch.zeros(self.num_layers, batch_size, self.hidden_size, device=device, dtype=dtype)
                     for _ in range(2))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
        h_prev, c_prev = state
        # One layer: views both ways (squeeze's backward is a view too, select's a zero-filled copy).
        if len(self.cells) == 1:
            x, c = self.cells[0](x, (h_prev.squeeze(0), c_prev.squeeze(0)))
            return x, (x.unsqueeze(0), c.unsqueeze(0))
        hs, cs = [], []
        for layer, cell in enumerate(self.cells):
            x, c = cell(x, (h_prev[layer], c_prev[layer]))
            hs.append(x)
            cs.append(c)
        return x, (torch.stack(hs), torch.stack(cs))


class MLPController(nn.Module):
    """Feed-forward layers with ReLU; no state of its own."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int):
        super().__init__()
        self.hidden_size = hidden_size
        sizes = [input_size] + [hidden_size] * num_layers
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))

    def initial_state(self, batch_size: int, device, dtype) -> tuple[torch.Tensor, ...]:
        return ()

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x, ()


class NTMCell(nn.Module):
    """One NTM step: ``(x_t, state) -> (y_t, new_state)``.

    ``y_t`` is (B, output_size), or the features ``[h_t, r_t]`` (B, controller_size
    + num_reads * memory_width) when ``output_size`` is None. Arguments as in
    ``FastNTM``; ``backend`` is ``"auto"`` (the Triton kernels for CUDA tensors, the
    numba kernels for CPU tensors where numba imports, else the reference path),
    ``"reference"``, ``"triton"``, ``"numba"``, or ``"compiled"`` (the whole step through
    ``torch.compile``, see ``step`` and ``fastntm.backend``).
    """

    def __init__(
        self,
        input_size: int,
        output_size: int | None,
        *,
        memory_slots: int = 128,
        memory_width: int = 20,
        controller: str = "lstm",
        controller_size: int = 100,
        controller_layers: int = 1,
        num_reads: int = 1,
        num_writes: int = 1,
        shift_range: int = 1,
        memory_init: str = "constant",
        memory_dtype: torch.dtype | str | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        input_size = _int_arg("input_size", input_size, 1)
        if output_size is not None:
            output_size = _int_arg("output_size", output_size, 1)
        memory_slots = _int_arg("memory_slots", memory_slots, 1)
        memory_width = _int_arg("memory_width", memory_width, 1)
        controller_size = _int_arg("controller_size", controller_size, 1)
        controller_layers = _int_arg("controller_layers", controller_layers, 1)
        num_reads = _int_arg("num_reads", num_reads, 0)
        num_writes = _int_arg("num_writes", num_writes, 0)
        shift_range = _int_arg("shift_range", shift_range, 0)
        if num_reads + num_writes < 1:
            raise ValueError(f"num_reads + num_writes must be at least 1, got {num_reads} + {num_writes}")
        _check_choice("controller", controller, CONTROLLERS)
        _check_choice("memory_init", memory_init, MEMORY_INITS)
        _check_choice("backend", backend, BACKENDS)
        memory_dtype = _memory_dtype(memory_dtype)

        self.input_size = input_size
        self.output_size = output_size
        self.memory_slots = memory_slots
        self.memory_width = memory_width
        self.controller_kind = controller
        self.controller_size = controller_size
        self.num_reads = num_reads
        self.num_writes = num_writes
        self.num_heads = num_reads + num_writes
        self.shift_range = shift_range
        self.memory_init = memory_init
        self.memory_dtype = memory_dtype
        self.backend = backend

        N, M, R, H = memory_slots, memory_width, num_reads, self.num_heads
        controller_cls = LSTMController if controller == "lstm" else MLPController
        self.controller = controller_cls(input_size + R * M, controller_size, controller_layers)
        # The head layer's output: per head [k, beta, g, s, gamma], then per write head [e, a].
        self.head_sizes = (M, 1, 1, 2 * shift_range + 1, 1)
        self.heads = nn.Linear(controller_size, H * sum(self.head_sizes) + num_writes * 2 * M)
        self.feature_size = controller_size + R * M
        self.output = nn.Linear(self.feature_size, output_size) if output_size is not None else None

        self.initial_weight_logits = nn.Parameter(torch.empty(H, N))
        self.initial_reads = nn.Parameter(torch.empty(R, M))
        if memory_init == "learned":
            self.initial_memory = nn.Parameter(torch.empty(N, M))
        else:
            self.register_buffer("initial_memory", torch.empty(N, M))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Controller and layers as PyTorch initialises them; memory as ``memory_init`` says;
        initial weightings focused on slot 0 (so that content-free starts are not all
        alike), initial reads zero."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        N, M = self.memory_slots, self.memory_width
        with torch.no_grad():
            self.initial_weight_logits.zero_()
            self.initial_weight_logits[:, 0] = 2 * math.log(N)
            self.initial_reads.zero_()
            if self.memory_init == "constant":
                self.initial_memory.fill_(CONSTANT_MEMORY_VALUE)
            else:
                bound = 1 / math.sqrt(N + M)
                self.initial_memory.uniform_(-bound, bound)

    def extra_repr(self) -> str:
        return (
            f"input_size={self.input_size}, output_size={self.output_size}, memory_slots={self.memory_slots}, "
            f"memory_width={self.memory_width}, controller={self.controller_kind!r}, num_reads={self.num_reads}, "
            f"num_writes={self.num_writes}, shift_range={self.shift_range}, memory_init={self.memory_init!r}"
            + (f", memory_dtype={self.memory_dtype}" if self.memory_dtype is not None else "")
            + f", backend={self.backend!r}"
        )

    def initial_state(self, batch_size: int, device=None, dtype=None) -> NTMState:
        """The state before the first step, for ``batch_size`` sequences; memory in
        ``memory_dtype`` when one was given (bf16 storage, fp32 arithmetic).

        Memory, weightings and reads are copies of the model's, each expanded over the batch (no copy per
        sequence): ``.clone()`` one before editing it in place."""
        batch_size = _int_arg("batch_size", batch_size, 1)
        if dtype is not None and not validation.is_float_dtype(dtype):
            raise TypeError(f"dtype must be a floating torch.dtype ({validation.FLOAT_NAMES}) or None, got {dtype!r}")
        device = device if device is not None else self.initial_memory.device
        dtype = dtype if dtype is not None else self.initial_memory.dtype
        B, R, H, N, M = batch_size, self.num_reads, self.num_heads, self.memory_slots, self.memory_width
        return NTMState(
            # Copies: at B = 1 an expanded view is the model's own tensor, which an edit would change.
            memory=self.initial_memory.to(device, self.memory_dtype or dtype, copy=True).expand(B, N, M),
            weights=torch.softmax(self.initial_weight_logits, dim=-1).to(device, dtype).expand(B, H, N),
            reads=self.initial_reads.to(device, dtype, copy=True).expand(B, R, M),
            controller=self.controller.initial_state(B, device, dtype),
        )

    # The steps below check nothing: ``forward`` and ``FastNTM`` check x and the state once, then step.

    def _features(self, x: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        """One step up to the output layer: ``([h_t, r_t], new_state)``."""
        h, state = self._step(x, state)
        return torch.cat([h, state.reads.flatten(1)], dim=-1), state

    def _step(self, x: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        """One step: the controller's output ``h_t`` and the new state (whose ``reads`` are ``r_t``).

        Under ``backend="compiled"`` the whole step (controller, head layer, memory step) is one compiled
        graph: on a CPU the controller's small ops cost as much as the memory step's, and their autograd
        nodes as much again."""
        if resolve_backend(self.backend, x.device) != "compiled":
            return self._eager_step(x, state)
        h, memory, weights, reads, *controller = _compiled_flat_step(
            self, x, state.memory, state.weights, state.reads, *state.controller)
        return h, NTMState(memory, weights, reads, tuple(controller))

    def _eager_step(self, x: torch.Tensor, state: NTMState) -> tuple[torch.Tensor, NTMState]:
        controller_in = torch.cat([x, state.reads.flatten(1)], dim=-1)
        h, controller_state = self.controller(controller_in, state.controller)
        raw = self.heads(h)
        # Under autocast the head layer's outputs come out in the low dtype while the
        # carried weightings do not: run the step in the wider of the two.
        wide = torch.promote_types(raw.dtype, state.weights.dtype)
        raw = raw if raw.dtype == wide else raw.to(wide)  # .to is a dispatcher call even where it returns raw
        weights = state.weights if state.weights.dtype == wide else state.weights.to(wide)
        w, r, memory = functional.memory_step_from_heads(
            state.memory, raw, weights, num_reads=self.num_reads, num_writes=self.num_writes,
            shift_width=2 * self.shift_range + 1, backend=self.backend,
        )
        return h, NTMState(memory, w, r, controller_state)

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        """The output layer on features of any leading shape (identity without one)."""
        return self.output(features) if self.output is not None else features

    def forward(self, x: torch.Tensor, state: NTMState | None = None) -> tuple[torch.Tensor, NTMState]:
        _check_x(self, "x", x, "(B, input_size)")
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        else:
            _check_state(self, state, x, x.shape[0])
        features, state = self._features(x, state)
        return self.readout(features), state


def _flat_step(cell: NTMCell, x: torch.Tensor, memory, weights, reads, *controller):
    """``cell._eager_step`` on the state's tensors, returning them as a tuple: what ``torch.compile`` takes."""
    h, state = cell._eager_step(x, NTMState(memory, weights, reads, tuple(controller)))
    return h, state.memory, state.weights, state.reads, *state.controller


_compiled_flat_step = compile_lazily(_flat_step, "the model's step")


def default_checkpoint_every(steps: int, state: NTMState) -> int:
    """``checkpoint_every="auto"``: about sqrt(T) steps a segment, or 0 (store every
    step) when every step's memory together takes at most ``AUTO_STORE_BYTES``, where
    recomputing would cost time and save nothing that matters."""
    memory = state.memory
    if any(isinstance(size, torch.SymInt) for size in memory.shape):
        # Traced with a dynamic size (torch.export, torch.compile(dynamic=True)): comparing its bytes with the
        # threshold would be a guard on it, which an unbounded torch.export.Dim refuses. Segments bound the
        # memory at any size.
        return max(1, math.isqrt(steps - 1) + 1)
    stored = steps * memory.shape[0] * memory.shape[1] * memory.shape[2] * memory.element_size()
    return 0 if stored <= AUTO_STORE_BYTES else max(1, math.isqrt(steps - 1) + 1)


AUTO_STORE_BYTES = 64 * 2**20


def unroll(cell: NTMCell, x: torch.Tensor, state: NTMState, checkpoint_every: int = 0, traces: Sequence["Trace"] = ()):
    """Run ``cell`` over ``x`` (T, B, input_size) from ``state``: ``(y (T, B, ...), final state)``.

    With ``checkpoint_every = C > 0`` and gradients on, the forward pass keeps the
    state only at every C-th step (and each step's output); backward recomputes
    each segment from its first state. Gradients equal the store-everything path
    (C = 0) to rounding. Memory for T steps falls from T copies of the memory to
    about T / C + C. Under a ``torch.func`` transform, whose grad takes no saved-tensor hooks, every step is
    stored. Each trace of ``traces`` gets every step's weightings (detached).
    """
    checkpointed = (checkpoint_every > 0 and torch.is_grad_enabled()
                    and not torch._C._are_functorch_transforms_active())
    segment = checkpoint_every if checkpointed else x.shape[0]
    outputs, recorded = [], []
    for start in range(0, x.shape[0], segment):
        x_segment = x[start : start + segment]
        if segment < x.shape[0]:
            flat = (state.memory, state.weights, state.reads, *state.controller)
            # The cell draws no random numbers: no RNG state to save, which also keeps the
            # segment capturable in a CUDA graph (saving it reads the generator on the host).
            y, weights, flat = torch.utils.checkpoint.checkpoint(
                _run_segment, cell, x_segment, bool(traces), *flat, use_reentrant=False, preserve_rng_state=False
            )
            state = NTMState(flat[0], flat[1], flat[2], tuple(flat[3:]))
        else:
            y, weights, state = _run_steps(cell, x_segment, state, bool(traces))
        outputs.append(y)
        if traces:
            recorded.extend(weights.detach().unbind(0))
    for trace in traces:  # once every segment has run: a call that raises records none of its steps
        trace.steps.extend(recorded)
    features = torch.cat(outputs) if len(outputs) > 1 else outputs[0]
    return cell.readout(features), state


def _run_steps(cell: NTMCell, x: torch.Tensor, state: NTMState, keep_weights: bool):
    """Features (T, B, F) of every step (the output layer runs once, outside), the
    weightings (T, B, H, N) if asked for, and the last state.

    The features ``[h_t, r_t]`` are joined once for all steps, not a step at a time: under a CUDA
    graph a training step costs about its number of kernels, and a join is one a step."""
    hs, reads, weights = [], [], []
    for x_t in x:
        h_t, state = cell._step(x_t, state)
        hs.append(h_t)
        reads.append(state.reads)
        if keep_weights:
            weights.append(state.weights)
    features = torch.cat([torch.stack(hs), torch.stack(reads).flatten(2)], dim=-1)
    return features, (torch.stack(weights) if keep_weights else None), state


def _run_segment(cell: NTMCell, x: torch.Tensor, keep_weights: bool, memory, weights, reads, *controller):
    y, step_weights, state = _run_steps(cell, x, NTMState(memory, weights, reads, tuple(controller)), keep_weights)
    return y, step_weights, (state.memory, state.weights, state.reads, *state.controller)


class FastNTM(nn.Module):
    """A Neural Turing Machine over whole sequences, called like ``nn.LSTM``.

    ``forward(x, state=None) -> (y, state)``: ``x`` is (T, B, input_size), or
    (B, T, input_size) with ``batch_first``; ``y`` is (T, B, output_size) raw
    logits (batch first likewise), or the features ``[h_t, r_t]`` when
    ``output_size`` is None. Pass the returned ``NTMState`` back in to continue a
    sequence (``state.detach()`` for truncated backprop); ``step(x_t, state)``
    runs one step, for streams.

    Args beyond ``NTMCell``'s:
        checkpoint_every: keep the state only every C steps in training and
            recompute segments in backward; 0 stores every step; "auto" (the
            default) takes about sqrt(T) when storing every step would take more
            than 64 MiB, else 0.
        memory_dtype: store memory in this dtype (``torch.bfloat16`` or
            ``"bfloat16"`` halves its traffic); every op still computes in float32.

    Example::

        ntm = FastNTM(9, 8)                       # the copy task's sizes
        x = torch.rand(21, 32, 9)                 # (T, B, input_size)
        y, state = ntm(x)                         # (21, 32, 8)
        with ntm.record() as trace:               # weightings for plots
            ntm(x)
        trace.read_weights                        # (T, B, R, N)
    """

    def __init__(
        self,
        input_size: int,
        output_size: int | None,
        *,
        memory_slots: int = 128,
        memory_width: int = 20,
        controller: str = "lstm",
        controller_size: int = 100,
        controller_layers: int = 1,
        num_reads: int = 1,
        num_writes: int = 1,
        shift_range: int = 1,
        memory_init: str = "constant",
        memory_dtype: torch.dtype | str | None = None,
        checkpoint_every: int | str = "auto",
        batch_first: bool = False,
        backend: str = "auto",
    ):
        super().__init__()
        if checkpoint_every != "auto":
            checkpoint_every = _int_arg("checkpoint_every", checkpoint_every, 0)
        if not isinstance(batch_first, bool):
            raise TypeError(f"batch_first must be a bool, got {batch_first!r}")
        self.cell = NTMCell(
            input_size,
            output_size,
            memory_slots=memory_slots,
            memory_width=memory_width,
            controller=controller,
            controller_size=controller_size,
            controller_layers=controller_layers,
            num_reads=num_reads,
            num_writes=num_writes,
            shift_range=shift_range,
            memory_init=memory_init,
            memory_dtype=memory_dtype,
            backend=backend,
        )
        self.checkpoint_every = checkpoint_every
        self.batch_first = batch_first
        self._traces: list[Trace] = []  # of the record() blocks open now, outermost first

    def extra_repr(self) -> str:
        return f"checkpoint_every={self.checkpoint_every!r}, batch_first={self.batch_first}"

    def __getstate__(self):
        # A copy (deepcopy, pickle) made inside a record() block records nothing: no block of its own is open.
        return {**super().__getstate__(), "_traces": []}

    @property
    def input_size(self) -> int:
        return self.cell.input_size

    @property
    def output_size(self) -> int | None:
        return self.cell.output_size

    @property
    def feature_size(self) -> int:
        """The width of ``[h_t, r_t]``, what ``y`` holds with ``output_size=None``."""
        return self.cell.feature_size

    def reset_parameters(self) -> None:
        self.cell.reset_parameters()

    def initial_state(self, batch_size: int, device=None, dtype=None) -> NTMState:
        return self.cell.initial_state(batch_size, device, dtype)

    @contextlib.contextmanager
    def record(self) -> Iterator[Trace]:
        """Record every step's weightings (detached) while the block runs; a block inside another
        records its own steps, and the outer one records them too."""
        trace = Trace(self.cell.num_reads)
        self._traces.append(trace)
        try:
            yield trace
        finally:
            # By identity: two traces with the same steps compare equal.
            del self._traces[next(i for i, t in enumerate(self._traces) if t is trace)]

    def forward(self, x: torch.Tensor, state: NTMState | None = None) -> tuple[torch.Tensor, NTMState]:
        _check_x(self.cell, "x", x, "(B, T, input_size)" if self.batch_first else "(T, B, input_size)")
        if state is not None:
            _check_state(self.cell, state, x, x.shape[0] if self.batch_first else x.shape[1])
        if self.batch_first:
            x = x.transpose(0, 1)
        if state is None:
            state = self.initial_state(x.shape[1], x.device, x.dtype)
        every = self.checkpoint_every
        if every == "auto":  # sized only where a backward will need the steps (unroll checkpoints nothing else)
            every = default_checkpoint_every(x.shape[0], state) if torch.is_grad_enabled() else 0
        y, state = unroll(self.cell, x, state, every, self._traces)
        return (y.transpose(0, 1) if self.batch_first else y), state

    def step(self, x_t: torch.Tensor, state: NTMState | None = None) -> tuple[torch.Tensor, NTMState]:
        """One step for streams: ``x_t`` (B, input_size) -> ``(y_t, state)``, the same as
        the matching step of ``forward``."""
        _check_x(self.cell, "x_t", x_t, "(B, input_size)")
        if state is None:
            state = self.initial_state(x_t.shape[0], x_t.device, x_t.dtype)
        else:
            _check_state(self.cell, state, x_t, x_t.shape[0])
        # The cell's parts, not its forward, which would check x_t and the state again.
        features, state = self.cell._features(x_t, state)
        for trace in self._traces:
            trace.steps.append(state.weights.detach())
        return self.cell.readout(features), state


def _autocast_dtypes(cell: NTMCell, kind: str) -> tuple[torch.dtype, ...] | None:
    """Under autocast on device type ``kind``, the dtypes that the model's inputs may have: its parameters'
    and autocast's (the controller's layers take no other); None outside autocast."""
    if not autocasting(kind):
        return None
    return tuple(dict.fromkeys((cell.heads.weight.dtype, torch.get_autocast_dtype(kind))))


def _check_autocast_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...] | None) -> None:
    """``t`` in one of the dtypes ``_autocast_dtypes`` allows (None: outside autocast, nothing to check here)."""
    if allowed is not None and t.dtype not in allowed:
        raise TypeError(f"{name} has dtype {t.dtype}; under autocast it must have the model's parameters' or "
                        f"autocast's, one of {allowed}")


def _check_x(cell: NTMCell, name: str, x, layout: str) -> None:
    """``x`` of shape ``layout`` ((B, input_size) or a sequence of those), floating, not empty, finite, on
    the model's device and in its parameters' dtype (under autocast, or in autocast's)."""
    ndim = layout.count(",") + 1  # the layout names each dimension
    parameter = cell.heads.weight
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim or x.shape[-1] != cell.input_size:
        raise ValueError(f"{name} must have shape {layout} with input_size = {cell.input_size}, got {tuple(x.shape)}")
    if not validation.is_float_dtype(x.dtype):
        raise TypeError(f"{name} must have a floating dtype ({validation.FLOAT_NAMES}), got {x.dtype}")
    if 0 in x.shape[:-1]:
        needs = "at least one step and one sequence" if ndim == 3 else "at least one sequence"
        raise ValueError(f"{name} must have {needs}, got shape {tuple(x.shape)}")
    if x.device != parameter.device:
        raise ValueError(f"{name} is on {x.device} but the model is on {parameter.device}")
    allowed = _autocast_dtypes(cell, x.device.type)
    if allowed is None and x.dtype != parameter.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the model's parameters have {parameter.dtype}; cast one "
                        f"to the other (or run under torch.autocast)")
    _check_autocast_dtype(name, x, allowed)
    validation.check_range(name, x, None, None)


def _check_state(cell: NTMCell, state, x: torch.Tensor, B: int) -> None:
    """``state`` fits ``cell`` and batch ``B``: shapes, on ``x``'s device, floating, in ``x``'s dtype (under
    autocast, in the parameters' or autocast's; ``state.memory`` in any floating dtype: ``memory_dtype``),
    finite, weightings in [0, 1]."""
    if not isinstance(state, NTMState):
        raise TypeError(f"state must be an NTMState, got {type(state).__name__}")
    if not isinstance(state.controller, (tuple, list)):
        raise TypeError(f"state.controller must be a tuple of tensors, got {type(state.controller).__name__}")
    expected = {
        "state.memory": (state.memory, (B, cell.memory_slots, cell.memory_width)),
        "state.weights": (state.weights, (B, cell.num_heads, cell.memory_slots)),
        "state.reads": (state.reads, (B, cell.num_reads, cell.memory_width)),
    }
    # The controller's own state, as its initial state has it (on the meta device: shapes alone, no memory).
    shapes = [tuple(t.shape) for t in cell.controller.initial_state(B, "meta", x.dtype)]
    if len(state.controller) != len(shapes):
        raise ValueError(
            f"state.controller must hold {len(shapes)} tensors for this model's {cell.controller_kind} controller, "
            f"got {len(state.controller)}"
        )
    expected.update({f"state.controller[{i}]": (t, shape)
                     for i, (t, shape) in enumerate(zip(state.controller, shapes))})
    allowed = _autocast_dtypes(cell, x.device.type)
    for name, (t, shape) in expected.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for this model and batch {B}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if not validation.is_float_dtype(t.dtype):
            raise TypeError(f"{name} must have a floating dtype ({validation.FLOAT_NAMES}), got {t.dtype}")
        if name == "state.memory":
            continue
        if allowed is None and t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; the state must share x's dtype")
        _check_autocast_dtype(name, t, allowed)
    bounds = {"state.weights": (0.0, validation.WEIGHT)}
    validation.check_ranges([(name, t, *bounds.get(name, (None, None))) for name, (t, _) in expected.items()])


def _memory_dtype(value) -> torch.dtype | None:
    """A floating ``torch.dtype``, from itself or its name ("bfloat16"), or None."""
    dtype = getattr(torch, value, None) if isinstance(value, str) else value
    if value is not None and not validation.is_float_dtype(dtype):
        raise TypeError(f"memory_dtype must be a floating torch.dtype ({validation.FLOAT_NAMES}), its name, or None, "
                        f"got {value!r}")
    return dtype


def _int_arg(name: str, value, minimum: int) -> int:
    """``value`` as a Python int of at least ``minimum``: ints and what ``operator.index`` takes (numpy's
    ints), not bools. A symbolic size (``torch.SymInt``, a batch dimension under ``torch.export``) passes
    as it is: the input checks have bounded it already, and a comparison here would add a guard."""
    if isinstance(value, torch.SymInt):
        return value
    kind = "a positive int" if minimum == 1 else "a non-negative int"
    try:
        index = operator.index(value)
    except TypeError:
        index = None
    if isinstance(value, bool) or index is None or index < minimum:
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return index


def _check_choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
