"""Pictures of what a trained NTM does: inputs, targets, outputs and memory weightings over time.

Like figure 6 of Graves et al. (2014): time runs left to right; the weightings show
which memory locations each write and read head attends to at every step. Uses
matplotlib's Agg backend, so no display is needed.

Example::

    from fastntm.plotting import plot_checkpoint
    plot_checkpoint("runs/copy", length=20)     # runs/copy/plots/io.png, weights.png
"""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from .training import length_overrides, load_model, max_length  # noqa: E402

__all__ = ["plot_checkpoint", "plot_io", "plot_weights", "used_slots"]

# A location counts as used when some head puts at least this much weight on it.
USED_WEIGHT = 0.01


def used_slots(weights: torch.Tensor, pad: int = 2) -> tuple[int, int]:
    """The range [lo, hi) of locations that ``weights`` (T, H, N) touches, padded; all N if none or wrapped."""
    N = weights.shape[-1]
    used = torch.nonzero(weights.amax(dim=(0, 1)) >= USED_WEIGHT).flatten()
    if used.numel() == 0:
        return 0, N
    lo, hi = int(used.min()), int(used.max()) + 1
    if hi - lo > N // 2:  # focus that wraps around the end: show everything
        return 0, N
    return max(0, lo - pad), min(N, hi + pad)


def plot_io(inputs: torch.Tensor, targets: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor,
            path: str | os.PathLike, title: str = "") -> Path:
    """Inputs (T, I), targets (T, O) and outputs in [0, 1] (T, O) of one sequence as three heat maps."""
    fig, axes = plt.subplots(3, 1, figsize=(max(6, inputs.shape[0] * 0.12 + 2), 6), sharex=True,
                             constrained_layout=True)
    T = inputs.shape[0]
    scored = mask.nonzero().flatten()
    for ax, data, name in zip(axes, (inputs, targets, outputs), ("inputs", "targets", "outputs")):
        image = ax.imshow(data.t().numpy(), aspect="auto", cmap="gray_r", vmin=0, vmax=1, interpolation="nearest",
                          extent=(-0.5, T - 0.5, data.shape[1] - 0.5, -0.5))
        ax.set_ylabel(f"{name}\nchannel")
        if name != "inputs" and scored.numel():
            ax.axvspan(int(scored.min()) - 0.5, int(scored.max()) + 0.5, color="tab:orange", alpha=0.12, lw=0)
    fig.colorbar(image, ax=axes, shrink=0.6, label="value (outputs: sigmoid)")
    axes[-1].set_xlabel("time step (shaded: scored steps)")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_weights(read_weights: torch.Tensor, write_weights: torch.Tensor, path: str | os.PathLike,
                 title: str = "") -> Path:
    """Write then read weightings of one sequence, each (T, heads, N), as heat maps of location over time.

    Only the locations the heads use are shown (``used_slots``); the y axis keeps the true indices.
    """
    panels = [(f"write head {h}", write_weights[:, h]) for h in range(write_weights.shape[1])]
    panels += [(f"read head {h}", read_weights[:, h]) for h in range(read_weights.shape[1])]
    lo, hi = used_slots(torch.cat([write_weights, read_weights], dim=1))
    T = read_weights.shape[0] if read_weights.numel() else write_weights.shape[0]
    height = min(4.0, max(1.8, (hi - lo) * 0.08))
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, T * 0.12 + 2), height * len(panels) + 0.8),
                             sharex=True, squeeze=False, constrained_layout=True)
    for ax, (name, w) in zip(axes[:, 0], panels):
        image = ax.imshow(w[:, lo:hi].t().numpy(), aspect="auto", cmap="magma", vmin=0, vmax=1,
                          interpolation="nearest", origin="lower", extent=(-0.5, T - 0.5, lo - 0.5, hi - 0.5))
        ax.set_ylabel(f"{name}\nlocation")
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.6, label="weight")
    axes[-1, 0].set_xlabel("time step")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def plot_checkpoint(checkpoint: str | os.PathLike, *, length: int | None = None, seed: int = 0,
                    out: str | os.PathLike | None = None, backend: str = "auto") -> list[Path]:
    """Run the checkpoint on one fresh sequence, on the CPU, and write ``io.png`` and ``weights.png`` to ``out``.

    ``length`` sets the task's length knob as in ``fastntm eval`` (default: the training
    maximum); ``out`` defaults to the checkpoint's ``plots`` folder; ``backend`` as in ``FastNTM``.
    """
    model, task, saved = load_model(checkpoint, "cpu", backend=backend)
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else Path(checkpoint).parent
    out = Path(out) if out is not None else folder / "plots"
    overrides = length_overrides(task, max_length(task) if length is None else length)
    batch = task.batch(1, torch.Generator().manual_seed(seed), **overrides)
    with model.record() as trace:
        logits, _ = model(batch.inputs)
    cost = task.cost(logits, batch)
    title = f"{task.name}, step {saved.get('step', '?')}, {_describe(overrides)}: cost {cost:.3g} bits"
    return [
        plot_io(batch.inputs[:, 0], batch.targets[:, 0], torch.sigmoid(logits[:, 0]), batch.mask[:, 0],
                out / "io.png", title),
        plot_weights(trace.read_weights[:, 0], trace.write_weights[:, 0], out / "weights.png", title),
    ]


def _describe(overrides: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in overrides.items())
