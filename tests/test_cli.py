"""The ``fastntm`` command and the training loop behind it, on tiny models (the whole file runs in seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fastntm import training
from fastntm.cli import main
from fastntm.tasks import TASKS, make_task
from fastntm.training import TrainConfig, Trainer, evaluate, load_model, masked_bce

from helpers import compile_model_steps_cheaply

TINY = {"memory_slots": 8, "memory_width": 4, "controller_size": 8}
TINY_FLAGS = ["--memory-slots", "8", "--memory-width", "4", "--controller-size", "8"]
FAST = ["--eval-every", "2", "--eval-batches", "1", "--eval-batch-size", "2", "--batch-size", "2", "--no-progress"]


def tiny_config(**kwargs) -> TrainConfig:
    defaults = dict(task="copy", task_args={"max_len": 6}, model_args=TINY, batch_size=3, eval_every=2,
                    eval_batches=1, eval_batch_size=2, device="cpu")
    return TrainConfig(**{**defaults, **kwargs})


@pytest.fixture
def trained(tmp_path):
    out = tmp_path / "run"
    assert main(["train", "copy", "--steps", "3", "--out", str(out), "--max-len", "5", *TINY_FLAGS, *FAST]) == 0
    return out


def test_train_smoke_writes_checkpoint_and_log(trained, capsys):
    assert {"model.safetensors", "config.json", "trainer_state.pt", "log.csv"} <= {p.name for p in trained.iterdir()}
    saved = json.loads((trained / "config.json").read_text())
    assert saved["model"]["memory_slots"] == 8 and saved["model"]["input_size"] == 9
    assert saved["task"] == {"name": "copy", "args": {"bits": 8, "min_len": 1, "max_len": 5}}
    assert saved["training"]["steps"] == 3 and saved["step"] == 3
    assert saved["training"]["cuda_graph"] is False
    rows = (trained / "log.csv").read_text().splitlines()
    assert rows[0] == "step,sequences,loss,cost,eval_cost,curriculum,elapsed_s"
    assert rows[1].startswith("2,4,")
    assert not list(trained.glob(".*.tmp"))
    # safetensors' save_file made the weights owner-only (0600) whatever the umask; each file now takes it alike.
    assert len({(trained / name).stat().st_mode & 0o777 for name in ("model.safetensors", "config.json")}) == 1


def test_checkpoint_round_trip_gives_the_same_outputs(tmp_path):
    trainer = Trainer(tiny_config(steps=2), tmp_path, progress=False)
    trainer.fit()
    model, task, saved = load_model(tmp_path / "model.safetensors")
    assert saved["task"]["name"] == "copy"
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    batch = task.batch(2, torch.Generator().manual_seed(0))
    assert torch.equal(model(batch.inputs)[0], trainer.model.eval()(batch.inputs)[0])


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_resume_continues_exactly(tmp_path, optimizer):
    # Curriculum threshold high so that the curriculum grows mid-run; the split at step 3
    # falls inside an eval window, so the window sums must survive the checkpoint too.
    config = dict(optimizer=optimizer, curriculum=True, curriculum_start=2, curriculum_step=2, curriculum_threshold=1e9)
    Trainer(tiny_config(steps=6, **config), tmp_path / "whole", progress=False).fit()
    Trainer(tiny_config(steps=3, **config), tmp_path / "split", progress=False).fit()
    resumed = Trainer.resume(tmp_path / "split", progress=False, steps=6)
    assert resumed.step == 3
    resumed.fit()
    whole = load_file(tmp_path / "whole" / "model.safetensors")
    split = load_file(tmp_path / "split" / "model.safetensors")
    for name in whole:
        assert torch.equal(whole[name], split[name]), name
    a = torch.load(tmp_path / "whole" / "trainer_state.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "trainer_state.pt", weights_only=True)
    assert a["curriculum_max"] == b["curriculum_max"] == 6
    assert torch.equal(a["data_rng"], b["data_rng"])
    drop_time = lambda p: [r.rsplit(",", 1)[0] for r in p.read_text().splitlines()]  # noqa: E731
    assert drop_time(tmp_path / "whole" / "log.csv") == drop_time(tmp_path / "split" / "log.csv")


def test_cli_resume_extends_the_step_count(trained, capsys):
    assert main(["train", "copy", "--out", str(trained), "--resume", "--steps", "5", "--no-progress"]) == 0
    assert json.loads((trained / "config.json").read_text())["step"] == 5
    assert "step 5," in capsys.readouterr().out


def test_resume_refuses_another_optimizer(trained, capsys):
    assert main(["train", "copy", "--out", str(trained), "--resume", "--steps", "5", "--optimizer", "adam",
                 "--no-progress"]) == 2
    assert "cannot change optimizer when resuming" in capsys.readouterr().err


def test_resume_takes_model_flags_given_at_their_defaults(trained, capsys):
    # config.json records only the model flags given; these defaults were refused as "(saved None)".
    assert main(["train", "copy", "--out", str(trained), "--resume", "--steps", "4", "--controller", "lstm",
                 "--memory-dtype", "float32", "--memory-slots", "8", "--no-progress"]) == 0
    assert main(["train", "copy", "--out", str(trained), "--resume", "--controller", "mlp", "--no-progress"]) == 2
    assert "cannot change the model: controller='mlp' (saved 'lstm')" in capsys.readouterr().err


def test_resume_refuses_another_seed(trained, capsys):
    # The seed was taken, and written to config.json, while the saved data stream went on unchanged.
    assert main(["train", "copy", "--out", str(trained), "--resume", "--steps", "5", "--seed", "7",
                 "--no-progress"]) == 2
    assert "cannot change seed when resuming: saved 0" in capsys.readouterr().err
    assert json.loads((trained / "config.json").read_text())["training"]["seed"] == 0


def test_resume_with_a_lower_target_trains_on(tmp_path):
    # A run that met a target of 1000 bits was reported as meeting 0 or 0.001 at once, with no step taken.
    Trainer(tiny_config(steps=10, target_cost=1000.0, target_patience=1), tmp_path, progress=False).fit()
    # Evaluations below 1000 are below 2000 too: that count stands.
    assert Trainer.resume(tmp_path, progress=False, target_cost=2000.0).evals_below_target == 1
    result = Trainer.resume(tmp_path, progress=False, target_cost=0.0).fit()
    assert result.step == 10 and not result.reached_target


def test_a_fresh_run_replaces_the_log_of_one_stopped_before_its_first_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    step = Trainer.train_step

    def interrupted(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny_config(steps=6), out, progress=False).fit()
    assert not (out / "trainer_state.pt").exists() and (out / "log.csv").is_file()
    monkeypatch.undo()
    Trainer(tiny_config(steps=6), out, progress=False).fit()
    steps = [line.split(",")[0] for line in (out / "log.csv").read_text().splitlines()[1:]]
    assert steps == ["2", "4", "6"]  # was 2, 4, 2, 4, 6


@pytest.mark.parametrize(
    "name, damage, message",
    [
        ("model.safetensors", b"\x00" * 10, "model.safetensors is damaged"),
        ("config.json", b'{"task": ', "config.json is damaged"),
        ("config.json", b"{}", "is not the config.json of a fastntm run"),
    ],
    ids=["weights", "config-cut", "config-empty"],
)
@pytest.mark.parametrize("command", ["eval", "plot", "resume"])
def test_a_damaged_checkpoint_is_a_one_line_error(trained, capsys, command, name, damage, message):
    # Once tracebacks (SafetensorError, KeyError) or a JSON error that named no file.
    (trained / name).write_bytes(damage)
    argv = {"eval": ["eval", str(trained)], "plot": ["plot", str(trained)],
            "resume": ["train", "copy", "--out", str(trained), "--resume", "--steps", "5", "--no-progress"]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_a_damaged_trainer_state_is_a_one_line_error(trained, capsys):
    (trained / "trainer_state.pt").write_bytes(b"")  # was an EOFError traceback
    assert main(["train", "copy", "--out", str(trained), "--resume", "--steps", "5", "--no-progress"]) == 2
    assert "trainer_state.pt is damaged: EOFError" in capsys.readouterr().err


def test_cuda_graph_is_refused_on_the_cpu(tmp_path, capsys):
    assert main(["train", "copy", "--cuda-graph", "--device", "cpu", "--out", str(tmp_path / "run"), *FAST]) == 2
    assert "--cuda-graph (cuda_graph=True) captures the step in a CUDA graph and needs a CUDA device, got cpu" in (
        capsys.readouterr().err)
    assert not (tmp_path / "run").exists()


def test_a_cuda_graph_run_resumes_on_the_cpu_without_the_flag(trained, capsys):
    # Make the CPU run look like a --cuda-graph run: the flag in its config, its optimiser state capturable.
    config = json.loads((trained / "config.json").read_text())
    config["training"]["cuda_graph"] = True
    (trained / "config.json").write_text(json.dumps(config))
    state = torch.load(trained / "trainer_state.pt", weights_only=False)
    for group in state["optimizer"]["param_groups"]:
        group["capturable"] = True
    torch.save(state, trained / "trainer_state.pt")
    assert main(["train", "copy", "--out", str(trained), "--resume", "--steps", "4", "--no-progress"]) == 2
    assert "--no-cuda-graph" in capsys.readouterr().err
    assert main(["train", "copy", "--out", str(trained), "--resume", "--steps", "4", "--no-cuda-graph",
                 "--no-progress"]) == 0
    saved = json.loads((trained / "config.json").read_text())
    assert saved["step"] == 4 and saved["training"]["cuda_graph"] is False


@pytest.mark.parametrize("optimizer, setting", [("adam", "fused"), ("sgd", "fused"), ("rmsprop", "foreach")])
def test_the_trainers_optimizers_take_their_fast_step_on_the_cpu(tmp_path, optimizer, setting):
    trainer = Trainer(tiny_config(steps=2, optimizer=optimizer), tmp_path, progress=False)
    assert trainer.optimizer.param_groups[0][setting] is True
    trainer.fit()
    assert Trainer.resume(tmp_path, progress=False).optimizer.param_groups[0][setting] is True


def test_inconsistent_checkpoint_is_refused(tmp_path):
    trainer = Trainer(tiny_config(steps=2), tmp_path, progress=False)
    trainer.fit()
    state = torch.load(tmp_path / "trainer_state.pt", weights_only=False)
    state["step"] = 1
    torch.save(state, tmp_path / "trainer_state.pt")
    with pytest.raises(RuntimeError, match="inconsistent"):
        Trainer.resume(tmp_path, progress=False)


def test_eval_prints_a_table_and_writes_json(trained, capsys):
    assert main(["eval", str(trained / "model.safetensors"), "--lengths", "3,7", "--batches", "1",
                 "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    lines = [line.split() for line in out.splitlines()]
    assert [line[0] for line in lines if line and line[0] in ("train", "3", "7")] == ["train", "3", "7"]
    report = json.loads((trained / "eval.json").read_text())
    assert [row["length"] for row in report["rows"]] == ["train", "3", "7"]
    assert all(row["cost"] >= 0 for row in report["rows"])


def test_eval_of_repeat_copy_fixes_the_repeat_counts_given(tmp_path, trained, capsys, monkeypatch):
    run = tmp_path / "repeat"
    assert main(["train", "repeat_copy", "--steps", "1", "--out", str(run), "--max-len", "3", "--max-repeats", "2",
                 *TINY_FLAGS, *FAST]) == 0
    overrides, evaluate = [], training.evaluate
    monkeypatch.setattr(training, "evaluate", lambda *a, **kw: overrides.append(kw) or evaluate(*a, **kw))
    assert main(["eval", str(run), "--lengths", "2,3", "--repeats", "1,4", "--batches", "1", "--batch-size",
                 "2"]) == 0
    assert [(kw.get("length"), kw.get("repeats")) for kw in overrides] == [
        (None, None), (2, 1), (2, 4), (3, 1), (3, 4)]
    rows = json.loads((run / "eval.json").read_text())["rows"]
    assert [(row["length"], row.get("repeats")) for row in rows] == [
        ("train", None), ("2", 1), ("2", 4), ("3", 1), ("3", 4)]
    assert "repeats" in capsys.readouterr().out
    assert main(["eval", str(trained), "--repeats", "2"]) == 2
    assert "--repeats applies to repeat_copy only" in capsys.readouterr().err


def test_eval_of_ngrams_reports_the_optimal_cost(tmp_path, capsys):
    Trainer(tiny_config(task="ngrams", task_args={"length": 12}, steps=1), tmp_path, progress=False).fit()
    assert main(["eval", str(tmp_path), "--lengths", "10", "--batches", "1", "--batch-size", "2"]) == 0
    assert "optimal" in capsys.readouterr().out
    assert all("optimal_cost" in row for row in json.loads((tmp_path / "eval.json").read_text())["rows"])


def test_plot_writes_nonempty_pngs(trained, tmp_path, capsys):
    assert main(["plot", str(trained), "--length", "4", "--out", str(tmp_path / "plots")]) == 0
    for name in ("io.png", "weights.png"):
        data = (tmp_path / "plots" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000


def test_version(capsys):
    from importlib.metadata import version

    from fastntm import __version__

    assert __version__ == version("fastntm")  # pyproject.toml's, as installed
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastntm {__version__} (torch {torch.__version__})"


@pytest.mark.parametrize("cores, local_ranks, omp, threads", [
    (1, None, None, 1), (2, None, None, 2), (64, None, None, 2), (4, "2", None, 2), (4, "4", None, 1),
    (4, "8", None, 1), (4, "x", None, 2), (4, None, "1", 1), (4, None, "3", 2), (4, None, "", 2), (4, None, "0", 2)])
def test_threads_default_to_two_of_this_processs_cores(monkeypatch, cores, local_ranks, omp, threads):
    from fastntm import cli

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    for name, value in (("LOCAL_WORLD_SIZE", local_ranks), ("OMP_NUM_THREADS", omp)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert cli.default_threads() == threads
    assert cli.build_parser().parse_args(["eval", "runs/x"]).threads == threads


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "nosuchtask"], "invalid choice"),
        (["train", "copy", "--lr", "-1"], "positive number"),
        (["train", "copy", "--steps", "0"], "positive integer"),
        (["train", "copy", "--optimizer", "lbfgs"], "invalid choice"),
        (["eval", "x", "--lengths", "20,abc"], "comma-separated"),
        (["train", "copy", "--seed", str(2**64 - 1)], "argument --seed: expected an integer in [-2**63, 2**64 - 2]"),
        (["eval", "x", "--seed", str(2**64)], "argument --seed: expected an integer in [-2**63, 2**64 - 1]"),
        (["train", "copy", "--out", ""], "argument --out: expected a path, not an empty string"),  # was "."
    ],
    ids=["task", "lr", "steps", "optimizer", "lengths", "train-seed", "eval-seed", "empty-out"],
)
def test_bad_arguments_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_eval_and_plot_take_the_generators_largest_seed(trained, tmp_path, capsys):
    # Training seeds its data with seed + 1, so its --seed stops one short of 2**64 - 1; eval and plot do not.
    seed = str(2**64 - 1)
    assert main(["eval", str(trained), "--lengths", "3", "--batches", "1", "--batch-size", "2", "--seed", seed,
                 "--out", str(tmp_path / "eval.json")]) == 0
    assert main(["plot", str(trained), "--seed", seed, "--out", str(tmp_path / "plots")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["seed"] == 2**64 - 1


def test_ctrl_c_in_training_is_one_line_saying_how_to_go_on(trained, tmp_path, monkeypatch, capsys):
    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "train_step", interrupted)
    capsys.readouterr()
    assert main(["train", "copy", "--out", str(tmp_path / "new"), *TINY_FLAGS, *FAST]) == 130
    assert capsys.readouterr().err == "fastntm train: interrupted; no checkpoint was written yet\n"
    assert main(["train", "copy", "--out", str(trained), "--resume", "--steps", "9", "--no-progress"]) == 130
    assert capsys.readouterr().err == ("fastntm train: interrupted; to continue from the last checkpoint: "
                                       f"fastntm train copy --out {trained} --resume\n")


@pytest.mark.parametrize("world_size, rank, printed", [("2", "1", False), ("2", "0", True), ("1", "1", True)],
                         ids=["torchrun-rank-1", "torchrun-rank-0", "alone-with-a-stray-RANK"])
def test_ctrl_c_under_torchrun_is_one_line_from_rank_0_alone(tmp_path, monkeypatch, capsys, world_size, rank, printed):
    from fastntm import cli

    def interrupted(args):  # the command, stopped before it joins any process group
        raise KeyboardInterrupt("no checkpoint was written yet")

    monkeypatch.setattr(cli, "run_train", interrupted)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    monkeypatch.setenv("RANK", rank)
    assert main(["train", "copy", "--out", str(tmp_path / "new"), *TINY_FLAGS, *FAST]) == 130
    line = "fastntm train: interrupted; no checkpoint was written yet\n"
    assert capsys.readouterr().err == (line if printed else "")


def test_errors_after_parsing_are_one_line(tmp_path, trained, capsys):
    assert main(["train", "copy", "--min-repeats", "2", "--out", str(tmp_path / "new")]) == 2
    assert "--min-repeats does not apply to task copy" in capsys.readouterr().err
    assert main(["train", "copy", "--out", str(trained)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "copy", "--out", str(trained), "--resume", "--memory-slots", "16"]) == 2
    assert "cannot change the model" in capsys.readouterr().err
    assert main(["train", "copy", "--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "none")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_output_paths_blocked_by_a_file_fail_before_any_work(tmp_path, trained, capsys):
    # Once tracebacks: train and plot at mkdir, eval at writing eval.json after the whole evaluation.
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "copy", "--out", str(blocker / "run"), "--steps", "1", *TINY_FLAGS, *FAST]) == 2
    assert f"cannot write to {blocker / 'run'}: {blocker} is a file, not a folder" in capsys.readouterr().err
    assert main(["plot", str(trained), "--out", str(blocker)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["eval", str(trained), "--out", str(blocker / "eval.json")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert main(["eval", str(trained), "--out", str(tmp_path)]) == 2
    assert "is a folder; give the JSON file to write" in capsys.readouterr().err
    # A folder that takes no new files (/proc refuses them even to root, who passes every permission check)
    for argv in (["train", "copy", "--out", "/proc/fastntm-run", "--steps", "1", *TINY_FLAGS, *FAST],
                 ["eval", str(trained), "--out", "/proc/fastntm-eval.json"],
                 ["plot", str(trained), "--out", "/proc/fastntm-plots"]):
        assert main(argv) == 2, argv[0]
        assert "cannot write to /proc" in capsys.readouterr().err, argv[0]
    before = set(tmp_path.iterdir())
    out = tmp_path / "new" / "eval.json"
    assert main(["eval", str(trained), "--out", str(out), "--batches", "1", "--batch-size", "2", "--lengths", "2"]) == 0
    assert json.loads(out.read_text())["rows"]
    # The folder check's probe file in tmp_path is gone.
    assert set(tmp_path.iterdir()) - before == {tmp_path / "new"} and list(out.parent.iterdir()) == [out]


def test_no_arguments_print_help(capsys):
    assert main([]) == 0
    assert "usage: fastntm" in capsys.readouterr().out


def test_python_dash_m_fastntm_help():
    done = subprocess.run([sys.executable, "-m", "fastntm", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert "train" in done.stdout and "eval" in done.stdout and "plot" in done.stdout


def test_masked_bce_sums_bits_and_scored_steps_and_averages_sequences():
    task = make_task("copy")
    batch = task.batch(4, torch.Generator().manual_seed(0), length=3)
    logits = torch.zeros_like(batch.targets)
    # Every scored bit costs log 2 at logit 0: 3 steps x 8 bits per sequence.
    assert masked_bce(logits, batch).item() == pytest.approx(24 * torch.log(torch.tensor(2.0)).item())


@pytest.mark.parametrize("name", sorted(TASKS))
def test_each_task_trains_a_few_steps(tmp_path, name):
    small = {"copy": {"max_len": 4}, "repeat_copy": {"max_len": 3, "max_repeats": 2},
             "associative_recall": {"max_items": 3}, "ngrams": {"length": 12},
             "priority_sort": {"num_items": 4, "num_outputs": 3}}[name]
    trainer = Trainer(tiny_config(task=name, task_args=small, steps=2), tmp_path, progress=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    result = trainer.fit()
    assert result.step == 2 and result.eval_cost is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    cost = evaluate(trainer.model, trainer.task, batches=1, batch_size=2, seed=0)
    assert cost >= 0


def test_backend_is_a_training_choice_that_checkpoints_do_not_keep(tmp_path, monkeypatch):
    """``--backend compiled`` trains and evaluates through torch.compile (here ``aot_eager``'s graphs: Inductor's
    are tests/test_compiled.py's); the checkpoint loads with the default backend."""
    graphs = compile_model_steps_cheaply(monkeypatch)
    out = tmp_path / "run"
    flags = ["--memory-slots", "16", "--memory-width", "4", "--controller-size", "8", "--batch-size", "2",
             "--eval-batch-size", "2", "--eval-every", "2", "--eval-batches", "1", "--no-progress"]
    assert main(["train", "copy", "--steps", "2", "--max-len", "3", "--backend", "compiled", "--out", str(out),
                 *flags]) == 0
    assert len(graphs) == 2  # training's and evaluation's (no-grad) steps
    saved = json.loads((out / "config.json").read_text())
    assert saved["training"]["backend"] == "compiled" and "backend" not in saved["model"]
    assert json.loads((out / "log.csv").read_text().splitlines()[1].split(",")[4]) >= 0  # an eval cost
    model, _, _ = load_model(out)
    assert model.cell.backend == "auto"
    assert Trainer.resume(out, progress=False, backend="reference").model.cell.backend == "reference"


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="fast"), "backend must be one of"),
    (dict(model_args={**TINY, "backend": "reference"}), "model_args must not hold 'backend'"),
    (dict(backend="compiled", cuda_graph=True), "choose one"),
])
def test_a_bad_backend_choice_is_refused_naming_it(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


def interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("renames_done", [None, 0, 1, 2], ids=["while-writing", "before-renames", "after-weights",
                                                                "after-config"])
def test_an_interrupted_save_leaves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch, renames_done):
    # The three files were each replaced in turn: stopped between two, the step-2 weights were gone and the
    # step-4 ones refused beside the step-2 state.
    Trainer(tiny_config(steps=4), tmp_path / "whole", progress=False).fit()
    out = tmp_path / "split"
    Trainer(tiny_config(steps=2), out, progress=False).fit()
    trainer = Trainer.resume(out, progress=False, steps=4)
    if renames_done is None:
        monkeypatch.setattr(torch, "save", interrupt)
    else:
        replace, calls = os.replace, []

        def interrupted(*args):
            calls.append(args)
            (interrupt if len(calls) > renames_done else replace)(*args)

        monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.undo()
    resumed = Trainer.resume(out, progress=False, steps=4)
    assert resumed.step == (4 if renames_done else 2)  # the new set once its first file is in place
    assert not list(out.glob(".*.tmp"))
    resumed.fit()
    whole, split = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    for name in whole:
        assert torch.equal(whole[name], split[name]), name


