"""Block-configuration overrides (``_config.force``, ``FASTNTM_BLOCKS``): honoured by ``choose()``, validated."""

from __future__ import annotations

import pytest

from fastntm.kernels import _config


@pytest.fixture(autouse=True)
def no_env_overrides(monkeypatch):
    monkeypatch.delenv(_config.ENV, raising=False)


# ---------------------------------------------------------------- overrides


def test_force_sets_each_part_of_the_choice_and_restores_it():
    default_large, default_onchip = _config.choose(65536, 64), _config.choose(128, 20)
    assert (default_large.onchip, default_large.BN, default_large.num_warps, default_large.BV) == (False, 32, 4, 1024)
    assert (default_onchip.onchip, default_onchip.num_warps, default_onchip.bwd_warps) == (True, 8, 8)
    with _config.force(block_n=64, num_warps=8, vector_block=256):
        blk = _config.choose(65536, 64)
        assert (blk.onchip, blk.BN, blk.num_warps, blk.bwd_warps, blk.BV) == (False, 64, 8, 8, 256)
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
        assert _config.choose(37, 13).num_warps == 4
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
    assert _config.choose(128, 20).bwd_warps == 8


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


def test_onchip_register_limit_leaves_every_warp_count_launchable():
    assert [_config.onchip_maxnreg(w) for w in (1, 4, 8, 16, 32)] == [255, 255, 255, 128, 64]
