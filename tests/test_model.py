"""FastNTM, NTMCell and NTMState: shapes, layouts, state carry, recording, bad input."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import re
import subprocess
import sys

import pytest
import torch

from fastntm import FastNTM, NTMCell, NTMState

SMALL = dict(memory_slots=13, memory_width=5, controller_size=16)


def make(**kwargs) -> FastNTM:
    torch.manual_seed(0)
    return FastNTM(3, 2, **{**SMALL, **kwargs})


CONFIGS = [
    pytest.param({}, id="lstm-R1-W1"),
    pytest.param(dict(controller="mlp", controller_layers=2), id="mlp-2layers"),
    pytest.param(dict(num_reads=2, num_writes=2, shift_range=2, controller_layers=2), id="lstm2-R2-W2-K2"),
    pytest.param(dict(num_reads=0, num_writes=1), id="write-only"),
    pytest.param(dict(num_reads=3, num_writes=0, memory_init="learned"), id="read-only-learned"),
    pytest.param(dict(memory_init="random"), id="random-init"),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_output_shapes_and_every_parameter_gets_a_gradient(config):
    ntm = make(**config)
    y, state = ntm(torch.rand(6, 4, 3))
    assert y.shape == (6, 4, 2)
    c = ntm.cell
    assert state.memory.shape == (4, c.memory_slots, c.memory_width)
    assert state.weights.shape == (4, c.num_heads, c.memory_slots)
    assert state.reads.shape == (4, c.num_reads, c.memory_width)
    y.square().sum().backward()
    for name, p in ntm.named_parameters():
        if c.num_reads == 0 and (name.startswith("cell.initial_") or name.startswith("cell.heads")):
            continue  # with no read head the output never sees memory
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_batch_first_matches_time_major():
    ntm = make()
    x = torch.rand(7, 3, 3)
    y_time, _ = ntm(x)
    ntm.batch_first = True
    y_batch, _ = ntm(x.transpose(0, 1))
    torch.testing.assert_close(y_batch.transpose(0, 1), y_time)


def test_running_in_two_halves_with_the_state_carried_equals_one_pass():
    ntm = make(num_reads=2, controller_layers=2)
    x = torch.rand(10, 3, 3)
    y_full, s_full = ntm(x)
    y1, s1 = ntm(x[:4])
    y2, s2 = ntm(x[4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2]), y_full)
    for a, b in zip((s2.memory, s2.weights, s2.reads, *s2.controller), (s_full.memory, s_full.weights, s_full.reads, *s_full.controller)):
        torch.testing.assert_close(a, b)


def test_detached_state_continues_the_sequence_without_the_graph():
    ntm = make()
    x = torch.rand(8, 2, 3)
    y_full, _ = ntm(x)
    _, s1 = ntm(x[:5])
    s1 = s1.detach()
    assert not s1.memory.requires_grad and all(not t.requires_grad for t in s1.controller)
    y2, _ = ntm(x[5:], s1)
    torch.testing.assert_close(y2, y_full[5:])
    y2.sum().backward()


def test_state_moves_and_casts_like_a_tensor():
    ntm = make()
    _, state = ntm(torch.rand(2, 2, 3))
    moved = state.to(torch.float64)
    assert moved.memory.dtype == torch.float64 and moved.controller[0].dtype == torch.float64
    assert moved.batch_size == 2


def test_feature_mode_returns_controller_output_and_reads():
    ntm = FastNTM(3, None, **SMALL, num_reads=2)
    y, _ = ntm(torch.rand(5, 2, 3))
    assert y.shape == (5, 2, 16 + 2 * 5)
    assert ntm.cell.feature_size == 16 + 2 * 5


def test_cell_does_one_step_of_the_module():
    ntm = make()
    x = torch.rand(3, 2, 3)
    y, _ = ntm(x)
    state = ntm.initial_state(2)
    steps = []
    for x_t in x:
        y_t, state = ntm.cell(x_t, state)
        steps.append(y_t)
    torch.testing.assert_close(torch.stack(steps), y)


def test_record_returns_every_steps_weightings_and_is_off_by_default():
    ntm = make(num_reads=2, num_writes=1)
    x = torch.rand(6, 2, 3)
    with ntm.record() as trace:
        _, state = ntm(x)
    assert trace.weights.shape == (6, 2, 3, 13)
    assert trace.read_weights.shape == (6, 2, 2, 13)
    assert trace.write_weights.shape == (6, 2, 1, 13)
    torch.testing.assert_close(trace.weights[-1], state.weights.detach())
    torch.testing.assert_close(trace.weights.sum(-1), torch.ones(6, 2, 3))
    ntm(x)
    assert len(trace.steps) == 6


def test_constant_memory_init_and_focused_initial_weighting():
    state = make().initial_state(3)
    assert torch.all(state.memory == 1e-6)
    assert state.weights[..., 0].min() > 0.9
    torch.testing.assert_close(state.weights.sum(-1), torch.ones(3, 2))


@pytest.mark.parametrize("memory_init", ["constant", "learned"])
def test_editing_an_initial_state_in_place_leaves_the_model_alone(memory_init):
    ntm = make(memory_init=memory_init)
    x = torch.rand(3, 1, 3)
    y, _ = ntm(x)
    before = {name: t.clone() for name, t in ntm.state_dict().items()}
    state = ntm.initial_state(1)  # at B = 1 an expanded view of the model's own tensor would alias it
    with torch.no_grad():
        state.memory.fill_(5.0)
        state.reads.fill_(5.0)
    for name, t in ntm.state_dict().items():
        assert torch.equal(t, before[name]), name
    torch.testing.assert_close(ntm(x)[0], y, rtol=0, atol=0)


def test_reset_parameters_is_deterministic_under_a_seed():
    a, b = make(), make()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert "memory_slots=13" in repr(a) and "batch_first=False" in repr(a)


def test_float64_model_runs_in_float64():
    ntm = make().double()
    y, state = ntm(torch.rand(3, 2, 3, dtype=torch.float64))
    assert y.dtype == torch.float64 and state.memory.dtype == torch.float64


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(memory_slots=0), "memory_slots must be a positive int"),
        (dict(memory_width=2.5), "memory_width must be a positive int"),
        (dict(num_reads=-1), "num_reads must be a non-negative int"),
        (dict(num_reads=0, num_writes=0), r"num_reads \+ num_writes must be at least 1"),
        (dict(controller="gru"), "controller must be one of"),
        (dict(memory_init="zeros"), "memory_init must be one of"),
        (dict(backend="cuda"), "backend must be one of"),
        (dict(shift_range=-1), "shift_range must be a non-negative int"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)


def test_forward_rejects_bad_input():
    ntm = make()
    with pytest.raises(ValueError, match=r"x must have shape \(T, B, input_size\) with input_size = 3"):
        ntm(torch.rand(4, 2, 5))
    with pytest.raises(TypeError, match="floating dtype"):
        ntm(torch.ones(4, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one step"):
        ntm(torch.rand(0, 2, 3))
    _, state = ntm(torch.rand(2, 2, 3))
    with pytest.raises(ValueError, match=r"state.memory must have shape \(3, 13, 5\)"):
        ntm(torch.rand(2, 3, 3), state)
    with pytest.raises(TypeError, match="state must be an NTMState"):
        ntm(torch.rand(2, 2, 3), (state.memory,))
    ntm.batch_first = True
    with pytest.raises(ValueError, match=r"\(B, T, input_size\)"):
        ntm(torch.rand(4, 2, 5))
    with pytest.raises(TypeError, match="batch_first must be a bool, got 'yes'"):
        make(batch_first="yes")
    with pytest.raises(TypeError, match=r"dtype must be a floating torch.dtype \(float32, .*\) or None, got torch.int64"):
        ntm.initial_state(2, dtype=torch.int64)  # once zeros, the 1e-6 memory truncated, and no word


def test_cell_is_exported_and_usable_alone():
    cell = NTMCell(3, 2, **SMALL)
    state = cell.initial_state(2)
    assert isinstance(state, NTMState)
    y, state = cell(torch.rand(2, 3), state)
    assert y.shape == (2, 2)
    x = torch.rand(2, 3)
    torch.testing.assert_close(cell(x)[0], cell(x, cell.initial_state(2))[0])  # no state: the initial one, as nn.LSTMCell


def test_the_model_names_its_sizes_and_backend_as_nn_lstm_does():
    ntm = FastNTM(3, None, **SMALL)
    assert (ntm.input_size, ntm.output_size, ntm.feature_size) == (3, None, 16 + 5)
    assert ntm(torch.rand(2, 4, 3))[0].shape == (2, 4, ntm.feature_size)
    assert "backend='auto'" in repr(ntm)


@pytest.mark.parametrize("checkpoint_every", [0, 2])
def test_a_call_that_raises_midway_records_none_of_its_steps(checkpoint_every):
    ntm = make(checkpoint_every=checkpoint_every)
    calls = []

    def fail_at_the_fifth_step(module, inputs, output):
        calls.append(None)
        if len(calls) == 5:
            raise RuntimeError("step 5 failed")

    x = torch.rand(6, 2, 3, requires_grad=True)
    with ntm.record() as trace:
        ntm(x[:2])
        handle = ntm.cell.heads.register_forward_hook(fail_at_the_fifth_step)
        with pytest.raises(RuntimeError, match="step 5 failed"):
            ntm(x)
        handle.remove()
    assert len(trace.steps) == 2  # the first call's; the second's four steps before the error, none


def test_a_copy_made_inside_a_record_block_records_nothing():
    ntm = make()
    with ntm.record() as trace:
        copied, pickled = copy.deepcopy(ntm), pickle.loads(pickle.dumps(ntm))
        copied(torch.rand(2, 2, 3))
        pickled(torch.rand(2, 2, 3))
    assert copied._traces == [] and pickled._traces == [] and trace.steps == []


def test_forward_rejects_a_controller_state_of_the_wrong_shape_or_kind():
    ntm = make()
    _, state = ntm(torch.rand(2, 2, 3))
    bad = NTMState(state.memory, state.weights, state.reads, (state.controller[0][:, :1], state.controller[1]))
    with pytest.raises(ValueError, match=r"state.controller\[0\] must have shape \(1, 2, 16\)"):
        ntm(torch.rand(2, 2, 3), bad)
    with pytest.raises(ValueError, match="state.controller must hold 2 tensors"):
        ntm(torch.rand(2, 2, 3), NTMState(state.memory, state.weights, state.reads, ()))


def test_step_rejects_a_sequence_or_a_vector():
    ntm = make()
    for x_t in (torch.rand(4, 2, 3), torch.rand(3)):
        with pytest.raises(ValueError, match=r"x_t must have shape \(B, input_size\) with input_size = 3"):
            ntm.step(x_t)


def test_step_names_x_t_in_its_errors():
    ntm = make()
    with pytest.raises(ValueError, match=re.escape("x_t must have at least one sequence, got shape (0, 3)")):
        ntm.step(torch.rand(0, 3))
    with pytest.raises(TypeError, match="x_t must have a floating dtype"):
        ntm.step(torch.ones(2, 3, dtype=torch.long))


def test_forward_rejects_x_and_state_of_another_dtype_or_device_or_kind_naming_them():
    ntm = make()
    x = torch.rand(4, 2, 3)
    _, state = ntm(x)
    with pytest.raises(TypeError, match=re.escape("x has dtype torch.float64 but the model's parameters have torch.float32")):
        ntm(x.double())
    with pytest.raises(ValueError, match="x is on meta but the model is on cpu"):
        ntm(x.to("meta"))
    bad = [
        (dataclasses.replace(state, weights=state.weights.double()), TypeError,
         "state.weights has dtype torch.float64 but x has torch.float32"),
        (dataclasses.replace(state, controller=(state.controller[0].long(), state.controller[1])), TypeError,
         "state.controller[0] must have a floating dtype"),
        (dataclasses.replace(state, memory=None), TypeError, "state.memory must be a torch.Tensor, got NoneType"),
        (dataclasses.replace(state, controller=None), TypeError, "state.controller must be a tuple of tensors"),
    ]
    for bad_state, error, message in bad:
        with pytest.raises(error, match=re.escape(message)):
            ntm(x, bad_state)
    bf16_memory = make(memory_dtype=torch.bfloat16)
    _, state = bf16_memory(x)
    bf16_memory(x, state)  # memory in its own dtype is fine


def test_forward_rejects_non_finite_input_and_state_naming_them():
    ntm = make()
    x = torch.rand(4, 2, 3)
    _, state = ntm(x)
    with pytest.raises(ValueError, match="x contains NaN"):  # once "beta contains NaN", from inside the step
        ntm(x * float("nan"))
    with pytest.raises(ValueError, match="state.memory contains NaN"):
        ntm(x, dataclasses.replace(state, memory=state.memory * float("nan")))
    with pytest.raises(ValueError, match=re.escape("state.weights must lie in [0.0, 1.0]")):
        ntm(x, dataclasses.replace(state, weights=-state.weights))
    with pytest.raises(ValueError, match=re.escape("state.weights must lie in [0.0, 1.0]")):
        ntm(x, dataclasses.replace(state, weights=state.weights + 1))


def test_cell_checks_its_input_and_state_naming_them():
    cell = NTMCell(3, 2, **SMALL)
    state = cell.initial_state(2)
    with pytest.raises(ValueError, match=re.escape("x must have shape (B, input_size) with input_size = 3, got (2, 5)")):
        cell(torch.rand(2, 5), state)
    with pytest.raises(ValueError, match=re.escape("state.memory must have shape (3, 13, 5) for this model and batch 3")):
        cell(torch.rand(3, 3), state)
    with pytest.raises(TypeError, match="state must be an NTMState, got tuple"):
        cell(torch.rand(2, 3), (state.memory, state.weights))


def test_nested_record_blocks_each_keep_their_steps():
    ntm = make()
    x = torch.rand(4, 2, 3)
    with ntm.record() as outer:
        ntm(x)
        with ntm.record() as inner:
            ntm(x)
        ntm(x)
    assert len(inner.steps) == 4 and len(outer.steps) == 12
    torch.testing.assert_close(outer.weights[4:8], inner.weights)
    with ntm.record() as empty:
        pass
    with pytest.raises(ValueError, match="the trace holds no steps"):
        empty.weights
    with ntm.record() as mixed:
        ntm(x)
        ntm(x[:, :1])
    with pytest.raises(ValueError, match="different batch sizes inside one 'with model.record\\(\\)' block"):
        mixed.weights


def test_a_state_saves_and_loads_with_torch_load_defaults(tmp_path):
    ntm = make()
    _, state = ntm(torch.rand(4, 2, 3))
    torch.save(state.detach(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt")  # weights_only=True: NTMState is an allowed global
    assert isinstance(loaded, NTMState)
    for a, b in zip(torch.utils._pytree.tree_leaves(loaded), torch.utils._pytree.tree_leaves(state)):
        assert torch.equal(a, b)


def test_torch_export_takes_and_returns_a_state(tmp_path):
    ntm = make()
    x = torch.rand(3, 2, 3)
    _, state = ntm(x)
    state = state.detach()
    exported = torch.export.export(ntm, (x, state))
    torch.export.save(exported, tmp_path / "ntm.pt2")
    y, new_state = torch.export.load(tmp_path / "ntm.pt2").module()(x, state)
    y_eager, state_eager = ntm(x, state)
    assert isinstance(new_state, NTMState)
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(new_state.memory, state_eager.memory)


def test_torch_export_takes_a_dynamic_batch_size_without_a_state():
    ntm = make()
    # Unbounded: the sizes of "auto" checkpointing, a guard on the batch, are not taken under export.
    exported = torch.export.export(ntm, (torch.rand(3, 4, 3),), dynamic_shapes=({1: torch.export.Dim("batch")},))
    for batch in (1, 7):
        x = torch.rand(3, batch, 3)
        torch.testing.assert_close(exported.module()(x)[0], ntm(x)[0])


def test_sizes_may_be_numpy_ints_and_are_kept_as_python_ints():
    np = pytest.importorskip("numpy")
    ntm = FastNTM(np.int64(3), np.int32(2), memory_slots=np.int64(13), memory_width=5, checkpoint_every=np.int8(2))
    assert type(ntm.cell.memory_slots) is int and type(ntm.checkpoint_every) is int
    assert ntm.initial_state(np.int64(4)).memory.shape == (4, 13, 5)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got True"):
        ntm.initial_state(True)


def test_forward_runs_under_cpu_autocast():
    ntm = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = ntm(torch.rand(4, 2, 3))
    y.float().sum().backward()
    assert torch.isfinite(y.float()).all() and state.weights.dtype == torch.float32


def test_under_autocast_x_and_state_take_the_parameters_or_autocasts_dtype_and_no_other():
    ntm = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for dtype in (torch.float32, torch.bfloat16):
            _, state = ntm(torch.rand(4, 2, 3, dtype=dtype))
            ntm(torch.rand(4, 2, 3), state)
        allowed = re.escape("one of (torch.float32, torch.bfloat16)")
        # Once errors from inside the LSTM cell's autocast, naming neither x nor the state.
        for dtype in (torch.float16, torch.float64):
            with pytest.raises(TypeError, match=f"x has dtype {dtype}; under autocast .* {allowed}"):
                ntm(torch.rand(4, 2, 3, dtype=dtype))
            with pytest.raises(TypeError, match=f"state.weights has dtype {dtype}; under autocast .* {allowed}"):
                ntm(torch.rand(4, 2, 3), ntm.initial_state(2, dtype=dtype))


def test_gradient_penalty_jacobian_and_torch_func_grad_of_the_model_match_the_literal_step(monkeypatch):
    """The model's memory step is one node with a hand-derived backward; a backward of the backward
    (create_graph=True), a vectorised Jacobian and torch.func.grad go through the literal composition, and
    give what the model built on it gives. Checkpointed, as long sequences are (torch.func.grad, which takes
    no saved-tensor hooks, stores every step instead)."""
    from fastntm import backend, reference

    torch.manual_seed(0)
    ntm = FastNTM(3, 2, memory_slots=6, memory_width=4, controller_size=8, num_writes=2,
                  checkpoint_every=2).double()
    params = dict(ntm.named_parameters())
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def answers():
        xr = x.clone().requires_grad_()
        y, _ = ntm(xr)
        (dx,) = torch.autograd.grad(y.square().sum(), xr, create_graph=True)
        penalty = torch.autograd.grad(dx.square().sum(), list(params.values()))
        jacobian = torch.autograd.functional.jacobian(lambda xx: ntm(xx)[0], x, vectorize=True)
        loss = lambda p: torch.func.functional_call(ntm, p, (x,))[0].square().sum()  # noqa: E731
        return [*penalty, jacobian, *torch.func.grad(loss)(params).values()]

    got = answers()
    monkeypatch.setattr(backend.REFERENCE, "memory_step_from_heads", reference.memory_step_from_heads)
    for i, (expected, g) in enumerate(zip(answers(), got)):
        torch.testing.assert_close(g, expected, rtol=1e-9, atol=1e-12, msg=f"answer {i}")


def test_torch_compile_traces_a_cell_step_without_graph_breaks_in_a_fresh_process():
    # A fresh process: the dispatch's first call must be traceable too, not only one after an eager call.
    code = """
import torch
from fastntm import FastNTM
torch.manual_seed(0)
model = FastNTM(9, 8, memory_slots=16, memory_width=6, backend="reference")
x, state = torch.rand(2, 9), model.initial_state(2)
cell = torch.compile(model.cell, fullgraph=True, backend="aot_eager")
y, new_state = cell(x, state)
y_eager, _ = model.cell(x, state)
assert torch.allclose(y, y_eager, atol=1e-6), (y - y_eager).abs().max()
y.sum().backward()
assert all(p.grad is not None for name, p in model.named_parameters() if name.startswith("cell.heads"))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
