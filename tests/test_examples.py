"""Smoke tests of examples/long_recall.py: the data generator's layout and targets, chunked
streaming equal to one forward pass, and a few training steps end to end at tiny sizes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "long_recall.py"


@pytest.fixture(scope="module")
def lr():
    spec = importlib.util.spec_from_file_location("long_recall", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["long_recall"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("distractor", ["tokens", "zeros"])
def test_batch_layout_and_target(lr, distractor):
    task = lr.TaskConfig(num_keys=6, num_values=5, num_pairs=3, num_distractors=4, distractor=distractor)
    g = torch.Generator().manual_seed(0)
    B, gap = 64, 7
    ep = lr.make_episode(task, B, g)
    x = torch.cat([ep.prefix, lr.distractors(task, gap, B, g), ep.query])
    assert x.shape == (3 + gap + 1, B, task.input_size) == (11, 64, 6 + 5 + 4 + 1)
    K, V, D = 6, 5, 4
    for b in range(B):
        # Pair steps: exactly one key and one value, nothing else.
        for p in range(3):
            assert x[p, b, :K].argmax() == ep.keys[b, p] and x[p, b, :K].sum() == 1
            assert x[p, b, K : K + V].argmax() == ep.values[b, p] and x[p, b, K : K + V].sum() == 1
            assert x[p, b, K + V :].sum() == 0
        assert len(set(ep.keys[b].tolist())) == 3  # distinct keys
        # Gap: only distractor channels, one token a step (or zeros).
        gap_x = x[3 : 3 + gap, b]
        assert gap_x[:, : K + V].sum() == 0 and gap_x[:, -1].sum() == 0
        expected = gap if distractor == "tokens" else 0
        assert gap_x[:, K + V : K + V + D].sum() == expected
        # Query: the flag and one of the keys; the target is that key's value.
        q = x[-1, b]
        assert q[-1] == 1 and q[:K].sum() == 1 and q[K:-1].sum() == 0
        queried_key = int(q[:K].argmax())
        slot = ep.keys[b].tolist().index(queried_key)
        assert slot == ep.query_index[b]
        assert ep.target[b] == ep.values[b, slot]
    # The decoder reads the value straight from the pair step whose key matches the query.
    x2, t2 = lr.make_batch(task, B, gap, torch.Generator().manual_seed(1))
    for b in range(B):
        key = x2[-1, b, :K].argmax()
        pair = next(p for p in range(3) if x2[p, b, key] == 1)
        assert t2[b] == x2[pair, b, K : K + V].argmax()


@pytest.mark.parametrize("gap,chunk", [(0, 1), (5, 3), (10, 4), (13, 7), (20, 64)])
def test_stream_chunks_cover_the_sequence(lr, gap, chunk):
    task = lr.TaskConfig(num_pairs=2)
    g = torch.Generator().manual_seed(0)
    ep = lr.make_episode(task, 3, g)
    chunks = list(lr.stream_chunks(task, ep, gap, chunk, g))
    x = torch.cat(chunks)
    assert x.shape[0] == 2 + gap + 1
    assert torch.equal(x[:2], ep.prefix) and torch.equal(x[-1:], ep.query)
    assert all(c.shape[0] <= max(chunk, 2 + 1) for c in chunks)


def test_streamed_logits_equal_one_forward(lr):
    torch.manual_seed(0)
    task = lr.TaskConfig(num_keys=4, num_values=3, num_pairs=2, num_distractors=2)
    model = lr.RecallModel(task, memory_slots=6, memory_width=4, controller_size=8).eval()
    ep = lr.make_episode(task, 5, torch.Generator().manual_seed(3))
    chunks = list(lr.stream_chunks(task, ep, 17, 4, torch.Generator().manual_seed(4)))
    with torch.no_grad():
        whole, _ = model(torch.cat(chunks))
    streamed = model.predict_stream(iter(chunks))
    torch.testing.assert_close(streamed, whole)


def test_train_and_eval_commands(lr, tmp_path, capsys):
    out = tmp_path / "made" / "tiny.pt"  # a folder the first save makes
    info = lr.main(
        ["train", "--out", str(out), "--steps", "4", "--batch", "4", "--gap", "6", "--gap-start", "3",
         "--eval-every", "2", "--val-size", "8", "--keys", "4", "--values", "3", "--pairs", "2",
         "--distractors", "2", "--slots", "6", "--width", "4", "--controller-size", "8", "--threads", "1"]
    )
    assert info["step"] == 4 and info["seen"] == 16 and len(info["history"]) == 2
    model, task, _, saved = lr.load(out)
    assert task.num_pairs == 2 and saved["step"] == 4
    results = lr.main(["eval", str(out), "--gaps", "3,40", "--sequences", "6", "--batch", "4", "--chunk", "16"])
    assert set(results) == {3, 40} and all(0.0 <= a <= 1.0 for a in results.values())
    assert "gap     40" in capsys.readouterr().out


def test_pair_gap_layout(lr):
    task = lr.TaskConfig(num_keys=4, num_values=3, num_pairs=2, num_distractors=2, distractor="tokens", pair_gap=2)
    ep = lr.make_episode(task, 5, torch.Generator().manual_seed(0))
    assert ep.prefix.shape[0] == task.prefix_steps == 6
    for p in range(2):
        step = ep.prefix[3 * p]
        assert torch.equal(step[:, :4].argmax(-1), ep.keys[:, p])
        assert torch.equal(step[:, 4:7].argmax(-1), ep.values[:, p])
        gap = ep.prefix[3 * p + 1 : 3 * p + 3]
        assert gap[..., :7].sum() == 0 and gap[..., 7:9].sum() == 2 * 5
    chunks = list(lr.stream_chunks(task, ep, 5, 4, torch.Generator().manual_seed(1)))
    assert torch.cat(chunks).shape[0] == 6 + 5 + 1


def test_copy_head_init_walks_the_write_head(lr):
    torch.manual_seed(0)
    task = lr.TaskConfig(num_pairs=2, distractor="zeros")
    model = lr.RecallModel(task, memory_slots=8, memory_width=20, controller="mlp", head_init="copy")
    x, _ = lr.make_batch(task, 3, 9, torch.Generator().manual_seed(0))
    with torch.no_grad(), model.ntm.record() as trace:
        model(x)
    w = trace.write_weights[:, :, 0]  # (T, B, N)
    assert torch.equal(w.argmax(-1), (torch.arange(1, x.shape[0] + 1) % 8)[:, None].expand(-1, 3))
    assert w.max(-1).values.min() > 0.9
    with pytest.raises(ValueError, match="head_init"):
        lr.RecallModel(task, head_init="nope")


def test_pairs_curriculum_advances(lr, tmp_path):
    info = lr.main(
        ["train", "--out", str(tmp_path / "c.pt"), "--steps", "4", "--batch", "4", "--gap", "4", "--gap-start", "2",
         "--eval-every", "1", "--val-size", "4", "--keys", "4", "--values", "3", "--pairs", "4", "--pairs-start", "1",
         "--advance-at", "0.0", "--pair-gap", "1", "--head-init", "copy", "--distractor", "zeros", "--slots", "6",
         "--width", "8", "--controller", "mlp", "--controller-size", "8", "--threads", "1"]
    )
    stages = [(h["max_pairs"], h["max_gap"]) for h in info["history"]]
    assert stages == [(1, 2), (2, 2), (4, 2), (4, 4)]
    model, task, _, _ = lr.load(tmp_path / "c.pt")
    assert task.num_pairs == 4 and task.pair_gap == 1


def test_init_from_continues_training(lr, tmp_path):
    first = tmp_path / "first.pt"
    lr.main(
        ["train", "--out", str(first), "--steps", "2", "--batch", "4", "--gap", "3", "--gap-start", "3",
         "--eval-every", "2", "--val-size", "4", "--keys", "4", "--values", "3", "--pairs", "2", "--distractor",
         "zeros", "--slots", "6", "--width", "4", "--controller", "mlp", "--controller-size", "8", "--threads", "1"]
    )
    model0, task0, model_args0, _ = lr.load(first)
    second = tmp_path / "second.pt"
    # Task and model flags are taken from the checkpoint (these defaults would not fit it).
    info = lr.main(
        ["train", "--init-from", str(first), "--out", str(second), "--steps", "3", "--batch", "4", "--gap", "12",
         "--gap-min", "8", "--gap-start", "12", "--eval-every", "3", "--val-size", "4", "--lr", "0",
         "--threads", "1"]
    )
    assert info["init_from"] == str(first) and info["seen"] == 12 and info["total_seen"] == 8 + 12
    assert [h["stage"] for h in info["history"]] == [0, 1] and info["history"][-1]["max_gap"] == 12
    model1, task1, model_args1, saved = lr.load(second)
    assert task1 == task0 and model_args1 == model_args0 and saved["total_seen"] == 20
    # lr 0: the weights are exactly the ones loaded.
    for (name, p0), p1 in zip(model0.state_dict().items(), model1.state_dict().values()):
        assert torch.equal(p0, p1), name


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--steps", "0"], "--steps must be positive"),
        (["train", "--eval-every", "0"], "--eval-every must be positive"),
        (["train", "--val-size", "0"], "--val-size must be positive"),
        (["train", "--gap-min", "20", "--gap-start", "10"], "--gap-min 20 is above the first largest gap"),
        (["train", "--gap-start", "0"], "the curriculum would never reach --gap 100"),
        (["train", "--gap-growth", "1"], "the curriculum would never reach --gap 100"),
        (["train", "--pairs", "9"], "num_pairs must be in 1..num_keys=8"),
        (["train", "--out", "{tmp}/run.pt/x.pt"], "run.pt is a file, not a folder"),
        (["train", "--init-from", "{tmp}/missing.pt"], "no checkpoint file"),
        (["eval", "{tmp}/missing.pt"], "no checkpoint file"),
        (["eval", "{tmp}/run.pt", "--gaps", "10,-5"], "--gaps must be whole numbers >= 0"),
        (["eval", "{tmp}/run.pt", "--chunk", "0"], "--chunk must be positive"),
        (["eval", "{tmp}/run.pt", "--sequences", "0"], "--sequences must be positive"),
        (["eval", "{tmp}/run.pt"], "run.pt is not a checkpoint of this script: "),
        (["train", "--init-from", "{tmp}/run.pt"], "run.pt is not a checkpoint of this script (--init-from): "),
    ],
    ids=["steps", "eval-every", "val-size", "gap-min", "gap-start-0", "gap-growth-1", "pairs", "out-folder",
         "init-from", "eval-checkpoint", "eval-gaps", "eval-chunk", "eval-sequences", "eval-damaged",
         "init-from-damaged"],
)
def test_bad_flags_are_refused_before_anything_runs(lr, tmp_path, capsys, args, message):
    (tmp_path / "run.pt").write_bytes(b"")
    argv = [a.format(tmp=tmp_path) for a in args]
    if argv[0] == "train" and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out.pt")]
    with pytest.raises(SystemExit) as exc:
        lr.parse_args(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out.pt").exists()
