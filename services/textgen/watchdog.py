"""Health by progress: the engine's gRPC health follows whether it moves, not whether its thread exists."""

from __future__ import annotations

import logging
import threading
import time

from services.textgen.loader import ServedModel

logger = logging.getLogger(__name__)


class Watchdog:
    """Turns gRPC health NOT_SERVING when the engine thread dies or a busy engine stops making progress.

    Progress is a token accepted or a sequence finished (``Engine.last_progress_at``), not a loop turn:
    a loop that keeps turning while no sequence advances is as wedged as one that blocks.
    """

    def __init__(self, served: ServedModel, set_serving, timeout_s: float) -> None:
        self.engine = served.engine
        self.set_serving = set_serving
        self.timeout_s = timeout_s
        self.poll_s = min(0.25, timeout_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="textgen-watchdog", daemon=True)
        self.healthy = True

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def check(self) -> bool:
        waiting, running = self.engine.load()
        busy = waiting + running > 0
        stalled = busy and time.monotonic() - self.engine.last_progress_at > self.timeout_s
        return self.engine.is_alive() and not stalled

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            ok = self.check()
            if ok != self.healthy:
                if ok:
                    logger.warning("engine is making progress again: health -> SERVING")
                else:
                    logger.error(
                        "engine made no progress for %.1fs while busy (or stopped): health -> NOT_SERVING",
                        self.timeout_s,
                    )
                self.healthy = ok
                self.set_serving(ok)
