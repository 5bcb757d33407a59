"""A model of the NTM code in common use, timed beside fastntm on the same machine.

The kernel issue's CPU targets (2x at batch 1, 8x at batch 32) are set against "widely used NTM
code": the most-forked PyTorch NTM (loudinthecloud/pytorch-ntm, BSD-3) and the code derived from it.
Its figures in the issue (~120 ms and ~670 ms a copy-task step at length 10) were taken once, while
this VM's pace moves by up to 2x from minute to minute; a ratio is only sound when both sides run
side by side. That code (Copyright (c) 2017 Guy Zana, BSD 3-Clause) is not a dependency, nor on PyPI,
and this module copies none of it: it is written here from that code's design, keeping what sets its
speed (its memory operations are one-line PyTorch expressions, each as costly as that code's):

* memory, reads and the erase/add write batched over sequences, one head at a time, the write's
  erase and add as two batched outer products (``matmul`` of (N, 1) by (1, M));
* the cosine similarity as ``F.cosine_similarity(M + 1e-16, k + 1e-16)``;
* the circular shift one sequence at a time, in a Python loop: each row padded by one slot either
  side with ``cat``, convolved with ``F.conv1d`` and copied into a (B, N) buffer, so the step costs
  grow with the batch (the issue's 120 ms at B 1 against 670 ms at B 32);
* sharpening as ``w ** gamma`` over its sum plus 1e-16;
* a one-layer ``nn.LSTM`` controller called one step at a time, learned initial ``(h, c)``; one
  ``nn.Linear`` per head, its output sliced into columns (a slice each) and squashed (k copied, ``softplus``
  on beta and gamma - 1, ``sigmoid`` on g and e, ``softmax`` on s);
* the output ``sigmoid(fc([h, r]))``, copied step by step into a zeros tensor; ``BCELoss``; every
  gradient clamped to [-10, 10]; RMSprop (lr 1e-4, momentum 0.9, alpha 0.95).

The step's math is SPEC.md's, but for two conventions: the shift runs the other way (its tap ``s[0]``
moves the focus forward, where SPEC.md's ``s[2]`` does) and the sharpening has no floor. The tests
hold :func:`memory_step` to ``fastntm.reference`` on that account, so the two sides do the same work.
That code's cost in bits per sequence (a Python ``apply_`` over every output bit) is left out of the
timed step, as fastntm's step computes none: it would only make this side slower.
"""

from __future__ import annotations

import copy
import itertools

import torch
import torch.nn.functional as F
from torch import nn

SHIFT_WIDTH = 3  # that code's shift is fixed at one slot either way


def address(mem, k, beta, g, s, gamma, w_prev):
    """One head's weighting (B, N) on ``mem`` (B, N, M): ``k`` (B, M), ``s`` (B, 3), the rest (B, 1)."""
    similarity = F.cosine_similarity(mem + 1e-16, k[:, None] + 1e-16, dim=2)
    content = torch.softmax(beta * similarity, 1)
    gated = content * g + w_prev * (1 - g)
    shifted = torch.zeros_like(gated)
    for b in range(len(gated)):  # one sequence at a time, as that code does
        row = gated[b]
        circle = torch.cat([row[-1:], row, row[:1]])
        shifted[b] = F.conv1d(circle.view(1, 1, -1), s[b].view(1, 1, -1)).view(-1)
    sharp = shifted.pow(gamma)
    return sharp / (sharp.sum(1, keepdim=True) + 1e-16)


def read(mem, w):
    return (w[:, None] @ mem)[:, 0]


def write(mem, w, e, a):
    """Erase then add, each a batched outer product (N, 1) x (1, M)."""
    return mem * (1 - w[:, :, None] @ e[:, None]) + w[:, :, None] @ a[:, None]


def memory_step(mem, read_params, write_params):
    """One read head then one write head on the memory before the step: ``(w_read, w_write, r, new_mem)``.
    ``read_params`` is ``(k, beta, g, s, gamma, w_prev)``; ``write_params`` adds ``e, a``."""
    w_read = address(mem, *read_params)
    w_write = address(mem, *write_params[:6])
    return w_read, w_write, read(mem, w_read), write(mem, w_write, *write_params[6:])


def _bounds(sizes):
    """``[(start, end), ...]`` of consecutive columns of these sizes."""
    ends = list(itertools.accumulate(sizes))
    return list(zip([0] + ends[:-1], ends))


