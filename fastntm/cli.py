"""The ``fastntm`` command: train, evaluate and plot NTMs on the paper's tasks.

Usage::

    fastntm train copy                          # solves copy in a few CPU minutes
    fastntm train copy --out runs/copy --steps 40000 --resume
    fastntm eval runs/copy --lengths 20,40,80
    fastntm plot runs/copy --length 20

Also ``python -m fastntm ...``. The command only parses arguments; the work is in
``fastntm.training`` and ``fastntm.plotting``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

from .backend import BACKENDS
from .tasks import TASKS

# (flag, task field, type, help); a flag is accepted only by tasks that have the field.
TASK_FLAGS = (
    ("--bits", "bits", "int", "bits per vector"),
    ("--min-len", "min_len", "int", "copy, repeat_copy: shortest training sequence"),
    ("--max-len", "max_len", "int", "copy, repeat_copy: longest training sequence"),
    ("--min-repeats", "min_repeats", "int", "repeat_copy: fewest repeats"),
    ("--max-repeats", "max_repeats", "int", "repeat_copy: most repeats"),
    ("--item-len", "item_len", "int", "associative_recall: vectors per item"),
    ("--min-items", "min_items", "int", "associative_recall: fewest items"),
    ("--max-items", "max_items", "int", "associative_recall: most items"),
    ("--length", "length", "int", "ngrams: bits per sequence"),
    ("--context", "context", "int", "ngrams: context bits (N - 1)"),
    ("--num-items", "num_items", "int", "priority_sort: input vectors"),
    ("--num-outputs", "num_outputs", "int", "priority_sort: output vectors"),
)

# (flag, FastNTM argument, type or choices, help)
MODEL_FLAGS = (
    ("--memory-slots", "memory_slots", "int", "memory locations N (default 128)"),
    ("--memory-width", "memory_width", "int", "memory word size M (default 20)"),
    ("--controller", "controller", ("lstm", "mlp"), "controller kind (default lstm)"),
    ("--controller-size", "controller_size", "int", "controller hidden units (default 100)"),
    ("--controller-layers", "controller_layers", "int", "controller layers (default 1)"),
    ("--num-reads", "num_reads", "nonneg", "read heads (default 1)"),
    ("--num-writes", "num_writes", "nonneg", "write heads (default 1)"),
    ("--shift-range", "shift_range", "nonneg", "largest shift of the location addressing (default 1)"),
    ("--memory-init", "memory_init", ("constant", "learned", "random"), "initial memory (default constant)"),
    ("--memory-dtype", "memory_dtype", ("float32", "bfloat16", "float16"),
     "store memory in this dtype; ops compute in float32 (default: the model's, float32)"),
)


def _number(cast, expected: str, accept):
    """An argparse type: ``cast(text)``, kept only if ``accept(value)``."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _number(int, "a positive integer", lambda v: v >= 1)
nonnegative_int = _number(int, "a non-negative integer", lambda v: v >= 0)
positive_float = _number(float, "a positive number", lambda v: 0 < v < float("inf"))
nonnegative_float = _number(float, "a number >= 0", lambda v: v >= 0)
# torch's generators take seeds in [-2**63, 2**64 - 1], and training seeds its data generator with seed + 1.
seed_int = _number(int, "an integer in [-2**63, 2**64 - 2]", lambda v: -(2**63) <= v <= 2**64 - 2)
generator_seed = _number(int, "an integer in [-2**63, 2**64 - 1]", lambda v: -(2**63) <= v <= 2**64 - 1)


