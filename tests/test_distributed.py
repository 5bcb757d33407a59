"""Training under torchrun: two CPU processes (gloo) stay in lockstep and follow one process on the whole batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from fastntm.training import TrainConfig, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from ddp_worker import CONFIG  # noqa: E402

pytestmark = __import__("pytest").mark.slow


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "MASTER_", "LOCAL_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_two_processes_stay_identical_and_equal_one_process_on_the_combined_batch(tmp_path):
    done = torchrun(str(Path(__file__).parent / "ddp_worker.py"), str(tmp_path), cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    rank0 = torch.load(tmp_path / "params_rank0.pt")
    rank1 = torch.load(tmp_path / "params_rank1.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name

    torch.set_num_threads(1)
    single = Trainer(TrainConfig(**CONFIG), tmp_path / "single", progress=False)
    single.fit()
    for name, value in single.model.state_dict().items():
        torch.testing.assert_close(rank0[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert (tmp_path / "run" / "model.safetensors").is_file()


def test_console_command_under_torchrun_writes_one_checkpoint(tmp_path):
    done = torchrun(
        "-m", "fastntm", "train", "copy", "--steps", "2", "--batch-size", "4", "--eval-every", "1",
        "--eval-batches", "1", "--eval-batch-size", "2", "--memory-slots", "8", "--memory-width", "4",
        "--controller-size", "8", "--max-len", "3", "--device", "cpu", "--no-progress", "--out", "run",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "log.csv", "model.safetensors", "trainer_state.pt"]
    assert done.stdout.count("checkpoint in run") == 1