def test_a_first_save_stopped_between_its_renames_resumes_from_the_command_line(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replace if dst.name == "model.safetensors" else interrupt)(
        src, dst))
    assert main(["train", "copy", "--steps", "2", "--out", str(out), *TINY_FLAGS, *FAST]) == 130
    monkeypatch.undo()
    assert (out / "model.safetensors").is_file() and not (out / "trainer_state.pt").exists()
    assert main(["train", "copy", "--steps", "2", "--out", str(out), *TINY_FLAGS, *FAST]) == 2
    assert "already holds a checkpoint; pass --resume" in capsys.readouterr().err
    assert main(["train", "copy", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "step 2," in capsys.readouterr().out


def test_resume_loads_no_pickled_code(trained, capsys):
    # trainer_state.pt was unpickled with weights_only=False: a crafted file ran its code at --resume.
    marker = trained / "ran"

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    state = torch.load(trained / "trainer_state.pt", weights_only=True)
    torch.save({**state, "payload": Payload()}, trained / "trainer_state.pt")
    assert main(["train", "copy", "--out", str(trained), "--resume", "--steps", "5", "--no-progress"]) == 2
    assert "trainer_state.pt is damaged: UnpicklingError" in capsys.readouterr().err
    assert not marker.exists()


def test_a_dtype_and_numpy_integers_in_the_args_are_kept_as_json_and_build_the_same_run(tmp_path):
    # Both failed at the first checkpoint, after the training, leaving weights without a config.json.
    config = tiny_config(steps=1, model_args={**TINY, "memory_dtype": torch.bfloat16},
                         task_args={"max_len": np.int64(5)})
    assert config.model_args["memory_dtype"] == "bfloat16" and type(config.task_args["max_len"]) is int
    Trainer(config, tmp_path, progress=False).fit()
    model, task, _ = load_model(tmp_path)
    assert model.cell.memory_dtype == torch.bfloat16 and task.max_len == 5
    with pytest.raises(ValueError, match=r"task_args\['max_len'\] = .* cannot be written to config.json"):
        tiny_config(task_args={"max_len": object()})


def test_a_new_trainer_refuses_a_folder_that_holds_a_run(tmp_path):
    # It replaced the step-2 checkpoint and emptied the log.
    Trainer(tiny_config(steps=2), tmp_path, progress=False).fit()
    log = (tmp_path / "log.csv").read_text()
    with pytest.raises(FileExistsError, match=f"{tmp_path} already holds a run's checkpoint.*Trainer.resume"):
        Trainer(tiny_config(steps=1), tmp_path, progress=False).fit()
    assert (tmp_path / "log.csv").read_text() == log
    assert json.loads((tmp_path / "config.json").read_text())["step"] == 2


def test_a_trainer_fits_again_over_its_own_checkpoint(tmp_path):
    trainer = Trainer(tiny_config(steps=2), tmp_path, progress=False)
    trainer.fit()
    trainer.config.steps = 4
    assert trainer.fit().step == 4


def test_resume_takes_task_and_model_args_equal_to_the_saved_ones(trained):
    # Once refused: the saved {} (the defaults) compared unequal to the defaults given by name.
    saved = json.loads((trained / "config.json").read_text())["training"]
    task_args = {**saved["task_args"], "bits": 8}
    model_args = {**saved["model_args"], "controller": "lstm"}
    resumed = Trainer.resume(trained, progress=False, task_args=task_args, model_args=model_args)
    assert resumed.step == 3
    with pytest.raises(ValueError, match="cannot change task_args when resuming"):
        Trainer.resume(trained, progress=False, task_args={**saved["task_args"], "bits": 6})


def test_resume_refuses_unknown_overrides(trained):
    # Both were dropped, and the run went on with steps=3 and lr=0.001.
    for name in ("stepz", "learning_rate"):
        with pytest.raises(ValueError, match=f"unknown override: {name} .*steps, batch_size, lr,"):
            Trainer.resume(trained, progress=False, **{name: 10})
    with pytest.raises(ValueError, match="unknown TrainConfig field: stepz"):
        TrainConfig.from_dict({"stepz": 10})


def test_resume_refuses_steps_below_the_checkpoints(trained, capsys):
    # It trained nothing and reported the old step as if done.
    assert main(["train", "copy", "--out", str(trained), "--resume", "--steps", "2", "--no-progress"]) == 2
    assert "steps=2 is below the checkpoint's step 3" in capsys.readouterr().err


def test_a_resume_that_fails_leaves_torchs_global_rng_as_it_was(trained):
    # A trainer seeds torch's RNG as it builds the model; a failed resume had reseeded the caller's.
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match="below the checkpoint's step"):
        Trainer.resume(trained, progress=False, steps=2)
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("argv, message", [
    (["ngrams", "--curriculum"], "curriculum=True (--curriculum) applies to copy, repeat_copy, associative_recall, "
                                 "not to ngrams"),
    (["copy", "--curriculum-start", "3"], "curriculum_start=3 (--curriculum-start): no effect without curriculum=True"),
    (["copy", "--curriculum-threshold", "0.3"], "curriculum_threshold=0.3 (--curriculum-threshold): no effect"),
], ids=["task-without-one", "start-without-curriculum", "threshold-without-curriculum"])
def test_curriculum_flags_that_cannot_apply_are_refused(tmp_path, capsys, argv, message):
    # Each was ignored while config.json recorded it.
    assert main(["train", *argv, "--steps", "1", "--out", str(tmp_path / "run"), *TINY_FLAGS, *FAST]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_no_curriculum_on_resume_drops_the_saved_curriculum_settings(tmp_path):
    Trainer(tiny_config(steps=2, curriculum=True, curriculum_start=2), tmp_path, progress=False).fit()
    resumed = Trainer.resume(tmp_path, progress=False, steps=3, curriculum=False)
    assert resumed.curriculum_max is None and resumed.config.curriculum_start is None


def test_triton_on_the_cpu_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    # It was a traceback at the first step, after the output folder was made.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["train", "copy", "--backend", "triton", "--device", "cpu", "--steps", "1", "--out",
                 str(tmp_path / "run"), *TINY_FLAGS, *FAST]) == 2
    err = capsys.readouterr().err
    assert "backend='triton' runs on CUDA tensors, got tensors on cpu" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(eval_seed="x"), r"eval_seed must be an integer in \[-2\*\*63, 2\*\*64 - 1\], got 'x'"),
    (dict(eval_seed=2**64), "eval_seed must be an integer"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=2**64 - 1), r"seed must be an integer in \[-2\*\*63, 2\*\*64 - 2\]"),
    (dict(lr="0.1"), "lr must be a positive finite number"),
    (dict(curriculum="no"), "curriculum must be True or False"),
    (dict(curriculum=True, curriculum_step=0.5), "curriculum_step must be a positive integer or None"),
    (dict(curriculum=True, curriculum_start=0), "curriculum_start must be a positive integer or None"),
    (dict(curriculum=True, curriculum_threshold=-1.0), "curriculum_threshold must be >= 0"),
    (dict(model_args={**TINY, "batch_first": True}), "model_args must not hold 'batch_first'"),
    (dict(model_args={"memory_slot": 4}), "model_args has 'memory_slot', not among the FastNTM arguments"),
    # Clamped to the task's range without a word, which trained without a curriculum:
    (dict(curriculum=True, curriculum_start=7), r"curriculum_start \(--curriculum-start\) must lie within the task's "
                                                r"min_len and max_len, \[1, 6\], got 7"),
    (dict(task_args={"length": 5}), "task copy takes no argument 'length'; its arguments: bits, min_len, max_len"),
    # Accepted, then refused by Trainer(...):
    (dict(model_args={"memory_slots": 8.0}), "model_args: memory_slots must be a positive int, got 8.0"),
    (dict(model_args={"controller": "gru"}), "model_args: controller must be one of"),
], ids=["eval_seed-str", "eval_seed-too-big", "seed-float", "seed-too-big", "lr-str", "curriculum-str",
        "curriculum_step-float", "curriculum_start-0", "curriculum_threshold-negative", "batch_first", "unknown-arg",
        "curriculum_start-past-the-task", "unknown-task-arg", "model-size-float", "model-controller"])
