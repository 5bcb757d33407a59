import math

import pytest
import torch

from fastntm.tasks import (
    TASKS,
    AssociativeRecallTask,
    Batch,
    CopyTask,
    NGramsTask,
    PrioritySortTask,
    RepeatCopyTask,
    make_task,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_layout_common(name):
    task = make_task(name)
    batch = task.batch(5, gen())
    assert isinstance(batch, Batch)
    x, y, m = batch
    T = x.shape[0]
    assert x.shape == (T, 5, task.input_size)
    assert y.shape == (T, 5, task.output_size)
    assert m.shape == (T, 5)
    assert all(t.dtype == torch.float32 for t in batch)
    assert set(m.unique().tolist()) <= {0.0, 1.0} and m.sum() > 0
    assert torch.all(y[m == 0] == 0)
    assert task.loss == "bce"
    assert batch.to("cpu").inputs.equal(x)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_seeded(name):
    task = make_task(name)
    a, b, c = task.batch(4, gen(7)), task.batch(4, gen(7)), task.batch(4, gen(8))
    assert all(u.equal(v) for u, v in zip(a, b))
    assert not all(u.shape == v.shape and u.equal(v) for u, v in zip(a, c))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_cost_perfect_and_known_errors(name):
    task = make_task(name)
    batch = task.batch(4, gen(3))
    logits = (batch.targets * 2 - 1) * 10
    if name == "ngrams":
        # Confident and right: near zero bits; all-zero logits: one bit per scored step.
        per_step = math.log2(1 + math.exp(-10))
        assert task.cost(logits, batch) == pytest.approx(195 * per_step)
        assert task.cost(torch.zeros_like(logits), batch) == pytest.approx(batch.mask.sum().item() / 4)
        return
    assert task.cost(logits, batch) == 0.0
    steps = batch.mask[:, 0].nonzero().flatten()
    bad = logits.clone()
    bad[steps[0], 0, 0] *= -1  # one error in sequence 0
    bad[steps[-1], 2, :] *= -1  # output_size errors in sequence 2
    unscored = (batch.mask[:, 1] == 0).nonzero().flatten()
    bad[unscored, 1] *= -1  # unscored steps do not count
    assert task.cost(bad, batch) == pytest.approx((1 + task.output_size) / 4)


def test_cost_rejects_wrong_shape():
    task = CopyTask()
    batch = task.batch(2, gen())
    with pytest.raises(ValueError, match="logits"):
        task.cost(batch.targets[:-1], batch)


def test_copy_encoding():
    task = CopyTask()
    for L in (20, 40, 80):
        x, y, m = task.batch(3, gen(), length=L)
        assert x.shape == (2 * L + 1, 3, 9)
        assert y[L + 1 :].equal(x[:L, :, :8])
        assert torch.all(x[L, :, 8] == 1) and x[L, :, :8].sum() == 0 and x[:L, :, 8].sum() == 0
        assert x[L + 1 :].sum() == 0
        assert m[: L + 1].sum() == 0 and torch.all(m[L + 1 :] == 1)
    g = gen(1)
    lengths = {(task.batch(1, g).inputs.shape[0] - 1) // 2 for _ in range(60)}
    assert min(lengths) >= 1 and max(lengths) <= 20 and len(lengths) > 10
    T = task.batch(2, gen(), min_len=5, max_len=5).inputs.shape[0]
    assert T == 11


def test_repeat_copy_encoding():
    task = RepeatCopyTask()
    L, R = 4, 3
    x, y, m = task.batch(3, gen(), length=L, repeats=R)
    T = L + 1 + L * R + 1
    assert x.shape == (T, 3, 9) and y.shape == (T, 3, 9)
    assert torch.allclose(x[L, :, 8], torch.full((3,), R / 10))
    assert x[:L, :, 8].sum() == 0 and x[L, :, :8].sum() == 0 and x[L + 1 :].sum() == 0
    seq = x[:L, :, :8]
    for r in range(R):
        assert y[L + 1 + r * L : L + 1 + (r + 1) * L, :, :8].equal(seq)
    assert torch.all(y[T - 1, :, 8] == 1) and y[T - 1, :, :8].sum() == 0
    assert y[: T - 1, :, 8].sum() == 0
    assert m[: L + 1].sum() == 0 and torch.all(m[L + 1 :] == 1)
    # Counts beyond the training range read above 1.0 (normalised by the task's max_repeats).
    x = task.batch(1, gen(), length=2, repeats=20).inputs
    assert x[2, 0, 8] == 2.0


def test_associative_recall_encoding():
    task = AssociativeRecallTask()
    n, k, bits, B = 5, 3, 6, 16
    x, y, m = task.batch(B, gen(2), num_items=n)
    Q = n * (k + 1)
    T = Q + 2 + 2 * k
    assert x.shape == (T, B, bits + 2)
    assert torch.all(x[0:Q:k + 1, :, bits] == 1) and x[:, :, bits].sum() == n * B
    assert torch.all(x[[Q, Q + k + 1], :, bits + 1] == 1) and x[:, :, bits + 1].sum() == 2 * B
    assert x[T - k :].sum() == 0
    assert m[: T - k].sum() == 0 and torch.all(m[T - k :] == 1)
    items = x[:Q].view(n, k + 1, B, bits + 2)[:, 1:, :, :bits]
    query = x[Q + 1 : Q + 1 + k, :, :bits]
    seen = set()
    for b in range(B):
        matches = [i for i in range(n) if items[i, :, b].equal(query[:, b])]
        q = matches[0]
        assert q < n - 1
        assert y[T - k :, b].equal(items[q + 1, :, b])
        seen.add(q)
    assert len(seen) > 1


def test_priority_sort_encoding():
    task = PrioritySortTask()
    x, y, m = task.batch(6, gen(4))
    n, mo, bits = 20, 16, 8
    assert x.shape == (n + 1 + mo, 6, bits + 2)
    pri = x[:n, :, bits]
    assert torch.all(pri.abs() <= 1) and pri.min() < -0.5 and pri.max() > 0.5
    assert torch.all(x[n, :, bits + 1] == 1) and x[:, :, bits + 1].sum() == 6
    assert x[n + 1 :].sum() == 0
    assert m[: n + 1].sum() == 0 and torch.all(m[n + 1 :] == 1)
    for b in range(6):
        ranked = sorted(range(n), key=lambda i: -pri[i, b].item())[:mo]
        assert y[n + 1 :, b].equal(x[ranked, b, :bits])
    small = task.batch(2, gen(), num_items=5, num_outputs=5)
    assert small.inputs.shape[0] == 11


def naive_bayes_cost(bits, c=5):
    counts = {}
    total = 0.0
    for t in range(c, len(bits)):
        ctx = tuple(bits[t - c : t])
        n0, n1 = counts.get(ctx, (0, 0))
        p1 = (n1 + 0.5) / (n0 + n1 + 1)
        total -= math.log2(p1 if bits[t] else 1 - p1)
        counts[ctx] = (n0 + (bits[t] == 0), n1 + (bits[t] == 1))
    return total


def test_ngrams_encoding_and_bayes_cost():
    task = NGramsTask()
    x, y, m = batch = task.batch(8, gen(5))
    assert x.shape == (199, 8, 1)
    assert m[:4].sum() == 0 and torch.all(m[4:] == 1)
    assert y[4:-1].equal(x[5:])
    assert set(x.unique().tolist()) == {0.0, 1.0}
    cost = task.optimal_cost(batch)
    assert math.isfinite(cost) and 0 < cost < 195 < 200
    seqs = torch.cat([x[:, :, 0], y[-1:, :, 0]]).t().long().tolist()
    naive = sum(naive_bayes_cost(s) for s in seqs) / 8
    assert cost == pytest.approx(naive, rel=1e-5)
    logits = task.optimal_logits(batch)
    assert logits.shape == y.shape and torch.all(logits[:4] == 0)
    assert task.batch(2, gen(), length=50).inputs.shape == (49, 2, 1)


def test_ngrams_tables_are_beta_half():
    # Beta(1/2, 1/2) tables make most contexts near-deterministic: Bayes beats uniform by far.
    task = NGramsTask(length=400)
    assert task.optimal_cost(task.batch(16, gen(6))) < 0.8 * 395


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: make_task("nope"), "copy"),
        (lambda: CopyTask().batch(0), "batch_size"),
        (lambda: CopyTask().batch(2, length=0), "length"),
        (lambda: CopyTask().batch(2, length=2.5), "length"),
        (lambda: CopyTask().batch(2, min_len=5, max_len=3), "max_len"),
        (lambda: CopyTask().batch(2, length=5, min_len=3), "length"),
        (lambda: CopyTask(bits=0), "bits"),
        (lambda: CopyTask(min_len=0), "min_len"),
        (lambda: RepeatCopyTask().batch(2, repeats=0), "repeats"),
        (lambda: RepeatCopyTask(min_repeats=4, max_repeats=2), "max_repeats"),
        (lambda: AssociativeRecallTask().batch(2, num_items=1), "num_items"),
        (lambda: AssociativeRecallTask(min_items=1), "min_items"),
        (lambda: NGramsTask().batch(2, length=5), "length"),
        (lambda: NGramsTask(context=0), "context"),
        (lambda: PrioritySortTask().batch(2, num_outputs=21), "num_outputs"),
        (lambda: PrioritySortTask(num_items=10), "num_outputs"),
        (lambda: PrioritySortTask().batch(2, num_items=10), "the task's num_outputs"),
    ],
)
def test_bad_arguments(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()
