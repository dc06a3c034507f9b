"""Rank heartbeats: silent ranks are found, counted from the attempt's start until their first beat."""

from __future__ import annotations

from services.trainer import heartbeat
from services.trainer.ray_driver import restart_reason


def test_silent_ranks_are_the_stale_ones(tmp_path):
    heartbeat.beat(tmp_path, 0)
    beat0 = float((tmp_path / heartbeat.DIR / "rank-0").read_text())
    # rank 1 never beat: it counts from the attempt's start
    assert heartbeat.stale_ranks(tmp_path, 2, 30, since=beat0, now=beat0 + 10) == []
    stale = heartbeat.stale_ranks(tmp_path, 2, 30, since=beat0 - 5, now=beat0 + 31)
    assert [r for r, _ in stale] == [0, 1] and all(s > 30 for _, s in stale)
    heartbeat.beat(tmp_path, 1)
    beat1 = float((tmp_path / heartbeat.DIR / "rank-1").read_text())
    assert [r for r, _ in heartbeat.stale_ranks(tmp_path, 2, 30, since=beat0 - 5, now=beat1 + 25)] == []
    # a heartbeat left by an earlier attempt does not make a fresh attempt's rank look stale at once
    assert heartbeat.stale_ranks(tmp_path, 2, 30, since=beat1 + 100, now=beat1 + 110) == []


def test_restart_reasons():
    assert restart_reason("hang: rank 1 made no progress for 31s") == "hang"
    assert restart_reason("a rank exited with code 1") == "rank_failed"
