"""Launched by tests/test_distributed.py under torchrun: train a few steps, save this rank's parameters."""

import sys
from pathlib import Path

import torch

from fastntm.training import TrainConfig, Trainer, shutdown_distributed

CONFIG = dict(
    task="copy",
    task_args={"max_len": 4},
    model_args={"memory_slots": 16, "memory_width": 6, "controller_size": 16},
    steps=4,
    batch_size=8,
    lr=3e-3,
    eval_every=2,
    eval_batches=1,
    eval_batch_size=4,
    device="cpu",
)

if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(**CONFIG), out / "run", progress=False)
    trainer.fit()
    torch.save(trainer.model.state_dict(), out / f"params_rank{trainer.dist.rank}.pt")
    shutdown_distributed()
