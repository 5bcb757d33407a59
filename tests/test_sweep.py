"""Block-configuration overrides (``_config.force``, ``FASTNTM_BLOCKS``) and the block-size sweep's core loop,
on CPU: the sweep's kernels run under the Triton interpreter and a stand-in timer replaces CUDA timing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from fastntm import kernels
from fastntm.kernels import _config

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not part of the installed package

from benchmarks import common, summary, sweep_blocks  # noqa: E402
from benchmarks.shapes import OP_SHAPES, OpShape  # noqa: E402

# The interpreter's own use of numpy, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:triton.runtime.interpreter")
interpreted = pytest.mark.skipif(not getattr(kernels, "INTERPRETING", False),
                                 reason="needs TRITON_INTERPRET=1 set before fastntm.kernels is imported")


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch):
    monkeypatch.delenv(_config.ENV, raising=False)


# ---------------------------------------------------------------- overrides


def test_force_sets_each_part_of_the_choice_and_restores_it():
    default_large, default_onchip = _config.choose(65536, 64), _config.choose(128, 20)
    assert (default_large.onchip, default_large.BN, default_large.num_warps, default_large.BV) == (False, 64, 2, 1024)
    assert (default_large.sim_BN, default_large.sim_warps) == (64, 2)
    assert (default_onchip.onchip, default_onchip.num_warps, default_onchip.bwd_warps) == (True, 8, 4)
    assert default_large.memory_bwd == (32, 2) and default_onchip.memory_bwd == (128, 8)
    with _config.force(block_n=64, num_warps=8, vector_block=256):
        blk = _config.choose(65536, 64)
        assert (blk.onchip, blk.BN, blk.num_warps, blk.bwd_warps, blk.BV) == (False, 64, 8, 8, 256)
        assert blk.memory_bwd == (64, 8)  # the backward follows the forward unless told otherwise
        assert (blk.sim_BN, blk.sim_warps) == (64, 8)  # and so does the similarity pass
        with _config.force(sim_block_n=32, sim_warps=2):
            blk = _config.choose(65536, 64)
            assert (blk.BN, blk.num_warps, blk.sim_BN, blk.sim_warps) == (64, 8, 32, 2)
        with _config.force(bwd_block_n=16, bwd_warps=2):
            blk = _config.choose(65536, 64)
            assert (blk.BN, blk.num_warps, blk.memory_bwd) == (64, 8, (16, 2))
    with _config.force(num_warps=1):  # one warp's rows: the default's 64 at one warp spilled
        assert (_config.choose(65536, 64).BN, _config.choose(65536, 64).num_warps) == (32, 1)
        assert (_config.choose(65536, 64).sim_BN, _config.choose(65536, 64).sim_warps) == (32, 1)  # likewise
    with _config.force(sim_warps=1):
        assert (_config.choose(65536, 64).sim_BN, _config.choose(65536, 64).sim_warps) == (32, 1)
    with _config.force(bwd_block_n=16, bwd_warps=2):
        assert _config.choose(128, 20) == default_onchip  # large-memory backward settings leave on-chip alone
    with _config.force(onchip_warps=2, onchip_bwd_warps=16):
        blk = _config.choose(128, 20)
        assert (blk.onchip, blk.BN, blk.num_warps, blk.bwd_warps) == (True, 128, 2, 16)
        assert _config.choose(65536, 64) == default_large  # on-chip settings leave the large regime alone
    assert _config.choose(65536, 64) == default_large and _config.choose(128, 20) == default_onchip


def test_nested_force_keeps_the_outer_settings_and_none_clears_one():
    with _config.force(block_n=16):
        assert _config.choose(37, 13).BV == 16  # a forced BN alone forces the vector block too
        with _config.force(num_warps=2, vector_block=32):
            blk = _config.choose(37, 13)
            assert (blk.BN, blk.num_warps, blk.BV) == (16, 2, 32)
            with _config.force(block_n=None):
                assert _config.choose(37, 13).onchip
        assert _config.choose(37, 13).num_warps == _config.large_warps(13)[0]  # the inner num_warps is gone
    with _config.force_block_n(16):
        assert not _config.choose(37, 13).onchip


def test_environment_is_read_at_every_call_and_force_wins(monkeypatch):
    monkeypatch.setenv(_config.ENV, "block_n=64, num_warps=8")
    blk = _config.choose(65536, 64)
    assert (blk.BN, blk.num_warps, blk.BV) == (64, 8, 64)
    with _config.force(num_warps=2):
        assert (_config.choose(65536, 64).BN, _config.choose(65536, 64).num_warps) == (64, 2)
    monkeypatch.setenv(_config.ENV, "onchip_bwd_warps=16")
    assert _config.choose(128, 20).bwd_warps == 16
    monkeypatch.delenv(_config.ENV)
    assert _config.choose(128, 20).bwd_warps == 4


@pytest.mark.parametrize("settings, message", [
    (dict(block_n=48), "block_n must be a power of two in [16, 1024], got 48"),
    (dict(block_n=8), "block_n must be a power of two"),
    (dict(num_warps=3), "num_warps must be a power of two in [1, 32], got 3"),
    (dict(onchip_warps=64), "onchip_warps must be a power of two in [1, 32], got 64"),
    (dict(onchip_bwd_warps=True), "onchip_bwd_warps must be a power of two"),
    (dict(vector_block=16384), "vector_block must be a power of two in [16, 8192]"),
    (dict(warps=4), "unknown setting 'warps'"),
], ids=["BN48", "BN8", "warps3", "onchip64", "bool", "vector16384", "unknown"])
def test_force_rejects_a_bad_setting_by_name(settings, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        with _config.force(**settings):
            pass
    assert _config.overrides() == _config.Overrides()


@pytest.mark.parametrize("text, message", [
    ("num_warps=3", "FASTNTM_BLOCKS: num_warps must be a power of two"),
    ("num_warps=four", "FASTNTM_BLOCKS: num_warps must be an integer, got 'four'"),
    ("block_n", "FASTNTM_BLOCKS: expected comma-separated name=value"),
    ("bn=32", "FASTNTM_BLOCKS: unknown setting 'bn'"),
], ids=["warps3", "not-int", "no-value", "unknown"])
def test_environment_rejects_a_bad_setting_by_name(monkeypatch, text, message):
    monkeypatch.setenv(_config.ENV, text)
    with pytest.raises(ValueError, match=message):
        _config.choose(128, 20)


def test_register_limit_leaves_every_warp_count_launchable():
    assert [_config.maxnreg(w) for w in (1, 4, 8, 16, 32)] == [255, 255, 255, 128, 64]


# ---------------------------------------------------------------- the sweep


def test_candidates_cover_the_requested_grid_default_first():
    large, paper = OP_SHAPES["large"], OP_SHAPES["paper-b32"]
    full = sweep_blocks.candidates(large, quick=False)
    assert full[0].axis == "default"
    fwd = [c.settings for c in full if c.axis == "fwd"]
    bwd = [c.settings for c in full if c.axis == "bwd"]
    assert {(c["block_n"], c["num_warps"]) for c in fwd} == {(bn, w) for bn in (16, 32, 64, 128) for w in (1, 2, 4, 8)}
    assert {(c["bwd_block_n"], c["bwd_warps"]) for c in bwd} == {(bn, w) for bn in (16, 32, 64, 128) for w in (2, 4, 8)}
    # Each axis holds the other at its default.
    default = _config.choose(large.N, large.M)
    assert all((c["vector_block"], c["bwd_block_n"], c["bwd_warps"]) == (1024, 32, default.bwd_warps) for c in fwd)
    assert all(set(c) == {"bwd_block_n", "bwd_warps"} for c in bwd)
    assert [(c["num_warps"], c["block_n"]) for c in fwd] == sorted((c["num_warps"], c["block_n"]) for c in fwd)
    per_thread = [c["bwd_block_n"] * 64 / (32 * c["bwd_warps"]) for c in bwd]
    assert per_thread == sorted(per_thread)
    assert [c.settings["vector_block"] for c in full if c.axis == "vector"] == list(sweep_blocks.VECTOR_BLOCKS)
    quick = sweep_blocks.candidates(large, quick=True)
    # The three axes take turns, so that a budget cut leaves each timed; one-warp forward programs first.
    assert [c.axis for c in quick] == ["default"] + ["sim", "fwd", "bwd"] * 5 + ["fwd", "bwd"] * 4 + ["fwd"] * 4
    assert [c.settings["sim_warps"] for c in quick[1:5:3]] == [1, 1]
    assert [c.settings["num_warps"] for c in quick[2:6:3]] == [1, 1]
    # The forward's default before 64 rows at two warps: 32 at one.
    assert dict(block_n=32, num_warps=1, vector_block=1024, bwd_block_n=32, bwd_warps=default.bwd_warps,
                sim_block_n=64, sim_warps=2) in [c.settings for c in quick]
    sim = [(c.settings["sim_block_n"], c.settings["sim_warps"]) for c in quick if c.axis == "sim"]
    assert sim == [(16, 1), (32, 1), (16, 2), (32, 2), (64, 2)]  # (64, 1): 128 elements a thread
    assert (128, 2) not in [(c.settings.get("bwd_block_n"), c.settings.get("bwd_warps")) for c in quick[1:]]
    onchip = sweep_blocks.candidates(paper, quick=True)
    assert [c.settings for c in onchip if c.axis == "fwd"] == [dict(onchip_warps=w) for w in (2, 4, 8, 16)]
    assert [c.settings for c in onchip if c.axis == "bwd"] == [dict(onchip_bwd_warps=w) for w in (2, 8, 16)]


def test_main_refuses_to_run_without_cuda(capsys, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert sweep_blocks.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "sweep_blocks.json").exists()


TINY = OpShape("tiny", B=2, N=37, M=13, R=1, W=1)


def stand_in_timer(fn):
    """A time that depends on the configuration in force when it is called: fewer warps, faster; more
    backward warps, much faster (so the best is the combination of two axes)."""
    blk = _config.choose(TINY.N, TINY.M)
    return dict(p50_us=1000 / blk.bwd_warps + blk.num_warps, p20_us=0.0, p80_us=0.0)


def wrong_at_8_warps(*args):
    w, r, new = kernels.memory_step(*args)
    blk = _config.choose(TINY.N, TINY.M)
    return (w * 1.01 if blk.onchip and blk.num_warps == 8 else w), r, new


@interpreted
def test_sweep_checks_skips_records_and_writes_json(tmp_path):
    C = sweep_blocks.Candidate
    cands = [C("default", {}),
             C("fwd", dict(block_n=16, num_warps=2, vector_block=32)),
             C("fwd", dict(onchip_warps=8)),  # wrong outputs
             C("fwd", dict(onchip_warps=3)),  # refused by force()
             C("fwd", dict(onchip_warps=2)),
             C("fwd", dict(onchip_warps=4)),  # the default's blocks again: no row
             C("bwd", dict(onchip_bwd_warps=8))]
    result = dict(shapes={})
    out = result["shapes"]["tiny"] = {}
    path = tmp_path / "sweep_blocks.json"
    sweep_blocks.sweep_shape(TINY, torch.device("cpu"), cands, timer=stand_in_timer, graph_timer=stand_in_timer,
                             copy_GBps=10.0, out=out, step=wrong_at_8_warps,
                             on_progress=lambda: common.write_json(str(path), result), log=lambda *_: None)
    saved = json.loads(path.read_text())["shapes"]["tiny"]
    rows = {r["label"] if "label" in r else str(r["settings"]): r for r in saved["rows"]}
    assert [r["status"] for r in saved["rows"]] == ["ok", "ok", "MISMATCH", "failed", "ok", "ok", "ok"]
    default = rows["on-chip BN 64 warps 4 bwd 4"]
    assert default["axis"] == "default" and default["rel_err_reference"] < 1e-4
    mismatch = rows["on-chip BN 64 warps 8 bwd 4"]
    assert "w differs" in mismatch["note"] and "fwd" not in mismatch
    assert "onchip_warps must be a power of two" in rows["{'onchip_warps': 3}"]["note"]
    large = rows["BN 16 warps 2 sim BN 16 warps 2 BV 32 bwd BN 16 warps 2"]
    launched = {(k["kernel"], k["consts"].get("BN"), k["num_warps"]) for k in large["kernels"]}
    assert {("_similarity_kernel", 16, 2), ("_shift_sharpen_kernel", 32, 4), ("_mem_bwd_kernel", 16, 2)} <= launched
    assert all(k["n_regs"] is None for k in large["kernels"])  # the interpreter compiles nothing
    assert large["fwd_bwd_graph"]["p50_us"] == 1000 / 2 + 2 and large["fwd"]["frac_copy"] > 0
    combined = saved["rows"][-1]
    assert combined["axis"] == "combined" and combined["settings"] == dict(onchip_warps=2, onchip_bwd_warps=8)
    best = saved["best"]["fwd_bwd_graph"]
    assert best["label"] == "on-chip BN 64 warps 2 bwd 8" and best["speedup"] == pytest.approx(254 / 127)
    text = "\n".join(sweep_blocks.table("tiny", out))
    assert text.index("warps 2 bwd 8") < text.index("warps 4 bwd 4 *") and "MISMATCH" in text
    assert any("sweep tiny fwd_bwd_graph: best on-chip BN 64 warps 2 bwd 8" in line
               for line in summary.sweep_lines(json.loads(path.read_text())))


@interpreted
def test_sweep_out_of_time_leaves_skipped_rows():
    out = {}
    cands = [sweep_blocks.Candidate("default", {}), sweep_blocks.Candidate("fwd", dict(onchip_warps=2))]
    sweep_blocks.sweep_shape(TINY, torch.device("cpu"), cands, timer=stand_in_timer, graph_timer=None,
                             copy_GBps=10.0, out=out, deadline=0.0, log=lambda *_: None)
    assert [r["status"] for r in out["rows"]] == ["skipped", "skipped"] and out["stopped"] == "budget"
    assert out["timings"] == ["fwd", "fwd_bwd"]


def test_summary_prints_the_sweep_only_when_it_ran(tmp_path):
    assert not any("sweep" in line for line in summary.summarise(str(tmp_path)))
    best = dict(label="BN 64 warps 8 BV 1024", settings={}, p50_us=500.0, default_p50_us=640.0, speedup=1.28,
                GBps=1600.0, frac_copy=0.4)
    rows = [dict(label="BN 32 warps 4 BV 1024", axis="default", status="ok"),
            dict(label="BN 64 warps 8 BV 1024", axis="fwd", status="ok", spill_bytes=48),
            dict(label="BN 16 warps 2 BV 1024", axis="fwd", status="failed", note="x"),
            dict(axis="bwd", settings={}, status="skipped", note="time budget spent")]
    (tmp_path / "sweep_blocks.json").write_text(json.dumps(dict(shapes=dict(large=dict(best=dict(fwd=best),
                                                                                       rows=rows)))))
    lines = [line for line in summary.summarise(str(tmp_path)) if "sweep" in line]
    assert lines[0] == ("  sweep large fwd: best BN 64 warps 8 BV 1024: 500.0 us, 1.28x the default's 640.0 us, "
                        "40% of copy")
    assert "2 of 4 configurations timed, 1 left for time" in lines[1]
    assert "BN 64 warps 8 BV 1024 (48 B)" in lines[1] and "BN 16 warps 2 BV 1024 (failed)" in lines[1]


def test_large_memory_combination_takes_the_best_backward_over_the_forward_rows_defaults():
    def row(axis, settings, fwd, fwd_bwd):
        return dict(axis=axis, settings=settings, status="ok", fwd=dict(p50_us=fwd), fwd_bwd=dict(p50_us=fwd_bwd))

    held = dict(vector_block=1024, bwd_block_n=32, bwd_warps=4)
    rows = [row("default", {}, 100.0, 400.0),
            row("fwd", dict(block_n=32, num_warps=1, **held), 60.0, 380.0),
            row("fwd", dict(block_n=64, num_warps=2, **held), 80.0, 350.0),
            row("bwd", dict(bwd_block_n=64, bwd_warps=8), 100.0, 300.0),
            row("bwd", dict(bwd_block_n=16, bwd_warps=2), 100.0, 420.0)]
    (combined,) = sweep_blocks._combined(rows, graph=False)
    assert combined.settings == dict(block_n=32, num_warps=1, vector_block=1024, bwd_block_n=64, bwd_warps=8)
