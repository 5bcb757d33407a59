"""Training a ``FastNTM`` on one of the paper's tasks, with checkpoints that resume exactly.

Outside the core: this module imports the model and the tasks, never the reverse.

Example::

    from fastntm.training import TrainConfig, Trainer
    result = Trainer(TrainConfig(task="copy", steps=5000), out="runs/copy").fit()
    result.eval_cost                       # bits per sequence on fresh sequences

A run's folder holds ``config.json`` (model constructor args, task name and args,
training args), ``model.safetensors`` (weights), ``trainer_state.pt`` (optimiser
state, data and global RNG states, step counter, curriculum) and ``log.csv`` (one row
per evaluation). ``Trainer.resume(out)`` continues where the checkpoint stopped: a run
of 2N steps and a run of N steps resumed for N more give bitwise equal parameters on
the CPU. A new ``Trainer`` refuses a folder that holds a checkpoint, and an interrupted
save leaves the last complete one to resume from (``Trainer.save_checkpoint``).

Loss: binary cross-entropy with logits, summed over bits and scored steps (``mask``),
averaged over sequences. Cost: ``Task.cost`` (bit errors per sequence, or bits per
sequence for N-grams).

Several processes: under ``torchrun`` (``WORLD_SIZE`` > 1) the trainer joins a
process group (gloo on CPU, NCCL on GPU, one GPU per process), wraps the model in
``DistributedDataParallel`` and gives each rank its own slice of every batch:
``batch_size`` stays the global batch, every rank draws the same batch from the
same seeded generator and keeps its shard, so a run on any number of processes
follows the single-process run on the same batch (to float rounding). Rank 0
alone writes checkpoints, logs and the progress bar.

CUDA graphs (``cuda_graph=True``, ``fastntm train --cuda-graph``): each training step
(forward, loss, backward, clipping, optimiser step) runs as a CUDA graph, one per batch
shape, through ``fastntm.graphs.CapturedStep``, with the optimiser built
``capturable=True``. One process, CUDA only. The flag may change on resume: the
optimiser's saved state loads either way.

Optional length curriculum (copy, repeat copy, associative recall): training starts with a
short maximum length (``curriculum_start``) and raises it by ``curriculum_step`` each
time the mean training cost over the last ``eval_every`` steps falls below
``curriculum_threshold``, up to the task's own maximum. Evaluation is always on the
task's full distribution, and training stops once its cost stays below
``target_cost`` for ``target_patience`` evaluations in a row.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import inspect
import json
import math
import numbers
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_weights

from .backend import BACKENDS, resolve as resolve_backend
from .graphs import CapturedStep
from .model import FastNTM
from .tasks import Batch, Task, make_task

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "LENGTH_KNOBS",
    "CURRICULUM_KNOBS",
    "OPTIMIZERS",
    "masked_bce",
    "evaluate",
    "length_overrides",
    "max_length",
    "load_model",
    "resolve_device",
    "Distributed",
    "init_distributed",
    "shutdown_distributed",
    "shard",
]

OPTIMIZERS = ("adam", "rmsprop", "sgd")
DEVICES = ("cpu", "cuda", "auto")
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "log.csv"
LOG_FIELDS = ("step", "sequences", "loss", "cost", "eval_cost", "curriculum", "elapsed_s")
# The order in which a save renames its files into place; the first rename commits the save.
SAVE_ORDER = (MODEL_FILE, CONFIG_FILE, STATE_FILE)

# The knob that "length L" sets in `evaluate`/`fastntm eval`, per task.
LENGTH_KNOBS = {
    "copy": "length",
    "repeat_copy": "length",
    "associative_recall": "num_items",
    "ngrams": "length",
    "priority_sort": "num_items",
}

# (batch override, task field) of the maximum that the curriculum grows.
CURRICULUM_KNOBS = {
    "copy": ("max_len", "max_len"),
    "repeat_copy": ("max_len", "max_len"),
    "associative_recall": ("max_items", "max_items"),
}
_CURRICULUM_FLOORS = {"copy": "min_len", "repeat_copy": "min_len", "associative_recall": "min_items"}
CURRICULUM_SETTINGS = ("curriculum_start", "curriculum_step", "curriculum_threshold")

# Default target eval cost (bits per sequence) that stops training; N-grams has none
# because its cost is bounded below by the optimal estimator, not by zero.
DEFAULT_TARGET_COST = {"copy": 0.1, "repeat_copy": 0.1, "associative_recall": 0.1, "ngrams": 0.0, "priority_sort": 0.1}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved to ``config.json``).

    ``model_args`` go to ``FastNTM`` (input and output sizes come from the task);
    ``task_args`` to ``make_task``. Training stops once ``target_patience``
    evaluations in a row cost less than ``target_cost``; None takes the task's default
    (0.1 bits, or none for N-grams), 0 never stops early. ``curriculum_start`` None
    starts at a quarter of the task's maximum.

    The defaults solve copy on a CPU in a few minutes: RMSProp (momentum 0.9, as in
    the paper) at 1e-3 on batches of 32, gradient norm clipped at 10, no curriculum
    (short sequences alone let the controller solve them without the memory, a
    habit it must then unlearn). A sweep of 14 settings and 15 seeds reached the
    target in 300-900 steps with each; this one in 300-400.

    ``curriculum``: only for the tasks of ``CURRICULUM_KNOBS``; ``CURRICULUM_SETTINGS`` other
    than their defaults need it.

    ``model_args`` and ``task_args`` must be what ``config.json`` can hold: a ``torch.dtype``
    is kept by its name and a numpy integer as an int (both build the same model and task);
    anything else that JSON cannot write is refused. ``model_args`` hold ``FastNTM``'s
    keyword arguments but ``backend`` (``TrainConfig.backend``) and ``batch_first`` (the
    trainer feeds time-major batches).

    ``cuda_graph``: run each step as a captured CUDA graph (``CapturedStep``); needs
    a CUDA device and one process.

    ``backend``: the model's (``fastntm.backend``); ``"compiled"`` compiles the model's step
    with ``torch.compile`` at the first steps (tens of seconds on a CPU, and again for the
    evaluation's no-grad graph), then runs the copy task's step at the paper's size in about
    0.6 of the time of ``"reference"`` on a CPU (about the numba kernels' time, at stop 32). A
    training choice, not the model's: checkpoints load with ``"auto"``.
    """

    task: str = "copy"
    task_args: dict[str, Any] = field(default_factory=dict)
    model_args: dict[str, Any] = field(default_factory=dict)
    steps: int = 20_000
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "rmsprop"
    clip: float = 10.0
    seed: int = 0
    device: str = "auto"
    eval_every: int = 100
    eval_batches: int = 20
    eval_batch_size: int = 16
    eval_seed: int = 12345
    checkpoint_every: int = 500
    target_cost: float | None = None
    target_patience: int = 3
    curriculum: bool = False
    curriculum_start: int | None = None
    curriculum_step: int | None = None
    curriculum_threshold: float = 0.5
    cuda_graph: bool = False
    backend: str = "auto"

    def __post_init__(self):
        for name in ("task_args", "model_args"):
            args = getattr(self, name)
            if not isinstance(args, dict):
                raise ValueError(f"{name} must be a dict, got {args!r}")
            setattr(self, name, {key: _json_ready(name, key, value) for key, value in args.items()})
        task = make_task(self.task, **self.task_args)  # names the bad task or argument
        _check_model_args(self.model_args)
        try:
            with torch.device("meta"):  # FastNTM's own checks of the values, allocating nothing
                FastNTM(task.input_size, task.output_size, **self.model_args)
        except (TypeError, ValueError) as error:
            raise ValueError(f"model_args: {error}") from None
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "eval_batch_size", "checkpoint_every",
                     "target_patience"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        # torch's generators take seeds in [-2**63, 2**64 - 1], and the data generator is seeded with seed + 1.
        for name, top, top_text in (("seed", 2**64 - 2, "2**64 - 2"), ("eval_seed", 2**64 - 1, "2**64 - 1")):
            value = getattr(self, name)
            if not _is_int(value) or not -(2**63) <= value <= top:
                raise ValueError(f"{name} must be an integer in [-2**63, {top_text}], got {value!r}")
        if not (_is_number(self.lr) and 0 < self.lr < math.inf):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if not (_is_number(self.clip) and self.clip >= 0):
            raise ValueError(f"clip must be >= 0 (0: no clipping), got {self.clip!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        if self.target_cost is not None and not (_is_number(self.target_cost) and self.target_cost >= 0):
            raise ValueError(f"target_cost must be >= 0, got {self.target_cost!r}")
        for name in ("curriculum", "cuda_graph"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("curriculum_start", "curriculum_step"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if not (_is_number(self.curriculum_threshold) and self.curriculum_threshold >= 0):
            raise ValueError(f"curriculum_threshold must be >= 0, got {self.curriculum_threshold!r}")
        if self.curriculum and self.task not in CURRICULUM_KNOBS:
            raise ValueError(f"curriculum=True (--curriculum) applies to {', '.join(CURRICULUM_KNOBS)}, not to "
                             f"{self.task}")
        if self.curriculum and self.curriculum_start is not None:
            floor, top = _CURRICULUM_FLOORS[self.task], CURRICULUM_KNOBS[self.task][1]
            low, high = getattr(task, floor), getattr(task, top)
            if not low <= self.curriculum_start <= high:
                # A run saved before this check, whose start was clamped, resumes with a --curriculum-start in range.
                raise ValueError(f"curriculum_start (--curriculum-start) must lie within the task's {floor} and "
                                 f"{top}, [{low}, {high}], got {self.curriculum_start}")
        if not self.curriculum:
            given = [f"{name}={getattr(self, name)!r} (--{name.replace('_', '-')})" for name in CURRICULUM_SETTINGS
                     if getattr(self, name) != _default(name)]
            if given:
                raise ValueError(f"{', '.join(given)}: no effect without curriculum=True (--curriculum)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.cuda_graph and self.backend == "compiled":
            raise ValueError("cuda_graph=True replays the step's kernels from a CUDA graph; backend='compiled' "
                             "compiles them with torch.compile: choose one")

    @property
    def stop_cost(self) -> float:
        return DEFAULT_TARGET_COST[self.task] if self.target_cost is None else self.target_cost

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """The config that ``to_dict`` gave ``data``; fields it lacks take their defaults, unknown keys are refused."""
        _check_field_names(data, "TrainConfig field")
        return cls(**data)


@contextlib.contextmanager
def _global_rng_kept_on_error():
    """torch's global RNG states put back if the block raises: the CPU's, and CUDA's (where CUDA was not yet
    initialised, its generators seeded as its first use would have seeded them, from the caller's seed)."""
    cpu, seed = torch.get_rng_state(), torch.initial_seed()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    except BaseException:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        elif torch.cuda.is_available():
            torch.cuda.manual_seed_all(seed)
        raise


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _default(name: str):
    return TrainConfig.__dataclass_fields__[name].default


def _check_field_names(names, what: str) -> None:
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    unknown = [name for name in names if name not in fields]
    if unknown:
        raise ValueError(f"unknown {what}: {', '.join(map(str, unknown))} (TrainConfig's fields: {', '.join(fields)})")


def _json_ready(field_name: str, key: str, value):
    """``value`` as ``config.json`` keeps it, read back to the same model or task: a ``torch.dtype`` by its
    name (``FastNTM`` takes either), a numpy integer as an int; ValueError for anything JSON cannot hold,
    which would otherwise fail at the first checkpoint, after the training before it."""
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        raise ValueError(f"{field_name}[{key!r}] = {value!r} cannot be written to config.json: give numbers, "
                         f"strings, booleans, None, or lists and dicts of them") from None
    return value


def model_defaults() -> dict[str, Any]:
    """``FastNTM``'s keyword arguments and their defaults: what ``model_args`` may set, and what it leaves."""
    return {name: p.default for name, p in inspect.signature(FastNTM).parameters.items() if p.kind is p.KEYWORD_ONLY}


def _effective(name: str, value, task: str):
    """A training argument as the run takes it: ``task_args`` as the task they build, ``model_args`` over
    ``FastNTM``'s defaults (a value given equal to its default is no change on resume)."""
    if name == "task_args":
        return make_task(task, **value)
    if name == "model_args":
        return {**model_defaults(), **value}
    return value


def _check_model_args(model_args: dict[str, Any]) -> None:
    if "backend" in model_args:
        raise ValueError("model_args must not hold 'backend': it is a training choice, TrainConfig.backend "
                         "(fastntm train --backend), not saved with the model")
    if "batch_first" in model_args:
        raise ValueError("model_args must not hold 'batch_first': the trainer feeds time-major (T, B, I) batches")
    # The sizes come from the task.
    allowed = [name for name in model_defaults() if name not in ("backend", "batch_first")]
    unknown = [name for name in model_args if name not in allowed]
    if unknown:
        raise ValueError(f"model_args has {', '.join(map(repr, unknown))}, not among the FastNTM arguments it may "
                         f"set: {', '.join(allowed)}")


@dataclass
class TrainResult:
    """How a ``fit`` ended: the step reached, sequences seen, eval cost, whether the target was met."""

    step: int
    sequences: int
    eval_cost: float | None  # the weights at ``step``: a run that ends between evaluations is evaluated once more
    reached_target: bool
    elapsed_s: float


def resolve_device(device: str) -> torch.device:
    """``"auto"``: CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    return torch.device(device)


@dataclass(frozen=True)
class Distributed:
    """Where this process stands in a ``torchrun`` launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Distributed:
    """Join the process group that ``torchrun`` describes in the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def shutdown_distributed(wait_for_all: bool = True) -> None:
    """Leave the process group. ``wait_for_all``: first wait until every rank is here (after a run that
    ended normally; not after an error, where another rank may never come). Without that wait, once in
    the test suite, rank 1 left while rank 0 still wrote its checkpoint and aborted in gloo's teardown
    ("terminate called without an active exception"); that race is the suspect, not proven."""
    if dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()


def shard(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank ``rank``'s equal slice of a time-major batch."""
    size = batch.inputs.shape[1] // world_size
    return Batch(*(t[:, rank * size : (rank + 1) * size] for t in batch))


def masked_bce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Binary cross-entropy with logits, summed over bits and scored steps, averaged over sequences."""
    nats = F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="none")
    return (nats * batch.mask.unsqueeze(-1)).sum() / batch.mask.shape[1]


def length_overrides(task: Task, length: int) -> dict[str, int]:
    """The ``batch`` overrides that set the task's natural length knob to ``length``.

    copy, repeat copy: sequence length (repeat copy keeps drawing its repeat count);
    associative recall: number of items; N-grams: sequence length in bits;
    priority sort: number of input items, with ``min(num_outputs, length)`` outputs.
    """
    overrides = {LENGTH_KNOBS[task.name]: length}
    if task.name == "priority_sort":
        overrides["num_outputs"] = min(task.num_outputs, length)
    return overrides


def max_length(task: Task) -> int:
    """The largest value of the task's length knob in its training distribution."""
    field_name = {"copy": "max_len", "repeat_copy": "max_len", "associative_recall": "max_items"}.get(
        task.name, LENGTH_KNOBS[task.name]
    )
    return getattr(task, field_name)


@torch.no_grad()
def evaluate(
    model: FastNTM,
    task: Task,
    *,
    batches: int,
    batch_size: int,
    seed: int,
    device: torch.device | str | None = None,
    **overrides,
) -> float:
    """Mean cost per sequence over ``batches`` fresh batches drawn with a generator seeded ``seed``.

    The same seed gives the same sequences, so evaluations during training compare like with like.
    No autograd graph is built: nothing here is differentiated.
    """
    if not _is_int(batches) or batches < 1:
        raise ValueError(f"batches must be a positive integer, got {batches!r}")
    device = next(model.parameters()).device if device is None else device
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(batches):
        batch = task.batch(batch_size, generator, **overrides).to(device)
        logits, _ = model(batch.inputs)
        total += task.cost(logits, batch)
    return total / batches


def build_model(config: TrainConfig, task: Task) -> FastNTM:
    return FastNTM(task.input_size, task.output_size, backend=config.backend, **config.model_args)


def model_constructor_args(config: TrainConfig, task: Task) -> dict[str, Any]:
    return {"input_size": task.input_size, "output_size": task.output_size, **config.model_args}


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", *,
               backend: str = "auto") -> tuple[FastNTM, Task, dict[str, Any]]:
    """The model, task and saved ``config.json`` of a checkpoint (its folder or its ``model.safetensors``), the
    model running its memory ops on ``backend`` (a choice of the run, not of the checkpoint: see
    ``TrainConfig.backend``); one that cannot run on ``device`` fails here, before the weights load."""
    resolve_backend(backend, torch.device(device))  # and FASTNTM_BACKEND's value, where auto defers to it
    folder = checkpoint_folder(path)
    saved = read_config(folder)
    try:  # a config.json of another version, or edited by hand
        task = make_task(saved["task"]["name"], **saved["task"]["args"])
        model = FastNTM(**saved["model"], backend=backend)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{folder / CONFIG_FILE} does not describe a model and task that fastntm builds: "
                         f"{error}") from None
    step = _load_weights(model, folder, "cpu")
    if step >= 0:  # the weights' own: config.json may be a save behind them, the save stopped between its renames
        saved["step"] = step
    return model.to(device).eval(), task, saved


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a run folder; ValueError naming the file when it is damaged or not a run's."""
    path = Path(folder) / CONFIG_FILE
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is damaged: {error}") from None
    try:
        fits = all(isinstance(x, dict) for x in (saved["model"], saved["training"], saved["task"]["args"]))
        fits = fits and isinstance(saved["task"]["name"], str)
    except (KeyError, TypeError):
        fits = False
    if not fits:
        raise ValueError(f"{path} is not the config.json of a fastntm run: it needs model, task (name and args) "
                         f"and training entries")
    return saved


def _load_weights(model: FastNTM, folder: Path, device: str | torch.device) -> int:
    """Load ``folder``'s weights into ``model``; returns the step they were saved at (-1: not recorded).

    ValueError naming the file when it is damaged or does not fit the model of ``config.json``.
    """
    path = folder / MODEL_FILE
    try:
        with safe_open(path, framework="pt", device=str(device)) as f:
            weights = {name: f.get_tensor(name) for name in f.keys()}
            step = int((f.metadata() or {}).get("step", -1))
        model.load_state_dict(weights)
    except SafetensorError as error:
        raise ValueError(f"{path} is damaged: {error}") from None
    except RuntimeError as error:  # load_state_dict: tensors missing, unexpected or of another shape
        raise ValueError(f"{path} does not fit the model in {CONFIG_FILE}: {' '.join(str(error).split())}") from None
    return step


def checkpoint_folder(path: str | os.PathLike) -> Path:
    """The run folder of ``path``: the folder itself or the folder of a ``model.safetensors``/``config.json``."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    missing = [name for name in (CONFIG_FILE, MODEL_FILE) if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"no checkpoint at {path}: missing {', '.join(missing)} in {folder}")
    return folder


def holds_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a checkpoint, complete or with a save to finish (``finish_interrupted_save``)."""
    return any((Path(folder) / name).exists() for name in SAVE_ORDER)


def can_resume(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds the trainer's state that ``Trainer.resume`` needs, or a save of it to finish."""
    folder = Path(folder)
    return (folder / STATE_FILE).is_file() or _tmp_path(folder, STATE_FILE).is_file()


def _tmp_path(folder: Path, name: str) -> Path:
    return folder / f".{name}.tmp"


def finish_interrupted_save(folder: str | os.PathLike) -> None:
    """Leave ``folder`` with one complete checkpoint after a save that stopped part way (``Trainer.save_checkpoint``).

    A save renames its first file (the weights) into place only once every temporary file is written:
    while the weights' temporary file is there, the previous checkpoint stands and the temporary files,
    perhaps partial, are deleted; once it is gone, the temporary files left are complete and are renamed
    into place. Safe to run in several processes at once (each rank under ``torchrun``).
    """
    folder = Path(folder)
    tmps = [_tmp_path(folder, name) for name in SAVE_ORDER]
    if tmps[0].exists():
        # The weights' file last: a process that finds it gone finds the others gone too.
        for tmp in reversed(tmps):
            tmp.unlink(missing_ok=True)
        return
    for name, tmp in zip(SAVE_ORDER, tmps):
        if tmp.exists():
            with contextlib.suppress(FileNotFoundError):  # another process renamed it in the meantime
                os.replace(tmp, folder / name)


def _write_synced(path: Path, write) -> None:
    """``write(path)``, then flush the file to the disk, so that a power cut after a later rename finds it whole."""
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _make_optimizer(name: str, params, lr: float, capturable: bool = False) -> torch.optim.Optimizer:
    """``capturable``: keep the step count on the device, so that a CUDA graph can capture the step
    (SGD keeps none). On a CPU, where PyTorch's default is a loop of about a dozen ops a parameter,
    Adam and SGD take their fused step and RMSprop its foreach one (at the copy task's model: Adam
    0.26 against 1.2 ms a step, SGD 0.15 against 0.34, RMSprop 0.64 against 0.88); on a GPU the
    defaults stand."""
    params = list(params)
    on_cpu = all(p.device.type == "cpu" for p in params)
    fused = foreach = True if on_cpu else None
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, capturable=capturable, fused=fused)
    if name == "rmsprop":
        # The paper's choice; momentum 0.9 as in its experiments. No fused RMSprop in PyTorch.
        return torch.optim.RMSprop(params, lr=lr, momentum=0.9, alpha=0.95, eps=1e-4, capturable=capturable,
                                   foreach=foreach)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, fused=fused)


def _load_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(saved)``, keeping ``optimizer``'s own ``capturable``, ``fused`` and
    ``foreach``.

    ``load_state_dict`` takes every group setting from ``saved`` and places each
    ``step`` count by it (on the device when capturable, else where it was saved), so
    a run resumed with ``--cuda-graph`` turned on or off, or on another device, would
    otherwise keep the saved run's choices.
    """
    for group, own in zip(saved["param_groups"], optimizer.param_groups):
        for setting in ("capturable", "fused", "foreach"):
            if setting in own:
                group[setting] = own[setting]
    optimizer.load_state_dict(saved)


def _check_cuda_graph(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"--cuda-graph (cuda_graph=True) captures the step in a CUDA graph and needs a CUDA "
                         f"device, got {device.type}; use --device cuda, or leave the flag out (--no-cuda-graph "
                         f"when resuming)")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--cuda-graph (cuda_graph=True) runs in one process, not under torchrun with several")


def _graph_loss(model: FastNTM, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """``masked_bce`` of the model's logits, and the logits (for the cost), as ``CapturedStep`` calls it."""
    logits, _ = model(inputs)
    return masked_bce(logits, Batch(inputs, targets, mask)), logits


class Trainer:
    """Trains one model on one task, writing logs and checkpoints to ``out``.

    ``fit()`` runs until ``config.steps`` (the total step count, counted across
    resumes) or until the eval cost falls below the target. ``Trainer.resume(out)``
    rebuilds a trainer from the checkpoint in ``out``; ``overrides`` change training
    arguments such as ``steps`` (not the model or the task).
    """

    def __init__(self, config: TrainConfig, out: str | os.PathLike, *, progress: bool = True):
        self.config = config
        self.out = Path(out)
        self.device = resolve_device(config.device)
        if config.cuda_graph:
            _check_cuda_graph(self.device)
        resolve_backend(config.backend, self.device)  # 'triton' on a CPU, say: fails here, not at the first step
        self.dist = init_distributed(self.device)
        if self.device.type == "cuda" and self.dist.world_size > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        if config.batch_size % self.dist.world_size:
            raise ValueError(
                f"batch_size ({config.batch_size}) must divide evenly among the {self.dist.world_size} processes"
            )
        self.progress = progress and self.dist.is_main
        self.task = make_task(config.task, **config.task_args)

        torch.manual_seed(config.seed)
        self.model = build_model(config, self.task).to(self.device)
        self.network = self.model
        if self.dist.world_size > 1:
            device_ids = [self.device] if self.device.type == "cuda" else None
            self.network = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        self.optimizer = _make_optimizer(config.optimizer, self.model.parameters(), config.lr, config.cuda_graph)
        self.captured = None
        if config.cuda_graph:
            self.captured = CapturedStep(self.model, self.optimizer, _graph_loss, clip=config.clip)
        self.generator = torch.Generator().manual_seed(config.seed + 1)

        self.step = 0
        self.sequences = 0
        self.elapsed_s = 0.0
        self.window_loss = 0.0
        self.window_cost = 0.0
        self.window_steps = 0
        self.last_eval_cost: float | None = None
        self.evals_below_target = 0
        self.curriculum_max = self._initial_curriculum()
        # Whether the checkpoint in out is this trainer's (resumed from, or saved by it): fit() writes over no other.
        self._owns_checkpoint = False

    # --- curriculum -----------------------------------------------------------------

    def _initial_curriculum(self) -> int | None:
        if not self.config.curriculum:
            return None
        top = getattr(self.task, CURRICULUM_KNOBS[self.config.task][1])
        floor = getattr(self.task, _CURRICULUM_FLOORS[self.config.task])
        start = self.config.curriculum_start or math.ceil(top / 4)
        return min(top, max(floor, start))

    def _grow_curriculum(self, window_cost: float) -> None:
        if self.curriculum_max is None or window_cost >= self.config.curriculum_threshold:
            return
        top = getattr(self.task, CURRICULUM_KNOBS[self.config.task][1])
        step = self.config.curriculum_step or math.ceil(top / 4)
        self.curriculum_max = min(top, self.curriculum_max + step)

    def _train_overrides(self) -> dict[str, int]:
        if self.curriculum_max is None:
            return {}
        return {CURRICULUM_KNOBS[self.config.task][0]: self.curriculum_max}

    # --- checkpoints ----------------------------------------------------------------

    def saved_config(self) -> dict[str, Any]:
        """What ``config.json`` holds: model constructor args, task name and args, training args."""
        return {
            "model": model_constructor_args(self.config, self.task),
            "task": {"name": self.config.task, "args": dataclasses.asdict(self.task)},
            "training": self.config.to_dict(),
        }

    def save_checkpoint(self) -> None:
        """Write weights, config and trainer state as one set; all three name the step. Only rank 0 writes.

        Each file is written in full to ``.NAME.tmp`` beside it and flushed to the disk; only then
        are the three renamed into place, in ``SAVE_ORDER``. A save that stops while it writes leaves
        the previous checkpoint as it was; one that stops between the renames leaves complete
        temporary files. ``finish_interrupted_save`` (run by ``resume`` and by the next save) tells
        the two apart and leaves one complete checkpoint either way.
        """
        self._owns_checkpoint = True
        if not self.dist.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        finish_interrupted_save(self.out)
        weights = {k: v.detach().to("cpu").contiguous() for k, v in self.model.state_dict().items()}
        text = json.dumps({**self.saved_config(), "step": self.step}, indent=2) + "\n"
        state = {
            "step": self.step,
            "sequences": self.sequences,
            "elapsed_s": self.elapsed_s,
            "optimizer": self.optimizer.state_dict(),
            "data_rng": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "window": (self.window_loss, self.window_cost, self.window_steps),
            "last_eval_cost": self.last_eval_cost,
            "evals_below_target": self.evals_below_target,
            "curriculum_max": self.curriculum_max,
        }
        writers = {
            # Bytes written as the other files are: save_file's file is owner-only (0600) whatever the umask.
            MODEL_FILE: lambda p: p.write_bytes(save_weights(weights, metadata={"step": str(self.step)})),
            CONFIG_FILE: lambda p: p.write_text(text),
            STATE_FILE: lambda p: torch.save(state, p),
        }
        for name in SAVE_ORDER:
            _write_synced(_tmp_path(self.out, name), writers[name])
        for name in SAVE_ORDER:
            os.replace(_tmp_path(self.out, name), self.out / name)

    @classmethod
    def resume(cls, out: str | os.PathLike, *, progress: bool = True, **overrides) -> "Trainer":
        """The trainer saved in ``out``, with training arguments ``overrides`` applied (e.g. ``steps``, which
        counts the whole run: below the checkpoint's step is an error). ``curriculum=False`` also drops the
        saved run's ``CURRICULUM_SETTINGS``."""
        _check_field_names(overrides, "override")
        out = Path(out)
        finish_interrupted_save(out)
        folder = checkpoint_folder(out)
        if not (folder / STATE_FILE).is_file():
            raise FileNotFoundError(f"no trainer state to resume from: {folder / STATE_FILE} is missing")
        saved = read_config(folder)
        training = {**saved["training"], **overrides}
        if overrides.get("curriculum") is False:
            training.update({name: _default(name) for name in CURRICULUM_SETTINGS if name not in overrides})
        # The optimiser's saved state only fits the optimiser that made it. The seed only draws the
        # first weights and the data stream's start, both long past: a new one would change nothing
        # but config.json's record of the run.
        for fixed in ("task", "task_args", "model_args", "optimizer", "seed"):
            if fixed in overrides and _effective(fixed, overrides[fixed], saved["training"]["task"]) != \
                    _effective(fixed, saved["training"][fixed], saved["training"]["task"]):
                raise ValueError(f"cannot change {fixed} when resuming: saved {saved['training'][fixed]!r}")
        with _global_rng_kept_on_error():  # a trainer seeds torch's RNG; a resume that fails leaves it as it was
            trainer = cls(TrainConfig.from_dict(training), folder, progress=progress)
            try:
                state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
            except Exception as error:  # a damaged file fails as EOFError, UnpicklingError, RuntimeError, ...
                raise ValueError(f"{folder / STATE_FILE} is damaged: {type(error).__name__}: "
                                 f"{' '.join(str(error).split())}") from None
            weights_step = _load_weights(trainer.model, folder, trainer.device)
            if weights_step != state["step"]:
                raise RuntimeError(
                    f"checkpoint in {folder} is inconsistent: weights from step {weights_step}, state from step "
                    f"{state['step']} (a save was interrupted); cannot resume exactly"
                )
            if trainer.config.steps < state["step"]:
                raise ValueError(f"steps={trainer.config.steps} is below the checkpoint's step {state['step']}: steps "
                                 f"counts the whole run, across resumes")
            _load_optimizer_state(trainer.optimizer, state["optimizer"])
            for group in trainer.optimizer.param_groups:
                group["lr"] = trainer.config.lr
            trainer.generator.set_state(state["data_rng"])
            torch.set_rng_state(state["torch_rng"])
            if state["cuda_rng"] is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda_rng"])
            trainer.step = state["step"]
            trainer.sequences = state["sequences"]
            trainer.elapsed_s = state["elapsed_s"]
            trainer.window_loss, trainer.window_cost, trainer.window_steps = state["window"]
            trainer.last_eval_cost = state["last_eval_cost"]
            trainer.evals_below_target = state["evals_below_target"]
        if not 0 < TrainConfig.from_dict(saved["training"]).stop_cost <= trainer.config.stop_cost:
            # The count is of evaluations in a row below the saved target, which says nothing of a
            # lower one (and 0 never stops): the new target starts its own count.
            trainer.evals_below_target = 0
        if not trainer.config.curriculum:
            trainer.curriculum_max = None
        elif state["curriculum_max"] is not None:
            trainer.curriculum_max = state["curriculum_max"]
        trainer._owns_checkpoint = True
        return trainer

    def _truncate_log(self) -> None:
        """Drop log rows written after the checkpoint: a run that died past it, or one that died before
        its first checkpoint in the folder that a fresh run now takes."""
        path = self.out / LOG_FILE
        if not self.dist.is_main:
            return
        rows = []
        if path.is_file():
            with open(path, newline="") as f:
                # A row without a step (a header or line damaged by hand) is dropped rather than stopping the run.
                rows = [row for row in csv.DictReader(f)
                        if (row.get("step") or "").isdigit() and int(row["step"]) <= self.step]
        self._write_log(rows, mode="w")  # the header at least: a run shorter than eval_every has its log too

    def _write_log(self, rows: list[dict[str, Any]], mode: str = "a") -> None:
        if not self.dist.is_main:
            return
        path = self.out / LOG_FILE
        header = mode == "w" or not path.is_file()
        with open(path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
            if header:
                writer.writeheader()
            writer.writerows(rows)

    # --- training -------------------------------------------------------------------

    def train_step(self) -> tuple[float, float]:
        """One optimiser step on a fresh batch; returns (loss, cost), averaged over all ranks."""
        batch = self.task.batch(self.config.batch_size, self.generator, **self._train_overrides())
        if self.dist.world_size > 1:
            batch = shard(batch, self.dist.rank, self.dist.world_size)
        batch = batch.to(self.device)
        self.model.train()
        if self.captured is not None:
            loss, logits = self.captured(*batch)
        else:
            logits, _ = self.network(batch.inputs)
            loss = masked_bce(logits, batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip)
            self.optimizer.step()
        self.step += 1
        self.sequences += self.config.batch_size
        figures = (loss.item(), self.task.cost(logits, batch))
        if self.dist.world_size > 1:
            figures = torch.tensor(figures, dtype=torch.float64, device=self.device)
            dist.all_reduce(figures)
            figures = (figures / self.dist.world_size).tolist()
        return figures[0], figures[1]

    def evaluate(self, **overrides) -> float:
        """Cost on the fixed eval set (``eval_seed``), the task's full distribution unless overridden."""
        self.model.eval()
        c = self.config
        return evaluate(self.model, self.task, batches=c.eval_batches, batch_size=c.eval_batch_size, seed=c.eval_seed,
                        device=self.device, **overrides)

    @property
    def reached_target(self) -> bool:
        """Whether the eval cost has stayed below the target for ``target_patience`` evaluations: ``fit`` then
        trains no further, whatever ``steps`` says (``target_cost=0`` trains on)."""
        return self.evals_below_target >= self.config.target_patience

    def fit(self) -> TrainResult:
        """Train until ``config.steps`` or the target cost; checkpoint at the end either way."""
        c = self.config
        if not self._owns_checkpoint and holds_checkpoint(self.out):
            raise FileExistsError(f"{self.out} already holds a run's checkpoint: continue it with "
                                  f"Trainer.resume({str(self.out)!r}), or train into another folder")
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self._truncate_log()
        reached = self.reached_target
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=c.steps, initial=self.step, desc=c.task, unit="step", dynamic_ncols=True)
        started = time.perf_counter() - self.elapsed_s
        try:
            while self.step < c.steps and not reached:
                loss, cost = self.train_step()
                self.window_loss += loss
                self.window_cost += cost
                self.window_steps += 1
                self.elapsed_s = time.perf_counter() - started
                if bar is not None:
                    bar.update(1)
                    postfix = {"loss": f"{loss:.3g}", "bits": f"{cost:.3g}", "eval": _fmt(self.last_eval_cost)}
                    if self.curriculum_max is not None:
                        postfix["max_len"] = self.curriculum_max
                    bar.set_postfix(postfix, refresh=False)
                if self.step % c.eval_every == 0:
                    below = self._end_window() < c.stop_cost
                    self.evals_below_target = self.evals_below_target + 1 if below else 0
                    reached = self.reached_target
                    self.elapsed_s = time.perf_counter() - started
                elif self.step >= c.steps:
                    # The result and the checkpoint then report the final weights. Off the schedule: no log row,
                    # no curriculum growth, no count toward the target; and evaluation draws no numbers from
                    # the RNGs, so a run resumed from here still follows the uninterrupted one.
                    self.last_eval_cost = self.evaluate()
                    self.elapsed_s = time.perf_counter() - started
                if self.step % c.checkpoint_every == 0 or reached or self.step >= c.steps:
                    self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
        if self.dist.is_main and (self.step == 0 or not (self.out / STATE_FILE).is_file()):
            self.save_checkpoint()
        return TrainResult(self.step, self.sequences, self.last_eval_cost, reached, self.elapsed_s)

    def _end_window(self) -> float:
        """Evaluate, log the window's means, maybe grow the curriculum; returns the eval cost."""
        loss = self.window_loss / self.window_steps
        cost = self.window_cost / self.window_steps
        self.last_eval_cost = self.evaluate()
        self._write_log([{
            "step": self.step,
            "sequences": self.sequences,
            "loss": f"{loss:.6g}",
            "cost": f"{cost:.6g}",
            "eval_cost": f"{self.last_eval_cost:.6g}",
            "curriculum": self.curriculum_max if self.curriculum_max is not None else "",
            "elapsed_s": f"{self.elapsed_s:.2f}",
        }])
        self._grow_curriculum(cost)
        self.window_loss = self.window_cost = 0.0
        self.window_steps = 0
        return self.last_eval_cost


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
