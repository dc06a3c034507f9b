"""Run a training spec on this machine under ``torchrun`` (no Ray): what gpu_check and the parallelism tests
use.

The ranks run exactly what a Ray job runs (``python -m services.trainer.train SPEC_JSON``); only the
launcher differs. Returns the exit code and the combined log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from services.trainer.spec import TrainSpec


@dataclass
class LocalRun:
    returncode: int
    log: str


def run_local(
    spec: TrainSpec, nproc: int, *, timeout_s: float = 600.0, env: dict[str, str] | None = None
) -> LocalRun:
    if nproc != spec.world_size:
        raise ValueError(f"nproc {nproc} must equal the spec's world size TP x PP x DP = {spec.world_size}")
    from shared.net import free_port

    with tempfile.TemporaryDirectory(prefix="megastack-torchrun-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(spec.to_json())
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}",
            "-m",
            "services.trainer.train",
            str(spec_path),
        ]
        full_env = {**os.environ, "OMP_NUM_THREADS": str(max(1, int(spec.cpus_per_worker))), **(env or {})}
        try:
            r = subprocess.run(
                cmd,
                env=full_env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                cwd=Path(__file__).resolve().parents[2],
            )
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            return LocalRun(124, out + f"\n[torchrun timed out after {timeout_s:.0f}s]")
    return LocalRun(r.returncode, r.stdout + r.stderr)
