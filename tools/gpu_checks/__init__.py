"""The checks of ``tools/gpu_check.py``, by topic: ``serving`` (textgen, the default model, MoE decoding,
the evaluator's scores) and ``training`` (the converter's parity, megatron-core training). Each check takes
a ``Check`` and fills its figures and failures; ``tools/gpu_check.py`` runs them in order and writes the
report."""

from __future__ import annotations

import time
from typing import Any


class Check:
    """One named check: its figures, and a failure list that makes it fail."""

    def __init__(self, name: str) -> None:
        self.name, self.figures, self.failures = name, {}, []
        self.t0 = time.perf_counter()

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.failures.append(what)

    def report(self, error: str | None = None, skipped: str | None = None) -> dict[str, Any]:
        out = {
            "name": self.name,
            "passed": skipped is None and error is None and not self.failures,
            "seconds": round(time.perf_counter() - self.t0, 2),
            "figures": self.figures,
        }
        if self.failures:
            out["failures"] = self.failures
        if error:
            out["error"] = error
        if skipped:
            out["skipped"] = skipped
            out["passed"] = None
        return out