def test_bad_config_values_are_refused_naming_the_field(kwargs, message):
    # Each failed late (at the first evaluation, mid-run, in Trainer.__init__) naming no field, or never.
    with pytest.raises(ValueError, match=message):
        tiny_config(**kwargs)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "trainer_state.pt", "log.csv"])
def test_eval_refuses_to_write_over_the_runs_own_files(trained, capsys, name):
    before = (trained / name).read_bytes()
    assert main(["eval", str(trained), "--out", str(trained / name), "--batches", "1", "--batch-size", "2"]) == 2
    assert "is one of the run's own files" in capsys.readouterr().err
    assert (trained / name).read_bytes() == before


def test_evaluate_refuses_zero_batches(trained):
    model, task, _ = load_model(trained)
    with pytest.raises(ValueError, match="batches must be a positive integer, got 0"):  # was ZeroDivisionError
        evaluate(model, task, batches=0, batch_size=2, seed=0)


def test_a_run_that_ends_between_evaluations_reports_its_final_weights(tmp_path):
    # eval_cost was the step-2 evaluation's; the extra one writes no log row.
    trainer = Trainer(tiny_config(steps=3), tmp_path, progress=False)
    result = trainer.fit()
    assert result.eval_cost == trainer.evaluate()
    assert [line.split(",")[0] for line in (tmp_path / "log.csv").read_text().splitlines()[1:]] == ["2"]
    Trainer(tiny_config(steps=1), tmp_path / "short", progress=False).fit()  # shorter than eval_every: no log was written
    assert (tmp_path / "short" / "log.csv").read_text() == "step,sequences,loss,cost,eval_cost,curriculum,elapsed_s\n"