def out_path(text: str) -> Path:
    """A path, not an empty string: an empty --out (an unset shell variable, say) would be Path("."), the current
    folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a path, not an empty string, got {text!r}")
    return Path(text)


BACKEND_HELP = ("the memory ops' implementation: auto (the Triton kernels on CUDA, the numba kernels on a CPU where "
                "numba imports, else the reference path), reference (plain PyTorch), triton (CUDA), numba (CPU), or "
                "compiled (the reference path through torch.compile: tens of seconds of compiling at the start, then "
                "on a CPU about the numba kernels' speed; needs a C++ compiler)")


def length_list(text: str) -> list[int]:
    """``"20,40,80"`` -> ``[20, 40, 80]`` (--lengths, --repeats)."""
    try:
        return [positive_int(part) for part in text.split(",") if part.strip()] or _empty(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated positive integers such as 20,40,80, got {text!r}"
        ) from None


def _empty(text: str):
    raise argparse.ArgumentTypeError(f"no numbers in {text!r}")


_TYPES = {"int": positive_int, "nonneg": nonnegative_int}


def default_threads() -> int:
    """Two threads where this process has two cores, else one. At batch 32 the numba kernels split the batch
    over two (the copy task's training step took 0.80 of one thread's time, paired rounds on a 2-core VM); the
    model's torch ops are too small to gain from more, and on a busy machine extra threads only wait for each
    other. The processes torchrun starts on one machine (``LOCAL_WORLD_SIZE``) share its cores; cores counted
    are those this process may run on (not a container's CPU quota). ``OMP_NUM_THREADS``, where set (torchrun
    sets 1), is the most."""
    def positive(name):
        value = os.environ.get(name, "")
        return int(value) if value.isdigit() and int(value) > 0 else None

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(2, cores // (positive("LOCAL_WORLD_SIZE") or 1), positive("OMP_NUM_THREADS") or 2))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastntm",
        description="Train, evaluate and plot Neural Turing Machines on the tasks of Graves et al. (2014).",
        epilog="Run 'fastntm COMMAND --help' for a command's options.",
    )
    import torch

    from . import __version__

    parser.add_argument("--version", action="version", version=f"fastntm {__version__} (torch {torch.__version__})")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--threads", type=positive_int, default=default_threads(),
                        help="CPU threads for torch and the numba kernels (default %(default)s here: 2 where this "
                             "process has two cores, 1 where it has one or OMP_NUM_THREADS=1; torchrun's processes "
                             "share the machine's cores)")
    _add_train(commands, common)
    _add_eval(commands, common)
    _add_plot(commands, common)
    return parser


def _add_train(commands, common) -> None:
    p = commands.add_parser(
        "train",
        parents=[common],
        help="train a model on a task",
        description=(
            "Train a FastNTM on TASK, logging to OUT/log.csv and checkpointing to OUT (model.safetensors, "
            "config.json, trainer_state.pt). Stops at --steps or when the eval cost on fresh sequences of the "
            "task's full distribution stays below --target-cost for --target-patience evaluations. Defaults in "
            "[brackets]. With no flags, 'fastntm train copy' solves "
            "copy (under 0.1 bit errors per sequence on lengths 1-20) in a few CPU minutes."
        ),
    )
    # Training flags default to None so that --resume can tell which were given; the
    # real defaults are TrainConfig's (shown in help).
    from .training import TrainConfig

    d = TrainConfig()
    p.add_argument("task", choices=sorted(TASKS), metavar="TASK", help=f"one of: {', '.join(sorted(TASKS))}")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=positive_int, help=f"total optimiser steps, counted across resumes [{d.steps}]")
    g.add_argument("--batch-size", type=positive_int, help=f"sequences per step [{d.batch_size}]")
    g.add_argument("--lr", type=positive_float, help=f"learning rate [{d.lr}]")
    g.add_argument("--optimizer", choices=("adam", "rmsprop", "sgd"), help=f"[{d.optimizer}]")
    g.add_argument("--clip", type=nonnegative_float, help=f"gradient norm clip, 0 for none [{d.clip}]")
    g.add_argument("--seed", type=seed_int, help=f"seed of the weights and the training data [{d.seed}]")
    g.add_argument("--device", choices=("cpu", "cuda", "auto"), help=f"[{d.device}]")
    g.add_argument("--out", type=out_path, help="output folder (default: runs/TASK)")
    g.add_argument("--resume", action="store_true",
                   help="continue from the checkpoint in --out; training flags given override the saved ones")
    g.add_argument("--eval-every", type=positive_int, help=f"steps between evaluations and log rows [{d.eval_every}]")
    g.add_argument("--eval-batches", type=positive_int, help=f"batches per evaluation [{d.eval_batches}]")
    g.add_argument("--eval-batch-size", type=positive_int, help=f"sequences per eval batch [{d.eval_batch_size}]")
    g.add_argument("--checkpoint-every", type=positive_int, help=f"steps between checkpoints [{d.checkpoint_every}]")
    g.add_argument("--target-cost", type=nonnegative_float,
                   help="stop once the eval cost (bits per sequence) stays below this; 0: never "
                        "[0.1, none for ngrams]")
    g.add_argument("--target-patience", type=positive_int,
                   help=f"evaluations in a row that must be below --target-cost [{d.target_patience}]")
    g.add_argument("--curriculum", dest="curriculum", action="store_const", const=True,
                   help="copy, repeat_copy, associative_recall: start with short sequences (few items) and grow "
                        "the maximum as the training cost drops [off: the full range from the start]")
    g.add_argument("--no-curriculum", dest="curriculum", action="store_const", const=False,
                   help="turn a resumed run's curriculum off")
    g.add_argument("--curriculum-start", type=positive_int,
                   help="first maximum length (items for associative_recall) [a quarter of the task's]")
    g.add_argument("--curriculum-step", type=positive_int, help="growth of the maximum per stage [a quarter]")
    g.add_argument("--curriculum-threshold", type=nonnegative_float,
                   help=f"grow when the mean training cost over --eval-every steps is below this "
                        f"[{d.curriculum_threshold}]")
    g.add_argument("--cuda-graph", dest="cuda_graph", action="store_const", const=True,
                   help="run each training step (forward, loss, backward, clipping, optimiser) as a CUDA graph, "
                        "captured once per batch shape and replayed, which removes the host's per-op overhead; "
                        "CUDA only, one process [off]")
    g.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_const", const=False,
                   help="turn a resumed run's --cuda-graph off (to resume it on a CPU, say)")
    g.add_argument("--backend", choices=BACKENDS, help=BACKEND_HELP + " [auto]")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    m = p.add_argument_group("model")
    for flag, dest, kind, text in MODEL_FLAGS:
        if isinstance(kind, tuple):
            m.add_argument(flag, dest=f"model_{dest}", choices=kind, help=text)
        else:
            m.add_argument(flag, dest=f"model_{dest}", type=_TYPES[kind], metavar="N", help=text)
    t = p.add_argument_group("task (each applies only to the tasks named; defaults are the paper's)")
    for flag, dest, kind, text in TASK_FLAGS:
        t.add_argument(flag, dest=f"task_{dest}", type=_TYPES[kind], metavar="N", help=text)
    p.set_defaults(run=run_train)


def _add_eval(commands, common) -> None:
    p = commands.add_parser(
        "eval",
        parents=[common],
        help="cost per sequence of a checkpoint at several lengths",
        description=(
            "Print the cost per sequence (bit errors; bits of cross-entropy for ngrams) of a checkpoint on fresh "
            "sequences, first on the task's training distribution, then at each length in --lengths, and write "
            "the table as eval.json next to the checkpoint. 'Length' sets: copy and repeat_copy the sequence "
            "length (repeat_copy keeps drawing its repeat count); associative_recall the number of items; "
            "ngrams the sequence length in bits; priority_sort the number of input items (with "
            "min(num_outputs, length) outputs). For repeat_copy, --repeats also fixes the repeat count, as the "
            "paper's Figure 8 does: each length at each count."
        ),
    )
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a run folder or its model.safetensors")
    p.add_argument("--lengths", type=length_list, help="comma-separated lengths (default: 1x, 2x, 4x the task's "
                                                       "training maximum)")
    p.add_argument("--repeats", type=length_list, help="repeat_copy only: comma-separated repeat counts, each "
                                                       "length evaluated at each (default: drawn as in training)")
    p.add_argument("--batches", type=positive_int, default=10, help="batches per length (default 10)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="sequences per batch (default 32)")
    p.add_argument("--seed", type=generator_seed, default=2024, help="seed of the eval sequences (default 2024)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto", help="(default auto)")
    p.add_argument("--out", type=out_path, help="JSON file to write (default: CHECKPOINT/eval.json)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP + " (default auto)")
    p.set_defaults(run=run_eval)


def _add_plot(commands, common) -> None:
    p = commands.add_parser(
        "plot",
        parents=[common],
        help="PNGs of a checkpoint's outputs and memory weightings on one sequence",
        description=(
            "Run a checkpoint on one fresh sequence and write io.png (inputs, targets, outputs) and "
            "weights.png (write and read weightings over time, like figure 6 of the paper)."
        ),
    )
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT", help="a run folder or its model.safetensors")
    p.add_argument("--length", type=positive_int,
                   help="the task's length knob (as in 'fastntm eval'); default: the training maximum")
    p.add_argument("--seed", type=generator_seed, default=0, help="seed of the sequence (default 0)")
    p.add_argument("--out", type=out_path, help="output folder (default: CHECKPOINT/plots)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help=BACKEND_HELP + " (default auto)")
    p.set_defaults(run=run_plot)


class CommandError(Exception):
    """A problem with the user's request, reported as one line without a traceback."""


