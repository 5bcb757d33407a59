"""Memory-efficient backprop through time, streaming, truncated backprop, bf16 memory."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from fastntm import FastNTM
from fastntm.model import default_checkpoint_every

SMALL = dict(memory_slots=11, memory_width=6, controller_size=12, num_reads=2, num_writes=2)


def make(**kwargs) -> FastNTM:
    torch.manual_seed(0)
    return FastNTM(4, 3, **{**SMALL, **kwargs})


def loss_and_grads(ntm: FastNTM, x: torch.Tensor):
    y, state = ntm(x)
    loss = y.square().mean() + state.memory.float().square().mean()
    grads = torch.autograd.grad(loss, list(ntm.parameters()))
    return y.detach(), dict(zip((n for n, _ in ntm.named_parameters()), grads))


@pytest.mark.parametrize("every", [1, 3, 4, 7, 12, 50], ids=lambda c: f"C{c}")
def test_checkpointed_gradients_equal_storing_every_step(every):
    x = torch.rand(12, 3, 4, dtype=torch.float64)
    stored = make(checkpoint_every=0).double()
    checkpointed = make(checkpoint_every=every).double()
    y_ref, g_ref = loss_and_grads(stored, x)
    y, g = loss_and_grads(checkpointed, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_checkpointed_gradients_in_float32_match_to_rounding():
    x = torch.rand(20, 2, 4)
    _, g_ref = loss_and_grads(make(checkpoint_every=0), x)
    _, g = loss_and_grads(make(checkpoint_every=6), x)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_compiled_model_checkpoints_and_has_the_eager_gradients():
    """torch.compile of the whole model keeps checkpointing (dynamo once read its check for torch.func
    transforms as true, and every step was stored): its graph holds the segments as checkpoints. Its gradients,
    through AOTAutograd's partition of the reference's single node in each step, are the eager model's (on torch
    2.11 they were not while the node's forward returned a tensor made in place: pytorch/pytorch#180642)."""
    x = torch.rand(3, 2, 4, dtype=torch.float64)
    model = make(checkpoint_every=2, backend="reference").double()
    y_ref, g_ref = loss_and_grads(model, x)
    graphs = []
    aot_eager = torch._dynamo.lookup_backend("aot_eager")  # AOTAutograd's forward and backward, run eagerly

    def keep_graph(graph, example_inputs):
        graphs.append(graph)
        return aot_eager(graph, example_inputs)

    torch._dynamo.reset()
    y, g = loss_and_grads(torch.compile(model, fullgraph=True, backend=keep_graph), x)
    checkpoints = [node for node in graphs[0].graph.nodes
                   if node.target is torch.ops.higher_order.tag_activation_checkpoint]
    assert len(graphs) == 1 and len(checkpoints) == 2
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for name, grad in g.items():
        name = name.removeprefix("_orig_mod.")
        torch.testing.assert_close(grad, g_ref[name], rtol=1e-10, atol=1e-12, msg=name)


def test_checkpointing_gives_the_initial_state_its_gradient():
    ntm = make(checkpoint_every=4)
    state = ntm.initial_state(2)
    memory = state.memory.clone().requires_grad_()
    state.memory = memory
    y, _ = ntm(torch.rand(9, 2, 4), state)
    y.sum().backward()
    assert memory.grad is not None and memory.grad.abs().sum() > 0


def test_auto_checkpointing_stores_small_runs_and_checkpoints_large_ones():
    small = make().initial_state(2)
    assert default_checkpoint_every(100, small) == 0
    big = FastNTM(4, 3, memory_slots=2048, memory_width=32).initial_state(4)
    assert default_checkpoint_every(1000, big) == 32
    assert default_checkpoint_every(1001, big) == 32


def test_recording_under_checkpointing_keeps_one_entry_per_step():
    ntm = make(checkpoint_every=3)
    with ntm.record() as trace:
        y, _ = ntm(torch.rand(8, 2, 4))
        y.sum().backward()
    assert trace.weights.shape == (8, 2, 4, 11)


def test_streaming_one_step_at_a_time_equals_one_pass():
    ntm = make()
    x = torch.rand(9, 2, 4)
    y_full, s_full = ntm(x)
    state, ys = None, []
    with torch.no_grad():
        for x_t in x:
            y_t, state = ntm.step(x_t, state)
            ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys), y_full.detach())
    torch.testing.assert_close(state.memory, s_full.memory.detach())


def test_step_rejects_bad_input():
    ntm = make()
    with pytest.raises(ValueError, match=r"x_t must have shape \(B, input_size\) with input_size = 4"):
        ntm.step(torch.rand(2, 5))


def test_truncated_backprop_windows_continue_the_sequence():
    ntm = make(checkpoint_every=2)
    x = torch.rand(12, 2, 4)
    with torch.no_grad():
        y_full, _ = ntm(x)
    state, outputs = None, []
    for window in x.split(5):
        y, state = ntm(window, state)
        y.sum().backward()
        state = state.detach()
        outputs.append(y.detach())
    torch.testing.assert_close(torch.cat(outputs), y_full)


def test_bf16_memory_stays_bf16_and_close_to_fp32():
    x = torch.rand(15, 3, 4)
    y32, s32 = make()(x)
    ntm16 = make(memory_dtype=torch.bfloat16)
    y16, s16 = ntm16(x)
    assert s16.memory.dtype == torch.bfloat16 and y16.dtype == torch.float32
    assert torch.isfinite(y16).all()
    rel = float((y16 - y32).detach().norm() / y32.detach().norm())
    assert rel < 2e-2, rel
    y16.sum().backward()
    for name, p in ntm16.named_parameters():
        assert torch.isfinite(p.grad).all(), name


def test_bad_checkpoint_and_memory_dtype_arguments():
    with pytest.raises(ValueError, match="checkpoint_every must be a non-negative int"):
        make(checkpoint_every=-2)
    for dtype in (torch.int8, torch.float8_e4m3fn, "float8_e5m2"):  # no op computes in float8
        with pytest.raises(TypeError, match=r"memory_dtype must be a floating torch.dtype \(float32, float64, bfloat16, "
                                            r"float16\), its name, or None"):
            make(memory_dtype=dtype)
    ntm = make()
    _, state = ntm(torch.rand(2, 2, 4))
    state = dataclasses.replace(state, memory=state.memory.to(torch.float8_e4m3fn))
    with pytest.raises(TypeError, match=r"state.memory must have a floating dtype \(float32, .*\), got torch.float8"):
        ntm(torch.rand(2, 2, 4), state)  # it raised torch's "aminmax_cpu not implemented" from the range check


def test_memory_dtype_by_name_round_trips_through_a_config():
    ntm = make(memory_dtype="bfloat16")
    assert ntm.cell.memory_dtype == torch.bfloat16
    assert ntm.initial_state(2).memory.dtype == torch.bfloat16
