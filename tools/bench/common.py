"""Benchmark plumbing: run a command and measure it, print a table, write bench-results/<name>.json."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.paths import REPO_ROOT

RESULTS_DIR = REPO_ROOT / "bench-results"
PY = sys.executable


@dataclass
class ProcessRun:
    seconds: float
    peak_rss_bytes: int
    returncode: int
    output: str


def run_process(argv: list[str], env: dict[str, str] | None = None, cwd: Path = REPO_ROOT) -> ProcessRun:
    """Run to completion; wall time and the child's own peak RSS (os.wait4, not the sum over children)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        text=True,
    )
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return ProcessRun(seconds, usage.ru_maxrss * 1024, proc.returncode, out)


def median_run(argv: list[str], repeats: int, *, before=None, env=None) -> dict[str, Any]:
    runs = []
    for _ in range(repeats):
        if before is not None:
            before()
        r = run_process(argv, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.output[-2000:]}")
        runs.append(r)
    return {
        "seconds": statistics.median(r.seconds for r in runs),
        "seconds_runs": [round(r.seconds, 3) for r in runs],
        "peak_rss_bytes": int(statistics.median(r.peak_rss_bytes for r in runs)),
        "output": runs[-1].output,
    }


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [
        [f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save(name: str, doc: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(exist_ok=True)
    doc = {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **doc,
    }
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"\nwrote {path.relative_to(REPO_ROOT)}")
    return path


def machine() -> dict[str, Any]:
    import torch

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "platform": platform.platform(),
    }
