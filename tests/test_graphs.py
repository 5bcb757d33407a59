"""``CapturedStep``: a training step captured in a CUDA graph and replayed.

Without a GPU: every refusal, and the benchmark cases' wiring. With one (``-m gpu``):
captured steps against the same steps run eagerly, and exact resume of a
``--cuda-graph`` run.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fastntm import FastNTM, validation
from fastntm import backend as backend_module
from fastntm.graphs import CapturedStep, _restore, _snapshot
from fastntm.tasks import Batch, make_task
from fastntm.training import TrainConfig, Trainer, _load_optimizer_state, masked_bce
from helpers import relative_error

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not part of the installed package

from benchmarks import host_overhead  # noqa: E402
from benchmarks.cases import GRAPH_PROVIDERS, Case  # noqa: E402
from benchmarks.run import build_cases  # noqa: E402
from benchmarks.shapes import TINY_OP_SHAPES, TINY_TRAIN_SHAPES  # noqa: E402

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def copy_loss(model, inputs, targets, mask):
    logits, _ = model(inputs)
    return masked_bce(logits, Batch(inputs, targets, mask)), logits


def tiny_model(device="cpu", **kwargs) -> FastNTM:
    torch.manual_seed(0)
    args = dict(memory_slots=8, memory_width=4, controller_size=8)
    return FastNTM(9, 8, **{**args, **kwargs}).to(device)


# ---------------------------------------------------------------- CapturedStep, on any machine


def test_a_model_on_the_cpu_is_refused():
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters(), capturable=True)
    with pytest.raises(ValueError, match="CapturedStep needs CUDA tensors, got cpu"):
        CapturedStep(model, optimizer, copy_loss)


def test_an_optimizer_without_capturable_is_refused_with_the_fix():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"Adam\(params, \.\.\., capturable=True\)"):
        CapturedStep(model, torch.optim.Adam(model.parameters()), copy_loss)


def test_sgd_has_no_capturable_option_and_passes_that_check():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        CapturedStep(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), copy_loss)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(model="not a module"), TypeError, "torch.nn.Module"),
        (dict(optimizer="not an optimizer"), TypeError, "torch.optim.Optimizer"),
        (dict(loss_fn=3), TypeError, "callable"),
        (dict(clip=-1.0), ValueError, "clip"),
        (dict(clip=math.nan), ValueError, "clip"),
        (dict(clip=True), ValueError, "clip"),
        (dict(warmup=0), ValueError, "warmup"),
    ],
    ids=["model", "optimizer", "loss_fn", "clip-negative", "clip-nan", "clip-bool", "warmup"],
)
def test_bad_arguments_are_named(change, error, message):
    model = tiny_model()
    args = dict(model=model, optimizer=torch.optim.Adam(model.parameters(), capturable=True), loss_fn=copy_loss)
    args.update(change)
    keywords = {k: args.pop(k) for k in ("clip", "warmup") if k in args}
    with pytest.raises(error, match=message):
        CapturedStep(args["model"], args["optimizer"], args["loss_fn"], **keywords)


def test_value_checks_are_refused_because_they_read_the_gpu_on_the_host(monkeypatch):
    monkeypatch.setenv("FASTNTM_CHECK_VALUES", "1")
    model = tiny_model()
    with pytest.raises(RuntimeError, match="FASTNTM_CHECK_VALUES"):
        CapturedStep(model, torch.optim.Adam(model.parameters(), capturable=True), copy_loss)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop", "sgd"])
def test_restoring_a_snapshot_undoes_steps_in_place(optimizer):
    # What makes the warm-up before a capture leave no trace.
    model = tiny_model()
    opt = {"adam": lambda p: torch.optim.Adam(p, lr=0.1),
           "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.1, momentum=0.9, centered=True),
           "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9)}[optimizer](model.parameters())
    batch = make_task("copy").batch(2, torch.Generator().manual_seed(0), length=2)

    def step():
        opt.zero_grad(set_to_none=True)
        copy_loss(model, *batch)[0].backward()
        opt.step()

    step()
    tensors = [*model.parameters(), *(v for s in opt.state.values() for v in s.values())]
    before = [t.detach().clone() for t in tensors]
    # A parameter whose first gradient comes after the snapshot: its state is created by
    # the steps undone, and must come back as a first step would find it.
    late = torch.nn.Parameter(torch.ones(3))
    opt.add_param_group({"params": [late]})
    saved = _snapshot(model, opt)

    def step_late():
        step()
        late.grad = torch.full_like(late, 0.5)
        opt.step()

    step_late()
    step_late()
    assert not all(torch.equal(a, b) for a, b in zip(before, tensors))
    _restore(opt, saved)
    now = [*model.parameters(), *(v for p, s in opt.state.items() if p is not late for v in s.values())]
    assert all(a is b for a, b in zip(tensors, now))
    assert all(torch.equal(a, b) for a, b in zip(before, now))
    assert torch.equal(late.detach(), torch.ones(3))
    assert all(not isinstance(v, torch.Tensor) or not v.any() for v in opt.state[late].values())


HOST_READS = {"aten::_local_scalar_dense", "aten::item", "aten::nonzero", "aten::masked_select", "aten::_unique2",
              "aten::unique_dim", "aten::unique_consecutive", "aten::equal", "aten::is_nonzero",
              "aten::repeat_interleave"}


@contextlib.contextmanager
def host_reads():
    """Collects the ops run inside that, on CUDA tensors, would make the host wait for the GPU's
    values. From the profiler, not a dispatch mode: under any dispatch mode autograd formulas
    take other branches (``prod``'s backward reads a value on the host only without one)."""
    seen: list[str] = []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        yield seen
    seen.extend(e.name for e in profiler.events() if e.name in HOST_READS)


def test_the_host_read_detector_sees_item_and_boolean_indexing():
    with host_reads() as seen:
        torch.ones(2).sum().item()
    assert "aten::_local_scalar_dense" in seen
    with host_reads() as seen:
        torch.ones(2)[torch.ones(2) > 0]
    assert "aten::nonzero" in seen
    with host_reads() as seen:  # the literal spec's erase product: prod's backward reads a value
        x = torch.rand(2, 3, requires_grad=True)
        x.prod(dim=0).sum().backward()
    assert "aten::_local_scalar_dense" in seen


@pytest.mark.parametrize("model_kwargs", [{}, dict(num_reads=2, num_writes=2, memory_slots=37, memory_width=13),
                                          dict(checkpoint_every=2), dict(controller="mlp")],
                         ids=["paper", "R2-W2", "checkpointed", "mlp"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_training_step_reads_no_value_on_the_host(monkeypatch, model_kwargs, backend):
    # The CPU stand-in for "capturable": forward, loss, backward and clipping, as they run
    # on CUDA (no value checks), call no op that reads a tensor's values on the host. The
    # Triton path runs its host code with every kernel launch stubbed out (the kernels
    # themselves read nothing on the host). The optimiser is PyTorch's capturable one.
    # The dispatch takes CPU tensors for the kernels only under the interpreter; with the launches stubbed, it
    # may take them anywhere (on a GPU machine too, where the interpreter is off).
    monkeypatch.setattr(backend_module, "interpreting", lambda: True)
    monkeypatch.setattr(validation, "_values_checked", lambda t: False)
    model = FastNTM(9, 8, backend=backend, controller_size=16, **model_kwargs)
    batch = make_task("copy").batch(3, torch.Generator().manual_seed(0), length=3)
    with host_overhead.stubbed_launches() if backend == "triton" else contextlib.nullcontext():
        with host_reads() as seen:
            loss, _ = copy_loss(model, *batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
    assert seen == []


@pytest.mark.parametrize("case", ["wide-slots", "float64"])
def test_the_kernels_fallback_reads_no_value_on_the_host(monkeypatch, case):
    # Slots wider than the kernels take, and float64, run the reference path under backend="triton": the
    # fused one, whose backward reads nothing on the host (the literal spec's erase product does).
    monkeypatch.setattr(validation, "_values_checked", lambda t: False)
    sizes = dict(memory_slots=16, memory_width=200) if case == "wide-slots" else {}
    model = FastNTM(9, 8, backend="triton", controller_size=16, **sizes)
    batch = make_task("copy").batch(3, torch.Generator().manual_seed(0), length=3)
    if case == "float64":
        model, batch = model.double(), [t.double() if t.is_floating_point() else t for t in batch]
    with host_reads() as seen:
        loss, _ = copy_loss(model, *batch)
        loss.backward()
    assert seen == []


# ---------------------------------------------------------------- the trainer, on any machine


def test_the_trainer_refuses_cuda_graph_on_the_cpu(tmp_path):
    config = TrainConfig(task_args={"max_len": 4}, model_args={"memory_slots": 8, "memory_width": 4,
                                                              "controller_size": 8}, device="cpu", cuda_graph=True)
    with pytest.raises(ValueError, match="needs a CUDA device, got cpu"):
        Trainer(config, tmp_path, progress=False)
    assert not any(tmp_path.iterdir())


def test_cuda_graph_round_trips_through_the_config():
    config = TrainConfig(cuda_graph=True)
    assert TrainConfig.from_dict(config.to_dict()) == config
    saved_before_the_flag = {k: v for k, v in config.to_dict().items() if k != "cuda_graph"}
    assert TrainConfig.from_dict(saved_before_the_flag).cuda_graph is False
    with pytest.raises(ValueError, match="cuda_graph"):
        TrainConfig(cuda_graph="yes")


@pytest.mark.parametrize("own_capturable", [True, False], ids=["into-capturable", "into-plain"])
def test_loading_optimizer_state_keeps_the_optimizers_own_capturable(own_capturable):
    # A capturable optimiser cannot step on a CPU, so the state saved is a plain one,
    # labelled the other way from the optimiser that loads it.
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    saved_by = torch.optim.Adam([param], lr=0.1)
    saved_by.step()
    saved = saved_by.state_dict()
    saved["param_groups"][0]["capturable"] = not own_capturable
    optimizer = torch.optim.Adam([param], lr=0.1, capturable=own_capturable)
    _load_optimizer_state(optimizer, saved)
    assert optimizer.param_groups[0]["capturable"] is own_capturable
    assert float(optimizer.state[param]["step"]) == 1.0
    if not own_capturable:
        optimizer.step()  # a capturable label would make this fail on the CPU
        assert float(optimizer.state[param]["step"]) == 2.0


@pytest.mark.parametrize("setting", ["fused", "foreach"])
@pytest.mark.parametrize("own", [True, None], ids=["into-set", "into-default"])
def test_loading_optimizer_state_keeps_the_optimizers_own_fused_and_foreach(setting, own):
    # A CPU run's Adam is fused (its RMSprop foreach); a run resumed elsewhere keeps its new optimiser's choice.
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.ones(3)
    saved_by = torch.optim.Adam([param], lr=0.1, **{setting: None if own else True})
    saved_by.step()
    optimizer = torch.optim.Adam([param], lr=0.1, **{setting: own})
    _load_optimizer_state(optimizer, saved_by.state_dict())
    assert optimizer.param_groups[0][setting] is own
    optimizer.step()
    assert float(optimizer.state[param]["step"]) == 2.0


# ---------------------------------------------------------------- benchmark wiring, on any machine


def test_graph_providers_time_the_training_step_on_cuda_only():
    providers = ["reference", *GRAPH_PROVIDERS]
    cuda = build_cases(torch.device("cuda"), "tiny", providers, None)
    assert {(c.op, c.provider) for c in cuda if c.provider in GRAPH_PROVIDERS} == {
        ("train_step", p) for p in GRAPH_PROVIDERS}
    assert cuda[0].op == "train_step"
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        Case("train_step", TINY_TRAIN_SHAPES["tiny-copy"], "triton-graph", torch.device("cpu")).prepare()
    with pytest.raises(ValueError, match="train_step only"):
        Case("memory_step.fwd", TINY_OP_SHAPES["tiny-n16"], "triton-graph", torch.device("cuda")).prepare()


# ---------------------------------------------------------------- CapturedStep, on a GPU


def copy_batches(lengths, batch_size=4, seed=0):
    task, generator = make_task("copy"), torch.Generator().manual_seed(seed)
    return [task.batch(batch_size, generator, length=n).to("cuda") for n in lengths]


def eager_steps(model, optimizer, batches, clip):
    losses = []
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = copy_loss(model, *batch)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_same_training(model_kwargs, backend, clip, lengths):
    batches = copy_batches(lengths)
    runs = []
    for captured in (False, True):
        model = tiny_model("cuda", backend=backend, **model_kwargs)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            if captured:
                step = CapturedStep(model, optimizer, copy_loss, clip=clip)
                losses = [step(*batch)[0].item() for batch in batches]
                assert step.num_graphs == len(set(lengths))
            else:
                losses = eager_steps(model, optimizer, batches, clip)
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    (eager_losses, eager_params), (graph_losses, graph_params) = runs
    assert graph_losses == pytest.approx(eager_losses, rel=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), eager_params, graph_params):
        assert relative_error(a, b) <= 1e-5, f"{name}: {relative_error(a, b):.2e}"


@pytest.mark.parametrize(
    "backend, model_kwargs, clip",
    [
        ("triton", dict(memory_slots=128, memory_width=20), 1.0),
        ("triton", dict(memory_slots=1000, memory_width=20, num_reads=2), None),  # the large-memory kernels
        ("reference", dict(memory_slots=128, memory_width=20), 1.0),
        ("reference", dict(memory_slots=37, memory_width=13, num_writes=2), None),
    ],
    ids=["triton-N128-M20-clip", "triton-N1000-M20-R2", "reference-N128-M20-clip", "reference-N37-M13-W2"],
)
@pytest.mark.gpu
@needs_gpu
def test_captured_steps_train_as_eager_steps_do(backend, model_kwargs, clip):
    # Lengths 3 and 5 alternate: the first step is eager (it creates Adam's state), the
    # next two capture a graph each, the last two replay them after the other one ran.
    assert_same_training(model_kwargs, backend, clip, lengths=[3, 5, 3, 5, 3])


@pytest.mark.gpu
@needs_gpu
def test_a_checkpointed_model_captures():
    # Segments are recomputed in backward (without saving RNG state: the cell draws none).
    assert_same_training(dict(memory_slots=128, memory_width=20, checkpoint_every=2), "triton", 1.0,
                         lengths=[3, 5, 3])


@pytest.mark.gpu
@needs_gpu
def test_captured_steps_under_autocast_cast_each_steps_weights():
    # Each call in its own autocast region, as autocast's docs ask. With autocast's cache on during the
    # capture, the graph would read the warm-up's casts of the weights, freed when that region ended.
    batches = copy_batches([3] * 6)
    runs = []
    for captured in (False, True):
        model = tiny_model("cuda", backend="triton", memory_slots=128, memory_width=20)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, capturable=True)
        step = CapturedStep(model, optimizer, copy_loss) if captured else None
        losses = []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True.*")
            for batch in batches:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    if captured:
                        loss = step(*batch)[0]
                    else:
                        optimizer.zero_grad(set_to_none=True)
                        loss = copy_loss(model, *batch)[0]
                if not captured:
                    loss.backward()
                    optimizer.step()
                losses.append(loss.item())
        runs.append(losses)
    assert step.num_graphs == 1
    assert runs[1] == pytest.approx(runs[0], rel=2e-2)


@pytest.mark.gpu
@needs_gpu
def test_inputs_on_the_cpu_are_refused():
    model = tiny_model("cuda")
    step = CapturedStep(model, torch.optim.Adam(model.parameters(), capturable=True), copy_loss)
    batch = make_task("copy").batch(2, torch.Generator().manual_seed(0), length=2)
    with pytest.raises(ValueError, match="CapturedStep needs CUDA tensors, got cpu"):
        step(*batch)


# ---------------------------------------------------------------- the trainer, on a GPU


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_a_cuda_graph_run_resumes_exactly(tmp_path, optimizer):
    config = dict(task_args={"max_len": 4}, model_args={"memory_slots": 128, "memory_width": 20,
                                                        "controller_size": 16},
                  batch_size=4, eval_every=2, eval_batches=1, eval_batch_size=2, device="cuda", cuda_graph=True,
                  optimizer=optimizer)
    whole = Trainer(TrainConfig(steps=6, **config), tmp_path / "whole", progress=False)
    whole.fit()
    assert whole.captured.num_graphs >= 1
    Trainer(TrainConfig(steps=3, **config), tmp_path / "split", progress=False).fit()
    Trainer.resume(tmp_path / "split", progress=False, steps=6).fit()
    a, b = load_file(tmp_path / "whole" / "model.safetensors"), load_file(tmp_path / "split" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