def test_a_resume_of_a_run_that_reached_its_target_says_why_no_step_runs(tmp_path, capsys):
    out = str(tmp_path / "run")
    target = ["--target-cost", "1000", "--target-patience", "1", "--eval-every", "1"]
    assert main(["train", "copy", "--steps", "2", "--out", out, *TINY_FLAGS, *FAST, *target]) == 0
    assert "(reached the target 1000)" in capsys.readouterr().out
    assert main(["train", "copy", "--out", out, "--resume", "--steps", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out  # was the summary line alone, at step 1
    assert "already reached its target (an eval cost below 1000 in its last 1 evaluations), so no step runs; " \
           "--target-cost 0 trains on" in printed and "step 1," in printed
    assert main(["train", "copy", "--out", out, "--resume", "--steps", "4", "--no-progress", "--target-cost", "0"]) == 0
    printed = capsys.readouterr().out
    assert "step 4, 8 sequences" in printed and "(no target)" in printed


def test_a_run_without_a_target_says_so(tmp_path, capsys):
    assert main(["train", "ngrams", "--steps", "1", "--length", "12", "--out", str(tmp_path / "run"), *TINY_FLAGS,
                 *FAST]) == 0
    assert "(no target)" in capsys.readouterr().out  # was "(did not reach the target 0)"


def test_a_folder_with_weights_but_no_trainer_state_is_named_as_such(trained, tmp_path, capsys):
    # A fresh run said "pass --resume", and --resume then said there was no checkpoint.
    (trained / "trainer_state.pt").unlink()
    assert main(["train", "copy", "--steps", "2", "--out", str(trained), *TINY_FLAGS, *FAST]) == 2
    assert "holds a model's files but not the trainer's state (trainer_state.pt), so it cannot be resumed" in (
        capsys.readouterr().err)


def test_a_config_of_another_version_is_a_one_line_error(trained, capsys):
    saved = json.loads((trained / "config.json").read_text())
    saved["model"]["bogus"] = 1  # a TypeError traceback from FastNTM.__init__
    (trained / "config.json").write_text(json.dumps(saved))
    for command in (["eval", str(trained), "--batches", "1"], ["plot", str(trained)]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "config.json does not describe a model and task that fastntm builds" in err and "'bogus'" in err
        assert len(err.splitlines()) == 1


def test_eval_and_plot_take_a_backend_and_refuse_a_bad_one_in_one_line(trained, tmp_path, monkeypatch, capsys):
    loaded = []
    monkeypatch.setattr(training, "load_model", lambda *args, **kwargs: loaded.append(load_model(*args, **kwargs))
                        or loaded[-1])
    assert main(["eval", str(trained), "--batches", "1", "--batch-size", "2", "--backend", "reference"]) == 0
    assert loaded[0][0].cell.backend == "reference"
    monkeypatch.undo()
    capsys.readouterr()
    monkeypatch.setenv("FASTNTM_BACKEND", "bogus")  # a traceback from the first step, after loading the model
    for command in (["eval", str(trained), "--batches", "1"], ["plot", str(trained), "--out", str(tmp_path / "p")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "FASTNTM_BACKEND must be one of" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_eval_names_the_step_of_the_weights_after_a_save_stopped_between_its_renames(tmp_path, monkeypatch, capsys):
    Trainer(tiny_config(steps=2), tmp_path, progress=False).fit()
    trainer = Trainer.resume(tmp_path, progress=False, steps=4)
    replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replace if dst.name == "model.safetensors" else interrupt)(
        src, dst))
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    monkeypatch.undo()
    assert json.loads((tmp_path / "config.json").read_text())["step"] == 2  # a save behind the weights
    assert main(["eval", str(tmp_path), "--batches", "1", "--batch-size", "2", "--lengths", "3"]) == 0
    assert "copy at step 4," in capsys.readouterr().out  # was step 2, of config.json
