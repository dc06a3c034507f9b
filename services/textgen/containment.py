"""Failure containment for the engine's work: a fault ends exactly the sequences it belongs to."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)
S = TypeVar("S")
Fail = Callable[[Any, str, BaseException], None]


def batched(
    group: list[S], forward: Callable[[list[S]], list], stage: str, fail: Fail
) -> list[tuple[S, object]]:
    """``forward(group)`` -> one output per sequence. When it raises for the whole group, each sequence is
    run alone, so a fault fails (``fail(seq, stage, error)``) exactly the sequences that fail on their own,
    and the rest get the outputs they would have had (the forward passes only write their own KV blocks)."""
    try:
        return list(zip(group, forward(group)))
    except Exception as e:  # noqa: BLE001
        if len(group) == 1:
            fail(group[0], stage, e)
            return []
        logger.warning(
            "%s failed for %d sequences (%s: %s); running each alone", stage, len(group), type(e).__name__, e
        )
    out: list[tuple[S, object]] = []
    for s in group:
        try:
            out.extend(zip([s], forward([s])))
        except Exception as e:  # noqa: BLE001
            fail(s, stage, e)
    return out


def guarded(s: S, stage: str, work: Callable[[], None], fail: Fail) -> None:
    """One sequence's own work (sampling, log-probs, accept, stop detection); a fault ends only it."""
    try:
        work()
    except Exception as e:  # noqa: BLE001
        fail(s, stage, e)
