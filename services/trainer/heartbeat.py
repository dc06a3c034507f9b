"""Rank heartbeats: how the Ray driver tells a hung rank from a slow one.

Each rank writes the wall time into ``<save_dir>/.megastack-heartbeat/rank-<N>`` from its step loop and around
checkpoint saves (the save folder is shared by every node, as checkpoints need). The driver restarts the
attempt from the last checkpoint when a rank has not beaten for ``resources.hang_timeout_s`` (a deadlocked
collective, a stopped process, a stuck filesystem), just as it does when a rank dies.
"""

from __future__ import annotations

import time
from pathlib import Path

from services.trainer.jobfiles import HEARTBEAT_DIR

DIR = HEARTBEAT_DIR
EVERY_S = (
    1.0  # beats closer together than this are skipped: a step is often far shorter, the timeout minutes long
)
_last: dict[tuple[str, int], float] = {}


def beat(save_dir: str | Path, rank: int, *, force: bool = False) -> None:
    """Record that ``rank`` is making progress (at most once per :data:`EVERY_S` unless ``force``)."""
    now = time.monotonic()
    key = (str(save_dir), rank)
    if not force and now - _last.get(key, -EVERY_S) < EVERY_S:
        return
    _last[key] = now
    d = Path(save_dir) / DIR
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".rank-{rank}.tmp"
    tmp.write_text(f"{time.time():.3f}")
    tmp.replace(d / f"rank-{rank}")


def stale_ranks(
    save_dir: str | Path, world: int, timeout_s: float, since: float, now: float | None = None
) -> list[tuple[int, float]]:
    """(rank, seconds without a beat) of the ranks silent for more than ``timeout_s``; a rank that has not
    beaten yet counts from ``since`` (the attempt's start)."""
    now = time.time() if now is None else now
    out = []
    for rank in range(world):
        try:
            last = max(float((Path(save_dir) / DIR / f"rank-{rank}").read_text()), since)
        except (OSError, ValueError):
            last = since
        if now - last > timeout_s:
            out.append((rank, now - last))
    return out