class BaselineNTM(nn.Module):
    """The model above: one read and one write head, an LSTM controller, sequences fed one step at a time."""

    def __init__(self, input_size: int, output_size: int, N: int = 128, M: int = 20, controller_size: int = 100):
        super().__init__()
        self.input_size, self.N, self.M = input_size, N, M
        self.lstm = nn.LSTM(input_size + M, controller_size)
        self.h0 = nn.Parameter(torch.randn(1, 1, controller_size) * 0.05)
        self.c0 = nn.Parameter(torch.randn(1, 1, controller_size) * 0.05)
        read_sizes = [M, 1, 1, SHIFT_WIDTH, 1]
        self.read_bounds, self.write_bounds = _bounds(read_sizes), _bounds(read_sizes + [M, M])
        self.read_head = nn.Linear(controller_size, self.read_bounds[-1][1])
        self.write_head = nn.Linear(controller_size, self.write_bounds[-1][1])
        self.output = nn.Linear(controller_size + M, output_size)
        self.register_buffer("initial_memory", torch.empty(N, M).uniform_(-1, 1) / (N + M) ** 0.5)
        self.register_buffer("initial_read", torch.randn(1, M) * 0.01)
        stdev = 5 / (input_size + M + controller_size) ** 0.5
        for name, p in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.uniform_(p, -stdev, stdev)
            else:
                nn.init.zeros_(p)
        for layer, gain in ((self.read_head, 1.4), (self.write_head, 1.4), (self.output, 1.0)):
            nn.init.xavier_uniform_(layer.weight, gain=gain)
            nn.init.normal_(layer.bias, std=0.01)

    def _head(self, layer, bounds, h):
        out = layer(h)
        k, beta, g, s, gamma, *ea = (out[:, start:end] for start, end in bounds)  # a slice each, as that code has
        params = [k.clone(), F.softplus(beta), torch.sigmoid(g), F.softmax(s, dim=1), 1 + F.softplus(gamma)]
        if ea:
            params += [torch.sigmoid(ea[0]), ea[1]]
        return params

    def _step(self, x, state):
        mem, r, controller, w_read, w_write = state
        out, controller = self.lstm(torch.cat([x, r], dim=1).unsqueeze(0), controller)
        h = out.squeeze(0)
        k, beta, g, s, gamma = self._head(self.read_head, self.read_bounds, h)
        w_read = address(mem, k, beta, g, s, gamma, w_read)
        r = read(mem, w_read)
        k, beta, g, s, gamma, e, a = self._head(self.write_head, self.write_bounds, h)
        w_write = address(mem, k, beta, g, s, gamma, w_write)
        mem = write(mem, w_write, e, a)
        return torch.sigmoid(self.output(torch.cat([h, r], dim=1))), (mem, r, controller, w_read, w_write)

    def forward(self, inputs, output_steps: int):
        """Feed ``inputs`` (T, B, input_size), then ``output_steps`` zero inputs; the outputs of those
        (output_steps, B, output_size), as probabilities."""
        B = inputs.shape[1]
        state = (  # copies of the learned starts, made as that code makes them
            self.initial_memory.clone().repeat(B, 1, 1),
            self.initial_read.clone().repeat(B, 1),
            (self.h0.clone().repeat(1, B, 1), self.c0.clone().repeat(1, B, 1)),
            inputs.new_zeros(B, self.N),
            inputs.new_zeros(B, self.N),
        )
        for x in inputs:
            _, state = self._step(x, state)
        y = inputs.new_zeros(output_steps, B, self.output.out_features)
        for i in range(output_steps):
            y[i], state = self._step(inputs.new_zeros(B, self.input_size), state)
        return y


def train_case(shape, device: torch.device):
    """``(step, rel_err)`` for ``benchmarks.cases``: the baseline's copy-task training step at ``shape``
    (a ``TrainShape``: batch, sequence length, memory and controller sizes; one read and one write head),
    and the relative error of its outputs and gradients in float32 against its own float64 copy."""
    from . import cases, common

    if shape.R != 1 or shape.W != 1:
        raise ValueError(f"the baseline has one read and one write head, got R={shape.R}, W={shape.W}")
    task, batch = cases.copy_batch(shape, device)
    inputs, targets = batch.inputs[: shape.length + 1], batch.targets[shape.length + 1 :]
    torch.manual_seed(0)
    model = BaselineNTM(task.input_size, task.output_size, shape.N, shape.M, shape.controller_size).to(device)
    criterion = nn.BCELoss()

    def outputs_and_grads(m, dtype):
        y = m(inputs.to(dtype), shape.length)
        return y, torch.autograd.grad(criterion(y, targets.to(dtype)), list(m.parameters()))

    y, grads = outputs_and_grads(model, torch.float32)
    y_ref, grads_ref = outputs_and_grads(copy.deepcopy(model).double(), torch.float64)
    err = max(common.rel_err(y, y_ref), common.max_rel_err(grads, grads_ref))

    optimiser = torch.optim.RMSprop(model.parameters(), lr=1e-4, momentum=0.9, alpha=0.95)

    def step():
        optimiser.zero_grad()
        loss = criterion(model(inputs, shape.length), targets)
        loss.backward()
        for p in model.parameters():
            p.grad.clamp_(-10, 10)
        optimiser.step()
        return loss

    step()
    return step, err
