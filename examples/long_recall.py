"""Long-range key-value recall with FastNTM as a layer, trained on short gaps, tested on long ones.

The task (one sequence)::

    step 0 .. P-1      P key-value pairs, one a step: a key one-hot and a value
                       one-hot, on separate channel groups
    step P .. P+G-1    G distractor steps: a random token on its own channel group
                       ("tokens"), or all-zero inputs ("zeros"); to be ignored
    step P+G           the query: a query flag and one of the P keys
    target             the value that was paired with the queried key
                       (cross-entropy on this last step only)

The model is a small sequence classifier: ``FastNTM(..., output_size=None)``
gives features ``[h_t, r_t]`` at every step, and a ``Linear`` reads the value
out of the last step's features.

Training uses a gap curriculum: gaps drawn up to ``--gap-start``, raised by
``--gap-growth`` whenever validation accuracy at the current largest gap passes
``--advance-at``, until ``--gap`` (short gaps only, which a CPU can afford); it
stops early once validation accuracy at ``--gap`` reaches ``--target-acc``.
Evaluation then streams much longer sequences (thousands of steps) through the
model in chunks with the state carried across chunks, under ``torch.no_grad``,
so memory stays bounded whatever the gap; the distractors are generated chunk by
chunk and the whole sequence never exists at once.

Commands::

    python examples/long_recall.py train --out runs/long_recall.pt
    python examples/long_recall.py train --init-from runs/long_recall.pt --gap-min 1024 --gap-start 3072 --gap 3072 \\
        --out runs/long_recall_3k.pt   # continue on longer gaps
    python examples/long_recall.py eval runs/long_recall.pt --gaps 100,1000,3000,10000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from fastntm import FastNTM
from fastntm.model import NTMState

DISTRACTORS = ("tokens", "zeros")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Sizes of the task. Channels: ``[keys | values | distractors | query flag]``."""

    num_keys: int = 8
    num_values: int = 8
    num_pairs: int = 4
    num_distractors: int = 8
    distractor: str = "tokens"
    pair_gap: int = 0

    def __post_init__(self):
        if self.distractor not in DISTRACTORS:
            raise ValueError(f"distractor must be one of {DISTRACTORS}, got {self.distractor!r}")
        if not 1 <= self.num_pairs <= self.num_keys:
            raise ValueError(f"num_pairs must be in 1..num_keys={self.num_keys}, got {self.num_pairs}")
        for name in ("num_keys", "num_values", "num_distractors"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.pair_gap < 0:
            raise ValueError(f"pair_gap must be non-negative, got {self.pair_gap}")

    @property
    def prefix_steps(self) -> int:
        """Steps before the long gap: each pair followed by ``pair_gap`` distractor steps."""
        return self.num_pairs * (1 + self.pair_gap)

    @property
    def input_size(self) -> int:
        return self.num_keys + self.num_values + self.num_distractors + 1

    @property
    def value_offset(self) -> int:
        return self.num_keys

    @property
    def distractor_offset(self) -> int:
        return self.num_keys + self.num_values

    @property
    def query_channel(self) -> int:
        return self.input_size - 1


class Episode(NamedTuple):
    """One batch of sequences, in parts. ``prefix`` (P * (1 + pair_gap), B, I): the pairs
    (each followed by ``pair_gap`` distractor steps); ``query``
    (1, B, I); ``target`` (B,) value indices; ``keys``/``values`` (B, P) the pairs;
    ``query_index`` (B,) which pair was queried. The gap is made by ``distractors``."""

    prefix: torch.Tensor
    query: torch.Tensor
    target: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    query_index: torch.Tensor


def make_episode(task: TaskConfig, batch_size: int, generator: torch.Generator | None = None) -> Episode:
    """Draw ``batch_size`` sets of pairs (distinct keys, values with replacement) and a query."""
    B, P, I = batch_size, task.num_pairs, task.input_size
    keys = torch.rand(B, task.num_keys, generator=generator).argsort(dim=1)[:, :P]
    values = torch.randint(0, task.num_values, (B, P), generator=generator)
    query_index = torch.randint(0, P, (B,), generator=generator)
    rows = torch.arange(B)
    target = values[rows, query_index]

    pairs = torch.zeros(P, B, I)
    pairs.scatter_(2, keys.T.unsqueeze(-1), 1.0)
    pairs.scatter_(2, (task.value_offset + values.T).unsqueeze(-1), 1.0)
    if task.pair_gap:
        parts = []
        for p in range(P):
            parts += [pairs[p : p + 1], distractors(task, task.pair_gap, B, generator)]
        prefix = torch.cat(parts)
    else:
        prefix = pairs
    query = torch.zeros(1, B, I)
    query[0, rows, keys[rows, query_index]] = 1.0
    query[0, :, task.query_channel] = 1.0
    return Episode(prefix, query, target, keys, values, query_index)


def distractors(task: TaskConfig, steps: int, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``steps`` gap steps (steps, B, I): one random distractor token a step, or zeros."""
    x = torch.zeros(steps, batch_size, task.input_size)
    if task.distractor == "tokens" and steps > 0:
        tokens = torch.randint(0, task.num_distractors, (steps, batch_size, 1), generator=generator)
        x.scatter_(2, task.distractor_offset + tokens, 1.0)
    return x


def make_batch(task: TaskConfig, batch_size: int, gap: int, generator: torch.Generator | None = None):
    """A whole batch as one tensor: ``(x (P + gap + 1, B, I), target (B,))``."""
    ep = make_episode(task, batch_size, generator)
    x = torch.cat([ep.prefix, distractors(task, gap, batch_size, generator), ep.query])
    return x, ep.target


def stream_chunks(
    task: TaskConfig, episode: Episode, gap: int, chunk: int, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """The sequence of ``episode`` with ``gap`` distractors, as chunks of at most ``chunk``
    steps, made one at a time (the last chunk ends with the query step)."""
    B = episode.prefix.shape[1]
    pending, left = episode.prefix, gap
    while True:
        take = min(left, max(chunk - pending.shape[0], 0))
        pending = torch.cat([pending, distractors(task, take, B, generator)])
        left -= take
        if left == 0 and pending.shape[0] < chunk:
            yield torch.cat([pending, episode.query])
            return
        yield pending
        pending = episode.prefix[:0]


class RecallModel(nn.Module):
    """``FastNTM`` features (``output_size=None``) and a linear readout of the last step."""

    def __init__(self, task: TaskConfig, *, memory_slots=32, memory_width=16, controller="lstm",
                 controller_size=64, memory_init="constant", shift_range=1, head_init="default",
                 checkpoint_every="auto", memory_dtype=None):
        super().__init__()
        self.ntm = FastNTM(
            task.input_size,
            None,
            memory_slots=memory_slots,
            memory_width=memory_width,
            controller=controller,
            controller_size=controller_size,
            num_reads=1,
            num_writes=1,
            shift_range=shift_range,
            memory_init=memory_init,
            checkpoint_every=checkpoint_every,
            memory_dtype=memory_dtype,
        )
        self.readout = nn.Linear(self.ntm.cell.feature_size, task.num_values)
        if head_init == "copy":
            self.copy_head_init()
        elif head_init != "default":
            raise ValueError(f"head_init must be 'default' or 'copy', got {head_init!r}")

    @torch.no_grad()
    def copy_head_init(self, bias: float = 6.0) -> None:
        """Start the heads where a copy-task NTM ends up (biases only; all still trained):
        the write head location-based (gate g ~ 0), shifting +1 slot every step, sharpened,
        so that successive pairs land in successive slots starting from slot 1; the read
        head content-based (g ~ 1, a soft key strength to start)."""
        cell = self.ntm.cell
        M, S = cell.memory_width, cell.shift_range
        per_head = sum(cell.head_sizes)  # k (M), beta, g, s (2S+1), gamma; read heads first
        b = cell.heads.bias
        for head in range(cell.num_heads):
            o = head * per_head
            if head < cell.num_reads:
                b[o + M] = 0.0  # beta = softplus(0) ~ 0.7: soft at first, so gradients reach the key
                b[o + M + 1] = bias  # g ~ 1: content
            else:
                b[o + M + 1] = -bias  # g ~ 0: previous weighting
                if S > 0:
                    b[o + M + 2 : o + M + 3 + 2 * S] = 0.0
                    b[o + M + 2 + S + 1] = bias  # shift +1
                b[o + M + 3 + 2 * S] = bias / 2  # gamma ~ 4

    def forward(self, x: torch.Tensor, state: NTMState | None = None) -> tuple[torch.Tensor, NTMState]:
        """Logits for the last step of ``x`` (T, B, I): ``(logits (B, V), state)``."""
        features, state = self.ntm(x, state)
        return self.readout(features[-1]), state

    @torch.no_grad()
    def predict_stream(self, chunks: Iterator[torch.Tensor]) -> torch.Tensor:
        """Run a sequence given as chunks, carrying the state; logits at its last step."""
        state = None
        logits = None
        for x in chunks:
            logits, state = self(x, state)
        return logits


@torch.no_grad()
def evaluate(model: RecallModel, task: TaskConfig, gap: int, num_sequences: int, *, batch_size: int = 256,
             chunk: int = 512, seed: int = 1234) -> float:
    """Accuracy over ``num_sequences`` fresh sequences with exactly ``gap`` distractor steps,
    streamed in chunks of ``chunk`` steps."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed + gap)
    correct = total = 0
    while total < num_sequences:
        b = min(batch_size, num_sequences - total)
        ep = make_episode(task, b, generator)
        logits = model.predict_stream(stream_chunks(task, ep, gap, chunk, generator))
        correct += (logits.argmax(-1) == ep.target).sum().item()
        total += b
    model.train(was_training)
    return correct / total


def train(args) -> dict:
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    prior = dict(seen=0, seconds=0.0, history=[])
    if args.init_from:
        # Continue from a saved model: its task and model sizes are kept (the task and model
        # flags are ignored); the optimiser starts afresh. Gap, pairs and lr flags apply.
        model, task, model_args, init_info = load(args.init_from)
        prior = dict(seen=init_info.get("total_seen", init_info.get("seen", 0)),
                     seconds=init_info.get("total_seconds", init_info.get("seconds", 0.0)),
                     history=init_info.get("history", []))
        args.pairs = task.num_pairs
        print(f"init from {args.init_from}: step {init_info.get('step')}, {prior['seen']} sequences, "
              f"{prior['seconds']:.0f}s so far; task {dataclasses.asdict(task)}", flush=True)
    else:
        task = TaskConfig(args.keys, args.values, args.pairs, args.distractors, args.distractor, args.pair_gap)
        model_args = dict(memory_slots=args.slots, memory_width=args.width, controller=args.controller,
                          controller_size=args.controller_size, memory_init=args.memory_init,
                          shift_range=args.shift_range, head_init=args.head_init)
        model = RecallModel(task, **model_args)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(args.seed)

    stage = prior["history"][-1].get("stage", 0) + 1 if prior["history"] else 0  # 0: from scratch
    max_gap = min(args.gap_start, args.gap)
    max_pairs = min(args.pairs_start or args.pairs, args.pairs)
    start = time.perf_counter()
    seen = 0
    history = []
    running_loss = running_acc = None
    bar = tqdm(range(1, args.steps + 1), desc="train", dynamic_ncols=True, mininterval=2.0, file=sys.stdout)
    done = False
    for step in bar:
        gap = int(torch.randint(args.gap_min, max_gap + 1, (1,), generator=generator))
        x, target = make_batch(dataclasses.replace(task, num_pairs=max_pairs), args.batch, gap, generator)
        logits, _ = model(x)
        loss = F.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optimizer.step()
        seen += args.batch
        acc = (logits.argmax(-1) == target).float().mean().item()
        running_loss = loss.item() if running_loss is None else 0.98 * running_loss + 0.02 * loss.item()
        running_acc = acc if running_acc is None else 0.98 * running_acc + 0.02 * acc
        bar.set_postfix(loss=f"{running_loss:.3f}", acc=f"{running_acc:.2f}", pairs=max_pairs, max_gap=max_gap,
                        refresh=False)

        if step % args.eval_every == 0 or step == args.steps:
            val = evaluate(model, dataclasses.replace(task, num_pairs=max_pairs), max_gap, args.val_size, seed=99)
            elapsed = time.perf_counter() - start
            history.append(dict(step=step, seen=seen, seconds=round(elapsed, 1), max_pairs=max_pairs,
                                max_gap=max_gap, val_acc=val, loss=round(running_loss, 4),
                                stage=stage))
            tqdm.write(f"step {step} seen {seen} {elapsed:.0f}s  pairs {max_pairs} max_gap {max_gap}  "
                       f"val {val:.3f}  loss {running_loss:.3f}", file=sys.stdout)
            if max_pairs < args.pairs and val >= args.advance_at:
                max_pairs = min(args.pairs, 2 * max_pairs)
            elif max_gap < args.gap and val >= args.advance_at:
                max_gap = min(args.gap, math.ceil(max_gap * args.gap_growth))
            elif max_pairs >= args.pairs and max_gap >= args.gap and val >= args.target_acc:
                done = True
            if args.out:
                save(args.out, model, task, model_args, dict(step=step, seen=seen, seconds=elapsed,
                                                             **_totals(prior, seen, elapsed, history)))
            if done or (args.max_minutes and elapsed > 60 * args.max_minutes):
                break
    bar.close()
    elapsed = time.perf_counter() - start
    info = dict(step=step, seen=seen, seconds=round(elapsed, 1), reached_target=done,
                **_totals(prior, seen, elapsed, history))
    if args.init_from:
        info["init_from"] = str(args.init_from)
    if args.out:
        save(args.out, model, task, model_args, info)
    print(json.dumps({k: v for k, v in info.items() if k != "history"}))
    return info


def _totals(prior: dict, seen: int, seconds: float, history: list) -> dict:
    """Counts over this run and the runs it was initialised from (``--init-from``)."""
    return dict(total_seen=prior["seen"] + seen, total_seconds=round(prior["seconds"] + seconds, 1),
                history=prior["history"] + history)


def save(path, model: RecallModel, task: TaskConfig, model_args: dict, info: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(dict(state_dict=model.state_dict(), task=dataclasses.asdict(task), model_args=model_args,
                    info=info), path)


def load(path, distractor: str | None = None) -> tuple[RecallModel, TaskConfig, dict, dict]:
    """``(model, task, model_args, info)`` from a checkpoint of ``save``, read once."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    task_args = dict(ckpt["task"])
    if distractor is not None:
        task_args["distractor"] = distractor
    task = TaskConfig(**task_args)
    model = RecallModel(task, **ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    return model, task, ckpt["model_args"], ckpt["info"]


def eval_command(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, task, _, info = load(args.checkpoint, args.distractor)
    results = {}
    print(f"checkpoint: step {info.get('step')}, {info.get('total_seen', info.get('seen'))} sequences, "
          f"{info.get('total_seconds', info.get('seconds', 0)):.0f}s; "
          f"task {dataclasses.asdict(task)}")
    for gap in (int(g) for g in args.gaps.split(",")):
        t0 = time.perf_counter()
        acc = evaluate(model, task, gap, args.sequences, batch_size=args.batch, chunk=args.chunk)
        results[gap] = acc
        print(f"gap {gap:6d}  ({task.prefix_steps + gap + 1} steps)  accuracy {acc:.4f}  "
              f"[{args.sequences} sequences, {time.perf_counter() - t0:.0f}s]", flush=True)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train with a gap curriculum")
    t.add_argument("--out", default="long_recall.pt", help="checkpoint path (written at every validation)")
    t.add_argument("--steps", type=int, default=20000, help="most optimiser steps")
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--clip", type=float, default=10.0)
    t.add_argument("--gap", type=int, default=100, help="largest training gap (end of the curriculum)")
    t.add_argument("--gap-start", type=int, default=10, help="largest gap at the start of the curriculum")
    t.add_argument("--gap-min", type=int, default=0, help="smallest training gap")
    t.add_argument("--gap-growth", type=float, default=2.0)
    t.add_argument("--advance-at", type=float, default=0.95, help="val accuracy that raises the gap")
    t.add_argument("--target-acc", type=float, default=0.99, help="val accuracy at --gap that stops training")
    t.add_argument("--eval-every", type=int, default=100)
    t.add_argument("--val-size", type=int, default=512)
    t.add_argument("--max-minutes", type=float, default=0, help="stop after this long (0: no limit)")
    t.add_argument("--keys", type=int, default=8)
    t.add_argument("--values", type=int, default=8)
    t.add_argument("--pairs", type=int, default=4)
    t.add_argument("--pairs-start", type=int, default=0,
                   help="pairs at the start of the curriculum, doubled on each advance up to --pairs (0: --pairs)")
    t.add_argument("--pair-gap", type=int, default=0, help="distractor steps after each pair, before the next")
    t.add_argument("--distractors", type=int, default=8, help="number of distractor tokens")
    t.add_argument("--distractor", choices=DISTRACTORS, default="tokens")
    t.add_argument("--slots", type=int, default=32)
    t.add_argument("--width", type=int, default=16)
    t.add_argument("--controller", choices=("lstm", "mlp"), default="lstm")
    t.add_argument("--controller-size", type=int, default=64)
    t.add_argument("--memory-init", choices=("constant", "learned", "random"), default="constant")
    t.add_argument("--shift-range", type=int, default=1, help="shifts -S..S of the location addressing")
    t.add_argument("--head-init", choices=("default", "copy"), default="default",
                   help="copy: write head starts location-based, moving +1 slot a step; read head content-based")
    t.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="continue training a saved model (its task and model sizes; a fresh optimiser)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    e = sub.add_parser("eval", help="accuracy at long gaps, streamed in chunks")
    e.add_argument("checkpoint")
    e.add_argument("--gaps", default="100,1000,3000")
    e.add_argument("--sequences", type=int, default=512)
    e.add_argument("--batch", type=int, default=256)
    e.add_argument("--chunk", type=int, default=512, help="steps per chunk (state carried between chunks)")
    e.add_argument("--distractor", choices=DISTRACTORS, default=None, help="override the trained distractor kind")
    e.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    problem = _problem(args)
    if problem:
        sub.choices[args.command].error(problem)
    return args


def _parents(path: str) -> list[str]:
    """The folders above ``path``, nearest first."""
    folders, folder = [], os.path.dirname(os.path.abspath(path))
    while folder not in folders:
        folders.append(folder)
        folder = os.path.dirname(folder)
    return folders


def _checkpoint_problem(path: str, flag: str, distractor: str | None = None) -> str | None:
    """Why ``path`` is not a checkpoint that ``load`` takes, or None: a damaged file is found before any work,
    as one line, not a traceback from deep in torch.load or load_state_dict."""
    if not os.path.isfile(path):
        return f"no checkpoint file {path}{flag}"
    try:
        load(path, distractor)
    except Exception as exc:  # what torch.load and load_state_dict raise depends on the damage
        first_line = (str(exc).splitlines() or [""])[0]
        return f"{path} is not a checkpoint of this script{flag}: {type(exc).__name__}: {first_line[:200]}"
    return None


def _problem(args) -> str | None:
    """What is wrong with the flags, found before anything runs: a bad ``--out`` would otherwise fail
    at the first validation, after minutes of training, and a bad count deep in the loop."""
    if args.threads < 0:
        return f"--threads must be >= 0 (0: torch's default), got {args.threads}"
    if args.command == "eval":
        if not all(g.strip().isdigit() for g in args.gaps.split(",")):
            return f"--gaps must be whole numbers >= 0 separated by commas, got {args.gaps!r}"
        counts = ("sequences", "batch", "chunk")
    else:
        counts = ("steps", "batch", "eval_every", "val_size")
        for name in ("gap", "gap_start", "gap_min", "pairs_start"):
            if getattr(args, name) < 0:
                return f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}"
        if args.gap_min > min(args.gap_start, args.gap):
            return f"--gap-min {args.gap_min} is above the first largest gap min(--gap-start, --gap) = " \
                   f"{min(args.gap_start, args.gap)}"
        if args.gap_start < args.gap and (args.gap_start < 1 or args.gap_growth <= 1):
            return f"the curriculum would never reach --gap {args.gap}: it needs --gap-start >= 1 and " \
                   f"--gap-growth > 1, got {args.gap_start} and {args.gap_growth}"
        if os.path.isdir(args.out):
            return f"--out {args.out} is a folder; give the checkpoint file to write, such as {args.out}/recall.pt"
        # The folder is made at the first save; a file in its way would stop the run there.
        blocked = [f for f in _parents(args.out) if os.path.exists(f) and not os.path.isdir(f)]
        if blocked:
            return f"--out {args.out} cannot be written: {blocked[0]} is a file, not a folder"
        if not args.init_from:
            try:
                TaskConfig(args.keys, args.values, args.pairs, args.distractors, args.distractor, args.pair_gap)
            except ValueError as exc:
                return f"{exc} (--pairs, --keys, --values, --distractors, --pair-gap)"
    for name in counts:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}"
    if args.command == "eval":
        return _checkpoint_problem(args.checkpoint, "", args.distractor)
    return _checkpoint_problem(args.init_from, " (--init-from)") if args.init_from else None


def main(argv=None):
    args = parse_args(argv)
    return train(args) if args.command == "train" else eval_command(args)


if __name__ == "__main__":
    main()