def _check_folder(folder: Path) -> None:
    """Raise before any work unless ``folder`` is a folder or can be made one: no file at it or above it, and
    its nearest existing folder takes new files (a file made there and removed, which leaves nothing: a
    permission check passes for root where the file system refuses, as in /proc)."""
    for path in (folder, *folder.parents):
        if path.exists():
            if not path.is_dir():
                raise CommandError(f"cannot write to {folder}: {path} is a file, not a folder")
            try:
                tempfile.TemporaryFile(dir=path).close()
            except OSError as error:
                raise CommandError(f"cannot write to {folder}: {path} takes no new files "
                                   f"({error.strerror or type(error).__name__})") from None
            return


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fastntm`` and ``python -m fastntm``; returns the exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    import torch

    torch.set_num_threads(args.threads)
    try:
        return args.run(args)
    except CommandError as error:
        print(f"fastntm {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:  # Ctrl-C: a line, not a traceback; 130 as a shell reports SIGINT
        # Under torchrun every rank gets the signal: the line once, from rank 0 (ranks as the trainer counts them:
        # one process alone is rank 0, whatever RANK its environment holds).
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("RANK", "0") == "0":
            print(f"fastntm {args.command}: interrupted{f'; {interrupt}' if str(interrupt) else ''}", file=sys.stderr)
        return 130


# --- train ---------------------------------------------------------------------------


def _given(args, prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def _training_overrides(args) -> dict[str, Any]:
    names = ("steps", "batch_size", "lr", "optimizer", "clip", "seed", "device", "eval_every", "eval_batches",
             "eval_batch_size", "checkpoint_every", "target_cost", "target_patience", "curriculum", "curriculum_start",
             "curriculum_step", "curriculum_threshold", "cuda_graph", "backend")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _task_args(task: str, given: dict[str, Any]) -> dict[str, Any]:
    fields = {f.name for f in dataclasses.fields(TASKS[task])}
    flags = {dest: flag for flag, dest, _, _ in TASK_FLAGS}
    wrong = [flags[k] for k in given if k not in fields]
    if wrong:
        valid = [flag for flag, dest, _, _ in TASK_FLAGS if dest in fields]
        raise CommandError(f"{', '.join(wrong)} does not apply to task {task}; its task flags are {', '.join(valid)}")
    return given


def run_train(args) -> int:
    from .training import (STATE_FILE, TrainConfig, Trainer, can_resume, checkpoint_folder,
                           finish_interrupted_save, holds_checkpoint, read_config, shutdown_distributed)

    out = args.out if args.out is not None else Path("runs") / args.task
    _check_folder(out)
    model_args = _given(args, "model_")
    task_args = _task_args(args.task, _given(args, "task_"))
    overrides = _training_overrides(args)
    try:
        if args.resume:
            finish_interrupted_save(out)  # a save stopped between its renames has no trainer_state.pt in place yet
            if not (out / STATE_FILE).is_file():
                raise CommandError(f"--resume: no checkpoint in {out} (expected {out / STATE_FILE})")
            saved = read_config(checkpoint_folder(out))
            _check_same(args.task, saved, model_args, task_args)
            trainer = Trainer.resume(out, progress=not args.no_progress, **overrides)
        else:
            if holds_checkpoint(out):
                if can_resume(out):
                    raise CommandError(f"{out} already holds a checkpoint; pass --resume to continue it or pick "
                                       f"another --out")
                raise CommandError(f"{out} holds a model's files but not the trainer's state ({STATE_FILE}), so "
                                   f"it cannot be resumed; pick another --out, or move them away to train there")
            config = TrainConfig(task=args.task, task_args=task_args, model_args=model_args, **overrides)
            trainer = Trainer(config, out, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise CommandError(str(error)) from None
    if trainer.reached_target and trainer.step < trainer.config.steps and trainer.dist.is_main:
        print(f"the checkpoint in {out} already reached its target (an eval cost below {trainer.config.stop_cost:g} "
              f"in its last {trainer.config.target_patience} evaluations), so no step runs; --target-cost 0 "
              f"trains on")
    try:
        result = trainer.fit()
    except KeyboardInterrupt:
        shutdown_distributed(wait_for_all=False)
        if (out / STATE_FILE).is_file():
            command = f"fastntm train {args.task} --out {shlex.quote(str(out))} --resume"
            raise KeyboardInterrupt(f"to continue from the last checkpoint: {command}") from None
        raise KeyboardInterrupt("no checkpoint was written yet") from None
    except BaseException:
        shutdown_distributed(wait_for_all=False)
        raise
    shutdown_distributed()
    if not trainer.dist.is_main:
        return 0
    target = trainer.config.stop_cost
    status = f"{'reached' if result.reached_target else 'did not reach'} the target {target:g}" if target else "no target"
    eval_cost = "-" if result.eval_cost is None else f"{result.eval_cost:.4g}"
    print(
        f"step {result.step}, {result.sequences} sequences, {result.elapsed_s:.0f} s: eval cost {eval_cost} "
        f"{'bits' if trainer.task.name == 'ngrams' else 'bit errors'}/sequence ({status}); checkpoint in {out}"
    )
    return 0


def _check_same(task: str, saved: dict[str, Any], model_args: dict[str, Any], task_args: dict[str, Any]) -> None:
    if saved["task"]["name"] != task:
        raise CommandError(f"--resume: the checkpoint was trained on {saved['task']['name']}, not {task}")
    # config.json holds only the model flags that were given: the others were FastNTM's defaults.
    model = {**_model_defaults(), **saved["model"]}
    for kind, given, have in (("model", model_args, model), ("task", task_args, saved["task"]["args"])):
        changed = {k: v for k, v in given.items() if have.get(k) != v}
        if changed:
            listed = ", ".join(f"{k}={v!r} (saved {have.get(k)!r})" for k, v in changed.items())
            raise CommandError(f"--resume cannot change the {kind}: {listed}")


def _model_defaults() -> dict[str, Any]:
    from .training import model_defaults

    defaults = model_defaults()
    # None: the memory takes the model's dtype, and training builds float32 models.
    defaults["memory_dtype"] = "float32"
    return defaults


# --- eval ----------------------------------------------------------------------------


def run_eval(args) -> int:
    from .training import (CONFIG_FILE, LOG_FILE, MODEL_FILE, STATE_FILE, checkpoint_folder, evaluate,
                           length_overrides, load_model, max_length, resolve_device)

    try:
        folder = checkpoint_folder(args.checkpoint)
        device = resolve_device(args.device)
        out = args.out if args.out is not None else folder / "eval.json"
        if out.is_dir():
            raise CommandError(f"--out {out} is a folder; give the JSON file to write, such as {out / 'eval.json'}")
        if out.resolve() in {(folder / name).resolve() for name in (CONFIG_FILE, MODEL_FILE, STATE_FILE, LOG_FILE)}:
            raise CommandError(f"--out {out} is one of the run's own files; give another, such as "
                               f"{folder / 'eval.json'}")
        _check_folder(out.parent)
        if out.exists() and not os.access(out, os.W_OK):
            raise CommandError(f"--out {out} cannot be written over (no write permission)")
        model, task, saved = load_model(folder, device, backend=args.backend)
        if args.repeats and task.name != "repeat_copy":
            raise CommandError(f"--repeats applies to repeat_copy only; this checkpoint's task is {task.name}")
        lengths = args.lengths or [max_length(task) * k for k in (1, 2, 4)]
        counts = [{"repeats": r} for r in args.repeats] if args.repeats else [{}]
        rows_in = [("train", {})] + [(str(n), {**length_overrides(task, n), **count})
                                     for n in lengths for count in counts]
        for _, overrides in rows_in:
            task.batch(1, None, **overrides)  # a bad length fails here, before any work
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise CommandError(str(error)) from None

    rows = []
    for label, overrides in rows_in:
        cost = evaluate(model, task, batches=args.batches, batch_size=args.batch_size, seed=args.seed,
                        device=device, **overrides)
        row = {"length": label, "cost": cost}
        if "repeats" in overrides:
            row["repeats"] = overrides["repeats"]
        if task.name == "ngrams":
            row["optimal_cost"] = _ngrams_optimal(task, args, overrides)
        rows.append(row)

    unit = "bits/seq" if task.name == "ngrams" else "bit errors/seq"
    print(f"{task.name} at step {saved.get('step', '?')}, {args.batches} x {args.batch_size} sequences per row; "
          f"length sets {_knob_name(task.name)}; 'train' is the training distribution")
    header = f"{'length':>8}  " + (f"{'repeats':>7}  " if args.repeats else "") + f"{'cost (' + unit + ')':>24}"
    if task.name == "ngrams":
        header += f"  {'optimal':>10}"
    print(header)
    for row in rows:
        repeats = f"{row.get('repeats', '-'):>7}  " if args.repeats else ""
        line = f"{row['length']:>8}  {repeats}{row['cost']:>24.4f}"
        if "optimal_cost" in row:
            line += f"  {row['optimal_cost']:>10.4f}"
        print(line)
    report = {"checkpoint": str(folder), "task": task.name, "step": saved.get("step"), "unit": unit,
              "length_knob": _knob_name(task.name), "batches": args.batches, "batch_size": args.batch_size,
              "seed": args.seed, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _knob_name(task_name: str) -> str:
    from .training import LENGTH_KNOBS

    return LENGTH_KNOBS[task_name]


def _ngrams_optimal(task, args, overrides) -> float:
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    costs = [task.optimal_cost(task.batch(args.batch_size, generator, **overrides)) for _ in range(args.batches)]
    return sum(costs) / len(costs)


# --- plot ----------------------------------------------------------------------------


def run_plot(args) -> int:
    from .plotting import plot_checkpoint
    from .training import checkpoint_folder

    try:
        out = args.out if args.out is not None else checkpoint_folder(args.checkpoint) / "plots"
        _check_folder(out)
        paths = plot_checkpoint(args.checkpoint, length=args.length, seed=args.seed, out=out, backend=args.backend)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        raise CommandError(str(error)) from None
    for path in paths:
        print(f"wrote {path}")
    return 0
